"""The model zoo. Importing this package registers every model with timm's registry."""
from ._pretrained import DEFAULT_HUB_NAMESPACE, HUB_NAMESPACE_ENV, MissingWeightsError, hub_namespace, hub_repo_id
from .gradattn import GradAttnResNet, gradattn_resnet18_lpe, gradattn_resnet18_nope, gradattn_resnet18_rope
from .resnet_attn import ReferenceInitResNet, resnet18_cbam, resnet18_se

MODEL_NAMES = (
    'gradattn_resnet18_nope', 'gradattn_resnet18_lpe', 'gradattn_resnet18_rope', 'resnet18_se', 'resnet18_cbam')
