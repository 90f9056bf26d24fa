"""The timm interface of every model in the zoo: sizes, cfgs, heads, features, scripting, tracing, compiling.

The structural checks run for every model by default; scripting, tracing, graph capture, the fx and getter feature
wrappers and gradient checkpointing run for one model per family by default and for the rest of the zoo under the
``zoo`` marker (``tests/tiers.py``). Each model is built once per session (the ``zoo_model`` fixture).
"""
import re
from dataclasses import dataclass
from typing import Dict, Tuple

import pytest
import torch
import torch.nn as nn

import timm
import timm_gradattn
from timm.models._features import FeatureGetterNet, FeatureListNet
from timm.models._features_fx import FeatureGraphNet, create_feature_extractor, get_graph_node_names
from timm.models._manipulate import group_parameters
from timm.optim import create_optimizer_v2
from timm_gradattn import DATASETS
from timm_gradattn.families import FAMILIES, MODEL_NAMES
from timm_gradattn.models import model_tags
from timm_gradattn.models.cnntention import ResidualCbam
from tiers import case, is_representative, one_per_family

# The GradAttn designs (the family's other two models are timm's SE / CBAM ResNet-18).
GRADATTN_NAMES = tuple(name for name in FAMILIES['gradattn'].models if name.startswith('gradattn_'))
GRADATTN_TAGS = FAMILIES['gradattn'].tags
CNNTENTION_NAMES = FAMILIES['cnntention'].models
CNNTENTION_TAGS = FAMILIES['cnntention'].tags
ATTENTION_SHORTCUTS_NAMES = FAMILIES['attention-shortcuts'].models
ATTENTION_SHORTCUTS_TAGS = FAMILIES['attention-shortcuts'].tags


@dataclass(frozen=True)
class Expected:
    """What one registered model must be; every name in ``MODEL_NAMES`` needs a row in ``EXPECTED``."""
    params_3ch: int                        # 3 input channels, 10 classes
    params_1ch: int                        # 1 input channel, 10 classes
    feature_channels: Tuple[int, ...]      # feature_info / features_only / forward_intermediates, in order
    feature_reductions: Tuple[int, ...]
    num_features: int                      # == head_hidden_size
    features_shape: Tuple[int, ...]        # forward_features of one 32 px image, batch dimension dropped
    tags: Tuple[str, ...]                  # pretrained tags, default first
    channel_error: str                     # what a wrong channel count is refused with (regex)
    sizes: Tuple[int, ...] = (28, 32)      # image sides the output-shape check runs, 1 and 3 channels
    rgb_sizes: Tuple[int, ...] = ()        # further sides checked with 3 channels only (large inputs)
    feature_size: int = 32                 # image side for the features_only checks
    feature_wrapper: type = FeatureListNet  # what features_only builds when no feature_cls is given


# GradAttn and SE match the GradAttn paper's reference implementation exactly; timm's CBAM spatial gate
# has a BatchNorm (2 parameters x 8 blocks) the reference's has not: 11,269,466 + 16. For timm's ResNets
# only the 7x7 stem conv sees the input: 64 x 7 x 7 weights per input channel.
_GRADATTN = dict(
    feature_channels=(64, 64, 128, 256, 512),
    feature_reductions=(4, 4, 8, 16, 32),  # the first point is after the stem's max-pool
    num_features=256, features_shape=(5, 256),  # one token per extraction point
    tags=FAMILIES['gradattn'].tags, channel_error='in_chans=3', sizes=(28, 32, 64, 96), rgb_sizes=(224,), feature_size=64)
_RESNET18 = dict(
    feature_channels=(64, 64, 128, 256, 512),
    feature_reductions=(2, 4, 8, 16, 32),  # timm's ResNet reads the stem before its max-pool
    num_features=512, features_shape=(512, 1, 1),
    tags=FAMILIES['gradattn'].tags, channel_error='expected input.* to have 3 channels', sizes=(28, 32, 64, 96),
    rgb_sizes=(224,), feature_size=64)
