"""Classification metrics of the GradAttn paper (sections 4.3-4.7), computed by torchmetrics.

``classification_metrics`` takes the logits and targets of a whole split (already gathered across
processes, without padding: see ``accelerator.gather_for_metrics``) and returns the keys shared by
training's ``results.json`` and the evaluation command: top-k accuracies in percent (as timm's
validate.py prints them), precision / recall / F1 / ECE as fractions and NLL in nats.
"""
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import (
    multiclass_accuracy, multiclass_calibration_error, multiclass_confusion_matrix, multiclass_f1_score,
    multiclass_precision, multiclass_recall,
)

__all__ = ['METRIC_KEYS', 'classification_metrics', 'confusion_matrix', 'topk_accuracy']

METRIC_KEYS = ('top1', 'top3', 'top5', 'precision_macro', 'precision_weighted', 'recall_macro', 'recall_weighted',
               'f1_macro', 'f1_weighted', 'ece', 'nll')


def topk_accuracy(logits: torch.Tensor, targets: torch.Tensor, k: int) -> float:
    """Top-k accuracy in percent, with k capped at the number of classes."""
    num_classes = logits.shape[1]
    k = min(k, num_classes)
    value = multiclass_accuracy(logits, targets, num_classes=num_classes, top_k=k, average='micro')
    return 100.0 * float(value)


def classification_metrics(
        logits: torch.Tensor,
        targets: torch.Tensor,
        topk: Sequence[int] = (1, 3, 5),
        ece_bins: int = 10,
) -> Dict[str, float]:
    """All paper metrics for one split; ``logits`` (N, C) and integer ``targets`` (N,)."""
    logits = logits.detach().float().cpu()
    targets = targets.detach().long().cpu()
    if logits.ndim != 2 or targets.ndim != 1 or len(logits) != len(targets):
        raise ValueError(f'Expected logits (N, C) and targets (N,), got {tuple(logits.shape)} and {tuple(targets.shape)}.')
    if len(targets) == 0:
        raise ValueError('No samples to evaluate: the split is empty.')
    num_classes = logits.shape[1]
    out = {f'top{k}': topk_accuracy(logits, targets, k) for k in topk}
    common = dict(num_classes=num_classes, zero_division=0)
    for name, fn in (('precision', multiclass_precision), ('recall', multiclass_recall), ('f1', multiclass_f1_score)):
        for average in ('macro', 'weighted'):
            out[f'{name}_{average}'] = float(fn(logits, targets, average=average, **common))
    probs = logits.softmax(dim=1)
    out['ece'] = float(multiclass_calibration_error(probs, targets, num_classes=num_classes, n_bins=ece_bins, norm='l1'))
    out['nll'] = float(F.cross_entropy(logits, targets))
    return out


def confusion_matrix(logits: torch.Tensor, targets: torch.Tensor, num_classes: Optional[int] = None) -> torch.Tensor:
    """Counts (true class x predicted class)."""
    num_classes = num_classes or logits.shape[1]
    return multiclass_confusion_matrix(logits.float().cpu(), targets.long().cpu(), num_classes=num_classes)
