"""Grad-CAM for every family: the layers it reads at 28 and 32 px, maps that show something and leave the model as
they found it, feature maps in other layouts, ``evaluate --cam``, and the one-line error without grad-cam."""
import json
import sys

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
from timm.models import save_for_hf

import timm_gradattn  # noqa: F401  (registers the zoo's models)
from timm_gradattn.analysis import CAM_INSTALL, cam_target_layers, class_activation_maps, feature_maps
from timm_gradattn.errors import UserError
from timm_gradattn.evaluate import cli, main, parse_args
from tiers import REPRESENTATIVES, case, one_per_family

# What each model reads: (feature_info module, module hooked, grid at 28 px, grid at 32 px). GradAttn's stage 4 is
# 1x1 and stage 3 2x2 at these sizes; an AS-Net never calls its stage modules, so the stage's last block is read.
_GRADATTN = ('stages.1', 'stages.1', (4, 4), (4, 4))
_RESNET18 = ('layer2', 'layer2', (4, 4), (4, 4))
_AS_NET = ('stages.3', 'stages.3.2', (4, 4), (4, 4))
_RESNET50 = ('layer4', 'layer4', (4, 4), (4, 4))
EXPECTED_LAYERS = {
    'gradattn_resnet18_nope': _GRADATTN, 'gradattn_resnet18_lpe': _GRADATTN, 'gradattn_resnet18_rope': _GRADATTN,
    'resnet18_se': _RESNET18, 'resnet18_cbam': _RESNET18,
    'resnet20': ('layer3', 'layer3', (7, 7), (8, 8)), 'resnet20_selfatt': ('attn3', 'attn3', (7, 7), (8, 8)),
    'resnet20_mha': ('attn3', 'attn3', (7, 7), (8, 8)), 'resnet20_cbam': ('attn3', 'attn3', (7, 7), (8, 8)),
    'asnet50_out': _AS_NET, 'asnet50_kv': _AS_NET, 'as_resnet50_stages': ('stages.3', 'stages.3', (4, 4), (4, 4)),
    'resnet50_cifar': _RESNET50, 'resnet50_cifar_050': _RESNET50, 'resnet50_cifar_plain': _RESNET50,
}
assert EXPECTED_LAYERS.keys() == set(timm_gradattn.MODEL_NAMES)
# The default tier's representatives, at a few blocks and channels: the strides, so the map sizes, and the names of
# the layers read are the full models'.
TINY = {
    'gradattn_resnet18_rope': dict(layers=(1, 1, 1, 1), channels=(8, 16, 16, 16), embed_dim=32, num_heads=2,
                                   mlp_dim=64),
    'resnet20_mha': dict(layers=(1, 1, 1), channels=(16, 16, 32)),
    'asnet50_kv': dict(layers=(1, 2, 1, 3), planes=(8, 8, 16, 16), widths=(8, 8, 16, 16)),
}
assert TINY.keys() == set(REPRESENTATIVES.values())


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


@pytest.mark.parametrize('name', one_per_family())
def test_each_model_reads_its_deepest_map_of_at_least_4_px(zoo_model, name):
    model = zoo_model(name, **TINY.get(name, {}))
    feature, module, *grids = EXPECTED_LAYERS[name]
    for size, grid in zip((28, 32), grids):
        with case(f'{size} px'):
            layer, = cam_target_layers(model, (3, size, size))
            assert (layer.feature, layer.module, layer.grid, layer.layout) == (feature, module, grid, 'NCHW')
            # The deeper maps are smaller than 4 px (GradAttn's last is 1x1): the choice is the deepest with a layout.
            deeper = [m for m in feature_maps(model, (3, size, size)) if m.index > layer.index]
            assert all(min(m.grid) < 4 for m in deeper)
    assert _hooks(model) == 0


