"""The Attention Shortcuts family behaves as the paper (and SEED_SYSTEMS.md System B) specifies: per-pixel attention
over depth, a cache that projects each output once, the readings' parameter counts, and the timm surface.

ResNet-50-sized: inputs are 16 px and batches 1-2 so the file stays cheap on two cores."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import timm
import timm_gradattn  # noqa: F401 - registers the models
from timm.models._features import FeatureGetterNet, FeatureListNet
from timm_gradattn.models.attention_shortcuts import DepthAttention, KVPool, PlainBottleneck, ShortcutFreeBottleneck

AS_NAMES = ('asnet50_out', 'asnet50_kv')
ALL_NAMES = AS_NAMES + ('as_resnet50_stages', 'resnet50_cifar', 'resnet50_cifar_050', 'resnet50_cifar_plain')
# Our readings (SEED_SYSTEMS.md B.4-B.7): (3 channels / 10 classes, 1 channel / 10 classes, 3 channels / 100 classes).
PARAMS = {
    'asnet50_out': (12_373_642, 12_371_338, 12_385_252),
    'asnet50_kv': (15_426_506, 15_425_354, 15_472_676),
    'as_resnet50_stages': (30_389_450, 30_388_298, 30_573_860),
    'resnet50_cifar': (23_520_842, 23_519_690, 23_705_252),
    'resnet50_cifar_050': (5_899_050, 5_898_474, 5_991_300),
    'resnet50_cifar_plain': (20_744_266, 20_743_114, 20_928_676),
}
FEATURE_CHANNELS = {
    'asnet50_out': (128, 128, 128, 128, 128),
    'asnet50_kv': (64, 64, 128, 256, 512),
    'as_resnet50_stages': (64, 256, 512, 1024, 2048),
    'resnet50_cifar': (64, 256, 512, 1024, 2048),
    'resnet50_cifar_050': (32, 128, 256, 512, 1024),
    'resnet50_cifar_plain': (64, 256, 512, 1024, 2048),
}
REDUCTIONS = (1, 1, 2, 4, 8)
SIZE = 16


def _create(name, **kwargs):
    torch.manual_seed(0)
    kwargs.setdefault('num_classes', 10)
    return timm.create_model(name, **kwargs).eval()


def _count(model):
    return sum(p.numel() for p in model.parameters())


def _images(batch=2, chans=3, size=SIZE, seed=0):
    return torch.randn(batch, chans, size, size, generator=torch.Generator().manual_seed(seed))


def _ln(x, norm):
    """Channel-wise LayerNorm of an NCHW map, written out: what the model's LayerNorm2d must compute."""
    return F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), norm.weight, norm.bias, norm.eps).permute(0, 3, 1, 2)


# --- parameter counts -------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', ALL_NAMES)
def test_parameter_counts_are_the_pinned_readings(name):
    params_3ch, params_1ch, params_100 = PARAMS[name]
    assert _count(_create(name)) == params_3ch
    assert _count(_create(name, in_chans=1)) == params_1ch
    assert _count(_create(name, num_classes=100)) == params_100


@pytest.mark.parametrize('name, kwargs, expected', [
    ('resnet50_cifar_050', dict(width_reading='inner'), 10_345_674),  # B.7 reading (b): timm base_width=32
    ('asnet50_out', dict(attn_sets='stage'), 12_570_250),
    ('asnet50_out', dict(attn_sets='block'), 13_356_682),
    ('asnet50_kv', dict(attn_sets='block'), 18_031_562),  # a set per attention step, at its query's width
    ('asnet50_out', dict(stem_norm='bn_relu_ln'), 12_373_642 + 2 * 128),
])
def test_parameter_counts_of_the_other_readings(name, kwargs, expected):
    assert _count(_create(name, **kwargs)) == expected


# --- the depth attention ----------------------------------------------------------------------------------------

def _random_attention(dim=32, num_heads=4, n=3, size=5, seed=0):
    torch.manual_seed(seed)
    attn = DepthAttention(dim, num_heads)
    outputs = [torch.randn(2, dim, size, size) for _ in range(n)]
    keys, values = [], []
    for x in outputs[:-1]:
        _, key, value = attn.project(x)
        keys.append(key)
        values.append(value)
    return attn, outputs, keys, values


