"""The GradAttn paper's published figures, as data: what a reproduction is compared with.

Source: Ghoshal & Buckchash, "GradAttn: Transformer-Based Modulation of Residual Approach for
Classification and Representation Learning Problems", Applied Sciences 16(11):5252, 2026
(arXiv:2603.26756), Tables 3, 4, 6, 7, 8 and 9. These are the paper's numbers, typed in once; they are
never results of this project. ``benchmarks/reproduce.py`` prints each of them next to what it measured.

Units follow the paper: accuracies, train-validation gaps in percent; F1 and ECE as fractions; GHS as a
fraction of layers; seconds per epoch on the paper's own hardware. Several figures of the paper come
from a reference implementation with known defects (double-normalised CIFAR-10 / FashionMNIST training
images, test metrics of the last rather than the best epoch, a GHS denominator with hooks that never
fire, a per-image PAD-UFES-20 split), so a faithful reproduction is not expected to match all of them.

``LITERATURE_TOP1`` holds what the paper's figures are checked against: published top-1 of the same
architecture trained from scratch elsewhere (not the paper's numbers, and not this project's).
"""
from typing import Dict, Optional, Tuple

from timm_gradattn.families import FAMILIES

__all__ = ['PAPER_CITATION', 'PAPER_MODEL_NAMES', 'PAPER_TABLES', 'PAPER_NOTES', 'paper_figure', 'LITERATURE_TOP1',
           'literature_figure']

PAPER_CITATION = FAMILIES['gradattn'].paper.citation

# The paper's column names for the models of this project.
PAPER_MODEL_NAMES = {
    'resnet18': 'ResNet-18',
    'gradattn_resnet18_nope': 'GradAttn No PE',
    'gradattn_resnet18_lpe': 'GradAttn Learnable PE',
    'gradattn_resnet18_rope': 'GradAttn RoPE',
    'resnet18_se': 'ResNet-18+SE',
    'resnet18_cbam': 'ResNet-18+CBAM',
}


def _by_model(values, models=('resnet18', 'gradattn_resnet18_nope', 'gradattn_resnet18_lpe',
                              'gradattn_resnet18_rope')) -> Dict[str, float]:
    """The paper lists its four main models in one order: ResNet-18, No PE, Learnable PE, RoPE."""
    return dict(zip(models, values))


