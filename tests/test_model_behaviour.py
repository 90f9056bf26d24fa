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


def _attention_probabilities(layer, x, rope):
    """The softmax probabilities a layer's attention computes for ``x``, read at its dropout on the unfused path."""
    probabilities = []
    hook = layer.attn.attn_drop.register_forward_pre_hook(lambda module, args: probabilities.append(args[0]))
    fused, layer.attn.fused_attn = layer.attn.fused_attn, False
    try:
        layer.attn(x, rope=rope)
    finally:
        layer.attn.fused_attn = fused
        hook.remove()
    return probabilities[0]


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


def _pytorch_layer_like(layer):
    """nn.TransformerEncoderLayer(256, 8, 512, 0.1) holding the weights of one of our encoder layers."""
    reference = nn.TransformerEncoderLayer(256, 8, 512, 0.1, batch_first=True).eval()
    with torch.no_grad():
        reference.self_attn.in_proj_weight.copy_(layer.attn.qkv.weight)
        if layer.attn.qkv.bias is not None:
            reference.self_attn.in_proj_bias.copy_(layer.attn.qkv.bias)
        else:  # RoPE's q/k/v projections have no bias, as the paper's reference
            reference.self_attn.in_proj_bias.zero_()
        for ours, theirs in ((layer.attn.proj, reference.self_attn.out_proj), (layer.mlp.fc1, reference.linear1),
                             (layer.mlp.fc2, reference.linear2), (layer.norm1, reference.norm1),
                             (layer.norm2, reference.norm2)):
            theirs.weight.copy_(ours.weight)
            theirs.bias.copy_(ours.bias)
    return reference


@pytest.mark.parametrize('name', GRADATTN_NAMES)
def test_encoder_layer_equals_pytorch_transformer_layer(name):
    layer = _create(name).encoder[0]
    reference = _pytorch_layer_like(layer)
    with torch.no_grad():
        x = torch.randn(3, 5, 256)
        expected = reference(x)
        for fused in (True, False):
            layer.attn.fused_attn = fused
            assert torch.allclose(layer(x), expected, atol=1e-5)
    assert (layer.attn.qkv.bias is None) == (name == 'gradattn_resnet18_rope')
    assert layer.attn.proj.bias is not None


def test_encoder_layer_is_timm_attention_and_mlp():
    from timm.layers import AttentionRope, Mlp
    layer = _create('gradattn_resnet18_rope').encoder[0]
    assert type(layer.attn) is AttentionRope and type(layer.mlp) is Mlp
    assert layer.attn.rotate_half and layer.attn.num_prefix_tokens == 0
    # Dropouts where nn.TransformerEncoderLayer has them: probabilities, after out_proj, in and after the MLP.
    assert [layer.attn.attn_drop.p, layer.attn.proj_drop.p, layer.mlp.drop1.p, layer.mlp.drop2.p] == [0.1] * 4


@pytest.mark.parametrize('name', GRADATTN_NAMES)
def test_encoder_is_post_norm_without_final_norm_and_head_averages_tokens(name):
    model = _create(name)
    assert len(model.encoder) == 3 and isinstance(model.norm, nn.Identity)
    assert not model.encoder[0].norm_first and model.encoder[0].attn.attn_drop.p == 0.1
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
    # Reading the maps leaves the model as it was: fused attention where it was on, no hooks left behind.
    for layer in model.encoder:
        assert layer.attn.fused_attn == timm.layers.use_fused_attn() and not layer.attn.attn_drop._forward_pre_hooks


def test_attention_maps_are_pytorch_attention_weights():
    model = _create('gradattn_resnet18_lpe')
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        maps = model.attention_maps(images)
        x = model.tokens(model.extract(images))
        for layer, attention in zip(model.encoder, maps):
            reference = _pytorch_layer_like(layer)
            _, expected = reference.self_attn(x, x, x, need_weights=True, average_attn_weights=False)
            assert torch.allclose(attention, expected, atol=1e-6)
            x = layer(x)


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
def test_rope_attention_depends_only_on_relative_position(offset):
    model = _create('gradattn_resnet18_rope')
    layer = model.encoder[0]
    x = torch.randn(2, 5, 256)
    with torch.no_grad():
        attention = _attention_probabilities(layer, x, model.rope)
        shifted = _attention_probabilities(layer, x, _rope_table(torch.arange(5) + offset))
        unrotated = _attention_probabilities(layer, x, None)
    assert torch.allclose(attention, shifted, atol=1e-5)  # q.k sees m - n only
    assert not torch.allclose(attention, unrotated, atol=1e-3)  # but the rotation is really applied


