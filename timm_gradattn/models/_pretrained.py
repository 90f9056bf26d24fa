"""Pretrained configurations shared by every model family of the zoo.

Each registered model gets one pretrained tag per dataset of its family's paper plus ``digits``, and its paper's
title and id (``timm_gradattn.families``); the dataset facts (classes, input size, mean/std, label names,
licence) come from ``timm_gradattn.data.info``. Where the weights live: ``timm_gradattn.models._hub``.
"""
import math
from typing import Any, Callable, Dict, Optional, Tuple, Union

from safetensors import SafetensorError
from timm.models import build_model_with_cfg, get_arch_pretrained_cfgs, parse_model_name, split_model_name_tag
from timm.models._builder import resolve_pretrained_cfg
from timm.models._hub import hf_split

from ..data.info import DATASETS
from ..families import family_of, paper_recipe
from ._hub import HUB_NAMESPACE_ENV, MissingWeightsError, hub_repo_id, hub_weights_problem

__all__ = ['dataset_cfgs', 'pool_size_at', 'model_tags', 'pretrained_name', 'build_with_weights_hint']


def pool_size_at(input_size: Tuple[int, ...], reduction: int) -> Tuple[int, int]:
    """The final feature map's (height, width) at ``input_size`` (C, H, W) for a CNN of total stride ``reduction``.

    Each stride-2 step of a timm-style CNN (3x3/7x7 conv or 3x3 max-pool with padding k // 2, or a 1x1 conv)
    maps n pixels to ceil(n / 2), and ceil(ceil(n / a) / b) = ceil(n / ab): 28 px at reduction 32 gives 1.
    """
    return tuple(math.ceil(size / reduction) for size in input_size[-2:])


def dataset_cfgs(
        model_name: str,
        paper_ids: Optional[Union[str, Tuple[str, ...]]] = None,
        paper_name: Optional[str] = None,
        reduction: Optional[int] = None,
        **kwargs: Any,
) -> Dict[str, Dict[str, Any]]:
    """``{'<model>.<tag>': cfg}`` for each tag of the model's family (the first is the default), for
    ``generate_default_cfgs``.

    The tags and the paper come from the family registry; a model built on another paper's architecture (the SE /
    CBAM baselines) passes its own ``paper_ids`` / ``paper_name``. Every other field comes from
    ``timm_gradattn.data.info``.
    A CNN passes ``reduction``, the total stride of ``forward_features`` (its last ``feature_info`` entry's),
    and each tag's ``pool_size`` is the final map size at that tag's input size (``pool_size_at``), as timm's
    model tests require; a token-output model (GradAttn, as timm's ViTs) leaves it None.
    """
    family = family_of(model_name)
    if family is None:
        raise KeyError(f'{model_name} is not in the family registry (timm_gradattn/families.py): add it there.')
    paper_ids = family.paper.ids if paper_ids is None else paper_ids
    paper_name = family.paper.title if paper_name is None else paper_name
    cfgs = {}
    for tag in family.tags:
        info = DATASETS[tag]
        cfgs[f'{model_name}.{tag}'] = {
            'hf_hub_id': hub_repo_id(model_name, tag),
            'num_classes': info.num_classes,
            'input_size': info.input_size,
            'pool_size': None if reduction is None else pool_size_at(info.input_size, reduction),
            'crop_pct': 1.0,
            'interpolation': 'bilinear',
            'mean': info.mean,
            'std': info.std,
            'label_names': info.label_names,
            'license': info.license,
            'paper_ids': paper_ids,
            'paper_name': paper_name,
            'notes': (f'Trained from scratch on {info.title} with the paper protocol.',),
            **kwargs,
        }
    return cfgs


def model_tags(model_name: str) -> Tuple[str, ...]:
    """The pretrained tags registered for ``model_name``, default first."""
    return tuple(name.split('.', 1)[1] for name in get_arch_pretrained_cfgs(model_name))


