""" GradAttn: a ResNet-18 whose skip connections are replaced by a transformer over five depths

Paper: `GradAttn: Transformer-Based Modulation of Residual Approach for Classification and
Representation Learning Problems` - Ghoshal & Buckchash, Applied Sciences 16(11):5252, 2026
    - https://arxiv.org/abs/2603.26756

Every shortcut and downsample branch of ResNet-18 is removed. The feature maps after the stem and
after each of the four stages are average-pooled, projected to a shared width and read as a sequence
of five tokens by a small transformer encoder; the mean of its output tokens is classified.
Self-attention over the tokens decides how much each depth contributes to the prediction, and so how
much gradient flows back into each stage.

Three variants differ only in how the encoder knows the token order:
    * ``gradattn_resnet18_nope`` - no position information
    * ``gradattn_resnet18_lpe`` - a learnable position embedding added to the tokens
    * ``gradattn_resnet18_rope`` - rotary position embedding on the queries and keys of every layer

Defaults follow the paper's reference implementation exactly (7x7 stem with max-pool, d=256, 3 post-norm
layers, 8 heads, feed-forward 512, dropout 0.1), so parameter counts match the paper's.
"""
import re
from functools import partial
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from timm.layers import AttentionRope, Mlp, get_act_layer, get_norm_layer
from timm.models import checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from ._pretrained import build_with_weights_hint, dataset_cfgs

__all__ = ['GradAttnResNet', 'PlainBlock', 'EncoderLayer', 'checkpoint_filter_fn']

POS_EMBED_TYPES = ('none', 'learned', 'rope')
STEM_TYPES = ('imagenet', 'small')
ENCODER_INITS = ('reference', 'independent')


