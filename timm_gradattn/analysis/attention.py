"""Attention routing: which inputs each family's attention reads, which the papers do not show.

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
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from timm.utils import unwrap_model

from ..models.attention_shortcuts import DepthAttention
from ..models.cnntention import SpatialSelfAttention
from ..models.gradattn import EncoderLayer
from ..preserve import preserved_state

__all__ = ['ATTENTION_KINDS', 'ATTENTION_MODELS', 'DepthRoutingSummary', 'ROUTING_METHODS', 'RoutingSummary',
           'SpatialAttention', 'attention_kind', 'attention_rollout', 'depth_routing_summary', 'depth_routing_weights',
           'extraction_point_names', 'images_per_class', 'routing_summary', 'routing_weights', 'spatial_attention']

ROUTING_METHODS = ('rollout', 'gradient')

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
    with preserved_state(model, buffers=False, rng=False):
        model.eval()
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
    'tokens': 'a GradAttn model',
    'spatial': "CNNtention's SelfAtt and MHA models",
    'depth': 'an Attention Shortcuts net (not its BatchNorm baselines)',
}
# The modules a model of each kind is built from.
_ATTENTION_MODULES = ((EncoderLayer, 'tokens'), (SpatialSelfAttention, 'spatial'), (DepthAttention, 'depth'))


def attention_kind(model: nn.Module) -> Optional[str]:
    """Which attention maps the model's ``attention_maps(x)`` returns, or None when it exposes none.

        * 'tokens': per encoder layer (B, heads, T, T) over GradAttn's extraction-point tokens.
        * 'spatial': per stage (B, heads, N, N) over the N = H*W positions of the stage's map, rows are queries.
        * 'depth': per attention step (B, n) softmax weights over the n outputs stored so far, oldest first,
          averaged over pixels and heads.

    A model may state its kind as an ``attention_kind`` attribute; the zoo's models are recognised by the
    attention modules they are built from (so the plain and CBAM ResNet-20 have none).
    """
    model = unwrap_model(model)
    if not callable(getattr(model, 'attention_maps', None)):
        return None
    declared = getattr(model, 'attention_kind', None)
    if declared is not None:
        if declared not in ATTENTION_KINDS:
            raise ValueError(f'{type(model).__name__}.attention_kind={declared!r} is not one of {ATTENTION_KINDS}.')
        return declared
    kinds = _ATTENTION_MODULES
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
        raise TypeError(f'This needs attention maps of kind {kind!r} ({ATTENTION_MODELS[kind]}); '
                        f'{type(model).__name__} exposes {has}.')
    return model


def _in_eval_mode(model: nn.Module, read: Callable[[], Any]) -> Any:
    with preserved_state(model, buffers=False, rng=False), torch.no_grad():
        model.eval()
        return read()


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
