"""Every pretrained cfg field timm's tests and tools read is present and true, for every model and every tag.

In the manner of timm's own ``tests/test_models.py`` (``test_model_default_cfgs`` for CNNs,
``test_model_default_cfgs_non_std`` for token-output models such as ViTs), but over all tags rather than the
default one: the names in the cfg are real modules, ``pool_size`` is the map ``forward_features`` really
returns at the tag's input size, and the data facts are those of ``timm_gradattn.data.info``.

One test per model loops over its tags. Every model's cfgs, modules and map sizes at every tag are checked by
default; head removal and the pool-size rule at odd sizes for one model per family, the rest of the zoo under the
``zoo`` marker (``tests/tiers.py``).
"""
import re

import pytest
import torch

import timm
import timm_gradattn
from timm_gradattn import DATASETS
from timm_gradattn.families import FAMILIES, MODEL_NAMES
from timm_gradattn.models import model_tags
from timm_gradattn.models._pretrained import pool_size_at
from tiers import case, for_each_tag, one_per_family

ATTENTION_SHORTCUTS_MODELS = FAMILIES['attention-shortcuts'].models
# An identifier a tool can resolve (timm writes 'arXiv:2010.11929'), not a citation: an arXiv id or a DOI.
PAPER_ID = re.compile(r'arXiv:\d{4}\.\d{4,5}(v\d+)?|doi:10\.\d{4,9}/\S+')
INTERPOLATIONS = ('nearest', 'bilinear', 'bicubic', 'lanczos', 'box', 'hamming')


def _tagged_model(name, tag):
    torch.manual_seed(0)
    return timm.create_model(f'{name}.{tag}').eval()


def _module_weight(model, name):
    module = model.get_submodule(name)
    assert isinstance(getattr(module, 'weight', None), torch.Tensor), f'{name} has no weight'
    return module


def test_every_model_has_tags():
    for name in MODEL_NAMES:
        assert model_tags(name), f'{name} has no pretrained tags'


@pytest.mark.parametrize('name', MODEL_NAMES)
def test_data_fields_are_the_datasets(name):
    for_each_tag(name, _check_data_fields)


def _check_data_fields(name, tag):
    cfg = timm.models.get_pretrained_cfg(f'{name}.{tag}').to_dict()
    info = DATASETS[tag]
    assert tuple(cfg['input_size']) == info.input_size
    assert cfg['num_classes'] == info.num_classes
    assert tuple(cfg['mean']) == info.mean and tuple(cfg['std']) == info.std
    assert len(cfg['mean']) == len(cfg['std']) == cfg['input_size'][0]
    assert all(0 <= m <= 1 for m in cfg['mean']) and all(s > 0 for s in cfg['std'])
    assert 0 < cfg['crop_pct'] <= 1
    assert cfg['interpolation'] in INTERPOLATIONS
    if cfg.get('label_names') is not None:
        assert len(cfg['label_names']) == cfg['num_classes']
    assert cfg['hf_hub_id'] == timm_gradattn.hub_repo_id(name, tag)


@pytest.mark.parametrize('name', MODEL_NAMES)
def test_license_and_papers_are_stated(name):
    for_each_tag(name, _check_license_and_papers)


def _check_license_and_papers(name, tag):
    cfg = timm.models.get_pretrained_cfg(f'{name}.{tag}').to_dict()
    license = cfg['license']
    assert isinstance(license, str) and license == license.strip().lower() and ' ' not in license and license, \
        f'license {license!r} is not a Hub licence identifier'
    assert license == DATASETS[tag].license
    paper_ids = cfg.get('paper_ids')
    paper_ids = (paper_ids,) if isinstance(paper_ids, str) else tuple(paper_ids or ())
    # Every family states its paper; an identifier only where one exists (Attention Shortcuts has none known).
    assert paper_ids or name in FAMILIES['attention-shortcuts'].models, 'no paper_ids'
    for paper_id in paper_ids:
        assert PAPER_ID.fullmatch(paper_id), \
            f'paper id {paper_id!r} is neither arXiv:NNNN.NNNNN nor doi:10.NNNN/...; a citation belongs in paper_name'
    assert cfg['paper_name']


@pytest.mark.parametrize('name', MODEL_NAMES)
def test_cfg_names_real_modules_and_the_real_map_size(name):
    for_each_tag(name, _check_modules_and_map_size)


def _check_modules_and_map_size(name, tag):
    model = _tagged_model(name, tag)
    cfg = model.pretrained_cfg
    channels = cfg['input_size'][0]
    assert model.num_classes == cfg['num_classes'] and model.num_features > 0

    first_convs = (cfg['first_conv'],) if isinstance(cfg['first_conv'], str) else cfg['first_conv']
    for first_conv in first_convs:
        assert _module_weight(model, first_conv).weight.shape[1] == channels, first_conv
    classifiers = (cfg['classifier'],) if isinstance(cfg['classifier'], str) else cfg['classifier']
    for classifier in classifiers:
        assert _module_weight(model, classifier).weight.shape[0] == cfg['num_classes'], classifier
    assert model.get_classifier() is model.get_submodule(classifiers[0])

    images = torch.randn(1, *cfg['input_size'])
    with torch.no_grad():
        features = model.forward_features(images)
        assert model.forward_head(features).shape == (1, cfg['num_classes'])
    if features.ndim == 4:  # NCHW maps: timm's CNN rule
        assert features.shape[1] == model.num_features
        assert cfg['pool_size'] == tuple(features.shape[-2:]), \
            f'pool_size {cfg["pool_size"]} but forward_features gives {tuple(features.shape[-2:])} at {images.shape}'
    else:  # (batch, tokens, width): timm's rule for ViTs, whose token count is not a map size
        assert features.ndim == 3 and features.shape[-1] == model.num_features
        assert cfg['pool_size'] is None


@pytest.mark.parametrize('name', one_per_family())
def test_head_removal_gives_pooled_and_unpooled_features(name):
    model = _tagged_model(name, model_tags(name)[0])
    cfg = model.pretrained_cfg
    images = torch.randn(2, *cfg['input_size'])
    model.reset_classifier(0)
    with torch.no_grad():
        assert model(images).shape == (2, model.num_features)
    headless = timm.create_model(f'{name}.{model_tags(name)[0]}', num_classes=0).eval()
    with torch.no_grad():
        assert headless(images).shape == (2, headless.num_features)
    if cfg['pool_size'] is not None:  # a CNN without its pooling returns the map pool_size states
        unpooled = timm.create_model(f'{name}.{model_tags(name)[0]}', num_classes=0, global_pool='').eval()
        with torch.no_grad():
            assert tuple(unpooled(images).shape[-2:]) == cfg['pool_size']


@pytest.mark.parametrize('name', one_per_family())
def test_pool_size_rule_holds_at_odd_sizes(name):
    # pool_size_at (ceil of size over the total stride) against the real map, away from the tags' sizes.
    model = _tagged_model(name, model_tags(name)[0])
    if model.pretrained_cfg['pool_size'] is None:
        pytest.skip(f'{name} outputs tokens; it has no pool_size')
    channels = model.pretrained_cfg['input_size'][0]
    reduction = model.feature_info[-1]['reduction']
    for size in (15, 28, 33, 65):
        with case(f'{size} px'):
            with torch.no_grad():
                features = model.forward_features(torch.randn(1, channels, size, size))
            assert tuple(features.shape[-2:]) == pool_size_at((channels, size, size), reduction)
