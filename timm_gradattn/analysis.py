"""Gradient flow and attention routing: what the GradAttn paper measures, and what it does not show.

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

Attention routing:
    How much each of the five extraction points (stem, stage 1..4) contributes to a GradAttn prediction.
        * ``method='rollout'``: attention rollout (Abnar & Zuidema, ACL 2020). Each layer's attention
          is averaged over heads, mixed half-and-half with the identity for the residual connection and
          renormalised; the layers are multiplied; the rows are averaged because the head averages the
          output tokens. Five weights per sample summing to one. It follows attention only (not the
          feed-forward blocks or the values), so it is an approximation of the information flow.
        * ``method='gradient'``: gradient x input on the five tokens entering the encoder:
          ``|sum_d token_d * d logit / d token_d|`` for the logit of the predicted class, normalised to
          sum to one per sample. With a learnable position embedding the token includes it.
    ``routing_summary`` averages either over a loader, overall and per true class.

Attention of the other families (``attention_kind`` says which a model exposes, through its own
``attention_maps``):
    * 'tokens': GradAttn, the routing above.
    * 'spatial': CNNtention's SelfAtt / MHA, softmax over the H*W positions of each stage's map.
      ``spatial_attention`` takes, per stage and averaged over heads, the attention from the centre position
      and the mean attention each position receives (over all query positions); both are distributions over
      the positions. Read on the unfused path: the fused kernel never forms the weights.
    * 'depth': Attention Shortcuts, softmax per pixel over the outputs stored so far.
      ``depth_routing_summary`` averages each block's weights over pixels, heads and a loader's images:
      which earlier outputs each block reads.
"""
import json
import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.utils import unwrap_model

__all__ = [
    'ATTENTION_KINDS', 'ATTENTION_MODELS', 'DepthRoutingSummary', 'GRADIENT_MODES', 'HEALTH_BANDS', 'PAPER_BANDS',
    'REFERENCE_BAND', 'ROUTING_METHODS', 'RoutingSummary', 'SpatialAttention', 'attention_kind', 'attention_rollout',
    'depth_routing_summary', 'depth_routing_weights', 'extraction_point_names', 'gradient_health',
    'gradient_health_report', 'gradient_norms', 'images_per_class', 'read_grad_norms', 'routing_summary',
    'routing_weights', 'spatial_attention',
]

GRADIENT_MODES = ('parameters', 'outputs')
ROUTING_METHODS = ('rollout', 'gradient')
# The three bands of the paper's GHS table and the band its reference code uses.
PAPER_BANDS = ((1e-7, 1e-2), (1e-6, 1e-1), (1e-5, 1.0))
REFERENCE_BAND = (1e-6, 10.0)
HEALTH_BANDS: Dict[str, Tuple[float, float]] = OrderedDict([
    ('paper_1e-7_1e-2', PAPER_BANDS[0]),
    ('paper_1e-6_1e-1', PAPER_BANDS[1]),
    ('paper_1e-5_1', PAPER_BANDS[2]),
    ('reference_1e-6_10', REFERENCE_BAND),
])


def _output_layer_types() -> Tuple[type, ...]:
    from .models.attention_shortcuts import DepthAttention
    from .models.cnntention import ResidualCbam, SpatialSelfAttention
    from .models.gradattn import EncoderLayer
    return (nn.Conv2d, nn.Linear, nn.TransformerEncoderLayer, EncoderLayer, SpatialSelfAttention, ResidualCbam,
            DepthAttention)


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


def _training_modes(model: nn.Module) -> List[Tuple[nn.Module, bool]]:
    # Per module, not just the root: a trainer may keep frozen layers in eval mode while training.
    return [(module, module.training) for module in model.modules()]


def _restore_training_modes(modes: List[Tuple[nn.Module, bool]]) -> None:
    for module, training in modes:
        module.training = training


