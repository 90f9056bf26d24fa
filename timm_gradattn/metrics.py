"""Predictions and classification metrics of the GradAttn paper (sections 4.3-4.7).

``predict`` gathers the logits and targets of a whole split across processes, without Accelerate's padding.
``evaluate_logits`` measures them once: the keys shared by training's ``results.json`` and the evaluation
command (top-k accuracies in percent, as timm's validate.py prints them; precision / recall / F1 / ECE as
fractions; NLL in nats), with the confusion matrix and calibration bins both commands plot.

Counting is done once, exactly, in integers (a confusion matrix by ``torch.bincount``); every ratio is then
taken in float64. float32 reductions (torchmetrics' among them) turn 57 of 200 correct into 28.499999 % instead
of 28.5 %.

Definitions (all match scikit-learn with ``zero_division=0``):
    * top-k: the target is among the k highest logits, k capped at the number of classes; ties are
      ranked by class index, so top-1 is exactly the argmax prediction of the confusion matrix. Where k is at least
      the number of classes (the logits per sample), top-k is 100 % whatever the model does: ``evaluate_logits``
      records it as None (the key stays, for readers of results.json and metrics.json), and nothing prints it.
    * precision / recall / F1, macro: unweighted mean over the classes that occur in the targets or
      the predictions; weighted: mean over classes weighted by their number of targets.
    * ECE: 10 equal-width bins of the top-1 softmax probability, bins closed on the right
      ((0, 0.1], ..., (0.9, 1.0]), ``sum_b |B_b| / n * |accuracy(B_b) - confidence(B_b)|``.
    * NLL: mean cross-entropy of the softmax of the logits, in nats.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['METRIC_KEYS', 'ClassificationResult', 'ReliabilityBins', 'classification_metrics', 'confusion_matrix',
           'evaluate_logits', 'per_class_metrics', 'predict', 'reliability_bins', 'topk_accuracy', 'topk_informs']

METRIC_KEYS = ('top1', 'top3', 'top5', 'precision_macro', 'precision_weighted', 'recall_macro', 'recall_weighted',
               'f1_macro', 'f1_weighted', 'ece', 'nll')


def predict(model: nn.Module, loader, accelerator) -> Tuple[torch.Tensor, torch.Tensor]:
    """Logits and targets of a whole prepared loader, gathered from every process.

    ``gather_for_metrics`` drops the samples Accelerate repeats to give every process equal batches, so
    each sample counts once however many processes run. Returns CPU tensors, the same on every process.
    """
    model.eval()
    all_logits, all_targets = [], []
    with torch.no_grad(), accelerator.autocast():
        for images, targets in loader:
            logits, targets = accelerator.gather_for_metrics((model(images), targets))
            all_logits.append(logits.float().cpu())
            all_targets.append(targets.cpu())
    return torch.cat(all_logits), torch.cat(all_targets)


def _check_inputs(logits: torch.Tensor, targets: torch.Tensor):
    logits = logits.detach().cpu().double()
    targets = targets.detach().cpu().long()
    if logits.ndim != 2 or targets.ndim != 1 or len(logits) != len(targets):
        raise ValueError(
            f'Expected logits (N, C) and targets (N,), got {tuple(logits.shape)} and {tuple(targets.shape)}.')
    if len(targets) == 0:
        raise ValueError('No samples to evaluate: the split is empty.')
    finite_rows = torch.isfinite(logits).all(dim=1)
    if not finite_rows.all():
        # NaN compares false with everything, so a NaN row would otherwise rank its target first (top-1 "correct").
        raise ValueError(f'{int((~finite_rows).sum())} of {len(logits)} samples have NaN or infinite logits: the '
                         f'model\'s weights or inputs are not finite (a diverged training run?). Metrics need finite '
                         f'logits; check the checkpoint with torch.isfinite on its tensors.')
    num_classes = logits.shape[1]
    if targets.min() < 0 or targets.max() >= num_classes:
        raise ValueError(
            f'Targets must lie in [0, {num_classes - 1}] for {num_classes} logits per sample, got labels '
            f'{int(targets.min())}..{int(targets.max())}. Does the model have the dataset\'s number of classes?')
    return logits, targets


def _target_rank(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Position of the target in each row sorted by decreasing logit, ties broken by class index."""
    target_logit = logits.gather(1, targets[:, None])
    class_index = torch.arange(logits.shape[1])[None, :]
    ahead = (logits > target_logit) | ((logits == target_logit) & (class_index < targets[:, None]))
    return ahead.sum(dim=1)


def topk_accuracy(logits: torch.Tensor, targets: torch.Tensor, k: int) -> float:
    """Top-k accuracy in percent, with k capped at the number of classes."""
    logits, targets = _check_inputs(logits, targets)
    if k < 1:
        raise ValueError(f'k must be at least 1, got {k}.')
    k = min(k, logits.shape[1])
    correct = int((_target_rank(logits, targets) < k).sum())
    return 100.0 * correct / len(targets)  # 100 * correct first keeps e.g. 57 / 200 at exactly 28.5


def topk_informs(k: int, num_classes: int) -> bool:
    """Whether top-k accuracy says anything about a model of ``num_classes`` outputs: top-1 always, a larger k only
    below the number of classes (from there on every target is among the top k)."""
    return k == 1 or k < num_classes


