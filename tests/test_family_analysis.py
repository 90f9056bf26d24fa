"""Evaluation of the CNNtention and Attention Shortcuts families: which attention each model exposes, the spatial
attention picture, the depth-attention routing, gradient health over their attention modules, and evaluate."""
import json

import pytest
import timm
import torch
from timm.models import save_for_hf

import timm_gradattn  # noqa: F401  (registers the zoo's models)
from timm_gradattn.analysis import (
    attention_kind, depth_routing_summary, depth_routing_weights, gradient_health, gradient_norms, images_per_class,
    spatial_attention,
)
from timm_gradattn.errors import UserError
from timm_gradattn.evaluate import main

# Small enough for 2 shared cores: the AS layouts at a few blocks and widths, 16 px inputs.
TINY_AS = {
    'asnet50_out': dict(layers=(1, 2, 1, 1), planes=(8, 8, 8, 8), widths=(8, 8, 8, 8)),
    'asnet50_kv': dict(layers=(1, 2, 1, 1), planes=(8, 8, 16, 16), widths=(8, 8, 16, 16)),
    'as_resnet50_stages': dict(layers=(1, 1, 1, 1), channels=(4, 4, 8, 8), stem_width=8),
}
TINY_CNNTENTION = dict(layers=(1, 1, 1), channels=(16, 16, 32))  # CBAM's r=16 needs 16 channels


def _create(name, **kwargs):
    torch.manual_seed(0)
    args = dict(TINY_AS.get(name, TINY_CNNTENTION if name.startswith('resnet20') else {}), num_classes=4)
    return timm.create_model(name, **dict(args, **kwargs)).eval()


def _with_gamma(model, value=0.5):
    # gamma is 0 at init: the attention output would not reach the logits, or its gradient the projections.
    for module in (model.attn1, model.attn2, model.attn3):
        module.gamma.data.fill_(value)
    return model


