"""timm-gradattn: attention-routed skip connections as timm models, in three families (GradAttn with its SE/CBAM
ResNet-18 baselines, CNNtention, Attention Shortcuts).

``import timm_gradattn`` registers the models with timm, after which ``timm.create_model`` knows them. The families,
their models, recipes and papers: ``timm_gradattn.families``.
"""
from .data.info import DATASETS, get_dataset_info
from .errors import UserError
from .families import FAMILIES, MODEL_NAMES
from .models import GradAttnResNet, MissingWeightsError, hub_namespace, hub_repo_id

__version__ = '0.1.0'
