"""timm-gradattn: GradAttn and its SE/CBAM ResNet-18 baselines as timm models.

``import timm_gradattn`` registers the models with timm, after which ``timm.create_model`` knows them.
"""
from .data.info import DATASETS, get_dataset_info
from .models import MODEL_NAMES, GradAttnResNet, MissingWeightsError, hub_namespace, hub_repo_id

__version__ = '0.1.0'