def _rng_fork(device: torch.device):
    # Dropout draws during the analysis must not shift the training run's random stream.
    if device.type == 'cuda':
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.random.fork_rng(devices=[index])
    return torch.random.fork_rng(devices=[])


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
            if isinstance(module, _output_layer_types()):
                handles.append(module.register_forward_hook(capture(name)))

    sums: 'OrderedDict[str, torch.Tensor]' = OrderedDict()
    counts: Dict[str, int] = {}
    modes = _training_modes(model)
    saved_buffers = [(buffer, buffer.detach().clone()) for buffer in model.buffers()]
    try:
        model.train()
        with _rng_fork(device), torch.enable_grad():
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
        _restore_training_modes(modes)
        with torch.no_grad():
            for buffer, saved in saved_buffers:
                buffer.copy_(saved)
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


# --- attention routing -------------------------------------------------------------------------------------

_ROUTING_SURFACE = ('extract', 'tokens', 'encode', 'forward_head', 'attention_maps')


def _routing_model(model: nn.Module) -> nn.Module:
    model = unwrap_model(model)
    missing = [name for name in _ROUTING_SURFACE if not callable(getattr(model, name, None))]
    if missing:
        raise TypeError(
            f'Attention routing needs a GradAttn model (one token per extraction point read by an encoder); '
            f'{type(model).__name__} has no {", ".join(missing)}. Use a gradattn_resnet18_* model; for other '
            f'models, gradient_norms() and the classification metrics still apply.')
    if getattr(model, 'global_pool', 'avg') != 'avg':
        raise ValueError(
            f"Attention routing reads the share of each token in the mean the head classifies, but this model "
            f"has global_pool={model.global_pool!r}. Create it with global_pool='avg' (the default).")
    return model


def extraction_point_names(model: nn.Module) -> Tuple[str, ...]:
    """'stem', 'stage1', ... for each token of a GradAttn model."""
    model = _routing_model(model)
    return ('stem',) + tuple(f'stage{i}' for i in range(1, model.num_tokens))


def attention_rollout(attention_maps: Sequence[torch.Tensor], residual: float = 0.5) -> torch.Tensor:
    """Attention rollout (B, N, N) from per-layer maps (B, heads, N, N), first layer first.

    Row i of the result says how much each input token flows into output token i; rows sum to one.
    """
    if not attention_maps:
        raise ValueError('No attention maps: the model has no encoder layers.')
    batch, _, num_tokens, _ = attention_maps[0].shape
    eye = torch.eye(num_tokens, dtype=attention_maps[0].dtype, device=attention_maps[0].device)
    rollout = eye.expand(batch, num_tokens, num_tokens)
    for attention in attention_maps:
        mixed = residual * eye + (1 - residual) * attention.mean(dim=1)
        mixed = mixed / mixed.sum(dim=-1, keepdim=True)
        rollout = mixed @ rollout
    return rollout