# CNNtention: counts are those of the authors' reference modules; the stem is not a feature point.
_RESNET20 = dict(
    feature_channels=(16, 32, 64), feature_reductions=(1, 2, 4), num_features=64, features_shape=(64, 8, 8),
    tags=CNNTENTION_TAGS, channel_error='expected input.* to have 3 channels')
# Attention Shortcuts: ResNet-50 layouts with the CIFAR stem (3x3 stride 1, no max-pool), about 25x a ResNet-20
# per image, so the size checks stay small. The AS nets' attention reads a cache across blocks, which timm's
# module-walking FeatureListNet cannot run: their features_only is FeatureGetterNet (forward_intermediates).
# For the 1-channel counts only the 3x3 stem conv sees the input: stem width x 3 x 3 weights per input channel.
_ATTENTION_SHORTCUTS = dict(
    feature_reductions=(1, 1, 2, 4, 8), tags=ATTENTION_SHORTCUTS_TAGS,
    channel_error='expected input.* to have 3 channels', sizes=(16, 32), feature_size=32)
_RESNET50_CIFAR = dict(feature_channels=(64, 256, 512, 1024, 2048), num_features=2048, features_shape=(2048, 4, 4),
                       **_ATTENTION_SHORTCUTS)

EXPECTED: Dict[str, Expected] = {
    'gradattn_resnet18_nope': Expected(12_849_994, 12_843_722, **_GRADATTN),
    'gradattn_resnet18_lpe': Expected(12_851_274, 12_845_002, **_GRADATTN),
    'gradattn_resnet18_rope': Expected(12_847_690, 12_841_418, **_GRADATTN),
    'resnet18_se': Expected(11_268_682, 11_268_682 - 2 * 64 * 7 * 7, **_RESNET18),
    'resnet18_cbam': Expected(11_269_482, 11_269_482 - 2 * 64 * 7 * 7, **_RESNET18),
    'resnet20': Expected(269_722, 269_434, **_RESNET20),
    'resnet20_selfatt': Expected(286_189, 285_901, **_RESNET20),
    'resnet20_mha': Expected(291_677, 291_389, **_RESNET20),
    'resnet20_cbam': Expected(270_691, 270_403, **_RESNET20),
    'asnet50_out': Expected(
        12_373_642, 12_373_642 - 2 * 128 * 3 * 3, feature_channels=(128,) * 5, num_features=128,
        features_shape=(128, 4, 4), feature_wrapper=FeatureGetterNet, **_ATTENTION_SHORTCUTS),
    'asnet50_kv': Expected(
        15_426_506, 15_426_506 - 2 * 64 * 3 * 3, feature_channels=(64, 64, 128, 256, 512), num_features=512,
        features_shape=(512, 4, 4), feature_wrapper=FeatureGetterNet, **_ATTENTION_SHORTCUTS),
    'as_resnet50_stages': Expected(
        30_389_450, 30_389_450 - 2 * 64 * 3 * 3, feature_wrapper=FeatureGetterNet, **_RESNET50_CIFAR),
    'resnet50_cifar': Expected(23_520_842, 23_520_842 - 2 * 64 * 3 * 3, **_RESNET50_CIFAR),
    'resnet50_cifar_050': Expected(
        5_899_050, 5_899_050 - 2 * 32 * 3 * 3, feature_channels=(32, 128, 256, 512, 1024), num_features=1024,
        features_shape=(1024, 4, 4), **_ATTENTION_SHORTCUTS),
    'resnet50_cifar_plain': Expected(20_744_266, 20_744_266 - 2 * 64 * 3 * 3, **_RESNET50_CIFAR),
}


def _create(name, **kwargs):
    torch.manual_seed(0)
    kwargs.setdefault('num_classes', 10)
    return timm.create_model(name, **kwargs)


def _count(model):
    return sum(p.numel() for p in model.parameters())