@pytest.mark.parametrize('name', one_per_family())
def test_maps_have_the_input_size_and_show_something(zoo_model, make_images, name):
    model = zoo_model(name, **TINY.get(name, {}))
    images = make_images(batch=3, size=32)
    result = class_activation_maps(model, images)
    assert [layer.grid for layer in result.layers] == [EXPECTED_LAYERS[name][3]]
    assert result.maps.shape == (3, 32, 32) and result.maps.dtype == np.float32
    assert np.isfinite(result.maps).all()
    assert (result.maps.max(axis=(1, 2)) - result.maps.min(axis=(1, 2)) > 0.1).all()  # not constant, per image
    with torch.no_grad():
        np.testing.assert_array_equal(result.predictions, model.eval()(images).argmax(dim=1).numpy())
    np.testing.assert_array_equal(result.targets, result.predictions)


def test_the_model_is_left_as_it_was_found(zoo_model, make_images):
    model = zoo_model('gradattn_resnet18_rope', **TINY['gradattn_resnet18_rope'])
    images = make_images(batch=2, size=32)
    reference = class_activation_maps(model, images).maps
    model.train()
    model.stem.eval()  # a frozen part inside a model in train mode
    model.set_grad_checkpointing(True)
    sentinel = torch.ones_like(model.head.weight)
    model.head.weight.grad = sentinel
    with torch.no_grad():  # the maps need gradients even when the caller turned them off
        maps = class_activation_maps(model, images).maps
    np.testing.assert_allclose(maps, reference, atol=1e-5)  # read without checkpointing, in eval mode
    assert model.training and not model.stem.training and model.stages.training
    assert model.grad_checkpointing
    assert model.head.weight.grad is sentinel
    assert all(p.grad is None for n, p in model.named_parameters() if n != 'head.weight')
    assert _hooks(model) == 0


def test_targets_layers_and_sizes_can_be_chosen(zoo_model, make_images):
    model = zoo_model('gradattn_resnet18_rope', **TINY['gradattn_resnet18_rope'])
    images = make_images(batch=2, size=32)
    predicted = class_activation_maps(model, images)
    other = (predicted.predictions + 1) % 10
    explained = class_activation_maps(model, images, targets=torch.from_numpy(other))
    np.testing.assert_array_equal(explained.targets, other)
    np.testing.assert_array_equal(explained.predictions, predicted.predictions)
    assert not np.allclose(explained.maps, predicted.maps)  # another class, another map
    assert [layer.feature for layer in cam_target_layers(model, (3, 32, 32), num_layers=2)] == ['stages.0', 'stages.1']
    assert [layer.grid for layer in class_activation_maps(model, images, layers=['stem']).layers] == [(8, 8)]
    with pytest.raises(ValueError, match='must name feature_info modules: stem, stages.0'):
        class_activation_maps(model, images, layers=['stages.9'])
    with pytest.raises(ValueError, match=r'No feature map .* 4 px or more on a side at 8x8 \(stem 2x2.*stages.3 1x1\)'):
        cam_target_layers(model, (3, 8, 8))
    with pytest.raises(ValueError, match='3 targets for 2 images'):
        class_activation_maps(model, images, targets=[0, 1, 2])


class _ToChannelsLast(nn.Module):
    def forward(self, x):
        return x.permute(0, 2, 3, 1)


class _ChannelsLastNet(nn.Module):
    """A stage whose output is channels-last (H, W, C), or, with ``nchw_feature``, the same net read before the
    permute."""

    def __init__(self, nchw_feature: bool = False):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.stage = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), _ToChannelsLast())
        self.head = nn.Linear(16, 5)
        self.feature_info = [dict(module='stem', num_chs=8, reduction=1),
                             dict(module='stage.0' if nchw_feature else 'stage', num_chs=16, reduction=2)]

    def forward(self, x):
        return self.head(self.stage(self.stem(x)).relu().mean(dim=(1, 2)))


