"""Gradient norms, the Gradient Health Score and attention routing."""
import math

import pytest
import timm
import torch
import torch.nn as nn
from timm.models.resnet import BasicBlock

import timm_gradattn  # noqa: F401  (registers the GradAttn models)
from timm_gradattn.analysis import (
    HEALTH_BANDS, REFERENCE_BAND, attention_rollout, extraction_point_names, gradient_health, gradient_health_report,
    gradient_norms, routing_summary, routing_weights,
)


class Scale(nn.Module):
    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


class ToyNet(nn.Module):
    """Linear -> ReLU -> scale -> Linear, with one layer that the forward never uses."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.hidden = nn.Linear(8, 16)
        self.act = nn.ReLU(inplace=True)
        self.scale = Scale(scale)
        self.unused = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.scale(self.act(self.hidden(x))))


def _toy_batches(num_batches: int = 2, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 8, generator=generator), torch.randint(0, 4, (16,), generator=generator))
            for _ in range(num_batches)]


def _small_gradattn(**kwargs):
    args = dict(layers=(1, 1, 1, 1), channels=(8, 16, 16, 16), embed_dim=32, num_heads=2, mlp_dim=64,
                in_chans=1, num_classes=4)
    return timm.create_model('gradattn_resnet18_nope', **dict(args, **kwargs))


@pytest.mark.parametrize('mode', ['parameters', 'outputs'])
def test_layer_without_gradient_is_not_analysed(mode):
    norms = gradient_norms(ToyNet(), _toy_batches(), mode=mode)
    assert set(norms) == {'hidden', 'head'}
    health = gradient_health(norms)
    assert health['analysed'] == 2


def test_multihead_attention_out_proj_is_not_counted():
    # nn.MultiheadAttention uses out_proj's weights without calling it, so a hook on it never fires:
    # the reference counted it anyway and its score could never reach 1.
    torch.manual_seed(0)
    model = nn.Sequential(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), nn.Flatten(),
                          nn.Linear(3 * 16, 4))
    batches = [(torch.randn(4, 3, 16), torch.randint(0, 4, (4,)))]
    norms = gradient_norms(model, batches, mode='outputs')
    assert '0.self_attn.out_proj' not in norms
    assert {'0', '0.linear1', '0.linear2', '2'} <= set(norms)
    health = gradient_health(norms)
    assert health['analysed'] == len(norms) and health['score'] == 1.0
    # Its parameters do receive gradients, so in parameter mode it is there.
    assert '0.self_attn.out_proj' in gradient_norms(model, batches, mode='parameters')


@pytest.mark.parametrize('mode', ['parameters', 'outputs'])
def test_planted_tiny_and_huge_gradients_are_flagged(mode):
    tiny = gradient_health(gradient_norms(ToyNet(scale=1e-9), _toy_batches(), mode=mode))
    assert tiny['vanishing'] == ['hidden']
    assert tiny['exploding'] == []
    assert tiny['score'] == 0.5
    huge = gradient_health(gradient_norms(ToyNet(scale=1e9), _toy_batches(), mode=mode))
    assert 'hidden' in huge['exploding']


def test_resnet18_scores_one_in_reference_band():
    # timm zero-initialises the last BN of every block (zero_init_last), which makes the residual
    # branches' gradients exactly zero at initialisation; with the standard init a healthy batch scores 1.
    torch.manual_seed(0)
    model = timm.create_model('resnet18', num_classes=10, zero_init_last=False)
    images = torch.randn(8, 3, 32, 32).clamp(-2, 2)
    batches = [(images, torch.randint(0, 10, (8,)))]
    norms = gradient_norms(model, batches, mode='outputs')
    health = gradient_health(norms, REFERENCE_BAND)
    assert health['score'] == 1.0
    assert health['analysed'] == 21  # 20 convolutions (3 of them downsample) and the classifier
    report = gradient_health_report(norms)
    assert list(report) == list(HEALTH_BANDS)
    assert report['reference_1e-6_10'] == health
    # timm's zero_init_last: the residual branches get exactly zero gradient and are reported as vanishing.
    for block in model.modules():
        if isinstance(block, BasicBlock):
            nn.init.zeros_(block.bn2.weight)
    zero_init = gradient_health(gradient_norms(model, batches, mode='outputs'), REFERENCE_BAND)
    assert 'layer1.0.conv1' in zero_init['vanishing'] and zero_init['score'] < 0.5


def test_gradient_norms_leave_the_model_as_found():
    model = _small_gradattn().train()
    model.stem.eval()  # e.g. a frozen stem kept in eval mode by the trainer
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    images = torch.randn(4, 1, 32, 32)
    rng_before = torch.get_rng_state()  # dropout draws in train mode must not move the caller's stream
    norms = gradient_norms(model, [(images, torch.tensor([0, 1, 2, 3]))] * 3, mode='parameters', max_batches=2)
    assert model.training and not model.stem.training and not model.stem.bn.training
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng_before)
    # Every trainable module of GradAttn takes part in backward: nothing is silently dropped.
    owners = {name.rpartition('.')[0] for name, _ in model.named_parameters()}
    assert set(norms) == owners
    assert all(math.isfinite(value) and value > 0 for value in norms.values())


def test_gradient_health_counts_and_bands():
    norms = {'a': 1e-8, 'b': 1e-3, 'c': 5.0, 'd': 50.0, 'e': float('nan'), 'f': None}
    health = gradient_health(norms, (1e-6, 10.0))
    assert (health['analysed'], health['healthy']) == (5, 2)
    assert health['vanishing'] == ['a'] and health['exploding'] == ['d', 'e']
    assert health['score'] == pytest.approx(2 / 5)
    assert gradient_health(norms, (1e-7, 1e-2))['healthy'] == 1  # only b
    assert gradient_health(norms, (1e-9, 100.0))['exploding'] == ['e']
    with pytest.raises(ValueError, match='low < high'):
        gradient_health(norms, (1.0, 0.1))
    with pytest.raises(ValueError, match='No layer received a gradient'):
        gradient_health({'x': None})


def test_rollout_weights_sum_to_one_and_follow_the_input():
    torch.manual_seed(0)
    model = _small_gradattn()
    first = routing_weights(model, torch.randn(3, 1, 32, 32), 'rollout')
    second = routing_weights(model, torch.randn(3, 1, 32, 32) * 3 + 1, 'rollout')
    assert first.shape == (3, 5)
    assert torch.allclose(first.sum(dim=1), torch.ones(3, dtype=first.dtype), atol=1e-6)
    assert (first >= 0).all()
    assert not torch.allclose(first, second)


def test_rollout_of_identity_attention_is_uniform_over_outputs():
    eye = torch.eye(5).expand(2, 4, 5, 5)  # every token attends only to itself
    rollout = attention_rollout([eye, eye])
    assert torch.allclose(rollout, torch.eye(5).expand(2, 5, 5))
    assert torch.allclose(rollout.mean(dim=1), torch.full((2, 5), 0.2))


def test_gradient_routing_sums_to_one_and_restores_mode():
    torch.manual_seed(0)
    model = _small_gradattn().train()
    weights = routing_weights(model, torch.randn(3, 1, 32, 32), 'gradient')
    assert weights.shape == (3, 5)
    assert torch.allclose(weights.sum(dim=1), torch.ones(3), atol=1e-6)
    assert model.training
    assert all(p.grad is None for p in model.parameters())


def test_routing_summary_per_class():
    torch.manual_seed(0)
    model = _small_gradattn()
    loader = [(torch.randn(4, 1, 32, 32), torch.tensor([0, 0, 2, 2])),
              (torch.randn(2, 1, 32, 32), torch.tensor([2, 0]))]
    summary = routing_summary(model, loader, 'rollout', num_classes=4)
    assert summary.points == list(extraction_point_names(model)) == ['stem', 'stage1', 'stage2', 'stage3', 'stage4']
    assert summary.class_counts == [3, 0, 3, 0]
    assert sum(summary.overall) == pytest.approx(1.0)
    assert sum(summary.per_class[0]) == pytest.approx(1.0) and summary.per_class[1] == [0.0] * 5


def test_routing_needs_a_gradattn_model():
    with pytest.raises(TypeError, match='GradAttn model.*ResNet'):
        routing_weights(timm.create_model('resnet18', num_classes=4), torch.randn(1, 3, 32, 32))