def test_registry_lists_every_model_and_tag():
    assert set(timm.list_models('gradattn_*')) == set(GRADATTN_NAMES)
    assert set(timm.list_models(['resnet20', 'resnet20_*'])) == set(CNNTENTION_NAMES)
    assert set(timm.list_models(['asnet50_*', 'as_resnet50_*', 'resnet50_cifar*'])) == set(ATTENTION_SHORTCUTS_NAMES)
    assert sorted(EXPECTED) == sorted(MODEL_NAMES), 'every registered model needs a row in EXPECTED'
    for name in MODEL_NAMES:
        assert timm.is_model(name)
        assert model_tags(name) == EXPECTED[name].tags  # default tag first
        assert set(timm.list_pretrained(f'{name}.*')) == {f'{name}.{tag}' for tag in EXPECTED[name].tags}


@pytest.mark.parametrize('name', MODEL_NAMES)
def test_parameter_count_matches_reference(name, zoo_model):
    assert _count(zoo_model(name)) == EXPECTED[name].params_3ch


def test_cbam_differs_from_the_reference_only_by_its_spatial_gate_batchnorm(zoo_model):
    model = zoo_model('resnet18_cbam')
    spatial_norm = [n for n, _ in model.named_parameters() if '.spatial.conv.bn.' in n]
    assert len(spatial_norm) == 2 * 8  # weight and bias, in each of the 8 blocks
    spatial_norm_params = sum(model.get_parameter(n).numel() for n in spatial_norm)
    assert _count(model) - spatial_norm_params == 11_269_466  # the reference implementation's count


@pytest.mark.parametrize('name', MODEL_NAMES)
def test_parameter_count_with_one_input_channel(name, zoo_model):
    assert _count(zoo_model(name, in_chans=1)) == EXPECTED[name].params_1ch


@pytest.mark.parametrize('name', MODEL_NAMES)
def test_output_shape_at_paper_input_sizes(name, make_images, zoo_model):
    for chans in (1, 3):
        model = zoo_model(name, in_chans=chans).eval()
        with case(f'{chans} channels'), torch.no_grad():
            for size in EXPECTED[name].sizes:
                out = model(make_images(batch=1, chans=chans, size=size))
                assert out.shape == (1, 10), f'{size} px'
                assert torch.isfinite(out).all()
            if chans == 3:  # e.g. PAD-UFES-20's 224 px, once per model
                for size in EXPECTED[name].rgb_sizes:
                    assert model(make_images(batch=1, chans=3, size=size)).shape == (1, 10), f'{size} px'


@pytest.mark.parametrize('name', MODEL_NAMES)
def test_backward_reaches_every_parameter(name, make_images):
    model = _create(name, num_classes=7).train()
    # A parameter initialised to zero may gate others by design (CNNtention's attention gamma: no gradient
    # reaches the attention projections at init). The question here is whether the graph connects every
    # parameter, so move such parameters off zero first.
    # Likewise a ReLU unit can be off for every input of a small batch: CNNtention's CBAM on 16 channels has one
    # hidden unit, off whenever its weights give the non-negative pooled features a negative sum; turn it on.
    with torch.no_grad():
        for param in model.parameters():
            if not param.any():
                param.fill_(0.5)
        for module in model.modules():
            if isinstance(module, ResidualCbam):
                module.mlp.fc1.weight.abs_()
    out = model(make_images(batch=2, size=32))
    assert out.shape == (2, 7)
    out.logsumexp(-1).mean().backward()
    for param_name, param in model.named_parameters():
        assert param.grad is not None, f'no gradient for {param_name}'
        assert torch.isfinite(param.grad).all(), param_name
        assert param.grad.abs().sum() > 0, f'zero gradient for {param_name}'



