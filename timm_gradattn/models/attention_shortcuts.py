""" Attention Shortcuts: ResNet-50 layouts whose shortcuts read earlier block outputs through attention

Paper: `Introducing attention shortcuts in convolutional neural networks` - Erroz & Galar, AIMS Press, 2025

A ResNet block adds its input back; a DenseNet block concatenates every earlier output. Here every block
reads every earlier output through multi-head attention (Eq. 3.1-3.2): ``X_l = H_l(g(X_1..X_{l-1}))`` where
``g`` attends, at each pixel separately, from the newest output ``X_{l-1}`` (the query) over all stored
outputs (keys and values), i.e. along depth. Nothing mixes pixels. Keys and values are projected once,
when an output is new, and cached; a block only ever projects its newest output.

    * ``asnet50_out`` - AS_out-Net-50: no residual adds, every block outputs 128 channels (LayerNorm), one
      projection set shared by all blocks, the cache subsampled (1x1 pooling, stride 2) when a block strides
    * ``asnet50_kv`` - AS_KV-Net-50: no residual adds, outputs 64/128/256/512 wide per stage, one projection
      set per stage, the cache adapted by one 1x1 stride-2 convolution for keys and one for values per stage
      transition
    * ``as_resnet50_stages`` - AS_stages-ResNet-50: the CIFAR ResNet-50 kept whole; attention over the stem
      and stage outputs (each LayerNormed) gives the input of every stage
    * ``resnet50_cifar``, ``resnet50_cifar_050``, ``resnet50_cifar_plain`` - the paper's baselines: timm's
      ResNet-50 with the CIFAR stem (3x3 stride 1, no max-pool), at 0.5x width, and without any shortcut

The attention itself, its cache and the cache adapters are in ``depth_attention.py``.

The paper has no public code and leaves several choices open; the defaults are the readings of the spec
(LayerNorm per pixel over channels, no ReLU after it, no projection biases, the stem output as the first
memory element, h=4 heads, strides 1-2-2-2 on the 3x3 convs), each an option where cheap. No reading
reproduces the paper's Table 1 parameter counts for the AS nets (12.7 M and 16.2 M); ours are 12.37 M and
15.43 M. ResNet-50 matches (23.5 M).
"""
from functools import partial
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.layers import LayerNorm2d, create_classifier, get_act_layer, get_norm_layer, trunc_normal_
from timm.models import checkpoint, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models.resnet import Bottleneck, ResNet, make_blocks

from ._pretrained import build_with_weights_hint, dataset_cfgs
from .depth_attention import DepthAttention, KVConv, KVIdentity, KVPool

__all__ = ['CifarStemResNet', 'PlainBottleneck', 'AttentionShortcutNet', 'AttentionShortcutResNet', 'DepthAttention',
           'ShortcutFreeBottleneck']

ATTN_SETS = ('shared', 'stage', 'block')
KV_ADAPTS = ('pool', 'conv')
STEM_NORMS = ('ln', 'bn_relu_ln')
WIDTH_READINGS = ('all', 'inner')
FEATURE_REDUCTIONS = (1, 1, 2, 4, 8)  # stem, stages 1-4: a 3x3 stride-1 stem and stage strides 1, 2, 2, 2
LN_EPS = 1e-5  # nn.LayerNorm's, as the Transformers the paper follows; the paper gives none


def _layer_norm(num_channels: int) -> nn.Module:
    """LayerNorm over the channels of each pixel (B.2: one orientation-preserving norm per output vector)."""
    return LayerNorm2d(num_channels, eps=LN_EPS)


class PlainBottleneck(Bottleneck):
    """timm's Bottleneck without its shortcut: conv1x1-BN-ReLU-conv3x3-BN-ReLU-conv1x1-BN-ReLU, nothing added.

    ``make_blocks`` builds a projection shortcut for the first block of every stage; it is dropped here. So is
    drop-path, which on a block without a shortcut would zero the whole signal.
    """

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 **kwargs: Any):
        kwargs.pop('drop_path', None)
        super().__init__(inplanes, planes, stride, None, **kwargs)

    def zero_init_last(self) -> None:
        pass  # zeroing the last BN would cut the block's only path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.drop_block(self.bn2(self.conv2(x))))
        x = self.bn3(self.conv3(self.aa(x)))
        if self.se is not None:
            x = self.se(x)
        return self.act3(x)


