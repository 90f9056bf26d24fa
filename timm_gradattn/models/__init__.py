"""The model zoo. Importing this package registers every model with timm's registry."""
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn as nn

from ._pretrained import (
    DEFAULT_HUB_NAMESPACE, HUB_NAMESPACE_ENV, MissingWeightsError, hub_namespace, hub_repo_id, model_tags)
from . import gradattn
from .attention_shortcuts import (
    AttentionShortcutNet, AttentionShortcutResNet, CifarStemResNet, as_resnet50_stages, asnet50_kv, asnet50_out,
    resnet50_cifar, resnet50_cifar_050, resnet50_cifar_plain)
from .cnntention import CifarResNet, resnet20, resnet20_cbam, resnet20_mha, resnet20_selfatt
from .gradattn import GradAttnResNet, gradattn_resnet18_lpe, gradattn_resnet18_nope, gradattn_resnet18_rope
from .resnet_attn import ReferenceInitResNet, resnet18_cbam, resnet18_se

MODEL_NAMES = (
    'gradattn_resnet18_nope', 'gradattn_resnet18_lpe', 'gradattn_resnet18_rope', 'resnet18_se', 'resnet18_cbam',
    'resnet20', 'resnet20_selfatt', 'resnet20_mha', 'resnet20_cbam',
    'asnet50_out', 'asnet50_kv', 'as_resnet50_stages', 'resnet50_cifar', 'resnet50_cifar_050', 'resnet50_cifar_plain')

# Each family whose weights were ever saved under other names registers its timm-style filter here:
# (model class, fn(state_dict, model) -> state_dict in the model's current names).
_CHECKPOINT_FILTERS: List[Tuple[type, Callable]] = [
    (GradAttnResNet, gradattn.checkpoint_filter_fn),
]


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Map a state dict saved under any naming the zoo knows (older releases, the papers' reference code) to
    ``model``'s names. The one filter every weight-loading path applies; a no-op for current names."""
    for model_cls, filter_fn in _CHECKPOINT_FILTERS:
        if isinstance(model, model_cls):
            return filter_fn(state_dict, model)
    return state_dict
