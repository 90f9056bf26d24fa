"""The timm interface of every model in the zoo: sizes, cfgs, heads, features, scripting, tracing, compiling."""
import re

import pytest
import torch
import torch.nn as nn

import timm
import timm_gradattn
from timm.models._features import FeatureGetterNet, FeatureListNet
from timm.models._features_fx import FeatureGraphNet, create_feature_extractor, get_graph_node_names
from timm.models._manipulate import group_parameters
from timm.optim import create_optimizer_v2
from timm_gradattn import DATASETS, MODEL_NAMES
from timm_gradattn.models._pretrained import TAGS

GRADATTN_NAMES = ('gradattn_resnet18_nope', 'gradattn_resnet18_lpe', 'gradattn_resnet18_rope')
RESNET_NAMES = ('resnet18_se', 'resnet18_cbam')

# Parameter counts with 10 classes. GradAttn and SE match the paper's reference implementation exactly;
# timm's CBAM spatial gate has a BatchNorm (2 parameters x 8 blocks) the reference's has not: 11,269,466 + 16.
PARAMS_3CH = {
    'gradattn_resnet18_nope': 12_849_994,
    'gradattn_resnet18_lpe': 12_851_274,
    'gradattn_resnet18_rope': 12_847_690,
    'resnet18_se': 11_268_682,
    'resnet18_cbam': 11_269_482,
}
PARAMS_1CH = {
    'gradattn_resnet18_nope': 12_843_722,
    'gradattn_resnet18_lpe': 12_845_002,
    'gradattn_resnet18_rope': 12_841_418,
}
FEATURE_CHANNELS = (64, 64, 128, 256, 512)
FEATURE_REDUCTIONS = {
    'gradattn': (4, 4, 8, 16, 32),  # the first point is after the stem's max-pool
    'resnet': (2, 4, 8, 16, 32),    # timm's ResNet reads the stem before its max-pool
}


def _create(name, **kwargs):
    torch.manual_seed(0)
    kwargs.setdefault('num_classes', 10)
    return timm.create_model(name, **kwargs)


def _reductions(name):
    return FEATURE_REDUCTIONS['gradattn' if name in GRADATTN_NAMES else 'resnet']


def _count(model):
    return sum(p.numel() for p in model.parameters())


def test_registry_lists_every_model_and_tag():
    assert set(timm.list_models('gradattn_*')) == set(GRADATTN_NAMES)
    for name in MODEL_NAMES:
        assert timm.is_model(name)
        assert set(timm.list_pretrained(f'{name}.*')) == {f'{name}.{tag}' for tag in TAGS}


@pytest.mark.parametrize('name', MODEL_NAMES)
def test_parameter_count_matches_reference(name):
    assert _count(_create(name)) == PARAMS_3CH[name]


def test_cbam_differs_from_the_reference_only_by_its_spatial_gate_batchnorm():
    model = _create('resnet18_cbam')
    spatial_norm = [n for n, _ in model.named_parameters() if '.spatial.conv.bn.' in n]
    assert len(spatial_norm) == 2 * 8  # weight and bias, in each of the 8 blocks
    spatial_norm_params = sum(model.get_parameter(n).numel() for n in spatial_norm)
    assert _count(model) - spatial_norm_params == 11_269_466  # the reference implementation's count


@pytest.mark.parametrize('name', MODEL_NAMES)
def test_parameter_count_with_one_input_channel(name):
    # Only the 7x7 stem conv sees the input: 64 x 7 x 7 weights per input channel.
    expected = PARAMS_1CH.get(name, PARAMS_3CH[name] - 2 * 64 * 7 * 7)
    assert _count(_create(name, in_chans=1)) == expected


@pytest.mark.parametrize('chans', (1, 3))
@pytest.mark.parametrize('name', MODEL_NAMES)
def test_output_shape_at_paper_input_sizes(name, chans, make_images):
    model = _create(name, in_chans=chans).eval()
    with torch.no_grad():
        for size in (28, 32, 64, 96):
            out = model(make_images(batch=1, chans=chans, size=size))
            assert out.shape == (1, 10), f'{size} px'
            assert torch.isfinite(out).all()
        if chans == 3:  # PAD-UFES-20's 224 px, once per model
            assert model(make_images(batch=1, chans=3, size=224)).shape == (1, 10)


@pytest.mark.parametrize('name', MODEL_NAMES)
def test_backward_reaches_every_parameter(name, make_images):
    model = _create(name, num_classes=7).train()
    out = model(make_images(batch=2, size=32))
    assert out.shape == (2, 7)
    out.logsumexp(-1).mean().backward()
    for param_name, param in model.named_parameters():
        assert param.grad is not None, f'no gradient for {param_name}'
        assert torch.isfinite(param.grad).all(), param_name
        assert param.grad.abs().sum() > 0, f'zero gradient for {param_name}'