def routing_weights(
        model: nn.Module,
        images: torch.Tensor,
        method: str = 'rollout',
        target: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Share of each extraction point in the prediction, (B, 5), each row summing to one.

    Args:
        model: A GradAttn model; evaluated in eval mode and returned to its previous mode.
        images: Input batch.
        method: 'rollout' (attention maps) or 'gradient' (gradient x input on the tokens).
        target: Class whose logit the gradient method explains; the predicted class by default.
    """
    if method not in ROUTING_METHODS:
        raise ValueError(f'method={method!r} is not one of {ROUTING_METHODS}.')
    model = _routing_model(model)
    modes = _training_modes(model)
    model.eval()
    try:
        if method == 'rollout':
            with torch.no_grad():
                return attention_rollout(model.attention_maps(images)).mean(dim=1)
        with torch.no_grad():
            tokens = model.tokens(model.extract(images))
        tokens = tokens.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = model.forward_head(model.encode(tokens))
            if target is None:
                target = logits.argmax(dim=1)
            score = logits.gather(1, target.to(logits.device).long()[:, None]).sum()
            grad, = torch.autograd.grad(score, tokens)
        contribution = (grad * tokens).sum(dim=-1).abs().detach()
        total = contribution.sum(dim=1, keepdim=True)
        uniform = torch.full_like(contribution, 1.0 / contribution.shape[1])
        return torch.where(total > 0, contribution / total.clamp(min=torch.finfo(total.dtype).tiny), uniform)
    finally:
        _restore_training_modes(modes)


@dataclass
class RoutingSummary:
    """Routing weights averaged over a data set, overall and per true class."""
    method: str
    points: List[str]
    overall: List[float]                 # mean weight per extraction point over all samples
    per_class: List[List[float]]         # (classes x points) mean weight over the samples of each class
    class_counts: List[int]
    label_names: Optional[List[str]] = None


def routing_summary(
        model: nn.Module,
        loader: Iterable[Tuple[torch.Tensor, torch.Tensor]],
        method: str = 'rollout',
        num_classes: Optional[int] = None,
        label_names: Optional[Sequence[str]] = None,
        accelerator: Any = None,
        max_batches: Optional[int] = None,
) -> RoutingSummary:
    """Average ``routing_weights`` over a loader, overall and per true class.

    With an ``accelerator`` the loader is the prepared (sharded) one and the weights of every process
    are gathered with ``gather_for_metrics``, so padded duplicate samples are not counted.
    """
    core = _routing_model(model)
    device = next(core.parameters()).device
    all_weights, all_targets = [], []
    for batch_index, (images, targets) in enumerate(loader):
        if max_batches is not None and batch_index >= max_batches:
            break
        weights = routing_weights(core, images.to(device), method)
        targets = targets.to(weights.device)
        if accelerator is not None:
            weights, targets = accelerator.gather_for_metrics((weights, targets))
        all_weights.append(weights.double().cpu())
        all_targets.append(targets.long().cpu())
    if not all_weights:
        raise ValueError('The loader yielded no batches.')
    weights = torch.cat(all_weights)
    targets = torch.cat(all_targets)
    num_classes = num_classes or int(targets.max()) + 1
    counts = torch.bincount(targets, minlength=num_classes)
    sums = torch.zeros(num_classes, weights.shape[1], dtype=torch.float64).index_add_(0, targets, weights)
    per_class = sums / counts.clamp(min=1)[:, None].double()
    return RoutingSummary(
        method=method, points=list(extraction_point_names(core)), overall=weights.mean(dim=0).tolist(),
        per_class=per_class.tolist(), class_counts=counts.tolist(),
        label_names=list(label_names) if label_names is not None else None)


# --- attention of every family: which kind a model exposes, spatial maps, depth routing -------------------

ATTENTION_KINDS = ('tokens', 'spatial', 'depth')
# Which of the zoo's models expose each kind, for messages.
ATTENTION_MODELS = {
    'tokens': 'a GradAttn model (gradattn_resnet18_*)',
    'spatial': "CNNtention's resnet20_selfatt / resnet20_mha",
    'depth': 'an Attention Shortcuts net (asnet50_out, asnet50_kv, as_resnet50_stages)',
}


def _attention_modules() -> Tuple[Tuple[type, str], ...]:
    from .models.attention_shortcuts import DepthAttention
    from .models.cnntention import SpatialSelfAttention
    from .models.gradattn import EncoderLayer
    return (EncoderLayer, 'tokens'), (SpatialSelfAttention, 'spatial'), (DepthAttention, 'depth')


def attention_kind(model: nn.Module) -> Optional[str]:
    """Which attention maps the model's ``attention_maps(x)`` returns, or None when it exposes none.

        * 'tokens': per encoder layer (B, heads, T, T) over GradAttn's extraction-point tokens.
        * 'spatial': per stage (B, heads, N, N) over the N = H*W positions of the stage's map, rows are queries.
        * 'depth': per attention step (B, n) softmax weights over the n outputs stored so far, oldest first,
          averaged over pixels and heads.

    A model may state its kind as an ``attention_kind`` attribute; the zoo's models are recognised by the
    attention modules they are built from (so ``resnet20`` and ``resnet20_cbam`` have none).
    """
    model = unwrap_model(model)
    if not callable(getattr(model, 'attention_maps', None)):
        return None
    declared = getattr(model, 'attention_kind', None)
    if declared is not None:
        if declared not in ATTENTION_KINDS:
            raise ValueError(f'{type(model).__name__}.attention_kind={declared!r} is not one of {ATTENTION_KINDS}.')
        return declared
    kinds = _attention_modules()
    for module in model.modules():
        for module_type, kind in kinds:
            if isinstance(module, module_type):
                return kind
    return None


def _attention_model(model: nn.Module, kind: str) -> nn.Module:
    model = unwrap_model(model)
    found = attention_kind(model)
    if found != kind:
        has = 'no attention maps' if found is None else f'attention maps of kind {found!r}'
        raise TypeError(f'This needs attention maps of kind {kind!r}, as {ATTENTION_MODELS[kind]} has; '
                        f'{type(model).__name__} exposes {has}.')
    return model


def _in_eval_mode(model: nn.Module, read: Callable[[], Any]) -> Any:
    modes = _training_modes(model)
    model.eval()
    try:
        with torch.no_grad():
            return read()
    finally:
        _restore_training_modes(modes)


def images_per_class(
        batches: Iterable[Tuple[torch.Tensor, torch.Tensor]],
        num_classes: int,
        per_class: int = 2,
        max_classes: int = 10,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The first ``per_class`` images of each of the first ``max_classes`` classes, ordered by class.

    Reads batches only until every wanted class is filled; a class the data lacks is left out.
    """
    wanted = min(num_classes, max_classes)
    found: Dict[int, List[torch.Tensor]] = {label: [] for label in range(wanted)}
    for images, targets in batches:
        for image, label in zip(images, targets.tolist()):
            if label in found and len(found[label]) < per_class:
                found[label].append(image)
        if all(len(images_of_class) == per_class for images_of_class in found.values()):
            break
    labels = [label for label in found for _ in found[label]]
    if not labels:
        raise ValueError(f'No images of classes 0..{wanted - 1} in the batches.')
    return torch.stack([image for label in found for image in found[label]]), torch.tensor(labels)


def _grid(num_positions: int, height: int, width: int) -> Tuple[int, int]:
    """(h, w) with h * w = num_positions and the aspect closest to the image's: a stage map's shape."""
    pairs = [(h, num_positions // h) for h in range(1, num_positions + 1) if num_positions % h == 0]
    return min(pairs, key=lambda pair: abs(math.log(pair[0] / pair[1]) - math.log(height / width)))


@dataclass
class SpatialAttention:
    """Per stage, head-averaged spatial attention of a batch of images, each map (B, h, w) over positions."""
    centre: List[torch.Tensor]                # attention from the centre position; sums to one per image
    received: List[torch.Tensor]              # mean over queries of the attention each position receives; sums to one
    centre_positions: List[Tuple[int, int]]   # (row, column) of the centre query in each stage's map
    entropy: List[float]                      # mean entropy of the attention rows (per head) / log N: 1 = uniform

    def summary(self) -> Dict[str, Any]:
        """The numbers (not the maps) for a JSON file."""
        return dict(
            stages=[dict(grid=list(centre.shape[-2:]), centre=list(position), normalised_entropy=entropy)
                    for centre, position, entropy in zip(self.centre, self.centre_positions, self.entropy)],
            num_images=int(self.centre[0].shape[0]) if self.centre else 0)


def spatial_attention(model: nn.Module, images: torch.Tensor) -> SpatialAttention:
    """Where each stage's spatial attention looks, read through the model's ``attention_maps`` in eval mode."""
    model = _attention_model(model, 'spatial')
    maps = _in_eval_mode(model, lambda: model.attention_maps(images))
    height, width = images.shape[-2:]
    centre, received, positions, entropy = [], [], [], []
    for attention in maps:
        attention = attention.float()
        batch, _, num_positions, _ = attention.shape
        h, w = _grid(num_positions, height, width)
        row, column = h // 2, w // 2
        mean_over_heads = attention.mean(dim=1)
        centre.append(mean_over_heads[:, row * w + column].reshape(batch, h, w).cpu())
        received.append(mean_over_heads.mean(dim=1).reshape(batch, h, w).cpu())
        positions.append((row, column))
        row_entropy = -(attention * attention.clamp(min=1e-30).log()).sum(dim=-1)
        entropy.append(float(row_entropy.mean() / math.log(num_positions)) if num_positions > 1 else 0.0)
    return SpatialAttention(centre=centre, received=received, centre_positions=positions, entropy=entropy)


def _depth_step_names(model: nn.Module, num_steps: int) -> List[str]:
    """A name per attention step: the stage or block ('block<stage>.<block>', 1-based) whose input it forms."""
    stages = getattr(model, 'stages', None)
    stages = list(stages) if isinstance(stages, nn.Module) else []
    if stages and num_steps == len(stages):
        return [f'stage{s}' for s in range(1, num_steps + 1)]
    blocks = [f'block{s}.{b}' for s, stage in enumerate(stages, 1) for b in range(1, len(stage) + 1)
              if isinstance(stage, nn.Sequential)]
    if len(blocks) == num_steps:
        return blocks
    return [f'step{i}' for i in range(1, num_steps + 1)]


def depth_routing_weights(model: nn.Module, images: torch.Tensor) -> List[torch.Tensor]:
    """Per attention step l, (B, l + 1) softmax weights over the stored outputs, averaged over pixels and heads."""
    model = _attention_model(model, 'depth')
    return [weights.float() for weights in _in_eval_mode(model, lambda: model.attention_maps(images))]


@dataclass
class DepthRoutingSummary:
    """Which stored outputs each attention step reads, averaged over pixels, heads and a data set's images."""
    readers: List[str]          # rows: the block (or stage) whose input the attention forms
    memory: List[str]           # columns, oldest first: the stem output, then each reader's output
    weights: List[List[float]]  # row l: mean weight over memory[0..l] (ragged); each row sums to one
    num_samples: int


def depth_routing_summary(
        model: nn.Module,
        loader: Iterable[Tuple[torch.Tensor, torch.Tensor]],
        accelerator: Any = None,
        max_batches: Optional[int] = None,
) -> DepthRoutingSummary:
    """Average ``depth_routing_weights`` over a loader (gathered over processes with an ``accelerator``)."""
    core = _attention_model(model, 'depth')
    device = next(core.parameters()).device
    total: Optional[torch.Tensor] = None
    count = 0
    for batch_index, (images, _) in enumerate(loader):
        if max_batches is not None and batch_index >= max_batches:
            break
        steps = depth_routing_weights(core, images.to(device))
        # Rows padded to one (B, steps, steps) tensor, so one gather covers them all.
        table = torch.zeros(images.shape[0], len(steps), len(steps), device=device)
        for row, weights in enumerate(steps):
            table[:, row, :weights.shape[1]] = weights
        if accelerator is not None:
            table = accelerator.gather_for_metrics(table)
        count += table.shape[0]
        table = table.double().sum(dim=0).cpu()
        total = table if total is None else total + table
    if total is None:
        raise ValueError('The loader yielded no batches.')
    mean = total / count
    readers = _depth_step_names(core, mean.shape[0])
    return DepthRoutingSummary(
        readers=readers, memory=['stem'] + readers[:-1],
        weights=[mean[row, :row + 1].tolist() for row in range(mean.shape[0])], num_samples=count)