@pytest.mark.parametrize('name', one_per_family())
def test_a_training_step_runs_under_cpu_bf16_autocast(name, make_images):
    # bf16 autocast is train.py's default on a CPU with native bf16: every model takes a step under it, as the engine
    # sets it up (1x1 maps in fp32), with finite gradients; a custom backward that ignores autocast fails here.
    from timm_gradattn.precision import guard_one_pixel_convolutions
    model = _create(name, num_classes=7).train()
    guard_one_pixel_convolutions(model)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = model(make_images(batch=2, size=32))
    out.float().logsumexp(-1).mean().backward()
    grads = {param_name: param.grad for param_name, param in model.named_parameters() if param.grad is not None}
    assert grads, 'no gradient at all'
    for param_name, grad in grads.items():
        assert torch.isfinite(grad).all(), param_name

# test_pretrained_cfgs.py checks these cfgs for every model and tag by default; this second reading of them runs for
# one model per family, the rest of the zoo under the zoo marker.
@pytest.mark.parametrize('name', one_per_family())
def test_default_cfgs_point_at_real_modules(name, make_images, zoo_model):
    state_dict = zoo_model(name).state_dict()
    for tag in model_tags(name):
        cfg = timm.models.get_pretrained_cfg(f'{name}.{tag}').to_dict()
        info = DATASETS[tag]
        assert cfg['num_classes'] == info.num_classes
        assert tuple(cfg['input_size']) == info.input_size
        assert tuple(cfg['mean']) == info.mean and tuple(cfg['std']) == info.std
        assert len(cfg['mean']) == len(cfg['std']) == info.in_chans
        assert cfg['hf_hub_id'] == timm_gradattn.hub_repo_id(name, tag)
        assert cfg['first_conv'] + '.weight' in state_dict
        assert cfg['classifier'] + '.weight' in state_dict
        if info.label_names is None:
            assert tag == 'tiny_imagenet', f'{tag} has no label names'
        else:
            assert len(cfg['label_names']) == cfg['num_classes'], tag
        assert cfg['license'] == info.license and cfg['crop_pct'] == 1.0
        # One id or a tuple, the architecture's paper first; the Attention Shortcuts paper has no id known.
        assert cfg['paper_name'] and (cfg.get('paper_ids') or name in ATTENTION_SHORTCUTS_NAMES), tag
        if cfg['pool_size'] is not None:  # the final feature map at the tag's input size, as timm defines it
            model = _create(f'{name}.{tag}', num_classes=info.num_classes).eval()
            with torch.no_grad():
                features = model.forward_features(make_images(batch=1, chans=info.in_chans, size=info.input_size[-1]))
            assert tuple(features.shape[-2:]) == tuple(cfg['pool_size']), tag


@pytest.mark.parametrize('name, tag', [
    ('gradattn_resnet18_lpe', 'fashion_mnist'), ('gradattn_resnet18_lpe', 'pcam'),
    ('resnet18_cbam', 'fashion_mnist'), ('resnet18_cbam', 'pcam'),
    ('resnet20_mha', 'mnist'), ('resnet20_cbam', 'digits'),
])
def test_tagged_model_takes_classes_and_channels_from_its_cfg(name, tag, make_images):
    model = timm.create_model(f'{name}.{tag}').eval()
    chans, size = DATASETS[tag].input_size[0], DATASETS[tag].input_size[-1]
    assert model.pretrained_cfg['tag'] == tag
    assert (model.num_classes, model.in_chans) == (DATASETS[tag].num_classes, chans)
    with torch.no_grad():
        assert model(make_images(batch=1, chans=chans, size=size)).shape == (1, DATASETS[tag].num_classes)