def _images(batch=2, size=16, chans=3, seed=0):
    return torch.randn(batch, chans, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize('name,kind', [
    ('resnet20', None), ('resnet20_cbam', None), ('resnet20_selfatt', 'spatial'), ('resnet20_mha', 'spatial'),
    ('asnet50_out', 'depth'), ('asnet50_kv', 'depth'), ('as_resnet50_stages', 'depth'),
    ('resnet50_cifar_050', None), ('resnet18', None),
])
def test_attention_kind_follows_the_attention_modules(name, kind):
    assert attention_kind(_create(name)) == kind


def test_attention_kind_of_gradattn_and_a_declared_kind():
    gradattn = timm.create_model('gradattn_resnet18_nope', layers=(1, 1, 1, 1), channels=(8, 16, 16, 16),
                                 embed_dim=32, num_heads=2, mlp_dim=64, num_classes=4)
    assert attention_kind(gradattn) == 'tokens'
    model = _create('resnet20_selfatt')
    model.attention_kind = 'depth'  # a model that states its kind is taken at its word
    assert attention_kind(model) == 'depth'
    model.attention_kind = 'pixels'
    with pytest.raises(ValueError, match="attention_kind='pixels' is not one of"):
        attention_kind(model)


@pytest.mark.parametrize('name', ['resnet20_selfatt', 'resnet20_mha'])
def test_spatial_attention_is_read_through_the_model_and_sums_to_one(name):
    model = _with_gamma(_create(name)).train()
    images = _images(batch=3, size=16)[:, :, :14]  # 14 x 16: the stage grids are 14x16, 7x8, 4x4
    attention = spatial_attention(model, images)
    assert model.training  # evaluated in eval mode, handed back as found
    assert [tuple(m.shape) for m in attention.centre] == [(3, 14, 16), (3, 7, 8), (3, 4, 4)]
    assert [tuple(m.shape) for m in attention.received] == [(3, 14, 16), (3, 7, 8), (3, 4, 4)]
    assert attention.centre_positions == [(7, 8), (3, 4), (2, 2)]
    for centre, received in zip(attention.centre, attention.received):
        assert torch.allclose(centre.sum(dim=(1, 2)), torch.ones(3), atol=1e-5)
        assert torch.allclose(received.sum(dim=(1, 2)), torch.ones(3), atol=1e-5)
    assert all(0.0 <= entropy <= 1.0 for entropy in attention.entropy)
    with torch.no_grad():
        maps = model.eval().attention_maps(images)
    last = maps[-1].mean(dim=1)
    assert torch.allclose(attention.centre[1].flatten(1), maps[1].mean(dim=1)[:, 3 * 8 + 4], atol=1e-6)
    assert torch.allclose(attention.centre[-1].flatten(1), last[:, 2 * 4 + 2], atol=1e-6)
    assert torch.allclose(attention.received[-1].flatten(1), last.mean(dim=1), atol=1e-6)
    summary = attention.summary()
    assert summary['num_images'] == 3 and summary['stages'][1]['grid'] == [7, 8]
    json.dumps(summary)


@pytest.mark.parametrize('name', ['resnet20_cbam', 'asnet50_out'])
def test_spatial_attention_needs_spatial_maps(name):
    with pytest.raises(TypeError, match="kind 'spatial'.*CNNtention's SelfAtt and MHA"):
        spatial_attention(_create(name), _images())


def test_images_per_class_takes_the_first_of_each_class_and_stops_reading():
    batches = [(torch.arange(6.)[:, None], torch.tensor([1, 0, 1, 1, 2, 0])),
               (torch.arange(6., 12.)[:, None], torch.tensor([2, 0, 0, 0, 0, 0]))]

    def once():
        yield from batches
        raise AssertionError('read past the batch that filled every class')

    images, labels = images_per_class(once(), num_classes=3, per_class=2)
    assert labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert images[:, 0].tolist() == [1., 5., 0., 2., 4., 6.]
    images, labels = images_per_class(batches[:1], num_classes=5, per_class=1, max_classes=4)
    assert labels.tolist() == [0, 1, 2]  # class 3 is missing from the data


@pytest.mark.parametrize('name,readers', [
    ('asnet50_out', ['block1.1', 'block2.1', 'block2.2', 'block3.1', 'block4.1']),
    ('asnet50_kv', ['block1.1', 'block2.1', 'block2.2', 'block3.1', 'block4.1']),
    ('as_resnet50_stages', ['stage1', 'stage2', 'stage3', 'stage4']),
])
def test_depth_routing_is_the_mean_softmax_weight_per_block(name, readers):
    model = _create(name)
    batches = [(_images(batch=2, seed=0), torch.zeros(2)), (_images(batch=1, seed=1), torch.zeros(1))]
    summary = depth_routing_summary(model, batches)
    assert summary.readers == readers and summary.memory == ['stem'] + readers[:-1]
    assert [len(row) for row in summary.weights] == list(range(1, len(readers) + 1))
    assert all(sum(row) == pytest.approx(1.0) for row in summary.weights)
    assert summary.num_samples == 3
    # An image-weighted mean of the model's own maps (batches of 2 and 1 images).
    per_image = [torch.cat(rows) for rows in zip(*(depth_routing_weights(model, images) for images, _ in batches))]
    for row, weights in zip(summary.weights, per_image):
        assert row == pytest.approx(weights.double().mean(dim=0).tolist())


def test_depth_routing_needs_depth_attention():
    with pytest.raises(TypeError, match="kind 'depth'.*exposes attention maps of kind 'spatial'"):
        depth_routing_summary(_create('resnet20_selfatt'), [(_images(), torch.zeros(2))])


def test_gradient_health_covers_the_cnntention_attention_modules():
    model = _with_gamma(_create('resnet20_selfatt'))
    norms = gradient_norms(model, [(_images(), torch.tensor([0, 1]))], mode='outputs')
    # The module's output (what the next stage reads) and its 1x1 projections, in forward order.
    assert {'attn1', 'attn1.query', 'attn1.key', 'attn1.value', 'attn3'} <= set(norms)
    assert list(norms).index('attn1.value') < list(norms).index('attn1') < list(norms).index('layer2.0.conv1')
    cbam = gradient_norms(_create('resnet20_cbam'), [(_images(), torch.tensor([0, 1]))], mode='outputs')
    assert {'attn1', 'attn1.spatial', 'attn1.mlp.fc1', 'attn1.mlp.fc2'} <= set(cbam)
    assert gradient_health(norms)['analysed'] == len(norms)


@pytest.mark.parametrize('name,attention', [('asnet50_out', 'attn_sets.0'), ('as_resnet50_stages', 'attn_sets.3')])
def test_gradient_health_covers_the_depth_attention(name, attention):
    # DepthAttention returns (g, key, value): its entry is the gradient of g, the input its block reads.
    model = _create(name)
    norms = gradient_norms(model, [(_images(), torch.tensor([0, 1]))], mode='outputs')
    assert {attention, f'{attention}.qkv', f'{attention}.proj'} <= set(norms)
    assert all(value > 0 for value in norms.values())
    by_parameters = gradient_norms(model, [(_images(), torch.tensor([0, 1]))], mode='parameters')
    assert f'{attention}.qkv' in by_parameters


def _export(tmp_path, name, **model_args):
    model_args = dict(model_args, in_chans=1, num_classes=10)
    model = timm.create_model(f'{name}.digits', **model_args)
    if name.startswith('resnet20'):
        _with_gamma(model)
    save_for_hf(model, tmp_path / name, model_args=model_args, safe_serialization=True)
    return f'local-dir:{tmp_path / name}'


def _evaluate(tmp_path, model, *extra):
    output_dir = tmp_path / 'eval'
    main(['--model', model, '--dataset', 'digits', '--split', 'val', '-b', '64', '-j', '0', '--routing',
          *extra, '--output', str(output_dir)])
    return json.loads((output_dir / 'metrics.json').read_text()), output_dir


@pytest.mark.slow
def test_evaluate_draws_the_spatial_attention_of_a_selfatt_model(tmp_path):
    written, output_dir = _evaluate(
        tmp_path, _export(tmp_path, 'resnet20_selfatt', **TINY_CNNTENTION), '--gradient-health',
        '--gradient-batches', '1')
    spatial = written['spatial_attention']
    assert [stage['grid'] for stage in spatial['stages']] == [[32, 32], [16, 16], [8, 8]]
    assert spatial['num_images'] == 20 and spatial['labels'][:4] == ['0', '0', '1', '1']
    assert {'attn1', 'attn2', 'attn3'} <= set(written['gradient_norms']['norms'])
    assert 'routing' not in written and 'depth_routing' not in written
    for name in ('attention_maps.png', 'gradient_norms.png', 'reliability.png', 'confusion_matrix.png'):
        assert (output_dir / name).stat().st_size > 10_000


@pytest.mark.slow
def test_evaluate_writes_the_depth_routing_of_an_as_net(tmp_path):
    written, output_dir = _evaluate(tmp_path, _export(tmp_path, 'asnet50_out', **TINY_AS['asnet50_out']))
    routing = written['depth_routing']
    assert routing['readers'] == ['block1.1', 'block2.1', 'block2.2', 'block3.1', 'block4.1']
    assert routing['num_samples'] == written['num_samples']
    assert all(sum(row) == pytest.approx(1.0) for row in routing['weights'])
    assert (output_dir / 'depth_routing.png').stat().st_size > 10_000


@pytest.mark.parametrize('name', ['resnet20', 'resnet20_cbam'])
def test_routing_on_a_cnntention_model_without_attention_maps_is_refused(tmp_path, name):
    with pytest.raises(UserError, match=f'--routing: {name} exposes no attention maps.*CNNtention\'s SelfAtt and MHA'):
        _evaluate(tmp_path, name)