def confusion_matrix(logits: torch.Tensor, targets: torch.Tensor, num_classes: Optional[int] = None) -> torch.Tensor:
    """Counts (true class x predicted class), int64, for ``num_classes`` classes (at least the logits' width)."""
    logits, targets = _check_inputs(logits, targets)
    num_classes = max(num_classes or 0, logits.shape[1])
    cells = targets.long() * num_classes + logits.argmax(dim=1)
    return torch.bincount(cells, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _safe_ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    # zero_division = 0, as in the paper's scikit-learn calls
    return torch.where(denominator > 0, numerator / denominator.clamp(min=1e-300), torch.zeros_like(numerator))


def per_class_metrics(counts: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Per-class precision, recall, F1 (float64) and support from a confusion matrix of counts."""
    counts = counts.double()
    true_positive = counts.diag()
    predicted = counts.sum(dim=0)
    support = counts.sum(dim=1)
    precision = _safe_ratio(true_positive, predicted)
    recall = _safe_ratio(true_positive, support)
    f1 = _safe_ratio(2 * true_positive, predicted + support)  # = 2PR / (P + R), defined when P + R = 0
    return dict(precision=precision, recall=recall, f1=f1, support=support, predicted=predicted)


@dataclass
class ReliabilityBins:
    """Equal-width bins of top-1 confidence: what the ECE sums and the reliability diagram draws."""
    edges: List[float]          # n_bins + 1 bin edges, 0 to 1
    count: List[int]            # samples per bin
    accuracy: List[float]       # fraction correct per bin (0 for empty bins)
    confidence: List[float]     # mean top-1 probability per bin (0 for empty bins)

    @property
    def ece(self) -> float:
        total = sum(self.count)
        return sum(n / total * abs(a - c) for n, a, c in zip(self.count, self.accuracy, self.confidence))


def reliability_bins(probs: torch.Tensor, targets: torch.Tensor, n_bins: int = 10) -> ReliabilityBins:
    """Bin samples by their top-1 probability into ``n_bins`` bins (lo, hi]; the first bin also takes 0."""
    probs = probs.detach().cpu().double()
    targets = targets.detach().cpu().long()
    if n_bins < 1:
        raise ValueError(f'n_bins must be at least 1, got {n_bins}.')
    confidence, predicted = probs.max(dim=1)
    correct = predicted.eq(targets).double()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    # bucketize with right=False puts x into bin i when edges[i] < x <= edges[i + 1]
    index = (torch.bucketize(confidence, edges[1:-1], right=False)).clamp(0, n_bins - 1)
    count = torch.bincount(index, minlength=n_bins)
    conf_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, index, confidence)
    correct_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, index, correct)
    nonempty = count.clamp(min=1).double()
    return ReliabilityBins(
        edges=edges.tolist(), count=count.tolist(),
        accuracy=(correct_sum / nonempty).tolist(), confidence=(conf_sum / nonempty).tolist())


@dataclass
class ClassificationResult:
    """One split measured once: the metrics, and the counts and bins the plots draw."""
    metrics: Dict[str, Optional[float]]     # METRIC_KEYS (top-k None where k >= the classes: topk_informs)
    confusion: torch.Tensor                 # counts, true class x predicted class (int64)
    per_class: Dict[str, torch.Tensor]      # per_class_metrics(confusion)
    reliability: ReliabilityBins


def evaluate_logits(
        logits: torch.Tensor,
        targets: torch.Tensor,
        num_classes: Optional[int] = None,
        topk: Sequence[int] = (1, 3, 5),
        ece_bins: int = 10,
) -> ClassificationResult:
    """All paper metrics for one split; ``logits`` (N, C), integer ``targets`` (N,) and the dataset's
    ``num_classes`` (the side of the confusion matrix; at least C). Top-k for k of C or more is None
    (``topk_informs``)."""
    logits, targets = _check_inputs(logits, targets)
    metrics = {f'top{k}': topk_accuracy(logits, targets, k) if topk_informs(k, logits.shape[1]) else None
               for k in topk}
    counts = confusion_matrix(logits, targets, num_classes)
    per_class = per_class_metrics(counts)
    # Macro averages skip classes absent from both targets and predictions (scikit-learn's label set).
    present = (per_class['support'] + per_class['predicted']) > 0
    weights = per_class['support'] / per_class['support'].sum()
    for name in ('precision', 'recall', 'f1'):
        metrics[f'{name}_macro'] = float(per_class[name][present].mean())
        metrics[f'{name}_weighted'] = float((per_class[name] * weights).sum())
    bins = reliability_bins(logits.softmax(dim=1), targets, ece_bins)  # float64, as _check_inputs returns
    metrics['ece'] = bins.ece
    metrics['nll'] = float(F.cross_entropy(logits, targets))
    return ClassificationResult(metrics=metrics, confusion=counts, per_class=per_class, reliability=bins)


def classification_metrics(logits: torch.Tensor, targets: torch.Tensor, topk: Sequence[int] = (1, 3, 5),
                           ece_bins: int = 10) -> Dict[str, float]:
    """``evaluate_logits(...).metrics``: the metrics alone."""
    return evaluate_logits(logits, targets, topk=topk, ece_bins=ece_bins).metrics
