""" CNNtention: a CIFAR ResNet-20 with self-attention, multi-head attention or CBAM after each stage

Paper: `CNNtention: Can CNNs do better with Attention?` - Kapila, Glattki & Rathi, 2024
    - https://arxiv.org/abs/2412.11657

The backbone is He et al.'s CIFAR ResNet-20 (`Deep Residual Learning for Image Recognition`, Sec. 4.2,
https://arxiv.org/abs/1512.03385): a 3x3 stem without max-pool, three stages of three basic blocks
(16, 32, 64 channels; strides 1, 2, 2) and parameter-free option-A shortcuts. timm's ``ResNet`` cannot
express that stem or those shortcuts, so the model class is written here; its blocks are timm's own
``BasicBlock`` with the option-A shortcut as their ``downsample``.

One attention module follows each stage, with a residual around it:
    * ``resnet20`` - no attention, the baseline
    * ``resnet20_selfatt`` - single-head self-attention over the positions at full channel width,
      scores not scaled: ``y = gamma * SDPA(query(x), key(x), value(x), scale=1) + x``
    * ``resnet20_mha`` - 8-head self-attention with a 1x1 output projection, scale 1/sqrt(head dim):
      ``y = gamma * proj(SDPA(...)) + x``
    * ``resnet20_cbam`` - CNNtention's CBAM (max-then-mean spatial input, 7x7 conv with bias and no norm,
      bias-free MLP, r=16) with an outer residual: ``y = cbam(x) + x``

``gamma`` is a learnable scalar initialised to 0, so the self-attention models start as ``resnet20``
exactly; ``attn_gamma=False`` builds the authors' unweighted ablation ``y = O + x``. Parameter counts
match the authors' reference code (AttentionSeekers/CNNtention) exactly. Not the GradAttn family's CBAM
ResNet-18 baseline, which puts timm's ``CbamModule`` inside every block of a ResNet-18.
"""
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.layers import Mlp, create_classifier, use_fused_attn
from timm.models import checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models.resnet import BasicBlock

from ._pretrained import build_with_weights_hint, dataset_cfgs

__all__ = ['CifarResNet', 'OptionAShortcut', 'SpatialSelfAttention', 'ResidualCbam']

ATTN_TYPES = ('none', 'selfatt', 'mha', 'cbam')
DEFAULT_NUM_HEADS = {'selfatt': 1, 'mha': 8}


