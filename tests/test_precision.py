"""precision.py: bf16 by default only where it is native, channels-last by the committed measurement, and the guard
that keeps 1x1 maps out of a PyTorch bf16 convolution bug on CPU."""
import copy
import pickle

import pytest
import torch
import torch.nn as nn

import timm
from timm.layers import ScaledStdConv2d, StdConv2d
from timm.utils import ModelEmaV3
from timm_gradattn import precision
from timm_gradattn.precision import OnePixelFp32, OnePixelFp32Conv2d, guard_one_pixel_convolutions


def conv_and_grads(conv, x, autocast):
    conv.zero_grad()
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
        out = conv(x)
    out.float().sum().backward()
    return out, conv.weight.grad.clone()


def test_one_pixel_maps_run_in_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)  # the shape of the bug: 3x3 stride 2 on 1x1
    reference = copy.deepcopy(conv)
    assert guard_one_pixel_convolutions(conv) == ['']
    x = torch.randn(4, 8, 1, 1)
    out, grad = conv_and_grads(conv, x, autocast=True)
    expected, expected_grad = conv_and_grads(reference, x, autocast=False)
    # Computed in fp32 from start to end: the same numbers as without autocast, bit for bit.
    assert out.dtype == torch.float32 and torch.equal(out, expected) and torch.equal(grad, expected_grad)
    # Larger maps stay with autocast (bf16); without autocast nothing changes.
    assert conv_and_grads(conv, torch.randn(4, 8, 2, 2), autocast=True)[0].dtype == torch.bfloat16
    assert torch.equal(conv_and_grads(conv, x, autocast=False)[0], expected)


def test_the_guard_keeps_names_weights_and_copies():
    model = timm.create_model('resnet18', num_classes=10)
    keys = list(model.state_dict())
    guarded = guard_one_pixel_convolutions(model)
    assert 'layer4.0.conv1' in guarded and 'conv1' in guarded  # stride-2 3x3 and the 7x7 stem
    assert 'layer2.0.downsample.0' not in guarded  # 1x1 kernels: no neighbours to mis-handle
    assert list(model.state_dict()) == keys
    ema = copy.deepcopy(model)  # EMA copies: the guard travels with the class, not with the original module
    assert type(ema.layer4[0].conv1) is OnePixelFp32Conv2d
    assert ema.layer4[0].conv1.weight is not model.layer4[0].conv1.weight
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        assert model.eval()(torch.randn(2, 3, 16, 16)).shape == (2, 10)  # 16 px: layer4 sees 1x1 maps


@pytest.mark.parametrize('conv_class', (StdConv2d, ScaledStdConv2d))
def test_convolution_subclasses_are_guarded_with_their_own_forward(conv_class):
    # timm's ResNetV2 and NFNet convolutions standardise their weights in forward: the guard must keep that.
    torch.manual_seed(0)
    conv = conv_class(256, 512, 3, stride=2)  # wide enough that unguarded bf16 gradients were garbage every time
    reference = copy.deepcopy(conv)
    assert guard_one_pixel_convolutions(conv) == ['']
    assert isinstance(conv, conv_class) and isinstance(conv, OnePixelFp32)
    for size in (1, 4):  # without autocast: the class's own result, bit for bit
        x = torch.randn(8, 256, size, size)
        assert torch.equal(conv_and_grads(conv, x, autocast=False)[0], conv_and_grads(reference, x, autocast=False)[0])
    x = torch.randn(8, 256, 1, 1)
    out, grad = conv_and_grads(conv, x, autocast=True)
    expected, expected_grad = conv_and_grads(reference, x, autocast=False)
    assert out.dtype == torch.float32 and torch.equal(out, expected) and torch.equal(grad, expected_grad)
    assert conv_and_grads(conv, torch.randn(8, 256, 4, 4), autocast=True)[0].dtype == torch.bfloat16


def test_guarded_subclasses_pickle_copy_and_average():
    model = nn.Sequential(StdConv2d(3, 8, 3), ScaledStdConv2d(8, 8, 3, stride=2), nn.Conv2d(8, 8, 1))
    keys = list(model.state_dict())
    assert guard_one_pixel_convolutions(model) == ['0', '1'] and guard_one_pixel_convolutions(model) == []
    assert list(model.state_dict()) == keys
    other = StdConv2d(3, 8, 3)
    guard_one_pixel_convolutions(other)
    assert type(other) is type(model[0]) and type(model[2]) is nn.Conv2d  # one guarded class per class; 1x1 kept
    x = torch.randn(2, 3, 8, 8)
    for copied in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model), ModelEmaV3(model).module):
        assert [type(m) for m in copied] == [type(m) for m in model]
        assert copied[0].weight is not model[0].weight and torch.equal(copied(x), model(x))


@pytest.mark.parametrize('amx, avx512_bf16, expected', ((False, False, 'no'), (False, True, 'bf16'), (True, False, 'bf16')))
def test_default_precision_is_bf16_only_where_the_cpu_computes_it(monkeypatch, amx, avx512_bf16, expected):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    monkeypatch.setattr(torch.cpu, '_is_amx_tile_supported', lambda: amx)
    monkeypatch.setattr(torch.cpu, '_is_avx512_bf16_supported', lambda: avx512_bf16)
    choice, why = precision.default_mixed_precision()
    assert choice == expected and ('--mixed-precision no' if expected == 'bf16' else 'emulate') in why


def test_default_precision_on_a_gpu_follows_its_bf16_support(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda *a: 'GPU X')
    for native, expected in ((True, 'bf16'), (False, 'no')):
        monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda including_emulation=True, n=native: n)
        assert precision.default_mixed_precision()[0] == expected


def test_channels_last_default_follows_the_committed_measurement():
    assert precision.default_channels_last('cpu', 224)[0] and precision.default_channels_last('cpu', 512)[0]
    assert not precision.default_channels_last('cpu', 32)[0] and not precision.default_channels_last('cpu', 96)[0]
    assert not precision.default_channels_last('cuda', 224)[0]  # nothing measured there