def test_depth_attention_equals_scaled_dot_product_attention_per_pixel():
    attn, outputs, keys, values = _random_attention()
    with torch.no_grad():
        g, _, _ = attn(outputs[-1], keys, values)
        # Reference: every pixel is a batch entry, the stored outputs are the sequence, the newest is the query.
        B, C, H, W = outputs[0].shape
        w_q, w_k, w_v = attn.qkv.weight.chunk(3)
        tokens = torch.stack([x.permute(0, 2, 3, 1).reshape(B * H * W, C) for x in outputs], dim=1)  # (BHW, n, C)

        def heads(t):
            return t.reshape(t.shape[0], t.shape[1], 4, C // 4).transpose(1, 2)
        query, key, value = heads(tokens[:, -1:] @ w_q.T), heads(tokens @ w_k.T), heads(tokens @ w_v.T)
        out = F.scaled_dot_product_attention(query, key, value)
        expected = (out.transpose(1, 2).reshape(B * H * W, C) @ attn.proj.weight.T).reshape(B, H, W, C)
    assert torch.allclose(g, expected.permute(0, 3, 1, 2), atol=1e-5)


@pytest.mark.parametrize('perturbed', ('old key', 'old value', 'newest output'))
def test_attention_at_a_pixel_depends_only_on_that_pixel(perturbed):
    attn, outputs, keys, values = _random_attention()
    with torch.no_grad():
        g, _, _ = attn(outputs[-1], keys, values)
        newest = outputs[-1].clone()
        keys, values = [k.clone() for k in keys], [v.clone() for v in values]
        if perturbed == 'old key':
            keys[0][:, 2, 3] += 1.0  # pixel (2, 3) of the first stored output's key, every head
        elif perturbed == 'old value':
            values[1][:, 2, 3] += 1.0
        else:
            newest[:, :, 2, 3] += 1.0
        g_perturbed, _, _ = attn(newest, keys, values)
    changed = (g_perturbed - g).abs().amax(dim=(0, 1)) > 1e-6  # (H, W)
    expected = torch.zeros_like(changed)
    expected[2, 3] = True
    assert torch.equal(changed, expected)


def test_a_model_pixel_reads_no_other_pixel_through_attention():
    # The first block's input g is attention over the stem output only: its per-pixel Jacobian is diagonal.
    model = _create('asnet50_out')
    x1 = torch.randn(1, 128, 4, 4, requires_grad=True)
    g, _, _ = model.attn_sets[0](x1, [], [])
    g[0, :, 1, 2].sum().backward()
    touched = x1.grad.abs().sum(dim=(0, 1)) > 0
    assert touched[1, 2] and touched.sum() == 1


@pytest.mark.parametrize('name', AS_NAMES + ('as_resnet50_stages',))
def test_memory_of_length_one_is_ln_x1_times_wv_times_wo(name):
    """The first attention sees only X_1 (softmax over one element is 1): g = LN(X_1) W^V W^O."""
    model = _create(name)
    seen = {}
    if name == 'as_resnet50_stages':
        stem_out, first_block, norm = model.act1, model.stages[0][0], model.memory_norms[0]
    else:
        stem_out, first_block, norm = model.stem.conv, model.stages[0][0], model.stem.norm
    stem_out.register_forward_hook(lambda m, i, o: seen.setdefault('x1', o.detach().clone()))
    first_block.register_forward_pre_hook(lambda m, i: seen.setdefault('g', i[0].detach().clone()))
    with torch.no_grad():
        model(_images(batch=1))
    attn = model.attn_sets[0]
    _, _, w_v = attn.qkv.weight.chunk(3)
    ln_x1 = _ln(seen['x1'], norm)  # X_1 before its LayerNorm: the stem conv (AS nets) or the stem ReLU (AS_stages)
    expected = (ln_x1.permute(0, 2, 3, 1) @ w_v.T @ attn.proj.weight.T).permute(0, 3, 1, 2)
    assert torch.allclose(seen['g'], expected, atol=1e-5)


def test_subsampling_the_cache_equals_projecting_subsampled_outputs():
    model = _create('asnet50_out')
    block = model.stages[1][0]
    x = block.norm3(torch.randn(2, 128, 9, 7))  # a LayerNormed output of odd size
    attn = model.attn_sets[0]
    with torch.no_grad():
        _, key, value = attn.project(x)
        keys, values = KVPool()([key], [value])
        _, key_sub, value_sub = attn.project(x[..., ::2, ::2])
    assert keys[0].shape[1:3] == (5, 4) == block.conv2(torch.zeros(1, 128, 9, 7)).shape[-2:]  # stride-2 3x3 sizes
    assert torch.equal(keys[0], key_sub) and torch.equal(values[0], value_sub)


@pytest.mark.parametrize('name', AS_NAMES)
def test_every_block_projects_only_its_newest_output(name):
    model = _create(name)
    calls = []
    for attn in model.attn_sets:
        attn.qkv.register_forward_hook(lambda m, i, o: calls.append(tuple(i[0].shape)))
    adapter_calls = []
    for stage_idx, adapter in enumerate(model.kv_adapters):
        for conv in [m for m in adapter.modules() if isinstance(m, nn.Conv2d)]:
            conv.register_forward_hook(lambda m, i, o, s=stage_idx: adapter_calls.append(s))
    with torch.no_grad():
        model(_images(batch=1))
    # One projection per block (16), each of one output: (1, C, H, W) at that output's size and width.
    sizes = [16] * 4 + [8] * 4 + [4] * 6 + [2] * 2  # the first block of a stage reads at the old size
    widths = [info['num_chs'] for info in model.feature_info]
    query_widths = [widths[0]] * 4 + [widths[2]] * 4 + [widths[3]] * 6 + [widths[4]] * 2
    assert calls == [(1, w, s, s) for s, w in zip(sizes, query_widths)]
    if name == 'asnet50_kv':
        # One key and one value convolution per stored output at each transition: 4, 8 and 14 outputs,
        # the earliest adapted three times (chained), never re-projected.
        assert [adapter_calls.count(s) for s in (1, 2, 3)] == [2 * 4, 2 * 8, 2 * 14]
    else:
        assert adapter_calls == []


@pytest.mark.parametrize('name, set_of_step', [
    ('asnet50_kv', [0] * 4 + [1] * 4 + [2] * 6 + [3] * 2),  # the first block of a stage reads with the last set
    ('asnet50_out', [0] * 16),
])
def test_projection_sets_follow_the_query(name, set_of_step):
    model = _create(name)
    assert model.set_index == set_of_step
    assert len(_create(name, attn_sets='block').attn_sets) == 16


# --- blocks and baselines ---------------------------------------------------------------------------------------

def test_as_blocks_have_no_residual_and_end_in_layernorm():
    block = ShortcutFreeBottleneck(128, 64, 128).eval()
    x1, x2 = torch.randn(2, 1, 128, 4, 4)
    with torch.no_grad():
        block.conv3.weight.zero_()
        assert torch.allclose(block(x1), block(x2))  # a residual would let the input through
    x = torch.randn(2, 128, 4, 4)
    with torch.no_grad():
        out = ShortcutFreeBottleneck(128, 64, 128).eval()(x)
    assert torch.allclose(out.mean(1), torch.zeros(2, 4, 4), atol=1e-5)  # LN over channels, per pixel, no ReLU
    assert (out < 0).any()


def test_plain_baseline_has_no_shortcut_and_cifar_stem():
    model = _create('resnet50_cifar_plain')
    assert not [n for n, _ in model.named_modules() if 'downsample' in n]
    block = model.layer2[1]
    assert isinstance(block, PlainBottleneck)
    x1, x2 = torch.randn(2, 1, 512, 4, 4)
    with torch.no_grad():
        block.conv3.weight.zero_()
        assert torch.equal(block(x1), block(x2))
    residual = _create('resnet50_cifar')
    for m in (model, residual):
        assert (m.conv1.kernel_size, m.conv1.stride) == ((3, 3), (1, 1)) and isinstance(m.maxpool, nn.Identity)
    assert residual.layer1[0].downsample is not None  # projection shortcut kept in the baseline


def test_half_width_readings():
    all_halved = _create('resnet50_cifar_050')
    assert all_halved.conv1.out_channels == 32 and all_halved.layer1[0].conv1.in_channels == 32
    assert all_halved.num_features == 1024
    inner = _create('resnet50_cifar_050', width_reading='inner')
    assert inner.layer1[0].conv1.out_channels == 32 and inner.num_features == 2048


# --- the timm surface -------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', ALL_NAMES)
def test_heads_features_and_cfgs(name):
    model = _create(name, num_classes=100)
    x = _images()
    with torch.no_grad():
        logits = model(x)
        features = model.forward_features(x)
        pre_logits = model.forward_head(features, pre_logits=True)
        final, intermediates = model.forward_intermediates(x)
    assert logits.shape == (2, 100)
    assert features.shape == (2, model.num_features, 2, 2)
    assert pre_logits.shape == (2, model.num_features) and torch.allclose(model.fc(pre_logits), logits, atol=1e-5)
    assert torch.allclose(final, features, atol=1e-5)
    assert [t.shape[1] for t in intermediates] == list(FEATURE_CHANNELS[name])
    assert [SIZE // t.shape[-1] for t in intermediates] == list(REDUCTIONS)
    assert [i['reduction'] for i in model.feature_info] == list(REDUCTIONS)
    state_dict = model.state_dict()
    for tag, classes, chans in (('cifar10', 10, 3), ('cifar100', 100, 3), ('digits', 10, 1)):
        cfg = timm.models.get_pretrained_cfg(f'{name}.{tag}').to_dict()
        assert (cfg['num_classes'], cfg['input_size'], cfg['pool_size']) == (classes, (chans, 32, 32), (4, 4))
        assert cfg['first_conv'] + '.weight' in state_dict and cfg['classifier'] == 'fc'
        assert cfg['paper_name'] == 'Introducing attention shortcuts in convolutional neural networks'
    model.reset_classifier(10)
    assert model(x).shape == (2, 10)


@pytest.mark.parametrize('name', AS_NAMES + ('as_resnet50_stages',))
def test_features_only_intermediates_and_pruning(name):
    features = timm.create_model(name, features_only=True, out_indices=(1, 3)).eval()
    assert isinstance(features, FeatureGetterNet)
    with torch.no_grad():
        maps = features(_images(batch=1))
    assert [m.shape[1] for m in maps] == [FEATURE_CHANNELS[name][i] for i in (1, 3)]
    model = _create(name)
    x = _images(batch=1)
    with torch.no_grad():
        _, intermediates = model.forward_intermediates(x)
        early = model.forward_intermediates(x, indices=[0, 2], intermediates_only=True, stop_early=True)
        assert torch.equal(early[0], intermediates[0]) and torch.equal(early[1], intermediates[2])
        before = _count(model)
        model.prune_intermediate_layers(indices=[0, 1, 2])
        assert _count(model) < before
        pruned = model.forward_intermediates(x, intermediates_only=True)
    assert all(torch.equal(a, b) for a, b in zip(pruned, intermediates[:3])) and len(pruned) == 3


def test_fx_feature_extraction_matches_forward_intermediates():
    features = timm.create_model('asnet50_kv', features_only=True, feature_cls='fx').eval()
    model = _create('asnet50_kv', num_classes=0)
    weights = {k.removeprefix('graph_module.'): v for k, v in features.state_dict().items()}
    assert not model.load_state_dict(weights, strict=False).missing_keys
    x = _images(batch=1)
    with torch.no_grad():
        expected = model.forward_intermediates(x, intermediates_only=True)
        assert all(torch.equal(a, b) for a, b in zip(features(x), expected))


def test_baselines_use_timms_feature_list():
    model = timm.create_model('resnet50_cifar', features_only=True)
    assert isinstance(model, FeatureListNet) and model.feature_info.reduction() == list(REDUCTIONS)


@pytest.mark.parametrize('name', AS_NAMES + ('as_resnet50_stages',))
def test_attention_maps_are_softmax_weights_over_earlier_outputs(name):
    model = _create(name)
    with torch.no_grad():
        maps = model.attention_maps(_images(batch=1))
        full = model.attention_maps(_images(batch=1), reduce=False)
    steps = 4 if name == 'as_resnet50_stages' else 16
    assert [m.shape for m in maps] == [(1, n) for n in range(1, steps + 1)]
    assert all(torch.allclose(m.sum(-1), torch.ones(1)) for m in maps)
    assert full[0].shape[:3] == (1, 4, 1) and torch.allclose(full[-1].mean(dim=(1, 3, 4)), maps[-1])


# Grad checkpointing, TorchScript, FX and dynamo capture of every model: tests/test_models.py.


@pytest.mark.slow
def test_torch_compile_fullgraph_matches_eager():
    # One block per stage: the same code paths (cache, subsampling, shared set) as the full 16 blocks, and an
    # inductor compile of minutes less on a CPU.
    torch._dynamo.reset()
    model = _create('asnet50_out', layers=(1, 1, 1, 1))
    x = _images()
    with torch.no_grad():
        assert torch.allclose(torch.compile(model, fullgraph=True)(x), model(x), atol=1e-4)


def test_odd_and_tiny_inputs_run():
    model = _create('asnet50_kv')
    with torch.no_grad():
        for size in (3, 9, 28):
            assert model(_images(batch=1, size=size)).shape == (1, 10)


# --- bad input --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name, kwargs, message', [
    ('asnet50_out', dict(num_heads=3), 'num_heads=3 does not divide the attention width 128'),
    ('asnet50_kv', dict(num_heads=128), 'num_heads=128 does not divide the attention width 64'),
    ('as_resnet50_stages', dict(num_heads=5), 'num_heads=5 does not divide the attention width 64'),
    ('asnet50_out', dict(attn_sets='layer'), "attn_sets='layer' is not one of"),
    ('asnet50_kv', dict(attn_sets='shared'), "use attn_sets='stage' or 'block'"),
    ('as_resnet50_stages', dict(attn_sets='shared'), "use attn_sets='stage'"),
    ('asnet50_out', dict(kv_adapt='avg'), "kv_adapt='avg' is not one of"),
    ('asnet50_out', dict(stem_norm='bn'), "stem_norm='bn' is not one of"),
    ('resnet50_cifar_050', dict(width_reading='half'), "width_reading='half' is not one of"),
])
def test_bad_options_raise_one_line_errors(name, kwargs, message):
    with pytest.raises(ValueError, match=message) as error:
        timm.create_model(name, **kwargs)
    assert '\n' not in str(error.value)