def pretrained_name(model: str, dataset: str) -> str:
    """The ``<model>.<tag>`` whose weights ``pretrained=True`` loads for a run on ``dataset``: the one rule of
    ``train.py --pretrained`` and ``evaluate --pretrained``.

    A registry name without a tag takes the dataset's tag where the model has one (the zoo's tags are dataset
    names: a zoo model on digits loads ``<model>.digits``), else the model's default tag, its first. A name with a tag, ``hf-hub:`` and ``local-dir:`` name their weights already and are kept.
    """
    source, name = parse_model_name(model)
    architecture, tag = split_model_name_tag(name)
    tags = model_tags(architecture) if source is None and not tag else ()
    if not tags:
        return model
    key = dataset.strip().lower().replace('-', '_')
    return f'{architecture}.{key if key in tags else tags[0]}'


def build_with_weights_hint(model_cls: Callable, variant: str, pretrained: bool, **kwargs: Any):
    """``build_model_with_cfg`` that turns a failed weight load into an error a user can act on.

    Unpublished or uncached weights otherwise surface as a bare Hub 404 / offline error, after timm's
    download has retried for tens of seconds; a corrupt file surfaces as a header error that names no file.
    This checks the Hub weights first (``timm_gradattn.hub.hub_weights_problem``: cache, then one request)
    and names the repository or file and the ways to get weights.
    """
    tag = kwargs.get('pretrained_cfg')
    known = model_tags(variant)
    if isinstance(tag, str) and tag not in known:
        raise RuntimeError(
            f'Unknown pretrained tag {tag!r} for {variant}. Known tags: {", ".join(known)} '
            f'(e.g. {variant}.{known[0]}).')
    if not pretrained:
        return build_model_with_cfg(model_cls, variant, pretrained, **kwargs)
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=kwargs.get('pretrained_cfg'),
                                 pretrained_cfg_overlay=kwargs.get('pretrained_cfg_overlay')).to_dict()
    repo_id, source = _weights_source(cfg)
    tag = cfg.get('tag')  # the default tag's when the name gave none
    if repo_id is not None:
        repo, revision = hf_split(repo_id)
        problem = hub_weights_problem(repo, revision, cache_dir=kwargs.get('cache_dir'))
        if problem is not None:
            raise MissingWeightsError(_missing_weights_message(variant, tag, source, problem))
    try:
        return build_model_with_cfg(model_cls, variant, pretrained, **kwargs)
    except SafetensorError as error:
        fix = ('delete the cached copy (`hf cache rm model/' + repo_id + '`) and load again' if repo_id
               else 'export or copy the weights again')
        raise MissingWeightsError(
            f'The pretrained weights {variant}.{tag} from {source} are not a readable safetensors file '
            f'({error}): the file is truncated or corrupt; {fix}.'
        ) from error
    except OSError as error:  # huggingface_hub's download errors; a weights/model mismatch stays timm's own
        if repo_id is None:
            raise  # a local path the user gave: timm's own error already names it
        raise MissingWeightsError(
            _missing_weights_message(variant, tag, source, f'{type(error).__name__}: {error}')) from error


def _missing_weights_message(variant: str, tag: str, source: str, reason: str) -> str:
    """Names the exact ``<model>.<tag>`` looked for; the zoo's tags are dataset names, so it trains on that one."""
    return (
        f'Could not load pretrained weights {variant}.{tag} from {source}: {reason}\n'
        f'These weights may not be published yet, or you are offline and they are not in the Hugging '
        f'Face cache. To get weights: train them with `python train.py --model {variant} --dataset {tag} '
        f'--recipe {paper_recipe(variant)}` and publish with `python -m timm_gradattn.publish <run folder> '
        f'--repo-id <namespace>/{variant}.{tag}`; load a local export with '
        f'create_model("local-dir:<folder>", pretrained=True) or pretrained_cfg_overlay=dict(file=...); '
        f'or point {HUB_NAMESPACE_ENV} at the namespace that holds them. '
        f'Use pretrained=False for random initialisation.'
    )


def _weights_source(cfg: Dict[str, Any]) -> Tuple[Optional[str], str]:
    """(Hub repo id or None for a local source, a description of the source) of a pretrained load's cfg."""
    if cfg.get('source') == 'local-dir':
        return None, f"the folder '{cfg.get('file')}'"
    if cfg.get('state_dict') is not None:
        return None, 'the given state_dict'
    if cfg.get('file'):
        return None, f"the file '{cfg['file']}'"
    if cfg.get('hf_hub_id'):
        return cfg['hf_hub_id'], f"the Hugging Face Hub repo '{cfg['hf_hub_id']}'"
    return None, f"the url '{cfg.get('url')}'"
