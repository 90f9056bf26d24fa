"""The model zoo. Importing this package registers every model with timm's registry.

Which models exist, and their families, tags and papers: ``timm_gradattn.families``.
"""
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn as nn

from ..families import MODEL_NAMES
from ._hub import DEFAULT_HUB_NAMESPACE, HUB_NAMESPACE_ENV, MissingWeightsError, hub_namespace, hub_repo_id
from ._pretrained import model_tags, pretrained_name
from . import gradattn
from .attention_shortcuts import AttentionShortcutNet, AttentionShortcutResNet, CifarStemResNet
from .cnntention import CifarResNet
from .gradattn import GradAttnResNet
from .resnet_attn import ReferenceInitResNet

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
