"""Pretrained configurations shared by every model family of the zoo.

Each registered model gets one pretrained tag per paper dataset plus ``digits``; the dataset facts
(classes, input size, mean/std, label names, licence) come from ``timm_gradattn.data.info``.
Weights live on the Hugging Face Hub as ``<namespace>/<model>.<tag>``; the namespace defaults to
``timm-gradattn`` and is read from the environment variable ``TIMM_GRADATTN_HUB_NAMESPACE`` when
the package is imported, so users can point the registry at their own fine-tunes.
"""
import os
from typing import Any, Callable, Dict, Tuple

from timm.models import build_model_with_cfg

from ..data.info import DATASETS, PAPER_TAGS

__all__ = ['HUB_NAMESPACE_ENV', 'DEFAULT_HUB_NAMESPACE', 'PAPER_ID', 'hub_namespace', 'hub_repo_id',
           'dataset_cfgs', 'build_with_weights_hint', 'MissingWeightsError']

HUB_NAMESPACE_ENV = 'TIMM_GRADATTN_HUB_NAMESPACE'
DEFAULT_HUB_NAMESPACE = 'timm-gradattn'
PAPER_ID = 'arXiv:2603.26756'
# The default tag comes first: ``create_model('gradattn_resnet18_rope')`` means Tiny ImageNet.
TAGS: Tuple[str, ...] = PAPER_TAGS + ('digits',)


class MissingWeightsError(RuntimeError):
    """Pretrained weights for a model tag could not be found or downloaded."""


def hub_namespace() -> str:
    return os.environ.get(HUB_NAMESPACE_ENV, '').strip() or DEFAULT_HUB_NAMESPACE


def hub_repo_id(model_name: str, tag: str) -> str:
    return f'{hub_namespace()}/{model_name}.{tag}'


def dataset_cfgs(model_name: str, **kwargs: Any) -> Dict[str, Dict[str, Any]]:
    """``{'<model>.<tag>': cfg}`` for every dataset tag, for ``generate_default_cfgs``."""
    cfgs = {}
    for tag in TAGS:
        info = DATASETS[tag]
        cfgs[f'{model_name}.{tag}'] = {
            'hf_hub_id': hub_repo_id(model_name, tag),
            'num_classes': info.num_classes,
            'input_size': info.input_size,
            'pool_size': None,
            'crop_pct': 1.0,
            'interpolation': 'bilinear',
            'mean': info.mean,
            'std': info.std,
            'label_names': info.label_names,
            'license': info.license,
            'paper_ids': PAPER_ID,
            'paper_name': 'GradAttn: Transformer-Based Modulation of Residual Approach for '
                          'Classification and Representation Learning Problems',
            'notes': (f'Trained from scratch on {info.title} with the paper protocol.',),
            **kwargs,
        }
    return cfgs


def build_with_weights_hint(model_cls: Callable, variant: str, pretrained: bool, **kwargs: Any):
    """``build_model_with_cfg`` that turns a failed weight download into an error a user can act on.

    Unpublished or uncached weights otherwise surface as a bare Hub 404 / offline error. This names
    the repository and the ways to get weights: train and publish them, or load a local copy.
    """
    if not pretrained:
        return build_model_with_cfg(model_cls, variant, pretrained, **kwargs)
    try:
        return build_model_with_cfg(model_cls, variant, pretrained, **kwargs)
    except (OSError, RuntimeError, ValueError) as error:
        source = _describe_source(variant, kwargs)
        if source is None:
            raise
        raise MissingWeightsError(
            f'Could not load pretrained weights for {variant} from {source}: {type(error).__name__}: {error}\n'
            f'These weights may not be published yet, or you are offline and they are not in the Hugging '
            f'Face cache. To get weights: train them with `python train.py --model {variant} '
            f'--dataset <dataset> --recipe paper` and publish with `python -m timm_gradattn.publish '
            f'<run folder> --repo-id <namespace>/{variant}.<tag>`; load a local export with '
            f'create_model("local-dir:<folder>", pretrained=True) or pretrained_cfg_overlay=dict(file=...); '
            f'or point {HUB_NAMESPACE_ENV} at the namespace that holds them. '
            f'Use pretrained=False for random initialisation.'
        ) from error


def _describe_source(variant: str, kwargs: Dict[str, Any]):
    """The Hub repo a failed load came from, or None when the failure was not about fetching weights."""
    from timm.models._builder import resolve_pretrained_cfg
    cfg = resolve_pretrained_cfg(
        variant, pretrained_cfg=kwargs.get('pretrained_cfg'),
        pretrained_cfg_overlay=kwargs.get('pretrained_cfg_overlay')).to_dict()
    if cfg.get('source') in ('local-dir', 'file') or cfg.get('file') or cfg.get('state_dict') is not None:
        return None  # a local path the user gave: timm's own error already names it
    if cfg.get('hf_hub_id'):
        return f"the Hugging Face Hub repo '{cfg['hf_hub_id']}'"
    return None