# PAPER_TABLES[table number][metric][dataset][model] = the published figure.
PAPER_TABLES: Dict[int, Dict[str, Dict[str, Dict[str, float]]]] = {
    # Table 3: test top-1 accuracy (%).
    3: {'top1': {
        'tiny_imagenet': _by_model((33.02, 35.89, 34.72, 37.67)),
        'svhn': _by_model((97.98, 98.09, 98.09, 98.15)),
        'cifar10': _by_model((92.10, 88.68, 86.49, 89.16)),
        'fashion_mnist': _by_model((64.11, 66.70, 75.18, 62.40)),
        'tissuemnist': _by_model((69.88, 69.79, 69.88, 69.72)),
        'bloodmnist': _by_model((95.97, 96.23, 94.48, 95.59)),
        'pcam': _by_model((80.71, 79.65, 79.74, 79.82)),
        'pad_ufes_20': _by_model((55.49, 50.29, 50.58, 47.69)),
    }},
    # Table 4: top-3 / top-5 accuracy (%), F1 and ECE (fractions), for the pairs the paper lists.
    4: {
        'top3': {'tiny_imagenet': {'resnet18': 50.52, 'gradattn_resnet18_rope': 56.45},
                 'fashion_mnist': {'resnet18': 92.21, 'gradattn_resnet18_lpe': 96.93},
                 'tissuemnist': {'resnet18': 93.83, 'gradattn_resnet18_lpe': 93.92}},
        'top5': {'tiny_imagenet': {'resnet18': 58.62, 'gradattn_resnet18_rope': 64.81},
                 'fashion_mnist': {'resnet18': 98.06, 'gradattn_resnet18_lpe': 99.30},
                 'tissuemnist': {'resnet18': 98.55, 'gradattn_resnet18_lpe': 98.64}},
        'f1': {'tiny_imagenet': {'resnet18': 0.327, 'gradattn_resnet18_rope': 0.373},
               'fashion_mnist': {'resnet18': 0.589, 'gradattn_resnet18_lpe': 0.723},
               'tissuemnist': {'resnet18': 0.695, 'gradattn_resnet18_lpe': 0.696}},
        'ece': {'tiny_imagenet': {'resnet18': 0.344, 'gradattn_resnet18_rope': 0.197},
                'fashion_mnist': {'resnet18': 0.193, 'gradattn_resnet18_lpe': 0.121},
                'tissuemnist': {'resnet18': 0.067, 'gradattn_resnet18_lpe': 0.039}},
    },
    # Table 5 (precision / recall / F1, macro and weighted): its figures are not transcribed here.
    5: {},
    # Table 6: |train top-1 - val top-1| at convergence (%).
    6: {'train_val_gap': {
        'tiny_imagenet': _by_model((65.77, 16.24, 14.30, 25.38)),
        'svhn': _by_model((0.70, 0.94, 1.29, 1.34)),
        'cifar10': _by_model((6.52, 5.47, 3.16, 6.62)),
        'fashion_mnist': _by_model((11.57, 10.85, 8.97, 10.96)),
        'tissuemnist': _by_model((5.39, 1.31, 1.75, 1.58)),
        'bloodmnist': _by_model((0.57, 0.43, 0.63, 0.15)),
        'pcam': _by_model((5.86, 7.37, 7.31, 8.33)),
        'pad_ufes_20': _by_model((3.46, 3.27, 2.95, 4.21)),
    }},
    # Table 7: Gradient Health Score on Tiny ImageNet, and the layers the paper counts as vanishing.
    7: {
        'ghs': {'tiny_imagenet': _by_model((1.00, 0.80, 0.80, 0.73))},
        'vanishing': {'tiny_imagenet': {'gradattn_resnet18_rope': 8}},
    },
    # Table 8: average training time per epoch (s), on the paper's hardware.
    8: {'seconds_per_epoch': {
        'tiny_imagenet': _by_model((50.90, 56.53, 58.17, 58.59)),
        'cifar10': _by_model((42.03, 40.45, 40.50, 40.84)),
        'fashion_mnist': _by_model((36.33, 37.42, 37.50, 38.94)),
        'bloodmnist': _by_model((12.52, 11.86, 12.97, 13.28)),
    }},
    # Table 9: top-1 accuracy (%) of the attention-module baselines.
    9: {'top1': {
        'tiny_imagenet': {'resnet18_se': 32.01, 'resnet18_cbam': 31.76},
        'svhn': {'resnet18_se': 97.94, 'resnet18_cbam': 97.99},
        'fashion_mnist': {'resnet18_se': 63.11, 'resnet18_cbam': 66.98},
    }},
}

# What a reader must know to compare with a table's figures.
PAPER_NOTES: Dict[int, str] = {
    3: 'CIFAR-10 and FashionMNIST figures come from training images normalised twice, and every test figure '
       'from the last trained epoch rather than the restored best weights (reference-code defects).',
    4: 'The paper lists these metrics for a few (dataset, model) pairs only; its F1 is compared with our '
       'macro F1.',
    5: "The paper's Table 5 figures are not transcribed in this project: its column reads n/a.",
    6: 'Gap between train and validation top-1 at the best epoch, in percentage points.',
    7: "The paper gives one GHS per model (its band is not stated with the figure); its reference code "
       "scores output gradients in (1e-6, 10) and counts hooks that never fire, which caps GradAttn's "
       "score (at 32/35 or 38/41) whatever the gradients are.",
    8: "Seconds per epoch on the paper's hardware; ours are on the machine named in the table.",
    9: 'ResNet-18 paper figures are those of Table 3.',
}


def paper_figure(table: int, metric: str, dataset: str, model: str) -> Optional[float]:
    """The paper's figure for one cell, or None where the paper publishes none."""
    if table not in PAPER_TABLES:
        raise KeyError(f'The paper has no table {table} here; known tables: {sorted(PAPER_TABLES)}.')
    return PAPER_TABLES[table].get(metric, {}).get(dataset, {}).get(model)


# LITERATURE_TOP1[dataset][model] = (top-1 %, source): the same architecture trained from scratch by others.
# The paper's FashionMNIST ResNet-18 (64.11 %) trained on double-normalised images; this is what one reaches without.
LITERATURE_TOP1: Dict[str, Dict[str, Tuple[float, str]]] = {
    'fashion_mnist': {'resnet18': (94.9, 'Fashion-MNIST benchmark README (zalandoresearch/fashion-mnist), '
                                         'ResNet-18 from scratch with flip, translate and rotate augmentation; '
                                         'approximate')},
}


def literature_figure(dataset: str, model: str) -> Optional[Tuple[float, str]]:
    """(top-1 %, source) of ``model`` trained from scratch on ``dataset`` in the literature, or None."""
    return LITERATURE_TOP1.get(dataset, {}).get(model)
