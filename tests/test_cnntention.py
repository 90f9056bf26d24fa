"""CNNtention models are what the reference code builds: counts, shortcuts, attention formulas, identity at init.

The timm interface of these models is checked with every other model in ``test_models.py``.
"""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import timm
import timm_gradattn  # noqa: F401  (registers the models)
from timm.models._features_fx import create_feature_extractor
from timm.optim import create_optimizer_v2
from timm_gradattn.models.cnntention import OptionAShortcut, ResidualCbam, SpatialSelfAttention

NAMES = ('resnet20', 'resnet20_selfatt', 'resnet20_mha', 'resnet20_cbam')
GATED = ('resnet20_selfatt', 'resnet20_mha')
WIDTHS = (16, 32, 64)


def _create(name, **kwargs):
    torch.manual_seed(0)
    kwargs.setdefault('num_classes', 10)
    return timm.create_model(name, **kwargs)


def _count(module):
    return sum(p.numel() for p in module.parameters())


def _with_trained_bn(model):
    """``model`` in eval mode with BN running statistics moved off their defaults by one training pass."""
    with torch.no_grad():
        model.train()(torch.randn(8, model.in_chans, 32, 32, generator=torch.Generator().manual_seed(1)))
    return model.eval()


# --- sizes ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name, params_3ch, params_1ch', [
    ('resnet20', 269_722, 269_434),
    ('resnet20_selfatt', 286_189, 285_901),
    ('resnet20_mha', 291_677, 291_389),
    ('resnet20_cbam', 270_691, 270_403),
])
def test_parameter_counts_match_the_reference_code(name, params_3ch, params_1ch):
    assert _count(_create(name)) == params_3ch
    assert _count(_create(name, in_chans=1)) == params_1ch


def test_attention_module_sizes_follow_the_paper_formulas():
    for width in WIDTHS:
        selfatt = SpatialSelfAttention(width, num_heads=1, scale=1.0, proj=False)
        mha = SpatialSelfAttention(width, num_heads=8, scale=None, proj=True)
        assert _count(selfatt) == 3 * (width ** 2 + width) + 1
        assert _count(mha) == 4 * (width ** 2 + width) + 1
        assert _count(ResidualCbam(width, reduction=16)) == 2 * width * (width // 16) + 99
    # The unweighted ablation drops one gamma per stage.
    assert _count(_create('resnet20_selfatt', attn_gamma=False)) == 286_189 - 3


# --- backbone ---------------------------------------------------------------------------------------------------------

def test_option_a_shortcut_pads_zero_channels_on_both_sides():
    x = torch.randn(2, 16, 8, 8)
    out = OptionAShortcut(16, 32, stride=2)(x)
    assert out.shape == (2, 32, 4, 4)
    assert not out[:, :8].any() and not out[:, 24:].any()  # 8 zero channels before, 8 after
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])


def test_backbone_uses_option_a_shortcuts_only_where_the_shape_changes():
    model = _create('resnet20')
    for stage_idx, layer in enumerate((model.layer1, model.layer2, model.layer3)):
        for block_idx, block in enumerate(layer):
            if stage_idx > 0 and block_idx == 0:
                assert isinstance(block.downsample, OptionAShortcut)
                assert (block.downsample.stride, block.downsample.pad_before, block.downsample.pad_after) == (
                    2, WIDTHS[stage_idx] // 4, WIDTHS[stage_idx] // 4)
            else:
                assert block.downsample is None
    # No max-pool, no projection shortcut, no bias anywhere in the backbone: convs, BNs and the classifier only.
    assert not [m for m in model.modules() if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d))]
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)