def test_depth_scores_backward_is_the_gradient():
    # The backward recomputes the query from the projected output x and W^Q instead of keeping it.
    from timm_gradattn.models.depth_attention import _DepthScores, pixel_linear
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 3, 3, dtype=torch.double, generator=gen).to(memory_format=torch.channels_last)
    x.requires_grad_()
    weight = torch.randn(8, 8, dtype=torch.double, generator=gen, requires_grad=True)
    full = torch.randn(2, 6, 6, 2, 4, dtype=torch.double, generator=gen, requires_grad=True)
    key = torch.randn(2, 3, 3, 2, 4, dtype=torch.double, generator=gen, requires_grad=True)

    def scores(x, weight, key, full):
        query = pixel_linear(x, weight).permute(0, 2, 3, 1).reshape(2, 3, 3, 2, 4)
        return _DepthScores.apply(query, x, weight, key, full[:, ::2, ::2])  # a subsampled entry: a strided view

    assert torch.autograd.gradcheck(scores, (x, weight, key, full))


def test_depth_mix_backward_is_the_gradient():
    from timm_gradattn.models.depth_attention import _DepthMix
    gen = torch.Generator().manual_seed(0)
    attn = torch.randn(2, 3, 3, 2, 2, dtype=torch.double, generator=gen).softmax(-1).requires_grad_()
    value = torch.randn(2, 3, 3, 2, 4, dtype=torch.double, generator=gen, requires_grad=True)
    full = torch.randn(2, 6, 6, 2, 4, dtype=torch.double, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, v, f: _DepthMix.apply(a, v, f[:, ::2, ::2]), (attn, value, full))