@pytest.mark.parametrize('name', MODEL_NAMES)
def test_classifier_reset_and_pre_logits(name, make_images, zoo_model):
    model = zoo_model(name).eval()
    x = make_images(batch=2, size=32)
    assert model.get_classifier() is getattr(model, model.pretrained_cfg['classifier'])
    assert model.num_features == model.head_hidden_size == EXPECTED[name].num_features
    with torch.no_grad():
        features = model.forward_features(x)
        pre_logits = model.forward_head(features, pre_logits=True)
        assert pre_logits.shape == (2, model.head_hidden_size)
        assert torch.allclose(model.get_classifier()(pre_logits), model(x), atol=1e-5)

        model.reset_classifier(5)
        assert model.num_classes == 5 and model.get_classifier().out_features == 5
        assert model(x).shape == (2, 5)

        model.reset_classifier(0)
        assert isinstance(model.get_classifier(), nn.Identity)
        assert torch.allclose(model(x), pre_logits, atol=1e-5)

        model.reset_classifier(0, '')
        unpooled = model(x)
    assert unpooled.shape == (2, *EXPECTED[name].features_shape)
    assert torch.allclose(unpooled, features, atol=1e-5)


@pytest.mark.parametrize('name', MODEL_NAMES)
def test_feature_info_names_the_extraction_points(name, zoo_model):
    model = zoo_model(name)
    info = model.feature_info
    assert [i['num_chs'] for i in info] == list(EXPECTED[name].feature_channels)
    assert [i['reduction'] for i in info] == list(EXPECTED[name].feature_reductions)
    for point in info:
        model.get_submodule(point['module'])  # raises if the module does not exist


# Every model's own wrapper by default; the getter and fx wrappers for one model per family, the rest under zoo.
@pytest.mark.parametrize('name, feature_cls', [
    pytest.param(name, feature_cls, marks=() if feature_cls is None or is_representative(name) else pytest.mark.zoo)
    for name in MODEL_NAMES for feature_cls in (None, 'getter', 'fx')])
def test_features_only_matches_feature_info(name, feature_cls, make_images):
    model = timm.create_model(name, features_only=True, feature_cls=feature_cls).eval()
    expected = EXPECTED[name]
    wrapper = {None: expected.feature_wrapper, 'getter': FeatureGetterNet, 'fx': FeatureGraphNet}[feature_cls]
    assert isinstance(model, wrapper)
    assert model.feature_info.channels() == list(expected.feature_channels)
    assert model.feature_info.reduction() == list(expected.feature_reductions)
    size = expected.feature_size
    with torch.no_grad():
        features = model(make_images(batch=1, size=size))
    assert len(features) == len(expected.feature_channels)
    for feature, chans, reduction in zip(features, expected.feature_channels, expected.feature_reductions):
        assert feature.shape == (1, chans, size // reduction, size // reduction)


@pytest.mark.parametrize('feature_cls', (None, 'getter'))
@pytest.mark.parametrize('name, out_indices, channels', [
    ('gradattn_resnet18_rope', (1, 3), [64, 256]),
    ('resnet18_se', (1, 3), [64, 256]),
    ('resnet20_selfatt', (0, 2), [16, 64]),
    ('asnet50_kv', (1, 3), [64, 256]),  # out_indices replace the family's getter default of all five points
])
def test_features_only_out_indices(name, out_indices, channels, feature_cls, make_images):
    model = timm.create_model(name, features_only=True, feature_cls=feature_cls, out_indices=out_indices).eval()
    assert model.feature_info.channels() == channels
    with torch.no_grad():
        features = model(make_images(batch=1, size=EXPECTED[name].feature_size))
    assert [f.shape[1] for f in features] == channels


@pytest.mark.parametrize('name', MODEL_NAMES)
def test_forward_intermediates_and_pruning(name, make_images, zoo_model):
    model = zoo_model(name).eval()
    x = make_images(batch=1, size=32)
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x)
        assert torch.allclose(final, model.forward_features(x), atol=1e-5)
        assert [t.shape[1] for t in intermediates] == list(EXPECTED[name].feature_channels)
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
        assert [torch.equal(a, b) for a, b in zip(last_two, intermediates[-2:])] == [True, True]
        early = model.forward_intermediates(x, indices=[0, 2], intermediates_only=True, stop_early=True)
        assert torch.equal(early[0], intermediates[0]) and torch.equal(early[1], intermediates[2])

        before = _count(model)
        keep = list(range(len(intermediates) - 2))  # all but the last two points
        assert list(model.prune_intermediate_layers(indices=keep)) == keep
        assert _count(model) < before  # the last two stages (and, for GradAttn, the encoder) are gone
        pruned = model.forward_intermediates(x, intermediates_only=True)
        assert [torch.equal(a, b) for a, b in zip(pruned, intermediates[:len(keep)])] == [True] * len(keep)