class PlainBlock(nn.Module):
    """ResNet basic block without its shortcut: conv-BN-ReLU-conv-BN-ReLU, nothing added back."""

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            stride: int = 1,
            act_layer: type = nn.ReLU,
            norm_layer: type = nn.BatchNorm2d,
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm_layer(out_chs)
        self.act1 = act_layer(inplace=True)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, stride=1, padding=1, bias=False)
        self.bn2 = norm_layer(out_chs)
        self.act2 = act_layer(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        return self.act2(self.bn2(self.conv2(x)))


class Stem(nn.Module):
    """The ImageNet stem (7x7/2 conv + 3x3/2 max-pool) or a 3x3/1 stem without pooling for small images."""

    def __init__(
            self,
            in_chans: int,
            out_chs: int = 64,
            stem_type: str = 'imagenet',
            act_layer: type = nn.ReLU,
            norm_layer: type = nn.BatchNorm2d,
    ):
        super().__init__()
        if stem_type == 'imagenet':
            self.conv = nn.Conv2d(in_chans, out_chs, 7, stride=2, padding=3, bias=False)
            self.pool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
            self.reduction = 4
        else:
            self.conv = nn.Conv2d(in_chans, out_chs, 3, stride=1, padding=1, bias=False)
            self.pool = nn.Identity()
            self.reduction = 1
        self.bn = norm_layer(out_chs)
        self.act = act_layer(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.act(self.bn(self.conv(x))))


def rope_sin_cos(num_tokens: int, head_dim: int, base: float = 10000.) -> torch.Tensor:
    """Rotary table for token positions 0..num_tokens-1, rotate-half layout, as ``cat([sin, cos], -1)``."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(num_tokens, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)  # [f0..f15, f0..f15] pairs dim i with i + head_dim/2
    return torch.cat([angles.sin(), angles.cos()], dim=-1).float()


def _global_average(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, C) spatial mean as sum / area: the same numbers as ``mean((2, 3))``, to the bit.

    sum's backward is an expanded view of the incoming gradient; with a channels-last backbone, mean's backward
    added three layout copies per training step (torch.profiler, 64 px), a negligible but free saving.
    """
    return x.sum((2, 3)) / (x.shape[2] * x.shape[3])


class EncoderLayer(nn.Module):
    """One transformer encoder layer, numerically the layer of ``nn.TransformerEncoderLayer``.

    timm's ``AttentionRope`` (rotate-half rotary embedding when given a table, plain attention without) and
    ``Mlp`` inside a post-norm residual (pre-norm with ``norm_first``). The dropouts sit where PyTorch's layer
    has them: on the attention probabilities, after the output projection, inside and after the feed-forward.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            mlp_dim: int,
            drop_rate: float = 0.1,
            attn_drop_rate: Optional[float] = None,
            qkv_bias: bool = True,
            norm_first: bool = False,
            act_layer: type = nn.ReLU,
            norm_layer: type = nn.LayerNorm,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'embed_dim={dim} must be divisible by num_heads={num_heads}.')
        self.norm_first = norm_first
        self.attn = AttentionRope(
            dim, num_heads, qkv_bias=qkv_bias, num_prefix_tokens=0, rotate_half=True,
            attn_drop=drop_rate if attn_drop_rate is None else attn_drop_rate, proj_drop=drop_rate,
        )
        self.norm1 = norm_layer(dim)
        self.mlp = Mlp(dim, mlp_dim, act_layer=act_layer, drop=drop_rate)
        self.norm2 = norm_layer(dim)

    def init_weights(self) -> None:
        """nn.MultiheadAttention's own initialisation: Xavier-uniform input projection, zero projection biases."""
        nn.init.xavier_uniform_(self.attn.qkv.weight)
        if self.attn.qkv.bias is not None:
            nn.init.zeros_(self.attn.qkv.bias)
        if self.attn.proj.bias is not None:
            nn.init.zeros_(self.attn.proj.bias)

    def forward(self, x: torch.Tensor, rope: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.norm_first:
            x = x + self.attn(self.norm1(x), rope=rope)
            x = x + self.mlp(self.norm2(x))
        else:
            x = self.norm1(x + self.attn(x, rope=rope))
            x = self.norm2(x + self.mlp(x))
        return x


class GradAttnResNet(nn.Module):
    """GradAttn ResNet: plain (shortcut-free) ResNet stages read out by a transformer over depths.

    The ``forward_features`` output is the encoder's token sequence (B, 5, embed_dim), one token per
    extraction point (stem, stage 1..4), in that order; the head averages the tokens and classifies.
    """

    def __init__(
            self,
            layers: Tuple[int, ...] = (2, 2, 2, 2),
            channels: Tuple[int, ...] = (64, 128, 256, 512),
            num_classes: int = 1000,
            in_chans: int = 3,
            global_pool: str = 'avg',
            stem_type: str = 'imagenet',
            stem_width: int = 64,
            embed_dim: int = 256,
            depth: int = 3,
            num_heads: int = 8,
            mlp_dim: int = 512,
            drop_rate: float = 0.1,
            attn_drop_rate: Optional[float] = None,
            head_drop_rate: float = 0.,
            pos_embed: str = 'none',
            rope_base: float = 10000.,
            qkv_bias: Optional[bool] = None,
            norm_first: bool = False,
            final_norm: Optional[bool] = None,
            act_layer: Union[str, type] = nn.ReLU,
            norm_layer: Union[str, type] = nn.BatchNorm2d,
            encoder_act_layer: Union[str, type] = nn.ReLU,
            encoder_norm_layer: Union[str, type] = partial(nn.LayerNorm, eps=1e-5),
            encoder_init: str = 'reference',
    ):
        """
        Args:
            layers: Plain blocks per stage.
            channels: Width of each stage.
            num_classes: Classifier outputs; 0 for a model that returns pooled features.
            in_chans: Input image channels.
            global_pool: 'avg' averages the output tokens, '' keeps all five.
            stem_type: 'imagenet' (7x7/2 conv + max-pool, the paper's) or 'small' (3x3/1 conv, no pool).
            stem_width: Stem output channels.
            embed_dim: Token width ``d`` of the encoder.
            depth: Encoder layers.
            num_heads: Attention heads per layer.
            mlp_dim: Feed-forward width of each encoder layer.
            drop_rate: Encoder dropout (residual branches and feed-forward), as in nn.TransformerEncoderLayer.
            attn_drop_rate: Dropout on attention probabilities; defaults to ``drop_rate`` as in PyTorch's layer.
            head_drop_rate: Dropout before the classifier.
            pos_embed: 'none', 'learned' (N(0, 1) table added to the tokens) or 'rope' (rotary, in attention).
            rope_base: Rotary frequency base.
            qkv_bias: Bias on the query/key/value projection; defaults to True, False for 'rope' (as the paper).
            norm_first: Pre-norm encoder layers instead of the paper's post-norm.
            final_norm: LayerNorm after the encoder; defaults to True only for pre-norm layers.
            act_layer: Backbone activation.
            norm_layer: Backbone normalisation.
            encoder_act_layer: Feed-forward activation.
            encoder_norm_layer: Encoder normalisation.
            encoder_init: 'reference' starts the encoder as the paper's reference code does: without rope, one
                layer in nn.MultiheadAttention's initialisation (Xavier-uniform q/k/v, zero q/k/v and output
                biases, nn.Linear defaults elsewhere) copied into every layer, as nn.TransformerEncoder's deep
                copy does; with rope, nn.Linear defaults (uniform +-1/sqrt(embed_dim), non-zero output bias)
                drawn for each layer. 'independent' draws every layer's weights separately in the same scheme
                (the same as 'reference' for rope).
        """
        super().__init__()
        if pos_embed not in POS_EMBED_TYPES:
            raise ValueError(f"pos_embed={pos_embed!r} is not one of {POS_EMBED_TYPES}.")
        if stem_type not in STEM_TYPES:
            raise ValueError(f"stem_type={stem_type!r} is not one of {STEM_TYPES}; use 'small' for 32 px data.")
        if global_pool not in ('avg', ''):
            raise ValueError(f"global_pool={global_pool!r} is not supported; use 'avg' or ''.")
        if encoder_init not in ENCODER_INITS:
            raise ValueError(f"encoder_init={encoder_init!r} is not one of {ENCODER_INITS}.")
        act_layer = get_act_layer(act_layer)
        norm_layer = get_norm_layer(norm_layer)
        encoder_act_layer = get_act_layer(encoder_act_layer)
        encoder_norm_layer = get_norm_layer(encoder_norm_layer)
        qkv_bias = pos_embed != 'rope' if qkv_bias is None else qkv_bias
        final_norm = norm_first if final_norm is None else final_norm

        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.pos_embed_type = pos_embed
        self.encoder_init = encoder_init
        self.num_tokens = len(layers) + 1
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.grad_checkpointing = False

        # Backbone: registered first and in order, so timm's FeatureListNet can walk it.
        self.stem = Stem(in_chans, stem_width, stem_type, act_layer=act_layer, norm_layer=norm_layer)
        reduction = self.stem.reduction
        self.feature_info = [dict(num_chs=stem_width, reduction=reduction, module='stem')]
        stages = []
        in_chs = stem_width
        for stage_idx, (num_blocks, out_chs) in enumerate(zip(layers, channels)):
            stride = 1 if stage_idx == 0 else 2
            reduction *= stride
            blocks = [
                PlainBlock(in_chs if i == 0 else out_chs, out_chs, stride if i == 0 else 1, act_layer, norm_layer)
                for i in range(num_blocks)
            ]
            stages.append(nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=out_chs, reduction=reduction, module=f'stages.{stage_idx}'))
            in_chs = out_chs
        self.stages = nn.Sequential(*stages)
        self.extraction_channels = tuple(info['num_chs'] for info in self.feature_info)

        # Tokens: global average pool of each extraction point, projected to the encoder width.
        self.token_proj = nn.ModuleList([nn.Linear(chs, embed_dim) for chs in self.extraction_channels])
        if pos_embed == 'learned':
            self.pos_embed = nn.Parameter(torch.randn(1, self.num_tokens, embed_dim))
        else:
            self.pos_embed = None
        self.rope_base = rope_base
        self.head_dim = embed_dim // num_heads
        if pos_embed == 'rope':
            # Derived, not a weight: filled by init_non_persistent_buffers (also after a meta-device build).
            self.register_buffer('rope', torch.empty(self.num_tokens, 2 * self.head_dim), persistent=False)
        else:
            self.rope = None

        self.encoder = nn.ModuleList([
            EncoderLayer(
                embed_dim, num_heads, mlp_dim, drop_rate=drop_rate, attn_drop_rate=attn_drop_rate,
                qkv_bias=qkv_bias, norm_first=norm_first, act_layer=encoder_act_layer,
                norm_layer=encoder_norm_layer,
            ) for _ in range(depth)
        ])
        self.norm = encoder_norm_layer(embed_dim) if final_norm else nn.Identity()

        self.head_drop = nn.Dropout(head_drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

        self.init_non_persistent_buffers()
        self.init_weights()
        self.register_load_state_dict_pre_hook(_load_state_dict_under_current_names)

    @torch.jit.ignore
    def init_weights(self) -> None:
        # PyTorch defaults everywhere, as the reference. Its No-PE/LPE encoder is nn.TransformerEncoder, whose
        # nn.MultiheadAttention re-initialises the attention projections and whose layers are deep copies of one;
        # its RoPE layer is written with plain nn.Linear projections, which keep their defaults.
        if self.pos_embed_type == 'rope' or not len(self.encoder):
            return
        for layer in self.encoder:
            layer.init_weights()
        if self.encoder_init == 'reference':
            for layer in self.encoder[1:]:
                layer.load_state_dict(self.encoder[0].state_dict())

    @torch.jit.ignore
    def init_non_persistent_buffers(self) -> None:
        """Compute the rotary table (the only buffer not saved with the weights), e.g. after a meta-device build."""
        if self.rope is not None:
            with torch.no_grad():
                self.rope.copy_(rope_sin_cos(self.num_tokens, self.head_dim, self.rope_base))

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {'pos_embed'}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r'^stem',
            blocks=r'^stages\.(\d+)' if coarse else r'^stages\.(\d+)\.(\d+)',
            tokens=r'^token_proj|^pos_embed',
            encoder=[(r'^encoder\.(\d+)', None), (r'^norm', (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> Union[str, nn.Module]:
        return 'head' if name_only else self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ('avg', ''):
                raise ValueError(f"global_pool={global_pool!r} is not supported; use 'avg' or ''.")
            self.global_pool = global_pool
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def _check_input(self, x: torch.Tensor) -> None:
        torch._assert(x.dim() == 4, 'GradAttn expects a batch of images shaped (B, C, H, W).')
        torch._assert(
            x.shape[1] == self.in_chans,
            'Input channel count does not match the model: it was created with in_chans=' + str(self.in_chans)
            + '. Create it with the in_chans of your images, or convert the images.')

    def tokens(self, features: List[torch.Tensor]) -> torch.Tensor:
        """Pool and project the five extraction-point feature maps into the (B, 5, d) token sequence."""
        # enumerate, not zip: TorchScript can only unroll a ModuleList loop it can index statically.
        tokens = [proj(_global_average(features[i])) for i, proj in enumerate(self.token_proj)]
        x = torch.stack(tokens, dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        return x

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Run the token sequence through the encoder (and final norm, if any)."""
        for layer in self.encoder:
            x = layer(x, self.rope)
        return self.norm(x)

    def extract(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Feature maps at the five extraction points, stem first."""
        self._check_input(x)
        x = self.stem(x)
        features = [x]
        for stage in self.stages:
            # Inline rather than a helper taking the stage: TorchScript cannot pass modules as arguments.
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint_seq(stage, x)
            else:
                x = stage(x)
            features.append(x)
        return features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(self.tokens(self.extract(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == 'avg':
            x = x.mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    @torch.jit.ignore
    def attention_maps(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Attention probabilities of every encoder layer, each (B, heads, 5, 5), query x key over depths.

        Read, as ``timm.utils.AttentionExtract`` does, at the input of each attention's dropout (so never
        dropped out), on the unfused path: the fused kernel never forms the probabilities.
        """
        attentions = [layer.attn for layer in self.encoder]
        maps: List[torch.Tensor] = []
        fused = [attn.fused_attn for attn in attentions]
        hooks = [attn.attn_drop.register_forward_pre_hook(lambda module, args: maps.append(args[0]))
                 for attn in attentions]
        try:
            for attn in attentions:
                attn.fused_attn = False
            self.forward_features(x)
        finally:
            for attn, was_fused, hook in zip(attentions, fused, hooks):
                attn.fused_attn = was_fused
                hook.remove()
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
        """Feature maps at the extraction points (stem, stage 1..4), and optionally the encoder tokens.

        Args:
            x: Input images.
            indices: Take the last n extraction points if int, all if None, these indices if a sequence.
            norm: Unused (the feature maps have no separate norm), kept for the timm interface.
            stop_early: Stop after the last requested point; only with ``intermediates_only``, since the
                encoder needs all five points.
            output_fmt: Only 'NCHW'.
            intermediates_only: Return only the feature maps.
        """
        if output_fmt != 'NCHW':
            raise ValueError(f"output_fmt={output_fmt!r} is not supported; GradAttn intermediates are 'NCHW'.")
        # Count the points still present: prune_intermediate_layers may have dropped stages.
        take_indices, max_index = feature_take_indices(len(self.stages) + 1, indices)
        self._check_input(x)
        x = self.stem(x)
        features = [x]
        last = max_index if stop_early and intermediates_only else len(self.stages)
        for stage in self.stages[:last]:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint_seq(stage, x)
            else:
                x = stage(x)
            features.append(x)
        intermediates = [features[i] for i in take_indices]
        if intermediates_only:
            return intermediates
        return self.encode(self.tokens(features)), intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the stages after the last requested extraction point.

        Without all five points there is no token sequence, so pruning any stage also removes the
        token projection, encoder and head; the model then serves ``forward_intermediates`` only.
        """
        take_indices, max_index = feature_take_indices(len(self.stages) + 1, indices)
        self.stages = self.stages[:max_index]
        if max_index < len(self.feature_info) - 1:
            self.token_proj = nn.ModuleList()
            self.encoder = nn.ModuleList()
            self.pos_embed = None
            self.norm = nn.Identity()
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
            prune_head = True
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices


# State-dict names of earlier releases (hand-written attention and MLP) and of the paper's reference notebooks,
# mapped by role to today's; tried in order, first match wins. A current name matches none of them.
_RENAMES = (
    (r'^encoder\.(\d+)\.(qkv|proj)\.', r'encoder.\1.attn.\2.'),
    (r'^encoder\.(\d+)\.(fc1|fc2)\.', r'encoder.\1.mlp.\2.'),
    (r'^conv1\.', 'stem.conv.'),
    (r'^bn1\.', 'stem.bn.'),
    (r'^layer(\d+)\.', lambda match: f'stages.{int(match[1]) - 1}.'),
    (r'^projections\.(\d+)\.2\.', r'token_proj.\1.'),
    (r'^positional_embedding$', 'pos_embed'),
    (r'^transformer_(?:encoder\.)?layers\.(\d+)\.self_attn\.in_proj_(weight|bias)$', r'encoder.\1.attn.qkv.\2'),
    (r'^transformer_(?:encoder\.)?layers\.(\d+)\.self_attn\.(?:out_proj|w_o)\.', r'encoder.\1.attn.proj.'),
    (r'^transformer_(?:encoder\.)?layers\.(\d+)\.linear([12])\.', r'encoder.\1.mlp.fc\2.'),
    (r'^transformer_(?:encoder\.)?layers\.(\d+)\.(norm[12])\.', r'encoder.\1.\2.'),
    (r'^classifier\.', 'head.'),
)
# The reference RoPE layer's separate query/key/value projections, concatenated into one qkv as AttentionRope's.
_REFERENCE_QKV = re.compile(r'^transformer_layers\.(\d+)\.self_attn\.w_([qkv])\.(weight|bias)$')
_REFERENCE_DERIVED = re.compile(r'\.rotary_emb\.inv_freq$')


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Map a GradAttn state dict saved under earlier or the reference notebooks' names to the current names.

    Earlier releases: ``encoder.N.{qkv,proj}`` -> ``encoder.N.attn.*``, ``encoder.N.{fc1,fc2}`` -> ``encoder.N.mlp.*``.
    Reference notebooks (by role, never by position): ``conv1``/``bn1`` -> ``stem.conv``/``stem.bn``,
    ``layer{1..4}`` -> ``stages.{0..3}``, ``projections.i.2`` -> ``token_proj.i``, ``positional_embedding`` ->
    ``pos_embed``, ``self_attn.in_proj_*``/``out_proj`` or ``w_q``/``w_k``/``w_v`` (concatenated) and ``w_o`` ->
    ``attn.qkv``/``attn.proj``, ``linear1``/``linear2`` -> ``mlp.fc1``/``mlp.fc2``, ``classifier`` -> ``head``; the
    RoPE layers' ``rotary_emb.inv_freq`` buffers are dropped (the model computes its own rotary table).
    Current names pass unchanged, so applying the filter twice is harmless.
    """
    out: Dict[str, torch.Tensor] = {}
    separate_qkv: Dict[Tuple[str, str], Dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if _REFERENCE_DERIVED.search(key):
            continue
        match = _REFERENCE_QKV.match(key)
        if match:
            layer, role, kind = match.groups()
            separate_qkv.setdefault((layer, kind), {})[role] = value
            continue
        for pattern, replacement in _RENAMES:
            key, found = re.subn(pattern, replacement, key, count=1)
            if found:
                break
        out[key] = value
    for (layer, kind), parts in separate_qkv.items():
        if set(parts) == {'q', 'k', 'v'}:
            out[f'encoder.{layer}.attn.qkv.{kind}'] = torch.cat([parts['q'], parts['k'], parts['v']])
        else:  # incomplete: keep the pieces under their own names, so that loading names what is missing
            out.update({f'transformer_layers.{layer}.self_attn.w_{role}.{kind}': v for role, v in parts.items()})
    return out


def _load_state_dict_under_current_names(module: nn.Module, state_dict: Dict[str, torch.Tensor], prefix: str,
                                         *args: Any) -> None:
    """load_state_dict pre-hook: apply ``checkpoint_filter_fn`` in place, for loaders that take no filter
    (``create_model(checkpoint_path=...)``, a plain ``model.load_state_dict``)."""
    own = {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}
    mapped = checkpoint_filter_fn(own, module)
    if mapped.keys() != own.keys():
        for key in own:
            del state_dict[prefix + key]
        state_dict.update({prefix + key: value for key, value in mapped.items()})


def _create_gradattn(variant: str, pretrained: bool = False, **kwargs: Any) -> GradAttnResNet:
    return build_with_weights_hint(
        GradAttnResNet, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True, out_indices=(0, 1, 2, 3, 4)),
        **kwargs,
    )


def _cfg(**kwargs: Any) -> Dict[str, Any]:
    return dict(first_conv='stem.conv', classifier='head', fixed_input_size=False, **kwargs)


default_cfgs = generate_default_cfgs({
    **dataset_cfgs('gradattn_resnet18_nope', **_cfg()),
    **dataset_cfgs('gradattn_resnet18_lpe', **_cfg()),
    **dataset_cfgs('gradattn_resnet18_rope', **_cfg()),
})


@register_model
def gradattn_resnet18_nope(pretrained: bool = False, **kwargs: Any) -> GradAttnResNet:
    """GradAttn ResNet-18 with no position information in the encoder."""
    model_args = dict(layers=(2, 2, 2, 2), pos_embed='none')
    return _create_gradattn('gradattn_resnet18_nope', pretrained, **dict(model_args, **kwargs))


@register_model
def gradattn_resnet18_lpe(pretrained: bool = False, **kwargs: Any) -> GradAttnResNet:
    """GradAttn ResNet-18 with a learnable position embedding over the five depth tokens."""
    model_args = dict(layers=(2, 2, 2, 2), pos_embed='learned')
    return _create_gradattn('gradattn_resnet18_lpe', pretrained, **dict(model_args, **kwargs))


@register_model
def gradattn_resnet18_rope(pretrained: bool = False, **kwargs: Any) -> GradAttnResNet:
    """GradAttn ResNet-18 with rotary position embedding in every attention layer."""
    model_args = dict(layers=(2, 2, 2, 2), pos_embed='rope')
    return _create_gradattn('gradattn_resnet18_rope', pretrained, **dict(model_args, **kwargs))
