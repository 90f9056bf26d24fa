""" Depth attention: per-pixel multi-head attention over a network's stored outputs, with its cache

The attention shortcut of `Introducing attention shortcuts in convolutional neural networks` (Erroz & Galar, AIMS
Press, 2025; Eq. 3.2): at every pixel separately, the newest output is the query and all stored outputs, itself
included, are the keys and values, so the sequence runs along depth and nothing mixes pixels. Keys and values are
projected once, when an output is new, and cached as (B, H, W, heads, head_dim) tensors.

    * ``DepthAttention`` - one projection set {W^Q, W^K, W^V, W^O}; projects the newest output, attends over the
      cache, returns the mix and the newest key and value for the caller to cache
    * ``KVIdentity``, ``KVPool``, ``KVConv`` - how the cache follows a block that changes resolution or width:
      not at all, by subsampling (AS_out), by 1x1 convolutions (AS_KV, AS_stages)
    * ``pixel_linear``, ``PixelLinear`` - a matrix applied at every pixel, as a 1x1 convolution

Scores and the weighted sum have custom backwards (``_DepthScores``, ``_DepthMix``) for eager training, where
autograd's own would write a full-size product per stored output; tracing, FX, compile and export see the plain
formulations. ``tests/test_attention_shortcuts.py`` checks the backwards by ``gradcheck`` and against the plain
formulation, and the attention against ``F.scaled_dot_product_attention`` run per pixel.
"""
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

try:  # newer torch; the older name also answers True under torch.export, and warns about it
    from torch.fx._symbolic_trace import is_fx_symbolic_tracing as is_fx_tracing
except ImportError:
    from torch.fx._symbolic_trace import is_fx_tracing

__all__ = ['DepthAttention', 'KVConv', 'KVIdentity', 'KVPool', 'PixelLinear', 'pixel_linear']

Cache = Tuple[List[torch.Tensor], List[torch.Tensor]]


class _DepthScores(torch.autograd.Function):
    """Per-head dot products of each pixel's query with each stored key: (B, H, W, heads, n).

    The forward is one batched product per key (a length-``head_dim`` reduction that writes only the scores);
    the backward is element-wise: ``dq = sum_i ds_i k_i`` accumulated in place and ``dk_i = ds_i q``. Autograd's
    own backward of that batched product runs ``B*H*W*heads`` tiny matrix products and is slower than the
    element-wise formulation, whose forward would write a full-size product per key.

    The query is not kept for the backward: it is recomputed there from the projected output ``x``, which the
    projection keeps anyway, and W^Q (one 1x1 convolution). Keeping it would hold a full-size map per block
    until the backward: at 32 px about 200 MB of AS_out's peak training memory at batch 64.
    """

    @staticmethod
    def forward(ctx, query: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, *keys: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight, *keys)
        ctx.query_shape, ctx.query_dtype = query.shape, query.dtype
        return _batched_scores(query, list(keys))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight, *keys = ctx.saved_tensors
        # The backward runs outside the forward's autocast: cast as autocast cast the projection (bf16 query from
        # an fp32 W^Q), or the recomputed query would differ from the forward's, or fail on mixed dtypes.
        dtype = ctx.query_dtype
        query = pixel_linear(x.to(dtype), weight.to(dtype)).permute(0, 2, 3, 1).reshape(ctx.query_shape)
        grads = grad.unsqueeze(-1).unbind(-2)
        grad_query = grads[0] * keys[0]
        for g, key in zip(grads[1:], keys[1:]):
            grad_query.addcmul_(g, key)
        return (grad_query, None, None, *[g * query for g in grads])