@pytest.mark.parametrize('name', GRADATTN_NAMES)
def test_pruning_only_the_head_keeps_the_token_sequence(name, make_images, zoo_model):
    model = zoo_model(name).eval()
    x = make_images(batch=1, size=32)
    with torch.no_grad():
        tokens = model.forward_features(x)
        model.prune_intermediate_layers(indices=5)
        assert model(x).shape == (1, 5, 256)
        assert torch.allclose(model(x), tokens, atol=1e-5)


@pytest.mark.parametrize('name', one_per_family())
def test_grad_checkpointing_gives_same_outputs_and_gradients(name, make_images, zoo_model):
    torch.manual_seed(0)
    model = zoo_model(name).eval()  # eval: no dropout, fixed BN statistics, so the two runs are comparable
    x = make_images(batch=1, size=32)

    def run():
        model.zero_grad()
        out = model(x)
        out.sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    out_plain, grads_plain = run()
    model.set_grad_checkpointing(True)
    out_ckpt, grads_ckpt = run()
    assert torch.allclose(out_plain, out_ckpt, atol=1e-5)
    for param_name, grad in grads_plain.items():
        assert torch.allclose(grad, grads_ckpt[param_name], atol=1e-5, rtol=1e-4), param_name


@pytest.mark.parametrize('name', MODEL_NAMES)
def test_group_matcher_covers_every_parameter(name, zoo_model):
    model = zoo_model(name)
    names = [n for n, _ in model.named_parameters()]
    classifier = model.pretrained_cfg['classifier'] + '.'
    for coarse in (False, True):
        matcher = model.group_matcher(coarse=coarse)
        patterns = [spec if isinstance(spec, str) else spec[0]
                    for entry in matcher.values() for spec in ([entry] if isinstance(entry, str) else entry)]
        # Only the classifier may fall through to timm's catch-all last group.
        unmatched = [n for n in names if not any(re.match(pattern, n) for pattern in patterns)]
        assert all(n.startswith(classifier) for n in unmatched), unmatched
        groups = group_parameters(model, matcher)
        grouped = [n for members in groups.values() for n in members]
        assert sorted(grouped) == sorted(names)  # every parameter exactly once
        assert any(n.startswith(model.pretrained_cfg['first_conv']) for n in groups[min(groups)])
        assert all(n.startswith(classifier) for n in groups[max(groups)])
    fine, coarse = (len(group_parameters(model, model.group_matcher(coarse=c))) for c in (False, True))
    assert coarse < fine  # coarse groups whole stages, fine groups blocks


@pytest.mark.parametrize('name', GRADATTN_NAMES)
def test_no_weight_decay_names_only_the_position_embedding(name, zoo_model):
    model = zoo_model(name)
    assert model.no_weight_decay() == {'pos_embed'}
    optimizer = create_optimizer_v2(model, 'adam', lr=1e-3, weight_decay=1e-4)
    no_decay = {id(p) for group in optimizer.param_groups if group['weight_decay'] == 0 for p in group['params']}
    params = dict(model.named_parameters())
    if name == 'gradattn_resnet18_lpe':
        assert id(params['pos_embed']) in no_decay
    else:
        assert 'pos_embed' not in params
    assert id(params['token_proj.0.weight']) not in no_decay


@pytest.mark.parametrize('name', one_per_family())
def test_torchscript_matches_eager(name, make_images, zoo_model):
    model = zoo_model(name).eval()
    scripted = torch.jit.script(model)
    x = make_images(batch=2, size=32)
    with torch.no_grad():
        assert torch.allclose(scripted(x), model(x), atol=1e-5)


