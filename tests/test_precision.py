"""precision.py: bf16 by default only where it is native, channels-last by the committed measurement, and the guard
that keeps 1x1 maps out of a PyTorch bf16 convolution bug on CPU."""
import copy

import pytest
import torch
import torch.nn as nn

import timm
from timm_gradattn import precision
from timm_gradattn.precision import OnePixelFp32Conv2d, guard_one_pixel_convolutions


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