def test_rope_leaves_values_unrotated():
    layer = _create('gradattn_resnet18_rope').encoder[0]
    x = torch.randn(2, 5, 256)
    with torch.no_grad():
        layer.attn.qkv.weight[:2 * 256].zero_()  # q = k = 0: uniform attention, the output is the mean value
        assert torch.equal(layer.attn(x, rope=_rope_table(torch.arange(5))), layer.attn(x, rope=None))


def test_rope_table_drives_every_forward():
    model = _create('gradattn_resnet18_rope')
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        model.rope.copy_(_rope_table(torch.zeros(5)))  # position 0 everywhere: no rotation
        assert not torch.allclose(model(x), out)
        model.rope.copy_(_rope_table(torch.arange(5) + 3))  # the same relative positions
        assert torch.allclose(model(x), out, atol=1e-4)


# --- initialisation -------------------------------------------------------------------------------------------------

def _layer_states(model):
    return [layer.state_dict() for layer in model.encoder]


def _all_equal(states):
    return all(torch.equal(state[key], states[0][key]) for state in states[1:] for key in states[0])


@pytest.mark.parametrize('name', ('gradattn_resnet18_nope', 'gradattn_resnet18_lpe'))
def test_transformer_encoder_variants_start_as_one_layer_copied(name):
    # nn.TransformerEncoder deep-copies one nn.TransformerEncoderLayer: the reference's three layers start equal.
    model = _create(name)
    assert _all_equal(_layer_states(model))
    layer = model.encoder[0]
    xavier_bound = (6 / (256 + 3 * 256)) ** 0.5  # nn.MultiheadAttention's in_proj, (768, 256)
    assert 0.95 * xavier_bound < layer.attn.qkv.weight.abs().max() <= xavier_bound
    assert not layer.attn.qkv.bias.any() and not layer.attn.proj.bias.any()
    assert layer.attn.proj.weight.abs().max() <= 256 ** -0.5 and layer.mlp.fc1.bias.any()  # nn.Linear defaults
    assert torch.equal(layer.norm1.weight, torch.ones(256)) and not layer.norm1.bias.any()

    independent = _create(name, encoder_init='independent')
    states = _layer_states(independent)
    for key in states[0]:
        if (key.startswith('attn.') and key.endswith('.bias')) or key.startswith('norm'):
            continue  # zeros and ones in every layer
        assert not torch.equal(states[0][key], states[1][key]), key
        assert not torch.equal(states[1][key], states[2][key]), key
    assert not independent.encoder[1].attn.qkv.bias.any() and not independent.encoder[2].attn.proj.bias.any()


@pytest.mark.parametrize('encoder_init', ('reference', 'independent'))
def test_rope_layers_start_with_linear_defaults_each_drawn_separately(encoder_init):
    # The reference RoPE layer is plain nn.Linear q/k/v (no bias) and output (with bias) projections.
    model = _create('gradattn_resnet18_rope', encoder_init=encoder_init)
    bound = 256 ** -0.5
    for layer in model.encoder:
        assert layer.attn.qkv.bias is None
        assert 0.95 * bound < layer.attn.qkv.weight.abs().max() <= bound
        assert layer.attn.proj.bias.any() and layer.attn.proj.bias.abs().max() <= bound
    states = _layer_states(model)
    assert not torch.equal(states[0]['attn.qkv.weight'], states[1]['attn.qkv.weight'])
    assert not torch.equal(states[1]['attn.proj.bias'], states[2]['attn.proj.bias'])


def test_unknown_encoder_init_is_refused():
    with pytest.raises(ValueError, match="encoder_init='copied'"):
        _create('gradattn_resnet18_nope', encoder_init='copied')


# --- computed buffers ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', GRADATTN_NAMES)
def test_meta_device_build_then_load_gives_identical_logits(name):
    # transformers' TimmWrapper builds on the meta device, materialises, then calls init_non_persistent_buffers.
    model = _create(name)
    with torch.device('meta'):
        empty = timm.create_model(name, num_classes=10)
    assert all(tensor.is_meta for tensor in empty.state_dict().values())
    empty = empty.to_empty(device='cpu')
    empty.init_non_persistent_buffers()
    empty.load_state_dict(model.state_dict())
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(empty.eval()(images), model(images))
    if model.rope is not None:
        assert torch.equal(empty.rope, model.rope)
