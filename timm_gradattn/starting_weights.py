"""The model a run starts from, built for the run's input: the data's channels and size win over the weights'.

A fine-tune trains at its dataset's input (an image folder's own channels and side, or the flags'), never at that of
its starting weights. The weights are adapted as timm's own ``create_model(..., pretrained=True, in_chans=N)`` adapts
them: ``adapt_input_conv`` on the pretrained cfg's ``first_conv`` (``checkpoint.load_weights`` calls the same function
for ``--initial-checkpoint``), and a model whose pretrained cfg says ``fixed_input_size`` (ViTs) is built for the
run's side (``img_size``), timm resampling its position embeddings; the others (every model of the zoo pools
globally) take another side as they are. One line says what was adapted; a model that cannot be built for the run's
side says so in one line.
"""
import json
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch.nn as nn
from accelerate import PartialState

import timm
from timm.models import get_pretrained_cfg, parse_model_name

from .errors import UserError

__all__ = ['weights_cfg', 'size_kwargs', 'first_conv_adapted', 'adaptation_note', 'create_for_input', 'say']


def weights_cfg(model: str) -> Optional[Dict[str, Any]]:
    """The pretrained cfg of the weights ``model`` names, read before they load: a registry name's (its tag's, or its
    default tag's), a ``local-dir:`` export's config.json ({} where it cannot be read: creating the model says why);
    None for ``hf-hub:``, whose config.json comes with the model (reading it first would wait on the Hub twice)."""
    source, name = parse_model_name(model)
    if source == 'hf-hub':
        return None
    if source == 'local-dir':
        try:
            return json.loads((Path(name).expanduser() / 'config.json').read_text()).get('pretrained_cfg') or {}
        except (OSError, ValueError):
            return {}
    cfg = get_pretrained_cfg(name)
    return cfg.to_dict() if cfg is not None else {}


def size_kwargs(cfg: Dict[str, Any], img_size: int) -> Dict[str, Any]:
    """``img_size`` for ``create_model`` where the pretrained cfg fixes the input size (a ViT builds its position
    table for one size); nothing for the others, which take any size and mostly refuse the keyword."""
    return dict(img_size=img_size) if cfg.get('fixed_input_size') else {}


def first_conv_adapted(saved: int, taken: int) -> str:
    return f"first convolution adapted from {saved} to {taken} channels (timm's adapt_input_conv)"


def _shape(size: Sequence[int]) -> str:
    return 'x'.join(str(s) for s in size)


def adaptation_note(what: str, cfg: Dict[str, Any], input_size: Sequence[int]) -> Optional[str]:
    """The line saying how weights trained at ``cfg``'s input were adapted to a run at ``input_size`` (C, H, W); None
    when they were trained at it, or their cfg does not say."""
    weights = tuple(cfg.get('input_size') or ())
    if len(weights) != 3 or weights == tuple(input_size):
        return None
    changes = [first_conv_adapted(weights[0], input_size[0])] if weights[0] != input_size[0] else []
    if weights[1:] != tuple(input_size[1:]):
        side = input_size[-1]
        changes.append(f'built for {side} px, timm resampling its position embeddings (the pretrained cfg fixes the '
                       f'input size)' if cfg.get('fixed_input_size') else
                       f'{side} px needs no change (no fixed input size in the pretrained cfg)')
    return (f'Starting weights {what}: trained at {_shape(weights)}, this run trains at {_shape(input_size)}; '
            f'{"; ".join(changes)}.')


def _create(model: str, pretrained: bool, cfg: Dict[str, Any], input_size: Sequence[int],
            kwargs: Dict[str, Any]) -> nn.Module:
    side = input_size[-1]
    try:  # the run's channels and side over --model-kwargs' own
        return timm.create_model(model, pretrained=pretrained,
                                 **dict(kwargs, in_chans=input_size[0], **size_kwargs(cfg, side)))
    except (RuntimeError, OSError, ValueError, TypeError) as error:  # missing weights, unreachable Hub, bad local
        # export, an argument the model does not take (TypeError), weights that do not fit the size asked for
        message = ' '.join(str(error).split())
        weights = (cfg.get('input_size') or (None,))[-1]
        if pretrained and cfg.get('fixed_input_size') and weights not in (None, side):
            raise UserError(f'{model} has a fixed input size (fixed_input_size in its pretrained cfg) and its weights, '
                            f'trained at {weights} px, cannot be built for this run\'s {side} px ({message[:300]}). '
                            f'Pass --img-size {weights}.') from error
        raise UserError(f'Cannot create {model!r}: {message}') from error


def create_for_input(model: str, pretrained: bool, input_size: Sequence[int], **kwargs: Any) -> nn.Module:
    """``timm.create_model(model, pretrained=pretrained, in_chans=input_size[0], **kwargs)`` built for the run's
    input (C, H, W): see the module's docstring. With ``pretrained``, one line (``say``) tells how the weights were
    adapted. A failure is a ``UserError`` of one line."""
    cfg = weights_cfg(model)
    created = _create(model, pretrained, cfg or {}, input_size, kwargs)
    if cfg is None:  # hf-hub: its cfg came with it; a fixed-size model is built again for the run's side
        cfg = dict(created.pretrained_cfg)
        if size_kwargs(cfg, input_size[-1]) and tuple(cfg.get('input_size', ())[1:]) != tuple(input_size[1:]):
            created = _create(model, pretrained, cfg, input_size, kwargs)
    note = adaptation_note(model, cfg, input_size) if pretrained else None
    if note:
        say(note)
    return created


def say(line: str) -> None:
    """One line for the user, from the main process only (as ``accelerator.print``)."""
    PartialState().print(line)
