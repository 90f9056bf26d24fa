"""GradAttn behaves as the paper specifies: plain stages, a post-norm encoder over five depth tokens,
and three variants that differ only in how the encoder knows the token order."""
import pytest
import torch
import torch.nn as nn

import timm
import timm_gradattn  # noqa: F401 - registers the models
from timm.layers import apply_rot_embed_cat
from timm_gradattn.models.gradattn import PlainBlock

GRADATTN_NAMES = ('gradattn_resnet18_nope', 'gradattn_resnet18_lpe', 'gradattn_resnet18_rope')
HEAD_DIM = 32  # 256 / 8 heads


def _create(name, **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=10, **kwargs).eval()


def _reaches_without_convolution(output: torch.Tensor, source: torch.Tensor) -> bool:
    """Whether the autograd graph of ``output`` has a path to ``source`` that passes through no convolution."""
    stack, seen = [output.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if 'Convolution' in type(node).__name__:
            continue  # everything behind this node is reached through a convolution
        if getattr(node, 'variable', None) is source:
            return True
        stack.extend(next_node for next_node, _ in node.next_functions)
    return False


def _rope_table(positions: torch.Tensor, head_dim: int = HEAD_DIM, base: float = 10000.) -> torch.Tensor:
    """Rotate-half rotary table ``cat([sin, cos])`` for arbitrary integer positions: inv_freq = base^(-2i/d)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = positions.double()[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)  # dim i and dim i + d/2 share a frequency
    return torch.cat([angles.sin(), angles.cos()], dim=-1).float()


def _scores(layer, x, rope):
    q, k, _ = layer._qkv(x, rope)
    return q @ k.transpose(-2, -1)


def _encode_projected(model, tokens):
    """The encoder applied to projected tokens, with the learned position embedding where the model has one."""
    return model.encode(tokens + model.pos_embed if model.pos_embed is not None else tokens)


# --- the backbone has no shortcut -------------------------------------------------------------------------------

def test_backbone_is_plain_resnet18_layout():
    model = _create('gradattn_resnet18_nope')
    stem = model.stem
    conv = stem.conv
    assert (conv.kernel_size, conv.stride, conv.padding, conv.bias) == ((7, 7), (2, 2), (3, 3), None)
    assert (stem.pool.kernel_size, stem.pool.stride, stem.pool.padding) == (3, 2, 1)
    assert [len(stage) for stage in model.stages] == [2, 2, 2, 2]
    for stage_idx, stage in enumerate(model.stages):
        for block_idx, block in enumerate(stage):
            assert isinstance(block, PlainBlock)
            convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
            assert len(convs) == 2 and all(c.kernel_size == (3, 3) and c.bias is None for c in convs)
            first_stride = 2 if stage_idx > 0 and block_idx == 0 else 1
            assert [c.stride for c in convs] == [(first_stride, first_stride), (1, 1)]
    names = [n for n, _ in model.named_modules()]
    assert not [n for n in names if 'downsample' in n or 'shortcut' in n]


@pytest.mark.parametrize('stage_idx', range(4))
def test_stage_input_reaches_output_only_through_convolutions(stage_idx):
    stage = _create('gradattn_resnet18_nope').stages[stage_idx]
    x = torch.randn(2, stage[0].conv1.in_channels, 8, 8, requires_grad=True)
    out = stage(x)
    assert not _reaches_without_convolution(out, x)
    out.sum().backward()
    assert x.grad.abs().sum() > 0  # the convolution path itself is there


def test_path_check_finds_the_shortcut_of_a_residual_block():
    # The same check on timm's BasicBlock (resnet18_se) must see the identity shortcut, or it proves nothing.
    block = _create('resnet18_se').layer1[0]
    x = torch.randn(2, 64, 8, 8, requires_grad=True)
    assert _reaches_without_convolution(block(x), x)


@pytest.mark.parametrize('conv_name', ('conv1', 'conv2'))
def test_zeroing_a_block_conv_cuts_the_block_off_its_input(conv_name):
    model = _create('gradattn_resnet18_nope')
    with torch.no_grad():
        for stage in model.stages:
            block = stage[-1]
            x1, x2 = torch.randn(2, 2, block.conv1.in_channels, 8, 8)
            assert not torch.allclose(block(x1), block(x2))
            getattr(block, conv_name).weight.zero_()
            assert torch.equal(block(x1), block(x2))  # a shortcut would let the input through

        residual = _create('resnet18_se').layer2[-1]
        x1, x2 = torch.randn(2, 2, 128, 8, 8)
        getattr(residual, conv_name).weight.zero_()
        assert not torch.allclose(residual(x1), residual(x2))


def test_zeroed_stage_makes_its_token_and_later_ones_independent_of_the_image():
    model = _create('gradattn_resnet18_nope')
    images = torch.randn(2, 2, 3, 32, 32)
    with torch.no_grad():
        model.stages[1][0].conv2.weight.zero_()
        feats = [model.extract(x) for x in images]
    assert not torch.allclose(feats[0][0], feats[1][0])  # stem
    assert not torch.allclose(feats[0][1], feats[1][1])  # stage 1
    for point in (2, 3, 4):  # stage 2 and everything after it
        assert torch.equal(feats[0][point], feats[1][point]), point


# --- tokens, encoder, head ----------------------------------------------------------------------------------------

def test_tokens_are_projected_average_pools_stem_first():
    model = _create('gradattn_resnet18_nope')
    with torch.no_grad():
        features = model.extract(torch.randn(2, 3, 32, 32))
        tokens = model.tokens(features)
        assert tokens.shape == (2, 5, 256)
        for i, feature in enumerate(features):
            expected = feature.mean((2, 3)) @ model.token_proj[i].weight.T + model.token_proj[i].bias
            assert torch.allclose(tokens[:, i], expected, atol=1e-5)


@pytest.mark.parametrize('name', GRADATTN_NAMES)
def test_encoder_layer_equals_pytorch_transformer_layer(name):
    layer = _create(name).encoder[0]
    reference = nn.TransformerEncoderLayer(256, 8, 512, 0.1, batch_first=True).eval()
    with torch.no_grad():
        reference.self_attn.in_proj_weight.copy_(layer.qkv.weight)
        if layer.qkv.bias is not None:
            reference.self_attn.in_proj_bias.copy_(layer.qkv.bias)
        else:  # RoPE's q/k/v projections have no bias, as the paper's reference
            reference.self_attn.in_proj_bias.zero_()
        for ours, theirs in ((layer.proj, reference.self_attn.out_proj), (layer.fc1, reference.linear1),
                             (layer.fc2, reference.linear2), (layer.norm1, reference.norm1),
                             (layer.norm2, reference.norm2)):
            theirs.weight.copy_(ours.weight)
            theirs.bias.copy_(ours.bias)
        x = torch.randn(3, 5, 256)
        expected = reference(x)
        for fused in (True, False):
            layer.fused_attn = fused
            assert torch.allclose(layer(x), expected, atol=1e-5)
    assert (layer.qkv.bias is None) == (name == 'gradattn_resnet18_rope')
    assert layer.proj.bias is not None


@pytest.mark.parametrize('name', GRADATTN_NAMES)
def test_encoder_is_post_norm_without_final_norm_and_head_averages_tokens(name):
    model = _create(name)
    assert len(model.encoder) == 3 and isinstance(model.norm, nn.Identity)
    assert not model.encoder[0].norm_first and model.encoder[0].attn_drop == 0.1
    tokens = torch.randn(2, 5, 256)
    with torch.no_grad():
        expected = tokens.mean(1) @ model.head.weight.T + model.head.bias
        assert torch.allclose(model.forward_head(tokens), expected, atol=1e-5)


@pytest.mark.parametrize('name', GRADATTN_NAMES)
def test_attention_maps_are_distributions_over_the_five_depths(name):
    model = _create(name)
    with torch.no_grad():
        maps = model.attention_maps(torch.randn(2, 3, 32, 32))
    assert len(maps) == 3
    for attention in maps:
        assert attention.shape == (2, 8, 5, 5)
        assert torch.allclose(attention.sum(-1), torch.ones(2, 8, 5), atol=1e-5)


# --- the variants ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', GRADATTN_NAMES)
def test_only_nope_is_permutation_equivariant_over_tokens(name):
    model = _create(name)
    tokens = torch.randn(2, 5, 256)
    permutation = torch.tensor([3, 0, 4, 1, 2])
    with torch.no_grad():
        out = _encode_projected(model, tokens)
        out_permuted = _encode_projected(model, tokens[:, permutation])
        equivariant = torch.allclose(out_permuted, out[:, permutation], atol=1e-5)
        same_logits = torch.allclose(model.forward_head(out_permuted), model.forward_head(out), atol=1e-5)
    # Without position information the encoder cannot tell the order, so the mean-pooled logits ignore it.
    assert equivariant == same_logits == (name == 'gradattn_resnet18_nope')


def test_lpe_position_embedding_is_used_and_trained():
    model = _create('gradattn_resnet18_lpe')
    pos_embed = model.pos_embed
    assert pos_embed.shape == (1, 5, 256)
    assert abs(pos_embed.std().item() - 1) < 0.1 and abs(pos_embed.mean().item()) < 0.1  # N(0, 1), unscaled
    assert 'pos_embed' in model.no_weight_decay() and 'pos_embed' in model.state_dict()
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    out.sum().backward()
    assert pos_embed.grad is not None and pos_embed.grad.abs().sum() > 0
    with torch.no_grad():
        pos_embed.add_(torch.randn_like(pos_embed))
        assert not torch.allclose(model(x), out)
    for name in ('gradattn_resnet18_nope', 'gradattn_resnet18_rope'):
        other = _create(name)
        assert other.pos_embed is None and 'pos_embed' not in other.state_dict()


def test_rope_table_is_rotate_half_over_full_head_base_10000():
    model = _create('gradattn_resnet18_rope')
    assert torch.allclose(model.rope, _rope_table(torch.arange(5)), atol=1e-6)
    assert 'rope' not in model.state_dict()  # derived, not a weight
    assert _create('gradattn_resnet18_nope').rope is None

    # timm's apply_rot_embed_cat(half=True) is the NeoX rotate-half: x cos + (-x2, x1) sin, all 32 dims.
    x = torch.randn(2, 8, 5, HEAD_DIM)
    sin, cos = model.rope.tensor_split(2, -1)
    rotate_half = torch.cat([-x[..., HEAD_DIM // 2:], x[..., :HEAD_DIM // 2]], dim=-1)
    assert torch.allclose(apply_rot_embed_cat(x, model.rope, half=True), x * cos + rotate_half * sin, atol=1e-6)


@pytest.mark.parametrize('offset', (1, 7, 100))
def test_rope_attention_scores_depend_only_on_relative_position(offset):
    model = _create('gradattn_resnet18_rope')
    layer = model.encoder[0]
    x = torch.randn(2, 5, 256)
    with torch.no_grad():
        scores = _scores(layer, x, model.rope)
        shifted = _scores(layer, x, _rope_table(torch.arange(5) + offset))
        unrotated = _scores(layer, x, None)
        _, _, v = layer._qkv(x, model.rope)
        _, _, v_plain = layer._qkv(x, None)
    assert torch.allclose(scores, shifted, atol=1e-3, rtol=1e-4)  # q.k sees m - n only
    assert not torch.allclose(scores, unrotated, atol=1e-3)       # but the rotation is really applied
    assert torch.equal(v, v_plain)                                # values are not rotated


def test_rope_table_drives_every_forward():
    model = _create('gradattn_resnet18_rope')
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        model.rope.copy_(_rope_table(torch.zeros(5)))  # position 0 everywhere: no rotation
        assert not torch.allclose(model(x), out)
        model.rope.copy_(_rope_table(torch.arange(5) + 3))  # the same relative positions
        assert torch.allclose(model(x), out, atol=1e-4)
