"""Checkpoints of the paper's reference notebooks load into our models and reproduce their outputs.

The reference classes below are small re-implementations written from the spec's description of the notebooks
(parameter names, layer order, initialisation are theirs; the code is ours). Their state dicts are pickled
``.pth`` files, read here only with ``torch.load(weights_only=True)``.
"""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import timm
import timm_gradattn
from timm_gradattn.models.gradattn import checkpoint_filter_fn

VARIANTS = {'gradattn_resnet18_nope': 'nope', 'gradattn_resnet18_lpe': 'lpe', 'gradattn_resnet18_rope': 'rope'}
TAG = 'cifar10'  # 3 channels, 10 classes
PARAMETER_TENSORS = {'nope': 99, 'lpe': 100, 'rope': 102}  # as the spec counts the notebooks' models


class ReferencePlainBlock(nn.Module):
    def __init__(self, in_chs, out_chs, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)

    def forward(self, x):
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))  # nothing added back


class ReferenceRotaryEmbedding(nn.Module):
    def __init__(self, dim, base=10000):
        super().__init__()
        self.register_buffer('inv_freq', 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim)))

    def forward(self, seq_len):
        angles = torch.outer(torch.arange(seq_len).type_as(self.inv_freq), self.inv_freq)
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos(), angles.sin()


def _rotate_half(x):
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


class ReferenceRopeAttention(nn.Module):
    def __init__(self, dim, num_heads, dropout):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.w_q = nn.Linear(dim, dim, bias=False)
        self.w_k = nn.Linear(dim, dim, bias=False)
        self.w_v = nn.Linear(dim, dim, bias=False)
        self.w_o = nn.Linear(dim, dim)
        self.rotary_emb = ReferenceRotaryEmbedding(self.head_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = (proj(x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)
                   for proj in (self.w_q, self.w_k, self.w_v))
        cos, sin = self.rotary_emb(N)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        attention = self.dropout(torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(self.head_dim), dim=-1))
        return self.w_o((attention @ v).transpose(1, 2).reshape(B, N, C))


class ReferenceRopeLayer(nn.Module):
    """Post-norm ReLU layer; norms registered before the feed-forward, unlike ours."""

    def __init__(self, dim, num_heads, ff_dim, dropout):
        super().__init__()
        self.self_attn = ReferenceRopeAttention(dim, num_heads, dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.linear1 = nn.Linear(dim, ff_dim)
        self.linear2 = nn.Linear(ff_dim, dim)
        self.dropout = nn.Dropout(dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, x):
        x = self.norm1(x + self.dropout1(self.self_attn(x)))
        return self.norm2(x + self.dropout2(self.linear2(self.dropout(F.relu(self.linear1(x))))))


class ReferenceGradAttn(nn.Module):
    def __init__(self, variant, num_classes=10, in_chans=3, dim=256, num_heads=8, ff_dim=512, dropout=0.1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        widths = (64, 128, 256, 512)
        in_chs = 64
        for index, width in enumerate(widths):
            stride = 1 if index == 0 else 2
            setattr(self, f'layer{index + 1}', nn.Sequential(
                ReferencePlainBlock(in_chs, width, stride), ReferencePlainBlock(width, width)))
            in_chs = width
        self.projections = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(chs, dim)) for chs in (64,) + widths)
        self.variant = variant
        if variant == 'lpe':
            self.positional_embedding = nn.Parameter(torch.randn(1, 5, dim))
        if variant == 'rope':
            self.transformer_layers = nn.ModuleList(
                ReferenceRopeLayer(dim, num_heads, ff_dim, dropout) for _ in range(3))
        else:
            self.transformer_encoder = nn.TransformerEncoder(
                nn.TransformerEncoderLayer(dim, num_heads, ff_dim, dropout, batch_first=True), 3,
                enable_nested_tensor=False)
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        features = [x]
        for index in range(1, 5):
            x = getattr(self, f'layer{index}')(x)
            features.append(x)
        tokens = torch.stack([proj(f) for proj, f in zip(self.projections, features)], dim=1)
        if self.variant == 'lpe':
            tokens = tokens + self.positional_embedding
        if self.variant == 'rope':
            for layer in self.transformer_layers:
                tokens = layer(tokens)
        else:
            tokens = self.transformer_encoder(tokens)
        return self.classifier(tokens.mean(dim=1))


@pytest.fixture(scope='module')
def reference_checkpoints(tmp_path_factory):
    """For each variant: a trained-looking reference model and its state dict pickled with torch.save."""
    root = tmp_path_factory.mktemp('reference')
    checkpoints = {}
    for index, (name, variant) in enumerate(VARIANTS.items()):
        torch.manual_seed(index)
        reference = ReferenceGradAttn(variant)
        with torch.no_grad():
            for parameter in reference.parameters():  # no two layers alike, as after training
                parameter.add_(0.02 * torch.randn_like(parameter))
            reference.train()(torch.randn(4, 3, 32, 32))  # BN running statistics off their defaults
        path = root / f'{variant}.pth'
        torch.save(reference.state_dict(), path)
        checkpoints[name] = dict(model=reference.eval(), path=path)
    return checkpoints