def test_initialisation_is_the_reference_kaiming_fan_out_everywhere():
    model = _create('resnet20_mha')
    conv = model.layer3[2].conv2.weight  # 64 x 64 x 3 x 3: fan_out = 64 * 9
    assert conv.std().item() == pytest.approx(math.sqrt(2 / (64 * 9)), rel=0.05)
    assert model.fc.weight.std().item() == pytest.approx(math.sqrt(2 / 10), rel=0.15)  # unusual, as the reference
    attn_conv = model.attn3.query.weight  # 64 x 64 x 1 x 1: fan_out = 64
    assert attn_conv.std().item() == pytest.approx(math.sqrt(2 / 64), rel=0.1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            assert torch.all(module.weight == 1) and not module.bias.any()
    assert all(not getattr(model, f'attn{i}').gamma.any() for i in (1, 2, 3))


# --- identity at init -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', NAMES[1:])
def test_a_variant_starts_from_resnet20s_backbone_at_the_same_seed(name):
    # Paired initialisation: the attention modules draw after the backbone and classifier, so at one seed the four
    # models differ only by their modules (random values and the in_chans / num_classes options included).
    for seed, kwargs in ((0, {}), (5, dict(in_chans=1, num_classes=7))):
        torch.manual_seed(seed)
        baseline = timm.create_model('resnet20', **kwargs)
        torch.manual_seed(seed)
        model = timm.create_model(name, **kwargs)
        mine = model.state_dict()
        for key, value in baseline.state_dict().items():
            assert torch.equal(mine[key], value), key
        drawn = [key for key in mine if key.startswith('attn') and mine[key].numel() > 1]  # not the gammas
        assert drawn and not any(torch.equal(mine[key], mine[other]) for key in drawn for other in drawn
                                 if key < other and mine[key].shape == mine[other].shape)
    torch.manual_seed(9)
    baseline.init_weights()  # re-initialising draws in the same order
    torch.manual_seed(9)
    model.init_weights()
    assert torch.equal(model.layer3[2].conv2.weight, baseline.layer3[2].conv2.weight)
    assert torch.equal(model.fc.weight, baseline.fc.weight)
    if name in GATED:  # gamma = 0: the same function as resnet20 from the start, nothing loaded
        x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            assert torch.equal(model.eval()(x), baseline.eval()(x))


@pytest.mark.parametrize('name', GATED)
def test_gamma_zero_model_gives_exactly_resnet20_logits(name):
    baseline = _with_trained_bn(_create('resnet20'))
    torch.manual_seed(1)
    model = timm.create_model(name, num_classes=10)
    missing, unexpected = model.load_state_dict(baseline.state_dict(), strict=False)
    assert not unexpected
    assert missing and all(key.startswith(('attn1.', 'attn2.', 'attn3.')) for key in missing)
    model.eval()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(model(x), baseline(x))
        # and the attention does something once gamma moves
        for i in (1, 2, 3):
            getattr(model, f'attn{i}').gamma.fill_(0.5)
        assert not torch.allclose(model(x), baseline(x))


@pytest.mark.parametrize('name', GATED)
def test_gamma_gates_the_attention_gradient_at_init(name):
    model = _create(name).train()
    model(torch.randn(2, 3, 32, 32)).logsumexp(-1).mean().backward()
    for i in (1, 2, 3):
        attn = getattr(model, f'attn{i}')
        assert attn.gamma.grad.abs().item() > 0  # gamma learns first
        assert not attn.query.weight.grad.any() and not attn.value.weight.grad.any()


# --- the attention modules against explicit formulas ------------------------------------------------------------------

def _randomised(module):
    torch.manual_seed(3)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn_like(param) * 0.3)
    return module.double().eval()


def test_selfatt_is_materialised_softmax_attention_with_scale_one():
    module = _randomised(SpatialSelfAttention(16, num_heads=1, scale=1.0, proj=False))
    x = torch.randn(2, 16, 6, 5, dtype=torch.float64)
    q = module.query(x).flatten(2).transpose(1, 2)  # (B, N, C)
    k = module.key(x).flatten(2)                    # (B, C, N)
    v = module.value(x).flatten(2)                  # (B, C, N)
    attn = torch.softmax(q @ k, dim=-1)             # (B, N, N): no 1/sqrt(C)
    out = (v @ attn.transpose(1, 2)).reshape(x.shape)  # O[:, c, i] = sum_j V[:, c, j] A[:, i, j]
    expected = module.gamma * out + x
    with torch.no_grad():
        assert torch.allclose(module(x), expected, atol=1e-10)
        module.fused_attn = False
        assert torch.allclose(module(x), expected, atol=1e-10)


