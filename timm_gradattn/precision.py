"""What this machine computes fast and correctly: the default precision and memory format of a training run.

- **bf16 autocast where bf16 is native**: a CUDA GPU that computes bf16, or a CPU with AMX or AVX512-BF16 tiles
  (mkldnn's own check also answers yes where it only emulates bf16, which is slower than fp32). Elsewhere fp32.
  The committed measurement (``benchmarks/results/speed.md``, AMD EPYC with AVX512-BF16): the bare training step
  of the default model (GradAttn-RoPE) 1.2x faster at 32 px, 1.3x at 64 px, 1.6x at 224 px.
- **Channels-last on CPU from 224 px**: the same measurement has it 1.10-1.21x faster to train at 224 px and
  0.81-0.97x (slower) at 28-96 px. No measurement on a GPU is committed, so there it stays off unless asked for.
- **One-pixel maps in fp32**: on CPU under bf16 autocast (torch 2.14.1), a 3x3 stride-2 convolution on 1x1 feature
  maps can leave part of its weight gradient unwritten (garbage or NaN). ``guard_one_pixel_convolutions`` makes every
  convolution (``nn.Conv2d`` or a subclass such as timm's ``StdConv2d``) with a kernel larger than 1 run such maps in
  fp32, whatever the input size; the maps are 1x1, so the cost does not show.

Nothing here probes speed at start-up: each default is a rule read off a committed measurement.
"""
from typing import List, Optional, Tuple

import torch
import torch.nn as nn

__all__ = ['native_bf16', 'emulated_bf16', 'default_mixed_precision', 'default_channels_last', 'OnePixelFp32',
           'OnePixelFp32Conv2d', 'guard_one_pixel_convolutions']

# The input side from which channels-last trains faster than NCHW on CPU (benchmarks/results/speed.md).
CHANNELS_LAST_CPU_MIN_SIZE = 224


def native_bf16() -> Optional[str]:
    """What on this machine computes bf16 natively (for the log line), or None where bf16 would be emulated."""
    if torch.cuda.is_available():
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return f'{torch.cuda.get_device_name()} computes bf16'
        return None
    if torch.cpu._is_amx_tile_supported():
        return 'the CPU has AMX'
    if torch.cpu._is_avx512_bf16_supported():
        return 'the CPU has AVX512-BF16'
    return None


def emulated_bf16() -> Optional[str]:
    """Where this machine would only emulate bf16 (for a log line), or None where it computes bf16 natively."""
    if native_bf16() is not None:
        return None
    return 'this GPU' if torch.cuda.is_available() else 'this CPU (no AMX or AVX512-BF16)'


def default_mixed_precision() -> Tuple[str, str]:
    """(Accelerate's word, why) for a run that states no precision: 'bf16' where native, else 'no'."""
    reason = native_bf16()
    if reason is not None:
        return 'bf16', f'{reason} (pass --mixed-precision no for fp32)'
    return 'no', (f'{emulated_bf16()} would only emulate bf16, slower than fp32 (pass --mixed-precision bf16 to use '
                  f'it anyway)')


def default_channels_last(device_type: str, img_size: int) -> Tuple[bool, str]:
    """(on?, why) for a run that does not say ``--channels-last`` / ``--no-channels-last``."""
    if device_type == 'cpu' and img_size >= CHANNELS_LAST_CPU_MIN_SIZE:
        return True, (f'on CPU at {img_size} px it trains faster '
                      f'(benchmarks/results/speed.md; --no-channels-last to turn off)')
    if device_type == 'cpu':
        return False, (f'on CPU below {CHANNELS_LAST_CPU_MIN_SIZE} px it trains slower '
                       f'(benchmarks/results/speed.md; --channels-last to turn on)')
    return False, 'no measurement on this device is committed (--channels-last to turn on)'


class OnePixelFp32:
    """Mixin for an ``nn.Conv2d`` class: 1x1 maps under CPU autocast go through the class's own forward (a weight
    standardisation, a padding) with autocast off and the input in fp32. The weights are fp32 already: Accelerate's
    autocast keeps them so."""
    unguarded_class: type = nn.Conv2d  # the class this one guards

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] == (1, 1) and x.device.type == 'cpu' and torch.is_autocast_enabled('cpu'):
            with torch.autocast('cpu', enabled=False):
                return super().forward(x.float())
        return super().forward(x)

    def __reduce_ex__(self, protocol):
        # The guarded class is made at run time, so pickle cannot find it by name: name the class it guards.
        reduced = super().__reduce_ex__(protocol)
        return (_new_guarded, (self.unguarded_class,)) + tuple(reduced[2:])


class OnePixelFp32Conv2d(OnePixelFp32, nn.Conv2d):
    """``nn.Conv2d`` that computes 1x1 maps in fp32 under CPU autocast (same parameters, same state dict)."""


_GUARDED = {nn.Conv2d: OnePixelFp32Conv2d}


def _guarded_class(conv_class: type) -> type:
    """The ``OnePixelFp32`` class of an ``nn.Conv2d`` class, made once per class."""
    if conv_class not in _GUARDED:
        _GUARDED[conv_class] = type(f'OnePixelFp32{conv_class.__name__}', (OnePixelFp32, conv_class),
                                    dict(unguarded_class=conv_class, __module__=__name__))
    return _GUARDED[conv_class]


def _new_guarded(conv_class: type) -> nn.Module:
    """An empty module of the guarded ``conv_class``, which unpickling then fills (``OnePixelFp32.__reduce_ex__``)."""
    guarded = _guarded_class(conv_class)
    return guarded.__new__(guarded)


def guard_one_pixel_convolutions(model: nn.Module) -> List[str]:
    """Make every ``nn.Conv2d``, subclasses included (timm's ``StdConv2d``, ``ScaledStdConv2d``, ...), with a kernel
    larger than 1 compute 1x1 maps in fp32 under CPU autocast. The module's class changes in place to one that adds
    ``OnePixelFp32`` to it and keeps its forward; its parameters, names and state dict do not change. Returns their
    names (modules guarded already are left as they are)."""
    guarded = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and not isinstance(module, OnePixelFp32) and max(module.kernel_size) > 1:
            module.__class__ = _guarded_class(type(module))
            guarded.append(name)
    return guarded