@pytest.fixture
def weights_only_loads(monkeypatch):
    """Fail any torch.load that could unpickle arbitrary objects; count the safe ones."""
    calls = []
    torch_load = torch.load

    def load(*args, **kwargs):
        assert kwargs.get('weights_only') is True, kwargs
        calls.append(args[0])
        return torch_load(*args, **kwargs)

    monkeypatch.setattr(torch, 'load', load)
    return calls


def _logits_and_gradients(model, images):
    """Eval-mode logits, the loss's gradient w.r.t. the images, and the parameters' gradients by name."""
    model.eval().zero_grad()
    images = images.clone().requires_grad_(True)
    logits = model(images)
    F.cross_entropy(logits, torch.arange(len(images)) % logits.shape[1]).backward()
    gradients = {name: p.grad for name, p in model.named_parameters()}
    return logits.detach(), images.grad, gradients


def test_reference_classes_have_the_notebooks_names(reference_checkpoints):
    for name, variant in VARIANTS.items():
        state = torch.load(reference_checkpoints[name]['path'], weights_only=True)
        parameters = dict(reference_checkpoints[name]['model'].named_parameters())
        assert len(parameters) == PARAMETER_TENSORS[variant]
        assert {'conv1.weight', 'bn1.running_var', 'layer4.1.bn2.weight', 'projections.4.2.bias',
                'classifier.weight'} <= set(state)
        if variant == 'rope':
            assert {'transformer_layers.2.self_attn.w_v.weight', 'transformer_layers.0.self_attn.w_o.bias',
                    'transformer_layers.1.self_attn.rotary_emb.inv_freq',
                    'transformer_layers.2.norm2.bias'} <= set(state)
            assert 'transformer_layers.0.self_attn.w_q.bias' not in state
        else:
            assert {'transformer_encoder.layers.2.self_attn.in_proj_weight',
                    'transformer_encoder.layers.0.linear2.bias',
                    'transformer_encoder.layers.1.self_attn.out_proj.weight'} <= set(state)
        assert ('positional_embedding' in state) == (variant == 'lpe')


@pytest.mark.parametrize('name', VARIANTS)
def test_reference_checkpoint_gives_the_reference_logits_and_gradients(name, reference_checkpoints):
    reference = reference_checkpoints[name]['model']
    state = torch.load(reference_checkpoints[name]['path'], weights_only=True)
    torch.manual_seed(0)
    model = timm.create_model(f'{name}.{TAG}')
    mapped = checkpoint_filter_fn(state, model)
    assert mapped.keys() == model.state_dict().keys()  # every tensor placed, inv_freq dropped
    model.load_state_dict(mapped)

    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    logits, image_grad, gradients = _logits_and_gradients(model, images)
    ref_logits, ref_image_grad, ref_gradients = _logits_and_gradients(reference, images)
    assert torch.allclose(logits, ref_logits, atol=1e-5, rtol=1e-5), (logits - ref_logits).abs().max()
    assert torch.allclose(image_grad, ref_image_grad, atol=1e-7, rtol=1e-4), (image_grad - ref_image_grad).abs().max()
    # The reference's gradients, mapped as its weights are, are ours (w_q/w_k/w_v gradients concatenated too).
    ref_gradients = checkpoint_filter_fn(ref_gradients, model)
    assert ref_gradients.keys() == gradients.keys()
    for key, gradient in gradients.items():
        scale = ref_gradients[key].abs().max().item()
        assert torch.allclose(gradient, ref_gradients[key], atol=1e-5 * max(scale, 1e-3), rtol=1e-4), key


@pytest.mark.parametrize('name', VARIANTS)
def test_reference_pth_loads_through_timm_with_weights_only(name, reference_checkpoints, weights_only_loads):
    reference = reference_checkpoints[name]['model']
    path = str(reference_checkpoints[name]['path'])
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = reference(images)
        overlay = timm.create_model(f'{name}.{TAG}', pretrained=True, pretrained_cfg_overlay=dict(file=path))
        assert torch.allclose(overlay.eval()(images), expected, atol=1e-5, rtol=1e-5)
        checkpoint = timm.create_model(f'{name}.{TAG}', checkpoint_path=path)
        assert torch.allclose(checkpoint.eval()(images), expected, atol=1e-5, rtol=1e-5)
        # The package's filter (every other loader's) and a plain load_state_dict map the names too.
        state = torch.load(path, weights_only=True)
        model = timm.create_model(f'{name}.{TAG}')
        model.load_state_dict(timm_gradattn.models.checkpoint_filter_fn(state, model))
        assert torch.allclose(model.eval()(images), expected, atol=1e-5, rtol=1e-5)
        model = timm.create_model(f'{name}.{TAG}')
        model.load_state_dict(state)
        assert torch.allclose(model.eval()(images), expected, atol=1e-5, rtol=1e-5)
    assert weights_only_loads == [path, path, path]  # overlay, checkpoint_path, ours


def test_incomplete_reference_qkv_is_named_by_load_state_dict(reference_checkpoints):
    state = torch.load(reference_checkpoints['gradattn_resnet18_rope']['path'], weights_only=True)
    del state['transformer_layers.1.self_attn.w_k.weight']
    model = timm.create_model(f'gradattn_resnet18_rope.{TAG}')
    missing_and_unexpected = r'encoder\.1\.attn\.qkv\.weight[\s\S]*transformer_layers\.1\.self_attn\.w_q'
    with pytest.raises(RuntimeError, match=missing_and_unexpected):
        model.load_state_dict(checkpoint_filter_fn(state, model))