class _DepthMix(torch.autograd.Function):
    """Each pixel's weighted sum of the stored values, ``out = sum_i attn_i v_i``: (B, H, W, heads, head_dim).

    The forward accumulates in place, one read of each value; the backward writes ``dv_i = attn_i dout`` and
    takes ``dattn_i = <dout, v_i>`` as one batched product per value, where autograd's backward of ``addcmul``
    would write and then sum a full-size product per value.
    """

    @staticmethod
    def forward(ctx, attn: torch.Tensor, *values: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(attn, *values)
        return _weighted_sum(attn, list(values))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        attn, *values = ctx.saved_tensors
        weights = attn.unsqueeze(-1).unbind(-2)
        return (_batched_scores(grad, values), *[w * grad for w in weights])


def _weighted_sum(attn: torch.Tensor, values: List[torch.Tensor]) -> torch.Tensor:
    # unbind, not slicing: each slice's backward would fill a zero tensor of the weights' full size.
    weights = attn.unsqueeze(-1).unbind(-2)
    out = weights[0] * values[0]
    for i in range(1, len(values)):
        out = torch.addcmul(out, weights[i], values[i])
    return out


def _depth_mix(attn: torch.Tensor, values: List[torch.Tensor]) -> torch.Tensor:
    """``sum_i attn[..., i] * values[i]`` for weights (B, H, W, heads, n) and n values (B, H, W, heads, head_dim)."""
    if not torch.jit.is_scripting():
        if _needs_grad(attn, values):
            return _DepthMix.apply(attn, *values)
    return _weighted_sum(attn, values)


def _batched_scores(query: torch.Tensor, keys: List[torch.Tensor]) -> torch.Tensor:
    return torch.cat([torch.matmul(query.unsqueeze(-2), key.unsqueeze(-1)).squeeze(-1) for key in keys], -1)


def _depth_scores(
        query: torch.Tensor,
        keys: List[torch.Tensor],
        x: Optional[torch.Tensor] = None,
        weight: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Scores (B, H, W, heads, n) of ``query`` against each of ``keys`` (all (B, H, W, heads, head_dim)); with
    the projected output ``x`` and W^Q (``weight``), eager autograd recomputes the query in the backward."""
    if not torch.jit.is_scripting():
        if x is not None and weight is not None and _needs_grad(query, keys):
            return _DepthScores.apply(query, x, weight, *keys)
    return _batched_scores(query, keys)


@torch.jit.unused
def _needs_grad(x: torch.Tensor, cache: List[torch.Tensor]) -> bool:
    """Eager autograd: take the custom backwards. Tracing, FX, compile and export see the plain formulations."""
    if torch.jit.is_tracing() or is_fx_tracing() or torch.compiler.is_compiling() or not torch.is_grad_enabled():
        return False
    return x.requires_grad or any(t.requires_grad for t in cache)


def pixel_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The (out, in) matrix ``weight`` applied at every pixel of a (B, in, H, W) map, as a 1x1 convolution."""
    return F.conv2d(x, weight.unsqueeze(-1).unsqueeze(-1), bias)


class PixelLinear(nn.Linear):
    """``nn.Linear`` applied at every pixel of a (B, in, H, W) map, as a 1x1 convolution: (B, out, H, W).

    The maps read here are LayerNorm2d's outputs, channels-last in memory: a 1x1 convolution runs on them as one
    matrix product (forward and backward about a quarter faster than ``nn.Linear`` on the permuted view) and
    returns channels-last, so ``.permute(0, 2, 3, 1)`` of the result is a contiguous (B, H, W, out) tensor.
    Parameters and their names are nn.Linear's.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pixel_linear(x, self.weight, self.bias)


class DepthAttention(nn.Module):
    """One projection set {W^Q, W^K, W^V, W^O} (Eq. 3.2): per-pixel multi-head attention over stored outputs.

    Cached keys and values are (B, H, W, heads, head_dim) tensors, one per stored output. ``forward`` projects
    only the newest output ``x`` and returns its key and value for the caller to cache.

    Scores and the weighted sum take one product per stored output (``_depth_scores``, ``_depth_mix``) rather than
    ``F.scaled_dot_product_attention`` over a stacked cache: with a query length of 1 and at most 16 keys,
    stacking would copy the whole cache at every block for a kernel with almost no work to amortise it over,
    and autograd would keep that copy. Here nothing is copied and backward keeps only references to the cached
    tensors. ``tests/test_attention_shortcuts.py`` checks the result equals the SDPA formulation.
    """

    def __init__(self, dim: int, num_heads: int = 4):
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f'num_heads={num_heads} does not divide the attention width {dim}; '
                             f'pass a num_heads that divides every width of the model (the paper uses 4).')
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = PixelLinear(dim, dim * 3, bias=False)
        self.proj = PixelLinear(dim, dim, bias=False)

    @torch.jit.export
    def project(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Query, key and value of one output (B, C, H, W), each (B, H, W, heads, head_dim)."""
        B, _, H, W = x.shape
        qkv = self.qkv(x).permute(0, 2, 3, 1)
        q, k, v = qkv.reshape(B, H, W, 3, self.num_heads, self.head_dim).unbind(3)
        # One copy each, now: the batched products that read them need contiguous heads, and would otherwise
        # copy a cached key or value again at every later block.
        return q.contiguous(), k.contiguous(), v.contiguous()

    @torch.jit.export
    def softmax_weights(
            self,
            query: torch.Tensor,
            keys: List[torch.Tensor],
            x: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Attention weights (B, H, W, heads, n) of each pixel's query over the n stored keys, oldest first.
        ``x``, the output the query was projected from, lets training recompute the query instead of keeping it."""
        weight = None if x is None else self.qkv.weight[:self.num_heads * self.head_dim]
        return (_depth_scores(query, keys, x, weight) * self.scale).softmax(dim=-1)

    @torch.jit.export
    def weights(self, x: torch.Tensor, keys: List[torch.Tensor]) -> torch.Tensor:
        """``softmax_weights`` for the newest output ``x`` over the cache plus ``x`` itself."""
        query, key, _ = self.project(x)
        return self.softmax_weights(query, keys + [key], None)

    def forward(
            self,
            x: torch.Tensor,
            keys: List[torch.Tensor],
            values: List[torch.Tensor],
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(g (B, C, H, W), key of ``x``, value of ``x``): attention from ``x`` over the cache and ``x``."""
        query, key, value = self.project(x)
        keys = keys + [key]
        values = values + [value]
        out = _depth_mix(self.softmax_weights(query, keys, x), values)
        g = self.proj(out.flatten(3).permute(0, 3, 1, 2))
        return g, key, value


class KVIdentity(nn.Module):
    """Cache adapter of a stage that does not change resolution or width: nothing to adapt."""

    def forward(self, keys: List[torch.Tensor], values: List[torch.Tensor]) -> Cache:
        return keys, values


class KVPool(nn.Module):
    """AS_out's 1x1 pooling with stride 2 on the cached keys and values: keep every other pixel.

    Projections and LayerNorm act per pixel, so this equals projecting the subsampled outputs.
    """

    def forward(self, keys: List[torch.Tensor], values: List[torch.Tensor]) -> Cache:
        return [k[:, ::2, ::2] for k in keys], [v[:, ::2, ::2] for v in values]


class KVConv(nn.Module):
    """One 1x1 convolution for every cached key and one for every cached value (AS_KV, AS_stages).

    Shared by all stored outputs at a stage transition and chained across transitions: an output of the first
    stage passes through every later adapter.
    """

    def __init__(self, in_dim: int, out_dim: int, stride: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.key = nn.Conv2d(in_dim, out_dim, 1, stride=stride, bias=False)
        self.value = nn.Conv2d(in_dim, out_dim, 1, stride=stride, bias=False)

    def _to_cache(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        return x.permute(0, 2, 3, 1).reshape(B, H, W, self.num_heads, C // self.num_heads)

    def forward(self, keys: List[torch.Tensor], values: List[torch.Tensor]) -> Cache:
        # A cached (B, H, W, heads, head_dim) tensor is a channels-last map: the permute copies nothing.
        keys = [self._to_cache(self.key(k.flatten(3).permute(0, 3, 1, 2))) for k in keys]
        values = [self._to_cache(self.value(v.flatten(3).permute(0, 3, 1, 2))) for v in values]
        return keys, values
