"""Which mixed precision a training run uses, and what set it: ``settings.py`` asks once, at the door.

Highest first, as every other setting (a flag over the ``--config`` YAML over the resumed run):

    ``--mixed-precision`` on the command line, else timm's ``--amp`` / ``--amp-dtype`` there; the same in the
    ``--config`` YAML; the resumed run's ``config.yaml``; ``accelerate launch --mixed_precision`` (or its config)
    where that is bf16 or fp16; else the machine's default (``precision.default_mixed_precision``).

``accelerate launch`` sets ``ACCELERATE_MIXED_PRECISION`` in every run it starts, to 'no' when neither its flag nor
its config names a precision (``accelerate/commands/launch.py``), so a 'no' there cannot be told from its default and
counts as unstated: a launched run gets the machine's default as ``python train.py`` does, and ``--mixed-precision no``
to train.py asks for fp32.
"""
import logging
import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from . import cli
from .errors import UserError
from .precision import default_mixed_precision, emulated_bf16

__all__ = ['resolve_mixed_precision', 'stated_precision']

_logger = logging.getLogger(__name__)


def resolve_mixed_precision(given: Dict[str, Any], from_yaml: Dict[str, Any],
                            saved: Dict[str, Any]) -> Tuple[str, str]:
    """(precision, what set it) from the settings on the command line, in ``--config`` and of the resumed run."""
    sources = ((given, None), (from_yaml, f'--config {given.get("config")}'),
               (saved, f'the resumed run ({Path(given.get("resume") or "") / "config.yaml"})'))
    for settings, source in sources:
        stated = stated_precision(settings, source)
        if stated is not None:
            if source is not None and saved.get('mixed_precision') == stated[0] == 'bf16':
                _warn_resumed_in_emulated_bf16(source)
            return stated[0], source or stated[1]
    return _launched_or_default()


def stated_precision(settings: Dict[str, Any], where: Optional[str] = None) -> Optional[Tuple[str, str]]:
    """(precision, the flags that state it) where ``settings``, one source, state one: ``mixed_precision``, else
    timm's ``amp`` / ``amp_dtype`` (bfloat16 on CPU, float16 on CUDA); None where they state none."""
    chosen, amp, amp_dtype = (settings.get(key) for key in ('mixed_precision', 'amp', 'amp_dtype'))
    if chosen and amp_dtype and cli.AMP_DTYPES[amp_dtype] != chosen:
        raise UserError(f'--mixed-precision {chosen} and --amp --amp-dtype {amp_dtype} disagree'
                        f'{f" in {where}" if where else ""}; pass only one of them.')
    if chosen:
        return chosen, '--mixed-precision'
    if amp or amp_dtype:
        dtype = amp_dtype or ('float16' if torch.cuda.is_available() else 'bfloat16')
        return cli.AMP_DTYPES[dtype], f'--amp --amp-dtype {dtype}'
    return None


def _launched_or_default() -> Tuple[str, str]:
    """accelerate launch's bf16 or fp16, else the machine's default (its 'no' is also its default: see above)."""
    launched = os.environ.get('ACCELERATE_MIXED_PRECISION')
    if launched and launched != 'no':
        return launched, "accelerate launch's --mixed_precision (or its config)"
    precision, why = default_mixed_precision()
    if launched == 'no' and precision != 'no':
        why += ("; accelerate launch's 'no' is also its default, so it counts as unstated (pass --mixed-precision "
                "no to train.py for fp32)")
    return precision, f'default: {why}'


def _warn_resumed_in_emulated_bf16(source: str) -> None:
    where = emulated_bf16()
    if where is not None:
        _logger.warning(f'Mixed precision bf16 from {source}: {where} only emulates bf16, slower than fp32. The '
                        f'resumed run continues in bf16 as it started; pass --mixed-precision no to continue in fp32, '
                        f'faster here but no longer the same arithmetic.')
