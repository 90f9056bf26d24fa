"""Gradient flow: what the GradAttn paper measures (section 4.7, Table 7), for any timm model.

Gradient flow (paper section 4.7, Table 7):
    ``gradient_norms`` records the mean gradient norm of every layer that takes part in backward,
    over up to 20 batches in train mode (as the reference implementation measured it), for any timm
    model. ``gradient_health`` turns those norms into the Gradient Health Score
    GHS = healthy layers / analysed layers for a band [low, high]. Only layers that received a
    gradient are analysed: the reference also counted hooks that never fired (the ``out_proj`` inside
    ``nn.MultiheadAttention``, whose forward is never called), which capped its score at 32/35.

    Two ways to take a layer's gradient norm:
        * ``mode='parameters'`` (default): one entry per module that owns trainable parameters, the L2
          norm of the gradient of all of its own parameters together (weight and bias), so norm layers
          and position embeddings are covered too. A parameter owned by the model itself (e.g.
          ``pos_embed``) is its own entry.
        * ``mode='outputs'``: the paper's variant, the L2 norm of the gradient of the loss with respect
          to the OUTPUT of every ``nn.Conv2d``, ``nn.Linear``, transformer encoder layer and attention
          module of the zoo's families (CNNtention's self-attention and CBAM, Attention Shortcuts' depth
          attention, whose output is the g its block reads), read by tensor hooks. A module called twice
          in one forward (AS_out's shared attention is called by every block) contributes the norm of all
          its calls' gradients together.
    In both modes the norm is taken per batch and averaged over the batches in which the layer
    received a gradient.
"""
import json
import math
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.utils import unwrap_model

from ..models.attention_shortcuts import DepthAttention
from ..models.cnntention import ResidualCbam, SpatialSelfAttention
from ..models.gradattn import EncoderLayer
from ..preserve import preserved_state

__all__ = ['GRADIENT_MODES', 'HEALTH_BANDS', 'PAPER_BANDS', 'REFERENCE_BAND', 'gradient_health',
           'gradient_health_report', 'gradient_norms', 'read_grad_norms']

GRADIENT_MODES = ('parameters', 'outputs')
# The three bands of the paper's GHS table and the band its reference code uses.
PAPER_BANDS = ((1e-7, 1e-2), (1e-6, 1e-1), (1e-5, 1.0))
REFERENCE_BAND = (1e-6, 10.0)
HEALTH_BANDS: Dict[str, Tuple[float, float]] = OrderedDict([
    ('paper_1e-7_1e-2', PAPER_BANDS[0]),
    ('paper_1e-6_1e-1', PAPER_BANDS[1]),
    ('paper_1e-5_1', PAPER_BANDS[2]),
    ('reference_1e-6_10', REFERENCE_BAND),
])


# The layers whose output gradient ``mode='outputs'`` reads: convolutions, linear layers, and the transformer and
# attention modules of the zoo's families.
OUTPUT_LAYER_TYPES = (nn.Conv2d, nn.Linear, nn.TransformerEncoderLayer, EncoderLayer, SpatialSelfAttention,
                      ResidualCbam, DepthAttention)


# --- gradient flow -------------------------------------------------------------------------------------------

def _parameter_owners(model: nn.Module) -> 'OrderedDict[str, List[nn.Parameter]]':
    """Trainable parameters grouped by the module that owns them, in registration order."""
    groups: 'OrderedDict[str, List[nn.Parameter]]' = OrderedDict()
    for name, param in model.named_parameters():
        if param.requires_grad:
            owner = name.rpartition('.')[0] or name  # parameters of the root module name themselves
            groups.setdefault(owner, []).append(param)
    return groups


def _norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t, dtype=torch.float32) for t in tensors]))