@pytest.mark.parametrize('name', one_per_family())
def test_fx_symbolic_trace_matches_eager(name, make_images, zoo_model):
    model = zoo_model(name).eval()
    traced = torch.fx.symbolic_trace(model)
    x = make_images(batch=2, size=32)
    with torch.no_grad():
        assert torch.allclose(traced(x), model(x), atol=1e-5)


@pytest.mark.parametrize('name', one_per_family(GRADATTN_NAMES))
def test_timm_fx_feature_extractor(name, make_images, zoo_model):
    model = zoo_model(name).eval()
    _, eval_nodes = get_graph_node_names(model)
    assert any(node.startswith('encoder.') for node in eval_nodes)
    extractor = create_feature_extractor(model, return_nodes={'stages.3': 'stage4', 'head': 'logits'})
    x = make_images(batch=2, size=64)
    with torch.no_grad():
        out = extractor(x)
        assert out['stage4'].shape == (2, 512, 2, 2)
        assert torch.allclose(out['logits'], model(x), atol=1e-5)


@pytest.mark.parametrize('name', one_per_family())
def test_dynamo_captures_one_graph_without_breaks(name, make_images, zoo_model):
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(zoo_model(name).eval())(make_images(batch=2, size=32))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


# Inductor takes tens of seconds per model on a CPU: slow. The Attention Shortcuts family's compile test is in
# test_attention_shortcuts.py.
@pytest.mark.slow
@pytest.mark.parametrize('name', ('gradattn_resnet18_rope', 'resnet20_mha'))
def test_torch_compile_fullgraph_matches_eager(name, make_images, zoo_model):
    torch._dynamo.reset()
    model = zoo_model(name).eval()
    compiled = torch.compile(model, fullgraph=True)
    x = make_images(batch=2, size=32)
    with torch.no_grad():
        assert torch.allclose(compiled(x), model(x), atol=1e-4)


def test_unknown_model_name_is_refused():
    with pytest.raises(RuntimeError, match='Unknown model'):
        timm.create_model('gradattn_resnet18_alibi')


def test_unknown_tag_lists_the_known_tags():
    with pytest.raises(RuntimeError, match="Unknown pretrained tag 'imagenet'") as error:
        timm.create_model('gradattn_resnet18_rope.imagenet')
    for tag in model_tags('gradattn_resnet18_rope'):
        assert tag in str(error.value)


@pytest.mark.parametrize('name', GRADATTN_NAMES)
def test_small_inputs_compute_without_an_artificial_minimum(name, make_images, zoo_model):
    # With the 7x7/2 stem and max-pool, 8 px reaches stage 2 as 1x1 and 15 px reaches stage 3 as 1x1:
    # stride-2 convolutions (padding 1) keep 1x1 maps, so nothing here fails and nothing is refused.
    model = zoo_model(name).eval()
    with torch.no_grad():
        for size in (8, 15):
            logits = model(make_images(batch=2, size=size))
            assert logits.shape == (2, 10) and torch.isfinite(logits).all(), size
        assert torch.isfinite(model(torch.zeros(1, 3, 64, 8))).all()


@pytest.mark.parametrize('name', MODEL_NAMES)
def test_wrong_channel_count_is_refused(name, make_images, zoo_model):
    model = zoo_model(name, in_chans=3).eval()
    # GradAttn checks the input itself; timm's ResNet and the CIFAR ResNets leave it to the stem conv.
    with torch.no_grad(), pytest.raises((AssertionError, RuntimeError), match=EXPECTED[name].channel_error):
        model(make_images(batch=1, chans=1, size=32))


def test_token_pooling_is_the_spatial_mean_to_the_bit():
    from timm_gradattn.models.gradattn import _global_average
    x = torch.randn(4, 8, 7, 5)
    assert torch.equal(_global_average(x), x.mean((2, 3)))