def test_channels_last_and_token_maps_are_read_in_their_layout(make_images):
    torch.manual_seed(0)
    channels_last = _ChannelsLastNet()
    channels_first = _ChannelsLastNet(nchw_feature=True)
    channels_first.load_state_dict(channels_last.state_dict())
    images = make_images(batch=2, size=16)
    result = class_activation_maps(channels_last, images)
    assert [(layer.module, layer.layout, layer.grid) for layer in result.layers] == [('stage', 'NHWC', (8, 8))]
    # The same activations read before the permute: the same maps, so nothing was transposed.
    np.testing.assert_allclose(result.maps, class_activation_maps(channels_first, images).maps, atol=1e-5)
    assert (result.maps.max(axis=(1, 2)) - result.maps.min(axis=(1, 2)) > 0.1).all()

    # timm's ViT: (1 class token + 4x4 patches, 64) tokens per block; averaged tokens, so patches get a gradient.
    torch.manual_seed(0)
    vit = timm.create_model('vit_tiny_patch16_224', img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2,
                            num_classes=5, global_pool='avg')
    result = class_activation_maps(vit, make_images(batch=2, size=32))
    assert [(layer.module, layer.layout, layer.grid, layer.shape) for layer in result.layers] == [
        ('blocks.1', 'NLC', (4, 4), (17, 64))]
    assert result.maps.shape == (2, 32, 32)
    assert (result.maps.max(axis=(1, 2)) - result.maps.min(axis=(1, 2)) > 0.1).all()


def test_without_grad_cam_the_error_says_what_to_install(monkeypatch, tmp_path, capsys, make_images):
    monkeypatch.setitem(sys.modules, 'pytorch_grad_cam', None)  # as if it were not installed
    with pytest.raises(ImportError) as raised:
        class_activation_maps(_ChannelsLastNet(), make_images(batch=1, size=16))
    assert CAM_INSTALL in str(raised.value) and '\n' not in str(raised.value)

    def not_before_the_check(*args, **kwargs):
        raise AssertionError('evaluation work started before the grad-cam check')
    monkeypatch.setattr('timm_gradattn.evaluate.create_eval_model', not_before_the_check)
    monkeypatch.setattr('timm_gradattn.evaluate.build_datasets', not_before_the_check)
    assert cli(['--model', 'resnet20', '--dataset', 'digits', '--cam', '4', '--output', str(tmp_path / 'eval')]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].endswith(f'--cam: Grad-CAM needs the grad-cam package, which is not '
                                                 f'installed: {CAM_INSTALL}')


@pytest.mark.parametrize('count', ['0', '-2', 'two'])
def test_cam_needs_a_count_of_at_least_one(count):
    with pytest.raises(UserError, match='--cam must be'):
        parse_args(['--model', 'resnet20', '--dataset', 'digits', '--cam', count])


@pytest.mark.slow  # a fresh interpreter
def test_grad_cam_is_imported_only_when_used(run_python_json):
    loaded = run_python_json(
        'import json, sys\n'
        'import timm_gradattn, timm_gradattn.analysis, timm_gradattn.evaluate, timm_gradattn.plots\n'
        'print(json.dumps({"loaded": sorted(m for m in ("pytorch_grad_cam", "cv2") if m in sys.modules)}))')
    assert loaded == {'loaded': []}


def test_evaluate_draws_grad_cam_over_the_first_images_of_the_split(tmp_path):
    # A small GradAttn: at 32 px its stage 4 is 1x1, its stage 2 4x4.
    model_args = dict(TINY['gradattn_resnet18_rope'], in_chans=1, num_classes=10)
    torch.manual_seed(0)
    save_for_hf(timm.create_model('gradattn_resnet18_rope.digits', **model_args), tmp_path / 'export',
                model_args=model_args, safe_serialization=True)
    output_dir = tmp_path / 'eval'
    main(['--model', f'local-dir:{tmp_path / "export"}', '--dataset', 'digits', '--split', 'test', '-b', '136',
          '-j', '0', '--cam', '5', '--output', str(output_dir)])
    cam = json.loads((output_dir / 'metrics.json').read_text())['cam']
    assert cam['indices'] == [0, 1, 2, 3, 4] and len(cam['labels']) == len(cam['predictions']) == 5
    assert [(layer['feature'], layer['grid']) for layer in cam['layers']] == [('stages.1', [4, 4])]
    assert (output_dir / 'cam.png').stat().st_size > 10_000
    saved = np.load(output_dir / 'cam.npz')
    assert saved['maps'].shape == (5, 32, 32) and saved['images'].shape == (5, 1, 32, 32)
    assert 0 <= saved['images'].min() and saved['images'].max() <= 1
    assert [str(target) for target in saved['targets']] == cam['labels']  # digits' label names are the digits