class ShortcutFreeBottleneck(nn.Module):
    """An AS-Net block H_l: conv1x1-BN-ReLU-conv3x3(stride)-BN-ReLU-conv1x1-LN, with no residual add.

    The LayerNorm replaces the bottleneck's last BN, so the output X_l is the normalised vector per pixel that
    later attention reads. ``final_act`` adds a ReLU after it (the paper does not say; off by default).
    """

    def __init__(
            self,
            in_chs: int,
            planes: int,
            out_chs: int,
            stride: int = 1,
            final_act: bool = False,
            act_layer: type = nn.ReLU,
            norm_layer: type = nn.BatchNorm2d,
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, planes, 1, bias=False)
        self.bn1 = norm_layer(planes)
        self.act1 = act_layer(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = norm_layer(planes)
        self.act2 = act_layer(inplace=True)
        self.conv3 = nn.Conv2d(planes, out_chs, 1, bias=False)
        self.norm3 = _layer_norm(out_chs)
        self.act3 = act_layer(inplace=True) if final_act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        return self.act3(self.norm3(self.conv3(x)))


class Stem(nn.Module):
    """3x3 stride-1 convolution, then LayerNorm ('ln') or BN-ReLU-LayerNorm ('bn_relu_ln'): X_1 is normalised."""

    def __init__(
            self,
            in_chans: int,
            out_chs: int,
            stem_norm: str = 'ln',
            act_layer: type = nn.ReLU,
            norm_layer: type = nn.BatchNorm2d,
    ):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, out_chs, 3, stride=1, padding=1, bias=False)
        with_bn = stem_norm == 'bn_relu_ln'
        self.bn = norm_layer(out_chs) if with_bn else nn.Identity()
        self.act = act_layer(inplace=True) if with_bn else nn.Identity()
        self.norm = _layer_norm(out_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.act(self.bn(self.conv(x))))


def _check_attn_sets(attn_sets: str) -> None:
    if attn_sets not in ATTN_SETS:
        raise ValueError(f"attn_sets={attn_sets!r} is not one of {ATTN_SETS}: 'shared' is one projection set for "
                         f"the network, 'stage' one per stage, 'block' one per block.")


def _check_num_heads(num_heads: int, widths: Sequence[int]) -> None:
    for width in widths:
        if num_heads < 1 or width % num_heads:
            raise ValueError(f'num_heads={num_heads} does not divide the attention width {width} (widths '
                             f'{widths}); pass a num_heads that divides every width (the paper uses 4).')


def _init_attention_weights(model: nn.Module) -> None:
    # The paper gives no initialisation: Kaiming fan-out for convolutions as the ResNet baseline, the
    # transformer convention (truncated normal, std 0.02) for the attention projections.
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode='fan_out', nonlinearity='relu')
        elif isinstance(module, DepthAttention):
            trunc_normal_(module.qkv.weight, std=.02)
            trunc_normal_(module.proj.weight, std=.02)


class CifarStemResNet(ResNet):
    """timm's ResNet with the CIFAR stem of He et al.: a 3x3 stride-1 convolution and no max-pool.

    Stages run at 1, 1/2, 1/4 and 1/8 of the input size. ``stem_width`` other than 64 (the 0.5x baseline's 32)
    sizes the first stage to match; everything else is timm's ``ResNet`` and its arguments.
    """

    def __init__(
            self,
            block: type = Bottleneck,
            layers: Tuple[int, ...] = (3, 4, 6, 3),
            stem_width: int = 64,
            zero_init_last: bool = False,
            **kwargs: Any,
    ):
        """
        Args:
            block: Residual block (timm ``Bottleneck``, or ``PlainBottleneck`` for no shortcut).
            layers: Blocks per stage.
            stem_width: Output channels of the 3x3 stem (even).
            zero_init_last: Zero-init the last BN of each block (off: He et al. did not, nor does the paper).
            **kwargs: timm ``ResNet`` arguments (``channels``, ``base_width``, ``num_classes``, ``in_chans``...).
        """
        if kwargs.get('stem_type') or kwargs.get('output_stride', 32) != 32 or stem_width % 2:
            raise ValueError(
                f"CifarStemResNet builds its own 3x3 stem with an even stem_width (got {stem_width}) and output stride "
                f"8 (stages at 1/1-1/8); drop stem_type / output_stride, or use timm's resnet50 for ImageNet inputs.")
        # timm's constructor sizes the first stage for a 64-wide stem, or 2 x stem_width for a deep stem; the
        # deep stem (built only to size the stages) is replaced by the CIFAR stem below.
        super().__init__(block, layers, stem_type='deep', stem_width=stem_width // 2,
                         zero_init_last=zero_init_last, **kwargs)
        dd = dict(device=kwargs.get('device'), dtype=kwargs.get('dtype'))
        self.conv1 = nn.Conv2d(self.in_chans, stem_width, 3, stride=1, padding=1, bias=False, **dd)
        nn.init.kaiming_normal_(self.conv1.weight, mode='fan_out', nonlinearity='relu')
        self.maxpool = nn.Identity()
        self.feature_info = [dict(info, reduction=reduction)
                             for info, reduction in zip(self.feature_info, FEATURE_REDUCTIONS)]