def test_mha_is_per_head_scaled_attention_with_output_projection():
    heads, width = 8, 32
    module = _randomised(SpatialSelfAttention(width, num_heads=heads, scale=None, proj=True))
    x = torch.randn(2, width, 4, 4, dtype=torch.float64)
    head_dim = width // heads
    q, k, v = (conv(x).flatten(2) for conv in (module.query, module.key, module.value))  # (B, C, N) each
    outs = []
    for h in range(heads):
        channels = slice(h * head_dim, (h + 1) * head_dim)  # head h reads a contiguous channel block
        scores = q[:, channels].transpose(1, 2) @ k[:, channels] / math.sqrt(head_dim)
        outs.append(v[:, channels] @ torch.softmax(scores, dim=-1).transpose(1, 2))
    merged = torch.cat(outs, dim=1).reshape(x.shape)
    expected = module.gamma * module.proj(merged) + x
    with torch.no_grad():
        assert torch.allclose(module(x), expected, atol=1e-10)
        module.fused_attn = False
        assert torch.allclose(module(x), expected, atol=1e-10)


def test_unweighted_ablation_adds_the_attention_output_unscaled():
    gated = _randomised(SpatialSelfAttention(16, scale=1.0, gamma=True))
    unweighted = SpatialSelfAttention(16, scale=1.0, gamma=False).double().eval()
    unweighted.load_state_dict({k: v for k, v in gated.state_dict().items() if k != 'gamma'})
    assert unweighted.gamma is None
    x = torch.randn(1, 16, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        gated.gamma.fill_(1.0)
        assert torch.allclose(unweighted(x), gated(x), atol=1e-12)


def test_cbam_matches_the_explicit_formula():
    module = _randomised(ResidualCbam(32, reduction=16))
    assert module.mlp.fc1.bias is None and module.mlp.fc2.bias is None
    assert module.spatial.bias is not None and module.spatial.kernel_size == (7, 7)
    assert not [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]
    x = torch.randn(2, 32, 6, 6, dtype=torch.float64)
    w1, w2 = module.mlp.fc1.weight, module.mlp.fc2.weight  # (2, 32), (32, 2)

    def mlp(vector):
        return torch.relu(vector @ w1.T) @ w2.T

    channel = torch.sigmoid(mlp(x.amax(dim=(2, 3))) + mlp(x.mean(dim=(2, 3))))
    refined = x * channel[:, :, None, None]
    spatial_in = torch.cat([refined.amax(1, keepdim=True), refined.mean(1, keepdim=True)], 1)  # max first
    spatial = torch.sigmoid(F.conv2d(spatial_in, module.spatial.weight, module.spatial.bias, padding=3))
    with torch.no_grad():
        assert torch.allclose(module(x), refined * spatial + x, atol=1e-12)


# --- attention maps ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('size', (28, 32))
@pytest.mark.parametrize('name, heads', [('resnet20_selfatt', 1), ('resnet20_mha', 8)])
def test_attention_maps_per_stage(name, heads, size):
    model = _create(name).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        maps = model.attention_maps(x)
    sides = [size, math.ceil(size / 2), math.ceil(size / 4)]
    assert [tuple(m.shape) for m in maps] == [(2, heads, s * s, s * s) for s in sides]
    for attn in maps:
        assert (attn >= 0).all()
        assert torch.allclose(attn.sum(-1), torch.ones(attn.shape[:-1]), atol=1e-5)


def test_attention_maps_are_the_weights_the_forward_pass_uses():
    model = _create('resnet20_selfatt').eval()
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        stage1 = model.layer1(model.act1(model.bn1(model.conv1(x))))
        attn = model.attn1
        attn.gamma.fill_(1.0)
        weights = model.attention_maps(x)[0]
        v = attn.value(stage1).flatten(2).transpose(1, 2).unsqueeze(1)  # (B, 1, N, C)
        expected = (weights @ v).squeeze(1).transpose(1, 2).reshape(stage1.shape) + stage1
        assert torch.allclose(attn(stage1), expected, atol=1e-5)


@pytest.mark.parametrize('name', ('resnet20', 'resnet20_cbam'))
def test_attention_maps_need_dot_product_attention(name):
    with pytest.raises(ValueError, match="attn_type 'selfatt' or 'mha'"):
        _create(name).attention_maps(torch.randn(1, 3, 32, 32))


# --- options and errors -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize('num_heads, bad', [(3, '[16, 32, 64]'), (32, '[16]'), (0, '[16, 32, 64]')])
def test_num_heads_must_divide_every_stage_width(num_heads, bad):
    with pytest.raises(ValueError, match=rf'num_heads={num_heads} does not divide the stage widths \{bad}') as error:
        _create('resnet20_mha', num_heads=num_heads)
    assert '\n' not in str(error.value) and 'use a num_heads that divides every width' in str(error.value)


def test_num_heads_and_reduction_options():
    model = _create('resnet20_mha', num_heads=4)
    assert [getattr(model, f'attn{i}').num_heads for i in (1, 2, 3)] == [4, 4, 4]
    assert _count(model) == 291_677  # the head count does not change the parameters
    model = _create('resnet20_cbam', reduction=8)
    assert model.attn1.mlp.fc1.out_features == 2
    with pytest.raises(ValueError, match='reduction=32 .* use reduction <= 16'):
        _create('resnet20_cbam', reduction=32)


@pytest.mark.parametrize('name', NAMES)
@pytest.mark.parametrize('chans', (1, 3))
def test_runs_at_28_and_32_px_and_smaller(name, chans):
    model = _create(name, in_chans=chans).eval()
    with torch.no_grad():
        for size, final in ((32, 8), (28, 7), (9, 3), (1, 1)):  # no artificial minimum input size
            x = torch.randn(2, chans, size, size)
            features = model.forward_features(x)
            assert features.shape == (2, 64, final, final), size
            logits = model(x)
            assert logits.shape == (2, 10) and torch.isfinite(logits).all(), size


@pytest.mark.parametrize('tag, input_size, pool_size', [
    ('cifar10', (3, 32, 32), (8, 8)), ('mnist', (1, 28, 28), (7, 7)), ('digits', (1, 32, 32), (8, 8))])
@pytest.mark.parametrize('name', NAMES)
def test_pretrained_cfgs(name, tag, input_size, pool_size):
    cfg = timm.models.get_pretrained_cfg(f'{name}.{tag}').to_dict()
    assert tuple(cfg['input_size']) == input_size and tuple(cfg['pool_size']) == pool_size
    assert (cfg['first_conv'], cfg['classifier'], cfg['num_classes']) == ('conv1', 'fc', 10)
    assert cfg['paper_ids'] == 'arXiv:2412.11657' and 'CNNtention' in cfg['paper_name']
    assert _create(name).pretrained_cfg['tag'] == 'cifar10'  # the default tag


def test_weight_decay_groups():
    model = _create('resnet20_selfatt')
    assert model.no_weight_decay() == set()
    gammas = {id(getattr(model, f'attn{i}').gamma) for i in (1, 2, 3)}
    # timm's default leaves 1-D parameters (biases, norms, the gammas) undecayed ...
    optimizer = create_optimizer_v2(model, 'adam', lr=1e-3, weight_decay=1e-3)
    no_decay = {id(p) for g in optimizer.param_groups if g['weight_decay'] == 0 for p in g['params']}
    assert gammas <= no_decay and id(model.attn1.query.weight) not in no_decay
    # ... the authors' recipe decays everything.
    optimizer = create_optimizer_v2(model, 'adam', lr=1e-3, weight_decay=1e-3, filter_bias_and_bn=False)
    assert all(g['weight_decay'] == 1e-3 for g in optimizer.param_groups)


def test_fx_feature_extractor_reads_stage_outputs_after_attention():
    model = _create('resnet20_mha').eval()
    extractor = create_feature_extractor(model, return_nodes={'attn2': 'stage2', 'fc': 'logits'})
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = extractor(x)
        _, intermediates = model.forward_intermediates(x)
        assert torch.allclose(out['stage2'], intermediates[1], atol=1e-6)
        assert torch.allclose(out['logits'], model(x), atol=1e-5)
