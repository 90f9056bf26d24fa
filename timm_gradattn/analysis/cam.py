"""Grad-CAM (Selvaraju et al., ICCV 2017) for any timm model, through the grad-cam package (``pytorch_grad_cam``).

CNNtention's authors rest their 'global context' claim on Grad-CAM pictures; the same picture for every family
lets them be compared. grad-cam is an optional extra (``pip install "timm-gradattn[cam]"``), imported only when
a map is asked for.

Which layer: a Grad-CAM map has the resolution of the layer it reads, and a 1x1 map is one number, so constant
over the image. ``cam_target_layers`` takes the deepest ``feature_info`` maps that are at least ``min_side``
(default 4) pixels on a side at the input size, measured by one forward pass of a blank image. At 28-32 px:

    * GradAttn (ImageNet stem, strides 4-32): stem and stage 1 are 8x8 (7x7 at 28 px), stage 2 4x4, stage 3 2x2,
      stage 4 1x1. Every extraction point is pooled into one token, so the tokens have no layout; the map is read
      from stage 2's output (``stages.1``), whose gradient arrives through its own token and through stages 3-4.
      The SE / CBAM baselines (timm's ResNet-18): ``layer2``, 4x4.
    * CNNtention (ResNet-20, strides 1-4): the third stage after its attention (``attn3``; ``layer3`` for the
      plain ResNet-20), 8x8 at 32 px, 7x7 at 28 px.
    * Attention Shortcuts (CIFAR stem, strides 1-8): stage 4, 4x4. The AS-Nets run a stage's blocks one by one
      between attention steps and never call the stage module, so the layer read is the stage's last block
      (``stages.3.2``); AS_stages calls ``stages.3``; timm's ResNet-50 baselines ``layer4``.

``num_layers`` > 1 adds the next shallower maps; grad-cam scales each layer's map to [0, 1] at the input size and
averages them. Feature maps may be (C, H, W), channels-last (H, W, C) or tokens (L, C) with the model's
``num_prefix_tokens`` first (timm's ViTs); each is turned into (C, H, W) for grad-cam.
"""
import contextlib
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
from timm.utils import unwrap_model

from ..preserve import preserved_state
from .attention import _grid

__all__ = ['CamLayer', 'ClassActivationMaps', 'CAM_INSTALL', 'cam_target_layers', 'class_activation_maps',
           'feature_maps', 'import_grad_cam']

CAM_INSTALL = 'pip install "timm-gradattn[cam]"'
LAYOUTS = ('NCHW', 'NHWC', 'NLC')


def import_grad_cam() -> Any:
    """The ``pytorch_grad_cam`` module; an ImportError that names the extra to install when it is missing."""
    try:
        import pytorch_grad_cam
    except ImportError as error:
        raise ImportError(f'Grad-CAM needs the grad-cam package, which is not installed: {CAM_INSTALL}') from error
    return pytorch_grad_cam


@dataclass(frozen=True)
class CamLayer:
    """A ``feature_info`` entry as Grad-CAM reads it at one input size."""
    feature: str                 # the feature_info module
    module: str                  # the module hooked: the feature module, or the last module inside it to run when
                                 # the model runs its pieces itself (an AS-Net stage's last block)
    index: int                   # position in feature_info, 0 = shallowest
    grid: Tuple[int, int]        # (h, w) of the map
    layout: str                  # 'NCHW', 'NHWC' or 'NLC' (tokens)
    shape: Tuple[int, ...]       # the module's output shape for one image


def _feature_info(model: nn.Module) -> List[Dict[str, Any]]:
    info = getattr(model, 'feature_info', None)
    info = getattr(info, 'info', info)  # timm's FeatureInfo keeps the list in .info
    if not info:
        raise TypeError(f'{type(model).__name__} has no feature_info: Grad-CAM picks its layers from it.')
    return list(info)


@contextlib.contextmanager
def _grad_checkpointing_off(model: nn.Module) -> Iterator[None]:
    # A checkpointed stage is not called as a module and its blocks run twice: the hooks would see both calls.
    enabled = bool(getattr(model, 'grad_checkpointing', False))
    if enabled:
        model.set_grad_checkpointing(False)
    try:
        yield
    finally:
        if enabled:
            model.set_grad_checkpointing(True)


