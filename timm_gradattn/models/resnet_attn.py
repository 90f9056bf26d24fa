""" ResNet-18 with squeeze-and-excitation or CBAM attention: the GradAttn paper's Table 9 baselines

Papers:
    `Squeeze-and-Excitation Networks` - Hu et al., CVPR 2018, https://arxiv.org/abs/1709.01507
    `CBAM: Convolutional Block Attention Module` - Woo et al., ECCV 2018, https://arxiv.org/abs/1807.06521
Compared against in `GradAttn` - Ghoshal & Buckchash, 2026, https://arxiv.org/abs/2603.26756

These are timm's own ``ResNet`` and ``BasicBlock`` with timm's ``SEModule`` / ``CbamModule`` as the
block attention (after the second BN, before the residual add), configured to the paper's reference:
reduction 16 with no rounding of the reduced width, bias-free SE projections, and the reference's
initialisation (Kaiming-normal convolutions, N(0, 0.01) SE projections and classifier, no zero-init of
the last BN). timm's ``seresnet18`` differs: its SE width is rounded to a multiple of 8 and has biases.
"""
from functools import partial
from typing import Any, Dict

import torch.nn as nn

from timm.layers.cbam import CbamModule
from timm.layers.squeeze_excite import SEModule
from timm.models import generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, ResNet

from ..families import FAMILIES
from ._pretrained import build_with_weights_hint, dataset_cfgs

__all__ = ['ReferenceInitResNet']


class ReferenceInitResNet(ResNet):
    """timm ``ResNet`` initialised as the GradAttn reference initialises its SE/CBAM baselines."""

    def init_weights(self, zero_init_last: bool = False) -> None:
        super().init_weights(zero_init_last=zero_init_last)
        for module in self.modules():
            if isinstance(module, SEModule):
                # The reference's SE projections are Linear layers, initialised N(0, 0.01).
                for proj in (module.fc1, module.fc2):
                    nn.init.normal_(proj.weight, 0, 0.01)
                    if proj.bias is not None:
                        nn.init.zeros_(proj.bias)
        if isinstance(self.fc, nn.Linear):
            nn.init.normal_(self.fc.weight, 0, 0.01)
            nn.init.zeros_(self.fc.bias)


def _create_resnet_attn(variant: str, pretrained: bool = False, **kwargs: Any) -> ResNet:
    kwargs.setdefault('zero_init_last', False)
    return build_with_weights_hint(ReferenceInitResNet, variant, pretrained, **kwargs)


def _cfg(**kwargs: Any) -> Dict[str, Any]:
    # reduction: the 7x7 stride-2 stem, the max-pool and three stride-2 stages give a map 1/32 of the input.
    return dict(first_conv='conv1', classifier='fc', reduction=32, **kwargs)


# paper_ids: the architecture's paper, then GradAttn's, whose protocol trains these baselines.
_GRADATTN_PAPER_ID = FAMILIES['gradattn'].paper.ids
default_cfgs = generate_default_cfgs({
    **dataset_cfgs('resnet18_se', paper_ids=('arXiv:1709.01507', _GRADATTN_PAPER_ID),
                   paper_name='Squeeze-and-Excitation Networks', **_cfg()),
    **dataset_cfgs('resnet18_cbam', paper_ids=('arXiv:1807.06521', _GRADATTN_PAPER_ID),
                   paper_name='CBAM: Convolutional Block Attention Module', **_cfg()),
})


@register_model
def resnet18_se(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNet-18 with a squeeze-and-excitation module (reduction 16, no bias) in every block."""
    attn_layer = partial(SEModule, rd_ratio=1. / 16, rd_divisor=1, bias=False)
    model_args = dict(block=BasicBlock, layers=(2, 2, 2, 2), block_args=dict(attn_layer=attn_layer))
    return _create_resnet_attn('resnet18_se', pretrained, **dict(model_args, **kwargs))


@register_model
def resnet18_cbam(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNet-18 with a CBAM module (reduction 16, 7x7 spatial attention) in every block."""
    attn_layer = partial(CbamModule, rd_ratio=1. / 16, rd_divisor=1, spatial_kernel_size=7)
    model_args = dict(block=BasicBlock, layers=(2, 2, 2, 2), block_args=dict(attn_layer=attn_layer))
    return _create_resnet_attn('resnet18_cbam', pretrained, **dict(model_args, **kwargs))