class OptionAShortcut(nn.Module):
    """He et al.'s parameter-free shortcut: subsample by the stride, zero-pad the new channels.

    The padding is split evenly before and after the input channels (16 -> 32 puts 8 zero channels on
    each side), as the CIFAR ResNet reference implementations do.
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1):
        super().__init__()
        self.stride = stride
        self.pad_before = (out_chs - in_chs) // 2
        self.pad_after = out_chs - in_chs - self.pad_before

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_before, self.pad_after))


class SpatialSelfAttention(nn.Module):
    """Self-attention over the H*W positions of a feature map, 1x1-conv projections, residual around it.

    Head k reads channels ``[k*C/heads, (k+1)*C/heads)`` of each projection. CNNtention's SelfAtt is one
    head, ``scale=1`` and no output projection; its MHA is 8 heads, ``scale=None`` (1/sqrt(head dim)) and
    a 1x1 output projection. The output is ``gamma * O + x`` (gamma a learnable scalar, 0 at init) or,
    with ``gamma=False``, ``O + x``.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int = 1,
            scale: Optional[float] = 1.0,
            proj: bool = False,
            gamma: bool = True,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'num_heads={num_heads} does not divide the width {dim}; use a divisor of {dim}.')
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5 if scale is None else float(scale)
        self.fused_attn = use_fused_attn()
        # Named for their role. The authors' MHA takes its queries from the conv it names `key` and its
        # keys from the one it names `query` (their SelfAtt does not): a filter loading their MHA
        # weights swaps the two.
        self.query = nn.Conv2d(dim, dim, 1)
        self.key = nn.Conv2d(dim, dim, 1)
        self.value = nn.Conv2d(dim, dim, 1)
        self.proj = nn.Conv2d(dim, dim, 1) if proj else nn.Identity()
        self.gamma = nn.Parameter(torch.zeros(1)) if gamma else None

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, heads, H*W, head_dim), contiguous.

        Contiguous because torch's CPU flash kernel needs unit stride along the head dimension; given the
        strided view, SDPA falls back to the math path, which materialises the (B, heads, N, N) scores (1 GB
        per stage-1 module at batch 32 for MHA) and took 6x as long per training step.
        """
        B, C, H, W = x.shape
        return x.reshape(B, self.num_heads, self.head_dim, H * W).transpose(-1, -2).contiguous()

    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        """Attention probabilities (B, heads, N, N) for input ``x``, N = H*W; rows are query positions."""
        q, k = self._heads(self.query(x)), self._heads(self.key(x))
        return ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        v = self._heads(self.value(x))
        if self.fused_attn:
            q, k = self._heads(self.query(x)), self._heads(self.key(x))
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        else:
            out = self.attention_map(x) @ v
        out = self.proj(out.transpose(-1, -2).reshape(B, C, H, W))
        if self.gamma is not None:
            out = self.gamma * out
        # x first: the sum takes x's memory layout (the single-head output is a channels-last view), so
        # with gamma = 0 the next stage sees exactly the tensor resnet20 would.
        return x + out


class ResidualCbam(nn.Module):
    """CBAM (Woo et al. 2018) as CNNtention builds it, with a residual around the whole module.

    Channel gate: a bias-free Linear MLP (hidden width C // reduction) on the global max- and
    mean-pooled vectors, summed, sigmoid. Spatial gate: channel max and mean (in that order) -> 7x7 conv
    with bias, no norm -> sigmoid. Differs from timm's ``CbamModule`` (mean-then-max, conv + BN, 1x1-conv
    MLP, no outer residual).
    """

    def __init__(self, dim: int, reduction: int = 16, spatial_kernel_size: int = 7):
        super().__init__()
        hidden = dim // reduction
        if hidden < 1:
            raise ValueError(
                f'reduction={reduction} leaves CBAM on {dim} channels no hidden unit; use reduction <= {dim}.')
        self.mlp = Mlp(dim, hidden, act_layer=nn.ReLU, bias=False)
        self.spatial = nn.Conv2d(2, 1, spatial_kernel_size, padding=spatial_kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channel_gate = (self.mlp(x.amax(dim=(2, 3))) + self.mlp(x.mean(dim=(2, 3)))).sigmoid()
        gated = x * channel_gate[:, :, None, None]
        spatial_in = torch.cat([gated.amax(dim=1, keepdim=True), gated.mean(dim=1, keepdim=True)], dim=1)
        return gated * self.spatial(spatial_in).sigmoid() + x


def _init_weights(parts: List[nn.Module]) -> None:
    """The authors' init: Kaiming-normal (fan_out) on every conv and linear weight, the classifier and the
    attention projections included; biases keep PyTorch's default; BN weight 1, bias 0."""
    for module in (m for part in parts for m in part.modules()):
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(module.weight, mode='fan_out', nonlinearity='relu')
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class CifarResNet(nn.Module):
    """CIFAR ResNet (3x3 stem, no max-pool, option-A shortcuts) with an optional attention module after
    each stage, CNNtention's models.

    Module names follow timm's ``ResNet`` (``conv1``, ``bn1``, ``layer1``..``layer3``, ``fc``); the
    attention modules are ``attn1``..``attn3`` (``nn.Identity`` without attention), so a ``resnet20``
    state dict loads into every attention variant with only the ``attn*`` keys missing. Features
    (``features_only``, ``forward_intermediates``) are the three stage outputs after their attention
    module, what the next stage reads, at reductions 1, 2, 4. The stem is not a feature point: at
    reduction 1 and 16 channels it has the shape of stage 1's output and no attention reads it.
    """

    def __init__(
            self,
            layers: Tuple[int, ...] = (3, 3, 3),
            channels: Tuple[int, ...] = (16, 32, 64),
            num_classes: int = 10,
            in_chans: int = 3,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            attn_type: str = 'none',
            num_heads: Optional[int] = None,
            reduction: int = 16,
            attn_gamma: bool = True,
    ):
        """
        Args:
            layers: Basic blocks per stage (3 each for ResNet-20; 5 for ResNet-32, 9 for ResNet-56).
            channels: Width of each of the three stages.
            num_classes: Classifier outputs; 0 for a model that returns pooled features.
            in_chans: Input image channels.
            global_pool: timm global pool type ('avg', 'max', ... or '' for none).
            drop_rate: Dropout before the classifier.
            attn_type: Module after each stage: 'none', 'selfatt', 'mha' or 'cbam'.
            num_heads: Heads of 'selfatt' (default 1) or 'mha' (default 8); must divide every stage width.
            reduction: CBAM channel-MLP reduction ratio (hidden width = width // reduction).
            attn_gamma: Weight the self-attention output by a learnable scalar gamma (0 at init);
                False gives the unweighted ablation y = O + x.
        """
        super().__init__()
        if attn_type not in ATTN_TYPES:
            raise ValueError(f'attn_type={attn_type!r} is not one of {ATTN_TYPES}.')
        if len(layers) != 3 or len(channels) != 3:
            raise ValueError(f'layers={layers} and channels={channels} must each give three stages.')
        if attn_type in DEFAULT_NUM_HEADS:
            num_heads = DEFAULT_NUM_HEADS[attn_type] if num_heads is None else num_heads
            bad = [width for width in channels if num_heads < 1 or width % num_heads]
            if bad:
                raise ValueError(
                    f'num_heads={num_heads} does not divide the stage widths {bad} of {tuple(channels)}; '
                    f'use a num_heads that divides every width, e.g. 8, 4, 2 or 1.')
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.attn_type = attn_type
        self.grad_checkpointing = False
        self.num_features = self.head_hidden_size = channels[-1]

        self.conv1 = nn.Conv2d(in_chans, channels[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels[0])
        self.act1 = nn.ReLU(inplace=True)

        self.feature_info = []
        stages = []
        in_chs, net_stride = channels[0], 1
        for stage_idx, (num_blocks, out_chs) in enumerate(zip(layers, channels)):
            stride = 1 if stage_idx == 0 else 2
            net_stride *= stride
            blocks = []
            for block_idx in range(num_blocks):
                block_stride = stride if block_idx == 0 else 1
                shortcut = None
                if block_stride != 1 or in_chs != out_chs:
                    shortcut = OptionAShortcut(in_chs, out_chs, block_stride)
                blocks.append(BasicBlock(in_chs, out_chs, block_stride, downsample=shortcut))
                in_chs = out_chs
            stages.append(nn.Sequential(*blocks))
            module = f'attn{stage_idx + 1}' if attn_type != 'none' else f'layer{stage_idx + 1}'
            self.feature_info.append(dict(num_chs=out_chs, reduction=net_stride, module=module))
        global_pool, fc = create_classifier(self.num_features, num_classes, pool_type=global_pool)
        _init_weights([self.conv1, self.bn1, *stages, fc])

        # The attention modules are made and initialised after the whole backbone and classifier, so at any seed
        # the backbone and classifier start exactly as resnet20's do at that seed: comparing the four models at
        # one seed compares the modules, not the draw of the backbone.
        attns = [self._make_attn(out_chs, num_heads, reduction, attn_gamma) for out_chs in channels]
        _init_weights(attns)
        # Registered in forward order (layer1, attn1, layer2, ...) so timm's FeatureListNet can walk them.
        for stage_idx, (stage, attn) in enumerate(zip(stages, attns)):
            self.add_module(f'layer{stage_idx + 1}', stage)
            self.add_module(f'attn{stage_idx + 1}', attn)
        self.global_pool, self.fc = global_pool, fc

    def _make_attn(self, dim: int, num_heads: Optional[int], reduction: int, gamma: bool) -> nn.Module:
        if self.attn_type == 'selfatt':
            return SpatialSelfAttention(dim, num_heads or 1, scale=1.0, proj=False, gamma=gamma)
        if self.attn_type == 'mha':
            return SpatialSelfAttention(dim, num_heads or 1, scale=None, proj=True, gamma=gamma)
        if self.attn_type == 'cbam':
            return ResidualCbam(dim, reduction)
        return nn.Identity()

    @torch.jit.ignore
    def init_weights(self) -> None:
        # The backbone and classifier draw first, in resnet20's order, then the attention modules.
        children = list(self.named_children())
        _init_weights([m for n, m in children if not n.startswith('attn')])
        _init_weights([m for n, m in children if n.startswith('attn')])

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        # Nothing beyond timm's default: the gammas are 1-D, so create_optimizer_v2 already exempts them
        # with biases and norms; the authors' recipe decays everything (filter_bias_and_bn=False).
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r'^conv1|^bn1',
            blocks=r'^(?:layer|attn)(\d+)' if coarse else [
                (r'^layer(\d+)\.(\d+)', None), (r'^attn(\d+)', (99999,))],
        )

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

    @torch.jit.ignore
    def _stages(self) -> List[Tuple[nn.Module, nn.Module]]:
        return [(self.layer1, self.attn1), (self.layer2, self.attn2), (self.layer3, self.attn3)]

    @torch.jit.ignore
    def _checkpoint_units(self) -> List[nn.Module]:
        # One checkpoint per block and per attention module, as timm's ResNet checkpoints per block.
        return [module for layer, attn in self._stages() for module in (*layer, attn)]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self._checkpoint_units(), x)
        else:
            x = self.attn1(self.layer1(x))
            x = self.attn2(self.layer2(x))
            x = self.attn3(self.layer3(x))
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    @torch.jit.ignore
    def attention_maps(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Attention probabilities after each stage, each (B, heads, N, N), N = H*W of that stage's map.

        Rows are query positions, softmax over key positions. Computed explicitly (the fused kernel does
        not expose the weights), so memory grows as N^2: about 4 MB per head and image at 32 px, stage 1.
        Only for ``attn_type`` 'selfatt' and 'mha'.
        """
        if self.attn_type not in DEFAULT_NUM_HEADS:
            raise ValueError(
                f"attention_maps needs dot-product attention (attn_type 'selfatt' or 'mha'); this model's "
                f'attn_type is {self.attn_type!r}.')
        x = self.act1(self.bn1(self.conv1(x)))
        maps = []
        for layer, attn in self._stages():
            x = layer(x)
            maps.append(attn.attention_map(x))
            x = attn(x)
        return maps

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """The three stage outputs (after each stage's attention module), and optionally the final features.

        Args:
            x: Input images.
            indices: Take the last n stages if int, all if None, these indices if a sequence.
            norm: Unused (no separate norm), kept for the timm interface.
            stop_early: Stop after the last requested stage.
            output_fmt: Only 'NCHW'.
            intermediates_only: Return only the stage outputs.
        """
        if output_fmt != 'NCHW':
            raise ValueError(f"output_fmt={output_fmt!r} is not supported; CNNtention intermediates are 'NCHW'.")
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        x = self.act1(self.bn1(self.conv1(x)))
        stages = self._stages()
        intermediates = []
        for stage_idx, (layer, attn) in enumerate(stages[:max_index + 1] if stop_early else stages):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint_seq([*layer, attn], x)
            else:
                x = attn(layer(x))
            if stage_idx in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the stages (and their attention) after the last requested one; the head too if any went."""
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        for stage_idx in range(max_index + 1, len(self.feature_info)):
            setattr(self, f'layer{stage_idx + 1}', nn.Sequential())  # empty: checkpoint_seq can still iterate it
            setattr(self, f'attn{stage_idx + 1}', nn.Identity())
        if max_index < len(self.feature_info) - 1:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
            prune_head = True
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices


def _create_cnntention(variant: str, pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    return build_with_weights_hint(
        CifarResNet, variant, pretrained, feature_cfg=dict(out_indices=(0, 1, 2)), **kwargs)


def _cfg(**kwargs: Any) -> Dict[str, Any]:
    # reduction: stages 2 and 3 each halve the map, so pool_size is (8, 8) at 32 px and (7, 7) at 28 px.
    return dict(first_conv='conv1', classifier='fc', reduction=4, **kwargs)


default_cfgs = generate_default_cfgs({
    **dataset_cfgs('resnet20', **_cfg()),
    **dataset_cfgs('resnet20_selfatt', **_cfg()),
    **dataset_cfgs('resnet20_mha', **_cfg()),
    **dataset_cfgs('resnet20_cbam', **_cfg()),
})


@register_model
def resnet20(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-20 (He et al. 2016, option-A shortcuts), CNNtention's baseline."""
    model_args = dict(layers=(3, 3, 3), attn_type='none')
    return _create_cnntention('resnet20', pretrained, **dict(model_args, **kwargs))


@register_model
def resnet20_selfatt(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-20 with single-head, full-width, unscaled self-attention after each stage."""
    model_args = dict(layers=(3, 3, 3), attn_type='selfatt', num_heads=1)
    return _create_cnntention('resnet20_selfatt', pretrained, **dict(model_args, **kwargs))


@register_model
def resnet20_mha(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-20 with 8-head self-attention and an output projection after each stage."""
    model_args = dict(layers=(3, 3, 3), attn_type='mha', num_heads=8)
    return _create_cnntention('resnet20_mha', pretrained, **dict(model_args, **kwargs))


@register_model
def resnet20_cbam(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-20 with CNNtention's CBAM (reduction 16) and a residual around it after each stage."""
    model_args = dict(layers=(3, 3, 3), attn_type='cbam', reduction=16)
    return _create_cnntention('resnet20_cbam', pretrained, **dict(model_args, **kwargs))