@pytest.mark.parametrize('name', ['asnet50_out', 'asnet50_kv'])
def test_training_gradients_equal_the_plain_formulation(name, monkeypatch):
    from timm_gradattn.models import depth_attention
    model = _create(name).train()
    images, targets = _images(), torch.tensor([1, 3])

    def gradients():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), targets).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    custom = gradients()
    monkeypatch.setattr(depth_attention, '_needs_grad', lambda x, cache: False)
    plain = gradients()
    for n in plain:
        torch.testing.assert_close(custom[n], plain[n], rtol=1e-4, atol=1e-5, msg=n)



def test_depth_scores_backward_under_cpu_bf16_autocast_recomputes_the_forwards_query():
    # The backward runs outside the forward's autocast: it must recompute the query as autocast computed it (bf16,
    # from the fp32 W^Q cast down), not fail on mixed dtypes; then it is the plain formulation's gradient up to bf16
    # rounding. (A whole model's bf16 gradients drift apart over 50 layers, whatever the order of sums: one layer.)
    from timm_gradattn.models.depth_attention import _DepthScores, _batched_scores, pixel_linear
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 3, 3, generator=gen).to(torch.bfloat16).requires_grad_()
    weight = torch.randn(8, 8, generator=gen, requires_grad=True)
    keys = [torch.randn(2, 3, 3, 2, 4, generator=gen).to(torch.bfloat16).requires_grad_() for _ in range(2)]
    mix = torch.randn(2, 3, 3, 2, 2, generator=gen)

    def gradients(custom: bool):
        with torch.autocast('cpu', dtype=torch.bfloat16):
            query = pixel_linear(x, weight).permute(0, 2, 3, 1).reshape(2, 3, 3, 2, 4)
            scores = _DepthScores.apply(query, x, weight, *keys) if custom else _batched_scores(query, keys)
        return torch.autograd.grad((scores.float() * mix).sum(), (x, weight, *keys))

    for custom, plain in zip(gradients(True), gradients(False)):
        assert custom.dtype == plain.dtype
        torch.testing.assert_close(custom.float(), plain.float(), rtol=2e-2, atol=2e-2)