def _layout(shape: Tuple[int, ...], channels: int, prefix_tokens: int, image_size: Tuple[int, int], name: str
            ) -> Tuple[str, Tuple[int, int]]:
    """The layout and (h, w) grid of a module output of per-image ``shape`` with ``channels`` channels."""
    if len(shape) == 3 and shape[0] == channels:
        return 'NCHW', (shape[1], shape[2])
    if len(shape) == 3 and shape[2] == channels:
        return 'NHWC', (shape[0], shape[1])
    if len(shape) == 2 and shape[1] == channels and shape[0] > prefix_tokens:
        return 'NLC', _grid(shape[0] - prefix_tokens, *image_size)
    raise ValueError(f'{name} outputs {shape} per image for {channels} channels; Grad-CAM reads a map shaped '
                     f'({channels}, H, W), (H, W, {channels}) or tokens (L, {channels}).')


def feature_maps(model: nn.Module, input_size: Sequence[int]) -> List[CamLayer]:
    """Every ``feature_info`` entry's map at ``input_size`` (C, H, W), read from one forward pass of a blank image
    in eval mode; the model is left as it was."""
    model = unwrap_model(model)
    info = _feature_info(model)
    modules = dict(model.named_modules())
    missing = [entry['module'] for entry in info if entry['module'] not in modules]
    if missing:
        raise ValueError(f'feature_info names modules {type(model).__name__} does not have: {", ".join(missing)}.')
    shapes: Dict[str, Any] = {}
    finished: List[str] = []  # module names in the order their forward ended: a stage ends after its blocks

    def record(name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            shapes[name] = tuple(output.shape[1:]) if isinstance(output, torch.Tensor) else type(output).__name__
            finished.append(name)
        return hook

    watched = {name for entry in info for name, _ in modules[entry['module']].named_modules(prefix=entry['module'])}
    handles = [modules[name].register_forward_hook(record(name)) for name in watched]
    parameter = next(model.parameters())
    try:
        with preserved_state(model, buffers=False, rng=False), _grad_checkpointing_off(model), torch.no_grad():
            model.eval()
            model(torch.zeros(1, *input_size, device=parameter.device, dtype=parameter.dtype))
    finally:
        for handle in handles:
            handle.remove()

    prefix_tokens = int(getattr(model, 'num_prefix_tokens', 0) or 0)
    layers = []
    for index, entry in enumerate(info):
        feature = entry['module']
        ran = [name for name in finished if name.startswith(feature + '.')]
        module = feature if feature in shapes else (ran[-1] if ran else None)
        if module is None:
            raise ValueError(f'feature_info module {feature} of {type(model).__name__} never runs in forward.')
        shape = shapes[module]
        if isinstance(shape, str):
            raise ValueError(f'{module} outputs a {shape}, not a tensor; Grad-CAM reads a feature map.')
        layout, grid = _layout(shape, entry['num_chs'], prefix_tokens, tuple(input_size[-2:]), module)
        layers.append(CamLayer(feature=feature, module=module, index=index, grid=grid, layout=layout, shape=shape))
    return layers


def cam_target_layers(
        model: nn.Module,
        input_size: Sequence[int],
        min_side: int = 4,
        num_layers: int = 1,
) -> List[CamLayer]:
    """The deepest ``num_layers`` feature maps at least ``min_side`` pixels on a side at ``input_size`` (C, H, W),
    shallowest first."""
    if min_side < 1 or num_layers < 1:
        raise ValueError(f'min_side={min_side} and num_layers={num_layers} must both be at least 1.')
    found = feature_maps(model, input_size)
    usable = [layer for layer in found if min(layer.grid) >= min_side]
    if not usable:
        sizes = ', '.join(f'{layer.feature} {layer.grid[0]}x{layer.grid[1]}' for layer in found)
        raise ValueError(f'No feature map of {type(unwrap_model(model)).__name__} is {min_side} px or more on a side '
                         f'at {input_size[-2]}x{input_size[-1]} ({sizes}); pass larger images or a smaller min_side.')
    return usable[-num_layers:]


@dataclass
class ClassActivationMaps:
    """Grad-CAM maps of a batch and what they explain, as numpy arrays."""
    maps: np.ndarray            # (B, H, W) float32 at the input size, each scaled to [0, 1] by its own maximum
    targets: np.ndarray         # (B,) the class whose score each map explains
    predictions: np.ndarray     # (B,) the model's top-1 class
    layers: List[CamLayer]      # the layers read


class _FloatLogits(nn.Module):
    """The model with its logits in float32 (grad-cam reads them with numpy) and checked to be (B, classes)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(f'Grad-CAM explains a class score: the model must return (batch, classes) logits, '
                             f'got {shape} (a classifier head with global pooling).')
        return logits.float()


def _to_nchw(layers: Sequence[CamLayer]):
    """grad-cam's ``reshape_transform``: each hooked output (and its gradient), told apart by shape, as float NCHW."""
    by_shape: Dict[Tuple[int, ...], CamLayer] = {}
    for layer in layers:
        other = by_shape.setdefault(layer.shape, layer)
        if other.layout != layer.layout:
            raise ValueError(f'{other.module} and {layer.module} output {layer.shape} in different layouts; '
                             f'read them one at a time.')

    def transform(tensor: torch.Tensor) -> torch.Tensor:
        layer = by_shape[tuple(tensor.shape[1:])]
        tensor = tensor.float()
        if layer.layout == 'NHWC':
            return tensor.permute(0, 3, 1, 2)
        if layer.layout == 'NLC':
            height, width = layer.grid
            tokens = tensor[:, tensor.shape[1] - height * width:]  # prefix (class) tokens come first
            return tokens.transpose(1, 2).reshape(tensor.shape[0], tensor.shape[2], height, width)
        return tensor
    return transform


def class_activation_maps(
        model: nn.Module,
        images: torch.Tensor,
        targets: Optional[Union[torch.Tensor, Sequence[int]]] = None,
        layers: Optional[Sequence[Union[str, CamLayer]]] = None,
        min_side: int = 4,
        num_layers: int = 1,
) -> ClassActivationMaps:
    """Grad-CAM maps of ``images`` (B, C, H, W) for the predicted classes, or for ``targets``.

    Args:
        model: Any timm classifier with ``feature_info``; read in eval mode with gradients enabled, and left as it
            was found: module modes, ``.grad`` fields, gradient checkpointing; no hook stays behind.
        images: Normalised input batch, on the model's device.
        targets: One class per image; the top-1 prediction by default.
        layers: feature_info module names (or ``CamLayer``s) to read; by default ``cam_target_layers(model,
            images.shape[1:], min_side, num_layers)``.
        min_side, num_layers: As ``cam_target_layers``.

    Raises:
        ImportError: grad-cam is not installed (the message says what to install).
    """
    grad_cam = import_grad_cam()
    model = unwrap_model(model)
    if images.dim() != 4:
        raise ValueError(f'images must be a batch shaped (B, C, H, W), got {tuple(images.shape)}.')
    input_size = tuple(images.shape[1:])
    if layers is None:
        chosen = cam_target_layers(model, input_size, min_side, num_layers)
    else:
        found = {layer.feature: layer for layer in feature_maps(model, input_size)}
        names = [layer.feature if isinstance(layer, CamLayer) else layer for layer in layers]
        unknown = [name for name in names if name not in found]
        if unknown or not names:
            raise ValueError(f'layers={names} must name feature_info modules: {", ".join(found)}.')
        chosen = [found[name] for name in names]
    if targets is not None:
        targets = [int(target) for target in targets]
        if len(targets) != images.shape[0]:
            raise ValueError(f'{len(targets)} targets for {images.shape[0]} images.')
        targets = [grad_cam.utils.model_targets.ClassifierOutputTarget(target) for target in targets]

    grads = [(parameter, parameter.grad) for parameter in model.parameters()]  # grad-cam zeroes and fills them
    wrapped = _FloatLogits(model)
    with preserved_state(model, buffers=False, rng=False), _grad_checkpointing_off(model), torch.enable_grad():
        model.eval()
        cam = grad_cam.GradCAM(model=wrapped, target_layers=[model.get_submodule(layer.module) for layer in chosen],
                               reshape_transform=_to_nchw(chosen))
        cam.compute_input_gradient = True  # the maps get a gradient even when every parameter is frozen
        try:
            maps = cam(input_tensor=images, targets=targets)
            predictions = cam.outputs.detach().argmax(dim=1).cpu().numpy()
        finally:
            cam.activations_and_grads.release()
            for parameter, grad in grads:
                parameter.grad = grad
    explained = predictions if targets is None else np.array([target.category for target in targets])
    return ClassActivationMaps(maps=np.asarray(maps, dtype=np.float32), targets=explained.astype(np.int64),
                               predictions=predictions.astype(np.int64), layers=chosen)
