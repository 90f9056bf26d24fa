"""What the papers measure and what they do not show: gradient flow (``gradients``), which inputs each family's
attention reads (``attention``) and where in the image a prediction comes from (``cam``: Grad-CAM, with the optional
grad-cam package). Every name is importable from ``timm_gradattn.analysis``."""
from .attention import (
    ATTENTION_KINDS, ATTENTION_MODELS, ROUTING_METHODS, DepthRoutingSummary, RoutingSummary, SpatialAttention,
    attention_kind, attention_rollout, depth_routing_summary, depth_routing_weights, extraction_point_names,
    images_per_class, routing_summary, routing_weights, spatial_attention)
from .cam import (
    CAM_INSTALL, CamLayer, ClassActivationMaps, cam_target_layers, class_activation_maps, feature_maps,
    import_grad_cam)
from .gradients import (
    GRADIENT_MODES, HEALTH_BANDS, PAPER_BANDS, REFERENCE_BAND, gradient_health, gradient_health_report,
    gradient_norms, read_grad_norms)
