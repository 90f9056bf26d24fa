"""What this machine computes fast and correctly: the default precision and memory format of a training run.

- **bf16 autocast where bf16 is native**: a CUDA GPU that computes bf16, or a CPU with AMX or AVX512-BF16 tiles
  (mkldnn's own check also answers yes where it only emulates bf16, which is slower than fp32). Elsewhere fp32.
  The committed measurement (``benchmarks/results/speed.md``, AMD EPYC with AVX512-BF16): the bare training step
  of the default model (GradAttn-RoPE) 1.2x faster at 32 px, 1.3x at 64 px, 1.6x at 224 px.
- **Channels-last on CPU from 224 px**: the same measurement has it 1.10-1.21x faster to train at 224 px and
  0.81-0.97x (slower) at 28-96 px. No measurement on a GPU is committed, so there it stays off unless asked for.
- **One-pixel maps in fp32**: on CPU under bf16 autocast (torch 2.14.1), a 3x3 stride-2 convolution on 1x1 feature
  maps can leave part of its weight gradient unwritten (garbage or NaN). ``guard_one_pixel_convolutions`` makes every
  convolution with a kernel larger than 1 run such maps in fp32, whatever the input size; the maps are 1x1, so the
  cost does not show.

Nothing here probes speed at start-up: each default is a rule read off a committed measurement.
"""
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['native_bf16', 'default_mixed_precision', 'default_channels_last', 'OnePixelFp32Conv2d',
           'guard_one_pixel_convolutions']

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


def default_mixed_precision() -> Tuple[str, str]:
    """(Accelerate's word, why) for a run that states no precision: 'bf16' where native, else 'no'."""
    reason = native_bf16()
    if reason is not None:
        return 'bf16', f'{reason} (pass --mixed-precision no for fp32)'
    where = 'this GPU' if torch.cuda.is_available() else 'this CPU (no AMX or AVX512-BF16)'
    return 'no', f'{where} would only emulate bf16, slower than fp32 (pass --mixed-precision bf16 to use it anyway)'


def default_channels_last(device_type: str, img_size: int) -> Tuple[bool, str]:
    """(on?, why) for a run that does not say ``--channels-last`` / ``--no-channels-last``."""
    if device_type == 'cpu' and img_size >= CHANNELS_LAST_CPU_MIN_SIZE:
        return True, (f'on CPU at {img_size} px it trains faster '
                      f'(benchmarks/results/speed.md; --no-channels-last to turn off)')
    if device_type == 'cpu':
        return False, (f'on CPU below {CHANNELS_LAST_CPU_MIN_SIZE} px it trains slower '
                       f'(benchmarks/results/speed.md; --channels-last to turn on)')
    return False, 'no measurement on this device is committed (--channels-last to turn on)'


class OnePixelFp32Conv2d(nn.Conv2d):
    """``nn.Conv2d`` that computes 1x1 maps in fp32 under CPU autocast (same parameters, same state dict)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] == (1, 1) and x.device.type == 'cpu' and torch.is_autocast_enabled('cpu'):
            with torch.autocast('cpu', enabled=False):
                return F.conv2d(x.float(), self.weight.float(), None if self.bias is None else self.bias.float(),
                                self.stride, self.padding, self.dilation, self.groups)
        return super().forward(x)


def guard_one_pixel_convolutions(model: nn.Module) -> List[str]:
    """Make every plain ``nn.Conv2d`` with a kernel larger than 1 compute 1x1 maps in fp32 under CPU autocast
    (the module's class changes in place; its parameters, names and state dict do not). Returns their names."""
    guarded = []
    for name, module in model.named_modules():
        if type(module) is nn.Conv2d and max(module.kernel_size) > 1 and module.padding_mode == 'zeros':
            module.__class__ = OnePixelFp32Conv2d
            guarded.append(name)
    return guarded
