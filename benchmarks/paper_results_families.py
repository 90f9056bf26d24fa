"""The published figures of the zoo's other two families, as data: what their reproductions are compared with.

- CNNtention (Kapila, Glattki & Rathi, arXiv:2412.11657): test top-1 accuracy (%) of one unseeded run per
  model and dataset, the "final accuracy" evaluated once after training stopped (early stopping on the test
  error, last weights kept). The paper's table could not be read; the figures are the authors' logged final runs
  (github.com/AttentionSeekers/CNNtention, MLflow run ids below), which match the published summary's CIFAR-10
  figures exactly (../shared/SEED_SYSTEMS.md, A.7).
- Attention Shortcuts (Erroz & Galar, AIMS Press, 2025), Table 2: test classification error (%), mean ± SD over
  5 runs, of the final network after 64k updates (SEED_SYSTEMS.md, B.10).

These are the papers' numbers, typed in once; they are never results of this project.
``benchmarks/reproduce.py --family cnntention|attention-shortcuts`` prints each beside what it measured.
"""
from typing import Dict, Optional, Tuple

from timm_gradattn.families import FAMILIES

__all__ = ['CNNTENTION_CITATION', 'CNNTENTION_MODEL_NAMES', 'CNNTENTION_TOP1', 'CNNTENTION_RUN_IDS',
           'CNNTENTION_NOTES', 'ATTENTION_SHORTCUTS_CITATION', 'ATTENTION_SHORTCUTS_MODEL_NAMES',
           'ATTENTION_SHORTCUTS_ERROR', 'ATTENTION_SHORTCUTS_NOTES', 'cnntention_figure', 'attention_shortcuts_figure']

CNNTENTION_CITATION = f"{FAMILIES['cnntention'].paper.citation}; figures of the authors' final logged runs"
CNNTENTION_MODEL_NAMES = {
    'resnet20': 'ResNet-20',
    'resnet20_selfatt': 'ResNet-20 + SelfAtt',
    'resnet20_mha': 'ResNet-20 + MHA',
    'resnet20_cbam': 'ResNet-20 + CBAM',
}
# CNNTENTION_TOP1[dataset][model] = test top-1 accuracy (%) of the authors' final run.
CNNTENTION_TOP1: Dict[str, Dict[str, float]] = {
    'cifar10': {'resnet20': 90.96, 'resnet20_selfatt': 91.44, 'resnet20_mha': 91.06, 'resnet20_cbam': 91.32},
    'mnist': {'resnet20': 98.52, 'resnet20_selfatt': 99.30, 'resnet20_mha': 98.84, 'resnet20_cbam': 98.00},
}
CNNTENTION_RUN_IDS: Dict[str, Dict[str, str]] = {
    'cifar10': {'resnet20': '8da960ad', 'resnet20_selfatt': 'e54b50f2', 'resnet20_mha': 'f5b8adbb',
                'resnet20_cbam': 'd46a11c0'},
    'mnist': {'resnet20': '08ef1e5e', 'resnet20_selfatt': '7b75f067', 'resnet20_mha': 'b88ac087',
              'resnet20_cbam': '1717fd3a'},
}
CNNTENTION_NOTES = (
    'One unseeded run per model; the authors stopped early on the test error (patience 20; the MNIST baseline 10) '
    'and kept the last weights, so their figure is a last-epoch one, chosen with the test set in view. Allow '
    'about ±0.3-0.5 points.',
    'The attention models\' figures come from Adam runs (SGD for the baseline); --recipe cnntention follows that, '
    '--recipe cnntention-sgd trains all four with the baseline\'s SGD recipe, to which the authors\' figures do '
    'not strictly apply.',
    'MNIST: the published summary gives the attention models as "98.52% to 98.86-99.04%", a range that matches '
    'none of the authors\' final MNIST runs (99.30, 98.84, 98.00, shown here); the paper\'s own MNIST figures are '
    'unverified.',
)

ATTENTION_SHORTCUTS_CITATION = f"{FAMILIES['attention-shortcuts'].paper.citation}, Table 2"
ATTENTION_SHORTCUTS_MODEL_NAMES = {
    'asnet50_out': 'AS_out-Net-50',
    'asnet50_kv': 'AS_KV-Net-50',
    'as_resnet50_stages': 'AS_stages-ResNet-50',
    'resnet50_cifar': 'ResNet-50',
    'resnet50_cifar_050': 'ResNet-50 0.5x',
    'resnet50_cifar_plain': 'plain-ResNet-50',
}
# ATTENTION_SHORTCUTS_ERROR[dataset][model] = (mean, SD) of the test error (%) over 5 runs.
ATTENTION_SHORTCUTS_ERROR: Dict[str, Dict[str, Tuple[float, float]]] = {
    'cifar10': {'asnet50_out': (5.63, 0.13), 'asnet50_kv': (5.97, 0.10), 'as_resnet50_stages': (5.06, 0.09),
                'resnet50_cifar': (5.10, 0.10), 'resnet50_cifar_050': (5.74, 0.14),
                'resnet50_cifar_plain': (8.41, 0.20)},
    'cifar100': {'asnet50_out': (24.72, 0.35), 'asnet50_kv': (24.92, 0.51), 'as_resnet50_stages': (22.47, 0.34),
                 'resnet50_cifar': (22.12, 0.38), 'resnet50_cifar_050': (24.08, 0.26),
                 'resnet50_cifar_plain': (40.02, 2.15)},
}
ATTENTION_SHORTCUTS_NOTES = (
    'The paper\'s figures: mean ± SD over 5 runs of the test error after 64k updates on all 50k training images '
    '(that the final network is reported, not a best epoch, is our reading; the paper does not say).',
    'ResNet-50 0.5x is read as all widths halved (the paper\'s "0.5x" is ambiguous); the AS nets\' parameter '
    'counts differ from the paper\'s Table 1 (12.37 M and 15.43 M against 12.7 M and 16.2 M), so the '
    'architectures may not be exactly the paper\'s.',
)


def cnntention_figure(dataset: str, model: str) -> Optional[float]:
    """The CNNtention authors' test top-1 (%) for one cell, or None where they published none."""
    return CNNTENTION_TOP1.get(dataset, {}).get(model)


def attention_shortcuts_figure(dataset: str, model: str) -> Optional[Tuple[float, float]]:
    """The Attention Shortcuts paper's (mean, SD) test error (%) for one cell, or None where it published none."""
    return ATTENTION_SHORTCUTS_ERROR.get(dataset, {}).get(model)