def gradient_norms(
        model: nn.Module,
        batches: Iterable[Tuple[torch.Tensor, torch.Tensor]],
        loss_fn: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
        mode: str = 'parameters',
        max_batches: int = 20,
) -> Dict[str, float]:
    """Mean gradient norm per layer over up to ``max_batches`` batches, in train mode.

    Only layers that receive a gradient appear in the result. The model is left as it was found: the
    train/eval mode of every module, its buffers (BatchNorm statistics updated by the train-mode passes are put back),
    its ``.grad`` fields (gradients are taken with ``torch.autograd.grad``, never accumulated) and the
    global random state.

    Args:
        model: Any timm / PyTorch classifier (DDP and compiled wrappers are unwrapped).
        batches: Iterable of (images, targets), e.g. a DataLoader.
        loss_fn: ``loss_fn(logits, targets)``; cross-entropy by default.
        mode: 'parameters' (per module, norm of its parameters' gradient) or 'outputs' (norm of the
            gradient w.r.t. each Conv2d / Linear / encoder-layer output, the paper's measurement).
        max_batches: Batches to average over (the reference used 20).

    Returns:
        ``{layer name: mean gradient norm}`` in the order of the layers in the network.
    """
    if mode not in GRADIENT_MODES:
        raise ValueError(f'mode={mode!r} is not one of {GRADIENT_MODES}.')
    if max_batches < 1:
        raise ValueError(f'max_batches must be at least 1, got {max_batches}.')
    model = unwrap_model(model)
    loss_fn = loss_fn or F.cross_entropy
    groups = _parameter_owners(model)
    params = [p for group in groups.values() for p in group]
    if not params:
        raise ValueError(f'{type(model).__name__} has no trainable parameters (requires_grad=True) to analyse.')
    device = params[0].device

    output_sq: Dict[str, torch.Tensor] = {}  # per batch: squared norm of the output gradient per layer
    layer_order: List[str] = []
    handles = []
    if mode == 'outputs':
        def capture(name):
            def add(grad):
                sq = torch.linalg.vector_norm(grad, dtype=torch.float32).square()
                output_sq[name] = output_sq[name] + sq if name in output_sq else sq

            def hook(module, args, output):
                if isinstance(output, tuple) and output:
                    output = output[0]  # DepthAttention returns (g, key, value); g is what the block reads
                if isinstance(output, torch.Tensor) and output.requires_grad:
                    if name not in layer_order:
                        layer_order.append(name)
                    output.register_hook(add)
            return hook

        for name, module in model.named_modules():
            if isinstance(module, OUTPUT_LAYER_TYPES):
                handles.append(module.register_forward_hook(capture(name)))

    sums: 'OrderedDict[str, torch.Tensor]' = OrderedDict()
    counts: Dict[str, int] = {}
    try:
        # Dropout draws and BatchNorm updates of these train-mode passes must not reach the training run.
        with preserved_state(model), torch.enable_grad():
            model.train()
            for batch_index, batch in enumerate(batches):
                if batch_index >= max_batches:
                    break
                images, targets = batch[0].to(device), batch[1].to(device)
                inputs = list(params)
                if mode == 'outputs' and images.is_floating_point():
                    # Asking for the input gradient makes backward visit every layer, trainable or not.
                    images = images.detach().requires_grad_(True)
                    inputs.append(images)
                output_sq.clear()
                loss = loss_fn(model(images), targets)
                if loss.dim() != 0:
                    raise ValueError(f'loss_fn must return a scalar, got shape {tuple(loss.shape)}.')
                grads = torch.autograd.grad(loss, inputs, allow_unused=True)
                if mode == 'parameters':
                    batch_norms, offset = {}, 0
                    for owner, group in groups.items():
                        received = [g for g in grads[offset:offset + len(group)] if g is not None]
                        offset += len(group)
                        if received:
                            batch_norms[owner] = _norm(received)
                else:
                    batch_norms = {name: output_sq[name].sqrt() for name in layer_order if name in output_sq}
                for name, norm in batch_norms.items():
                    sums[name] = sums[name] + norm if name in sums else norm
                    counts[name] = counts.get(name, 0) + 1
    finally:
        for handle in handles:
            handle.remove()
    if not counts:
        raise ValueError('No batches were analysed: `batches` was empty.')
    order = layer_order if mode == 'outputs' else list(groups)
    return {name: float(sums[name]) / counts[name] for name in order if name in sums}


def gradient_health(
        norms: Dict[str, float],
        band: Tuple[float, float] = REFERENCE_BAND,
) -> Dict[str, Any]:
    """Gradient Health Score of per-layer gradient norms for one band [low, high].

    A layer is healthy when low <= norm <= high, vanishing below, exploding above (a non-finite norm
    counts as exploding). Layers whose norm is None received no gradient and are not analysed.

    Returns:
        dict(score=healthy / analysed, analysed=int, healthy=int, vanishing=[names], exploding=[names],
        band=[low, high]).
    """
    low, high = float(band[0]), float(band[1])
    if not 0 <= low < high:
        raise ValueError(f'band must be (low, high) with 0 <= low < high, got {tuple(band)}.')
    healthy, vanishing, exploding = 0, [], []
    for name, norm in norms.items():
        if norm is None:
            continue
        norm = float(norm)
        if not math.isfinite(norm) or norm > high:
            exploding.append(name)
        elif norm < low:
            vanishing.append(name)
        else:
            healthy += 1
    analysed = healthy + len(vanishing) + len(exploding)
    if analysed == 0:
        raise ValueError('No layer received a gradient, so there is nothing to score. Check that the model '
                         'has trainable parameters and that the norms come from gradient_norms().')
    return dict(score=healthy / analysed, analysed=analysed, healthy=healthy,
                vanishing=vanishing, exploding=exploding, band=[low, high])


def gradient_health_report(
        norms: Dict[str, float],
        bands: Optional[Dict[str, Tuple[float, float]]] = None,
) -> Dict[str, Dict[str, Any]]:
    """``gradient_health`` for each named band (the paper's three and the reference's by default)."""
    return {name: gradient_health(norms, band) for name, band in (bands or HEALTH_BANDS).items()}


def read_grad_norms(path: Union[str, Path]) -> List[Dict[str, Any]]:
    """Records of a run's ``grad_norms.jsonl``: ``[{'epoch': e, 'norms': {layer: norm}}, ...]``."""
    records = []
    with open(path) as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if 'norms' not in record:
                raise ValueError(f'{path}:{line_number} has no "norms" field: {line.strip()[:80]}')
            records.append(record)
    return records