class AttentionShortcutBase(nn.Module):
    """The timm surface of the attention-shortcut networks: head, features, intermediates, pruning, attention maps.

    A subclass builds ``stages``, ``feature_info``, ``num_features`` and then the head (``reset_classifier``), and
    writes ``_forward(x, take_indices, stop_index, weights)``: it runs the stem and the stages before ``stop_index``
    and returns the last output with the outputs at ``take_indices`` (0 = stem), appending every attention step's
    softmax weights (B, H, W, heads, n) to ``weights`` when a list is given; and ``_prune_stages(num_stages)``,
    which keeps the first ``num_stages`` stages and the attention that reads for them.
    """

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return set()

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> Union[str, nn.Module]:
        return 'fc' if name_only else self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(x, [], len(self.stages))[0]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    @torch.jit.ignore
    def attention_maps(self, x: torch.Tensor, reduce: bool = True) -> List[torch.Tensor]:
        """Depth-attention routing: for each attention step, the softmax weights over the outputs it reads.

        A step is a block in the AS-Nets and a stage in AS_stages. Entry t is for step t (0-based) and covers its
        n = t + 1 memory elements, oldest (the stem output) first. ``reduce=True``: (B, n), averaged over pixels
        and heads; ``reduce=False``: (B, heads, n, H, W).
        """
        weights: List[torch.Tensor] = []
        self._forward(x, [], len(self.stages), weights)
        return [w.mean(dim=(1, 2, 3)) if reduce else w.permute(0, 3, 4, 1, 2) for w in weights]

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Outputs of the stem (index 0) and of each stage: in the AS-Nets X_1 and each stage's last X_l, all
        LayerNormed; in AS_stages the stem and stage outputs as ResNet's, before the attention path's LayerNorm.

        Args:
            x: Input images.
            indices: Take the last n points if int, all if None, these indices if a sequence.
            norm: Unused, kept for the timm interface.
            stop_early: Stop after the last requested stage.
            output_fmt: Only 'NCHW'.
            intermediates_only: Return only the intermediates.
        """
        if output_fmt != 'NCHW':
            raise ValueError(f"output_fmt={output_fmt!r} is not supported; use 'NCHW'.")
        take_indices, max_index = feature_take_indices(len(self.stages) + 1, indices)
        stop_index = max_index if stop_early else len(self.stages)
        x, intermediates = self._forward(x, list(take_indices), stop_index)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the stages after the last requested point, with the attention feeding only them, and then the head,
        sized for the final output."""
        take_indices, max_index = feature_take_indices(len(self.stages) + 1, indices)
        if max_index < len(self.stages):
            self._prune_stages(max_index)
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
            prune_head = True
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices


class AttentionShortcutNet(AttentionShortcutBase):
    """AS-Net-50 (AS_out and AS_KV): shortcut-free bottlenecks, each reading all earlier outputs by attention.

    Forward: ``X_1 = stem(image)``; for every block l, ``g = attention(query X_{l-1}, keys and values of
    X_1..X_{l-1})`` and ``X_l = block(g)``; after a strided block the cached keys and values are subsampled
    (``kv_adapt='pool'``) or adapted by 1x1 stride-2 convolutions (``'conv'``); ``logits = fc(mean(X_L))``.
    ``forward_features`` returns X_L (B, widths[-1], H/8, W/8).

    Which projection set reads after block l (``attn_sets``): 'shared' one for all; 'stage' the set of the stage
    whose output is the query, so the first block of a stage still reads with the previous stage's set (it is
    the one whose width the query has); 'block' one per attention step.
    """

    def __init__(
            self,
            layers: Tuple[int, ...] = (3, 4, 6, 3),
            planes: Tuple[int, ...] = (64, 128, 256, 512),
            widths: Tuple[int, ...] = (128, 128, 128, 128),
            kv_adapt: str = 'pool',
            attn_sets: str = 'shared',
            num_heads: int = 4,
            final_act: bool = False,
            stem_norm: str = 'ln',
            num_classes: int = 1000,
            in_chans: int = 3,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            act_layer: Union[str, type] = nn.ReLU,
            norm_layer: Union[str, type] = nn.BatchNorm2d,
    ):
        """
        Args:
            layers: Blocks per stage.
            planes: Inner (bottleneck) width of each stage's blocks.
            widths: Output width of each stage's blocks; the stem outputs ``widths[0]``.
            kv_adapt: How the cache follows a strided block: 'pool' (subsample, AS_out) or 'conv' (AS_KV).
            attn_sets: Projection sets: 'shared', 'stage' or 'block'.
            num_heads: Attention heads; must divide every width.
            final_act: ReLU after each block's LayerNorm.
            stem_norm: 'ln' (conv-LN) or 'bn_relu_ln' (conv-BN-ReLU-LN).
            num_classes: Classifier outputs; 0 for a model that returns pooled features.
            in_chans: Input image channels.
            global_pool: timm global pool type; '' keeps the final map.
            drop_rate: Dropout before the classifier.
            act_layer: Activation of the blocks.
            norm_layer: Normalisation after the first two convolutions of each block.
        """
        super().__init__()
        _check_attn_sets(attn_sets)
        if kv_adapt not in KV_ADAPTS:
            raise ValueError(f"kv_adapt={kv_adapt!r} is not one of {KV_ADAPTS}: 'pool' subsamples the cache (AS_out), "
                             f"'conv' adapts it with 1x1 stride-2 convolutions (AS_KV).")
        if stem_norm not in STEM_NORMS:
            raise ValueError(f'stem_norm={stem_norm!r} is not one of {STEM_NORMS}.')
        if not len(layers) == len(planes) == len(widths):
            raise ValueError(f'layers, planes and widths need one entry per stage; got {layers}, {planes}, {widths}.')
        if len(set(widths)) > 1 and (attn_sets == 'shared' or kv_adapt == 'pool'):
            raise ValueError(
                f"attn_sets={attn_sets!r} with kv_adapt={kv_adapt!r} needs one output width for every stage, but "
                f"widths={widths}; use attn_sets='stage' or 'block' with kv_adapt='conv' (the AS_KV reading).")
        _check_num_heads(num_heads, widths)
        act_layer = get_act_layer(act_layer)
        norm_layer = get_norm_layer(norm_layer)

        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.num_heads = num_heads
        self.grad_checkpointing = False

        self.stem = Stem(in_chans, widths[0], stem_norm, act_layer=act_layer, norm_layer=norm_layer)
        self.feature_info = [dict(num_chs=widths[0], reduction=1, module='stem')]
        stages, kv_adapters = [], []
        in_chs, reduction = widths[0], 1
        for stage_idx, (num_blocks, stage_planes, width) in enumerate(zip(layers, planes, widths)):
            stride = 1 if stage_idx == 0 else 2
            reduction *= stride
            stages.append(nn.Sequential(*[
                ShortcutFreeBottleneck(
                    in_chs if i == 0 else width, stage_planes, width, stride if i == 0 else 1,
                    final_act=final_act, act_layer=act_layer, norm_layer=norm_layer,
                ) for i in range(num_blocks)
            ]))
            if stride == 1 and in_chs == width:
                kv_adapters.append(KVIdentity())
            elif kv_adapt == 'pool':
                kv_adapters.append(KVPool())
            else:
                kv_adapters.append(KVConv(in_chs, width, stride, num_heads))
            self.feature_info.append(dict(num_chs=width, reduction=reduction, module=f'stages.{stage_idx}'))
            in_chs = width
        self.stages = nn.Sequential(*stages)
        self.kv_adapters = nn.ModuleList(kv_adapters)

        # Attention step t reads for block t, with the newest output (the stem's for t = 0) as the query.
        query_stage = [0] + [stage_idx for stage_idx, n in enumerate(layers) for _ in range(n)][:-1]
        if attn_sets == 'shared':
            self.set_index = [0] * len(query_stage)
            set_widths = [widths[0]]
        elif attn_sets == 'stage':
            self.set_index = query_stage
            set_widths = list(widths)
        else:
            self.set_index = list(range(len(query_stage)))
            set_widths = [widths[stage_idx] for stage_idx in query_stage]
        self.attn_sets = nn.ModuleList([DepthAttention(width, num_heads) for width in set_widths])

        self.num_features = widths[-1]
        self.reset_classifier(num_classes, global_pool)
        self.init_weights()

    @torch.jit.ignore
    def init_weights(self) -> None:
        _init_attention_weights(self)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        # The attention sets serve every depth (all of them when shared): one group right after the stem.
        return dict(
            stem=r'^stem',
            attn=r'^attn_sets',
            blocks=r'^(?:stages|kv_adapters)\.(\d+)' if coarse else [
                (r'^stages\.(\d+)\.(\d+)', None),
                (r'^kv_adapters\.(\d+)', (0,)),  # with the stage's first block, whose stride it follows
            ],
        )

    def _attend(
            self,
            step: int,
            x: torch.Tensor,
            keys: List[torch.Tensor],
            values: List[torch.Tensor],
            weights: Optional[List[torch.Tensor]] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Attention step ``step`` with the set it uses: (g, key, value) of the newest output ``x``."""
        set_idx = self.set_index[step]
        out = (x, x, x)
        # A loop, not self.attn_sets[set_idx]: TorchScript cannot index a ModuleList with a computed index.
        for idx, attn in enumerate(self.attn_sets):
            if idx == set_idx:
                if weights is not None:
                    weights.append(attn.weights(x, keys))
                out = attn(x, keys, values)
        return out

    def _attend_and_run(
            self,
            step: int,
            block: nn.Module,
            x: torch.Tensor,
            keys: Tuple[torch.Tensor, ...],
            values: Tuple[torch.Tensor, ...],
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        g, key, value = self._attend(step, x, list(keys), list(values))
        return block(g), key, value

    def _forward(
            self,
            x: torch.Tensor,
            take_indices: List[int],
            stop_index: int,
            weights: Optional[List[torch.Tensor]] = None,
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Run stem and stages up to ``stop_index``: (last output, outputs at ``take_indices``, 0 = stem)."""
        if weights is not None and self.grad_checkpointing:  # checkpointed steps hand out no weights
            raise RuntimeError('attention_maps reads the forward pass; call set_grad_checkpointing(False) first.')
        x = self.stem(x)
        intermediates: List[torch.Tensor] = []
        if 0 in take_indices:
            intermediates.append(x)
        keys: List[torch.Tensor] = []
        values: List[torch.Tensor] = []
        step = 0
        for stage_idx, (stage, kv_adapt) in enumerate(zip(self.stages, self.kv_adapters)):
            if stage_idx < stop_index:  # not `break`: TorchScript unrolls this loop and allows none
                for block_idx, block in enumerate(stage):
                    if self.grad_checkpointing and not torch.jit.is_scripting():
                        # The cache goes in as tuples: the lists grow after this call, before any recomputation.
                        x, key, value = checkpoint(
                            partial(self._attend_and_run, step, block), x, tuple(keys), tuple(values),
                            use_reentrant=False)  # only non-reentrant checkpointing reaches tensors in tuples
                    else:
                        g, key, value = self._attend(step, x, keys, values, weights)
                        x = block(g)
                    keys.append(key)
                    values.append(value)
                    if block_idx == 0:
                        keys, values = kv_adapt(keys, values)
                    step += 1
                if stage_idx + 1 in take_indices:
                    intermediates.append(x)
        return x, intermediates

    def _prune_stages(self, num_stages: int) -> None:
        self.stages = self.stages[:num_stages]
        self.kv_adapters = self.kv_adapters[:num_stages]
        num_steps = sum(len(stage) for stage in self.stages)
        self.set_index = self.set_index[:num_steps]
        self.attn_sets = self.attn_sets[:max(self.set_index) + 1] if num_steps else nn.ModuleList()


class AttentionShortcutResNet(AttentionShortcutBase):
    """AS_stages-ResNet-50: the CIFAR ResNet-50 kept whole, each stage fed by attention over earlier stages.

    Memory elements are the stem output X_1 (64 ch) and the outputs of stages 1-3 (256, 512, 1024 ch). The input
    of stage l is ``g(LN(X_1)..LN(X_{l-1}))`` in place of X_{l-1}, with no residual around g (Eq. 3.1), one
    projection set per query width, and the cached keys and values adapted by 1x1 convolutions at each width
    change (64->256 stride 1, then 256->512 and 512->1024 stride 2). Stage 4's output goes to the head
    unchanged. Blocks are timm's ``Bottleneck`` with their BN and residuals; LayerNorm is only on the
    attention path. The paper names neither the downsampling nor whether stage 1 attends (B.6): these are the
    spec's readings.
    """

    def __init__(
            self,
            layers: Tuple[int, ...] = (3, 4, 6, 3),
            channels: Tuple[int, ...] = (64, 128, 256, 512),
            stem_width: int = 64,
            num_heads: int = 4,
            attn_sets: str = 'stage',
            num_classes: int = 1000,
            in_chans: int = 3,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            zero_init_last: bool = False,
            act_layer: Union[str, type] = nn.ReLU,
            norm_layer: Union[str, type] = nn.BatchNorm2d,
            block_args: Optional[Dict[str, Any]] = None,
    ):
        """
        Args:
            layers: Bottlenecks per stage.
            channels: Bottleneck planes per stage (outputs are 4x).
            stem_width: Output channels of the 3x3 stride-1 stem.
            num_heads: Attention heads; must divide every memory width (64, 256, 512, 1024).
            attn_sets: 'stage' (one set per stage; 'block' means the same here, each stage being one
                attention block). 'shared' is refused: the query widths differ.
            num_classes: Classifier outputs; 0 for a model that returns pooled features.
            in_chans: Input image channels.
            global_pool: timm global pool type; '' keeps the final map.
            drop_rate: Dropout before the classifier.
            drop_path_rate: Stochastic depth in the residual blocks.
            zero_init_last: Zero-init the last BN of each residual block.
            act_layer: Activation.
            norm_layer: Normalisation of the ResNet backbone.
            block_args: Extra arguments of timm's ``Bottleneck``.
        """
        super().__init__()
        _check_attn_sets(attn_sets)
        if attn_sets == 'shared':
            raise ValueError("attn_sets='shared' needs one width for every query, but AS_stages queries are 64, 256, "
                             "512 and 1024 wide; use attn_sets='stage'.")
        act_layer = get_act_layer(act_layer)
        norm_layer = get_norm_layer(norm_layer)
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.grad_checkpointing = False

        self.conv1 = nn.Conv2d(in_chans, stem_width, 3, stride=1, padding=1, bias=False)
        self.bn1 = norm_layer(stem_width)
        self.act1 = act_layer(inplace=True)
        stage_modules, stage_info = make_blocks(
            (Bottleneck,) * len(channels), channels, layers, stem_width, drop_path_rate=drop_path_rate,
            act_layer=act_layer, norm_layer=norm_layer, **(block_args or {}))
        self.stages = nn.Sequential(*[stage for _, stage in stage_modules])
        self.feature_info = [dict(num_chs=stem_width, reduction=1, module='act1')] + [
            dict(num_chs=info['num_chs'], reduction=reduction, module=f'stages.{i}')
            for i, (info, reduction) in enumerate(zip(stage_info, FEATURE_REDUCTIONS[1:]))]

        memory_widths = [info['num_chs'] for info in self.feature_info[:-1]]
        _check_num_heads(num_heads, memory_widths)
        self.memory_norms = nn.ModuleList([_layer_norm(width) for width in memory_widths])
        self.attn_sets = nn.ModuleList([DepthAttention(width, num_heads) for width in memory_widths])
        # Before stage s > 0, the cache follows stage s - 1's output to stage s's query width and resolution.
        stage_strides = [1] + [2] * (len(channels) - 1)
        self.kv_adapters = nn.ModuleList([KVIdentity()] + [
            KVConv(memory_widths[s - 1], memory_widths[s], stage_strides[s - 1], num_heads)
            for s in range(1, len(memory_widths))])

        self.num_features = self.feature_info[-1]['num_chs']
        self.reset_classifier(num_classes, global_pool)
        self.init_weights(zero_init_last=zero_init_last)

    @torch.jit.ignore
    def init_weights(self, zero_init_last: bool = False) -> None:
        _init_attention_weights(self)
        if zero_init_last:
            for module in self.modules():
                if hasattr(module, 'zero_init_last'):
                    module.zero_init_last()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        attention = r'^(?:memory_norms|attn_sets|kv_adapters)\.(\d+)'  # what feeds stage N
        return dict(
            stem=r'^conv1|^bn1',
            blocks=[(r'^stages\.(\d+)', None), (attention, None)] if coarse else [
                (r'^stages\.(\d+)\.(\d+)', None),
                (attention, (-1,)),  # its own group, just before the stage's first block
            ],
        )

    def _forward(
            self,
            x: torch.Tensor,
            take_indices: List[int],
            stop_index: int,
            weights: Optional[List[torch.Tensor]] = None,
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Run stem and stages up to ``stop_index``: (last output, outputs at ``take_indices``, 0 = stem)."""
        x = self.act1(self.bn1(self.conv1(x)))
        intermediates: List[torch.Tensor] = []
        if 0 in take_indices:
            intermediates.append(x)
        keys: List[torch.Tensor] = []
        values: List[torch.Tensor] = []
        zipped = zip(self.stages, self.memory_norms, self.attn_sets, self.kv_adapters)
        for stage_idx, (stage, memory_norm, attn, kv_adapt) in enumerate(zipped):
            if stage_idx < stop_index:  # not `break`: TorchScript unrolls this loop and allows none
                keys, values = kv_adapt(keys, values)
                x = memory_norm(x)
                if weights is not None:
                    weights.append(attn.weights(x, keys))
                x, key, value = attn(x, keys, values)
                keys.append(key)
                values.append(value)
                if self.grad_checkpointing and not torch.jit.is_scripting():
                    x = checkpoint_seq(stage, x)  # per block; the cache stays outside
                else:
                    x = stage(x)
                if stage_idx + 1 in take_indices:
                    intermediates.append(x)
        return x, intermediates

    def _prune_stages(self, num_stages: int) -> None:
        self.stages = self.stages[:num_stages]
        self.memory_norms = self.memory_norms[:num_stages]
        self.attn_sets = self.attn_sets[:num_stages]
        self.kv_adapters = self.kv_adapters[:num_stages]


def _create_cifar_resnet(variant: str, pretrained: bool = False, **kwargs: Any) -> CifarStemResNet:
    return build_with_weights_hint(CifarStemResNet, variant, pretrained, **kwargs)


def _create_asnet(variant: str, pretrained: bool = False, **kwargs: Any) -> AttentionShortcutNet:
    # The attention reads a cache across blocks, so timm's module-walking feature wrapper cannot run the net;
    # features_only uses forward_intermediates.
    return build_with_weights_hint(
        AttentionShortcutNet, variant, pretrained,
        feature_cfg=dict(feature_cls='getter', out_indices=(0, 1, 2, 3, 4)), **kwargs)


def _create_as_resnet(variant: str, pretrained: bool = False, **kwargs: Any) -> AttentionShortcutResNet:
    return build_with_weights_hint(
        AttentionShortcutResNet, variant, pretrained,
        feature_cfg=dict(feature_cls='getter', out_indices=(0, 1, 2, 3, 4)), **kwargs)


def _cfg(model_name: str, **kwargs: Any) -> Dict[str, Dict[str, Any]]:
    """The model's pretrained cfgs, one per tag; pool_size is the final map at the tag's input size."""
    return dataset_cfgs(model_name, reduction=FEATURE_REDUCTIONS[-1], classifier='fc', fixed_input_size=False,
                        **kwargs)


default_cfgs = generate_default_cfgs({
    **_cfg('asnet50_out', first_conv='stem.conv'),
    **_cfg('asnet50_kv', first_conv='stem.conv'),
    **_cfg('as_resnet50_stages', first_conv='conv1'),
    **_cfg('resnet50_cifar', first_conv='conv1'),
    **_cfg('resnet50_cifar_050', first_conv='conv1'),
    **_cfg('resnet50_cifar_plain', first_conv='conv1'),
})


@register_model
def asnet50_out(pretrained: bool = False, **kwargs: Any) -> AttentionShortcutNet:
    """AS_out-Net-50: a shortcut-free ResNet-50 whose blocks all output 128 channels and read every earlier output
    through one shared 4-head depth attention; the cache is subsampled when a block strides."""
    model_args = dict(
        layers=(3, 4, 6, 3), planes=(64, 128, 256, 512), widths=(128, 128, 128, 128), kv_adapt='pool',
        attn_sets='shared')
    return _create_asnet('asnet50_out', pretrained, **dict(model_args, **kwargs))


@register_model
def asnet50_kv(pretrained: bool = False, **kwargs: Any) -> AttentionShortcutNet:
    """AS_KV-Net-50: a shortcut-free ResNet-50 with outputs a quarter as wide (64-512), one 4-head depth attention
    per stage, and the cache adapted by 1x1 stride-2 convolutions at each stage transition."""
    model_args = dict(
        layers=(3, 4, 6, 3), planes=(64, 128, 256, 512), widths=(64, 128, 256, 512), kv_adapt='conv',
        attn_sets='stage')
    return _create_asnet('asnet50_kv', pretrained, **dict(model_args, **kwargs))


@register_model
def as_resnet50_stages(pretrained: bool = False, **kwargs: Any) -> AttentionShortcutResNet:
    """AS_stages-ResNet-50: the CIFAR ResNet-50 with its residuals, each stage's input given by 4-head depth
    attention over the stem and earlier stage outputs."""
    model_args = dict(layers=(3, 4, 6, 3), channels=(64, 128, 256, 512), attn_sets='stage')
    return _create_as_resnet('as_resnet50_stages', pretrained, **dict(model_args, **kwargs))


@register_model
def resnet50_cifar(pretrained: bool = False, **kwargs: Any) -> CifarStemResNet:
    """ResNet-50 for 32 px images: timm's ResNet-50 with a 3x3 stride-1 stem and no max-pool."""
    model_args = dict(block=Bottleneck, layers=(3, 4, 6, 3))
    return _create_cifar_resnet('resnet50_cifar', pretrained, **dict(model_args, **kwargs))


@register_model
def resnet50_cifar_050(pretrained: bool = False, width_reading: str = 'all', **kwargs: Any) -> CifarStemResNet:
    """ResNet-50 for 32 px images at 0.5x width: stem, bottleneck and output widths all halved.

    ``width_reading='inner'`` halves only the bottleneck's inner width (timm ``base_width=32``), keeping the
    256-2048 outputs: the paper's "0.5x" allows both (10.35 M parameters against 5.90 M).
    """
    if width_reading not in WIDTH_READINGS:
        raise ValueError(f"width_reading={width_reading!r} is not one of {WIDTH_READINGS}: 'all' halves every width, "
                         f"'inner' only the bottleneck's inner width.")
    model_args = dict(block=Bottleneck, layers=(3, 4, 6, 3))
    if width_reading == 'all':
        model_args.update(stem_width=32, channels=(32, 64, 128, 256))
    else:
        model_args.update(base_width=32)
    return _create_cifar_resnet('resnet50_cifar_050', pretrained, **dict(model_args, **kwargs))


@register_model
def resnet50_cifar_plain(pretrained: bool = False, **kwargs: Any) -> CifarStemResNet:
    """Plain ResNet-50 for 32 px images: the CIFAR ResNet-50 without any shortcut, identity or projection."""
    model_args = dict(block=PlainBottleneck, layers=(3, 4, 6, 3))
    return _create_cifar_resnet('resnet50_cifar_plain', pretrained, **dict(model_args, **kwargs))