@pytest.mark.parametrize('name', MODEL_NAMES)
def test_default_cfgs_point_at_real_modules(name):
    state_dict = _create(name).state_dict()
    for tag in TAGS:
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


@pytest.mark.parametrize('tag', ('fashion_mnist', 'pcam'))
@pytest.mark.parametrize('name', ('gradattn_resnet18_lpe', 'resnet18_cbam'))
def test_tagged_model_takes_classes_and_channels_from_its_cfg(name, tag, make_images):
    model = timm.create_model(f'{name}.{tag}').eval()
    chans, size = DATASETS[tag].input_size[0], DATASETS[tag].input_size[-1]
    assert model.pretrained_cfg['tag'] == tag
    assert (model.num_classes, model.in_chans) == (DATASETS[tag].num_classes, chans)
    with torch.no_grad():
        assert model(make_images(batch=1, chans=chans, size=size)).shape == (1, DATASETS[tag].num_classes)


@pytest.mark.parametrize('name', MODEL_NAMES)
def test_classifier_reset_and_pre_logits(name, make_images):
    model = _create(name).eval()
    x = make_images(batch=2, size=32)
    assert model.get_classifier() is getattr(model, model.pretrained_cfg['classifier'])
    assert model.num_features == model.head_hidden_size == (256 if name in GRADATTN_NAMES else 512)
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
    if name in GRADATTN_NAMES:
        assert unpooled.shape == (2, 5, 256)  # one token per extraction point
    else:
        assert unpooled.shape == (2, 512, 1, 1)
    assert torch.allclose(unpooled, features, atol=1e-5)


@pytest.mark.parametrize('name', MODEL_NAMES)
def test_feature_info_names_the_five_extraction_points(name):
    model = _create(name)
    info = model.feature_info
    assert [i['num_chs'] for i in info] == list(FEATURE_CHANNELS)
    assert [i['reduction'] for i in info] == list(_reductions(name))
    for point in info:
        model.get_submodule(point['module'])  # raises if the module does not exist


@pytest.mark.parametrize('feature_cls', (None, 'getter', 'fx'))
@pytest.mark.parametrize('name', MODEL_NAMES)
def test_features_only_matches_feature_info(name, feature_cls, make_images):
    model = timm.create_model(name, features_only=True, feature_cls=feature_cls).eval()
    wrapper = {None: FeatureListNet, 'getter': FeatureGetterNet, 'fx': FeatureGraphNet}[feature_cls]
    assert isinstance(model, wrapper)
    assert model.feature_info.channels() == list(FEATURE_CHANNELS)
    assert model.feature_info.reduction() == list(_reductions(name))
    with torch.no_grad():
        features = model(make_images(batch=1, size=64))
    assert len(features) == 5
    for feature, chans, reduction in zip(features, FEATURE_CHANNELS, _reductions(name)):
        assert feature.shape == (1, chans, 64 // reduction, 64 // reduction)


@pytest.mark.parametrize('feature_cls', (None, 'getter'))
@pytest.mark.parametrize('name', ('gradattn_resnet18_rope', 'resnet18_se'))
def test_features_only_out_indices(name, feature_cls, make_images):
    model = timm.create_model(name, features_only=True, feature_cls=feature_cls, out_indices=(1, 3)).eval()
    assert model.feature_info.channels() == [FEATURE_CHANNELS[1], FEATURE_CHANNELS[3]]
    with torch.no_grad():
        features = model(make_images(batch=1, size=64))
    assert [f.shape[1] for f in features] == [64, 256]


@pytest.mark.parametrize('name', MODEL_NAMES)
def test_forward_intermediates_and_pruning(name, make_images):
    model = _create(name).eval()
    x = make_images(batch=1, size=32)
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x)
        assert torch.allclose(final, model.forward_features(x), atol=1e-5)
        assert [t.shape[1] for t in intermediates] == list(FEATURE_CHANNELS)
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
        assert [torch.equal(a, b) for a, b in zip(last_two, intermediates[-2:])] == [True, True]
        early = model.forward_intermediates(x, indices=[0, 2], intermediates_only=True, stop_early=True)
        assert torch.equal(early[0], intermediates[0]) and torch.equal(early[1], intermediates[2])

        before = _count(model)
        assert list(model.prune_intermediate_layers(indices=[0, 1, 2])) == [0, 1, 2]
        assert _count(model) < before  # stages 3 and 4 (and, for GradAttn, the encoder) are gone
        pruned = model.forward_intermediates(x, intermediates_only=True)
        assert [torch.equal(a, b) for a, b in zip(pruned, intermediates[:3])] == [True, True, True]


@pytest.mark.parametrize('name', GRADATTN_NAMES)
def test_pruning_only_the_head_keeps_the_token_sequence(name, make_images):
    model = _create(name).eval()
    x = make_images(batch=1, size=32)
    with torch.no_grad():
        tokens = model.forward_features(x)
        model.prune_intermediate_layers(indices=5)
        assert model(x).shape == (1, 5, 256)
        assert torch.allclose(model(x), tokens, atol=1e-5)


@pytest.mark.parametrize('name', MODEL_NAMES)
def test_grad_checkpointing_gives_same_outputs_and_gradients(name, make_images):
    torch.manual_seed(0)
    model = _create(name).eval()  # eval: no dropout, fixed BN statistics, so the two runs are comparable
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
def test_group_matcher_covers_every_parameter(name):
    model = _create(name)
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
def test_no_weight_decay_names_only_the_position_embedding(name):
    model = _create(name)
    assert model.no_weight_decay() == {'pos_embed'}
    optimizer = create_optimizer_v2(model, 'adam', lr=1e-3, weight_decay=1e-4)
    no_decay = {id(p) for group in optimizer.param_groups if group['weight_decay'] == 0 for p in group['params']}
    params = dict(model.named_parameters())
    if name == 'gradattn_resnet18_lpe':
        assert id(params['pos_embed']) in no_decay
    else:
        assert 'pos_embed' not in params
    assert id(params['token_proj.0.weight']) not in no_decay


@pytest.mark.parametrize('name', MODEL_NAMES)
def test_torchscript_matches_eager(name, make_images):
    model = _create(name).eval()
    scripted = torch.jit.script(model)
    x = make_images(batch=2, size=32)
    with torch.no_grad():
        assert torch.allclose(scripted(x), model(x), atol=1e-5)


@pytest.mark.parametrize('name', MODEL_NAMES)
def test_fx_symbolic_trace_matches_eager(name, make_images):
    model = _create(name).eval()
    traced = torch.fx.symbolic_trace(model)
    x = make_images(batch=2, size=32)
    with torch.no_grad():
        assert torch.allclose(traced(x), model(x), atol=1e-5)


@pytest.mark.parametrize('name', GRADATTN_NAMES)
def test_timm_fx_feature_extractor(name, make_images):
    model = _create(name).eval()
    _, eval_nodes = get_graph_node_names(model)
    assert any(node.startswith('encoder.') for node in eval_nodes)
    extractor = create_feature_extractor(model, return_nodes={'stages.3': 'stage4', 'head': 'logits'})
    x = make_images(batch=2, size=64)
    with torch.no_grad():
        out = extractor(x)
        assert out['stage4'].shape == (2, 512, 2, 2)
        assert torch.allclose(out['logits'], model(x), atol=1e-5)


@pytest.mark.parametrize('name', GRADATTN_NAMES)
def test_dynamo_captures_one_graph_without_breaks(name, make_images):
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(_create(name).eval())(make_images(batch=2, size=32))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.slow
def test_torch_compile_fullgraph_matches_eager(make_images):
    torch._dynamo.reset()
    model = _create('gradattn_resnet18_rope').eval()
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
    for tag in TAGS:
        assert tag in str(error.value)


@pytest.mark.parametrize('name', GRADATTN_NAMES)
def test_too_small_input_names_the_minimum(name, make_images):
    model = _create(name).eval()
    assert model.min_input_size == 16
    with torch.no_grad():
        model(make_images(batch=1, size=model.min_input_size))  # the minimum itself is accepted
        with pytest.raises(AssertionError, match='at least 16 px'):
            model(make_images(batch=1, size=15))
        with pytest.raises(AssertionError, match='at least 16 px'):
            model(torch.zeros(1, 3, 64, 8))


@pytest.mark.parametrize('name', MODEL_NAMES)
def test_wrong_channel_count_is_refused(name, make_images):
    model = _create(name, in_chans=3).eval()
    # GradAttn checks the input itself; timm's ResNet leaves it to the stem conv.
    message = 'in_chans=3' if name in GRADATTN_NAMES else 'expected input.* to have 3 channels'
    with torch.no_grad(), pytest.raises((AssertionError, RuntimeError), match=message):
        model(make_images(batch=1, chans=1, size=32))


def test_token_pooling_is_the_spatial_mean_to_the_bit():
    from timm_gradattn.models.gradattn import _global_average
    x = torch.randn(4, 8, 7, 5)
    assert torch.equal(_global_average(x), x.mean((2, 3)))
