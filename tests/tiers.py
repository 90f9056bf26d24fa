"""The suite's tiers, as timm runs its own tests, stated once.

The default tier (``python -m pytest -q``: pyproject's ``addopts`` leave out both markers below) checks the structure
of every model and sends one model of each family (``REPRESENTATIVES``) through the exporters and clients. The
markers hold the rest, which ``.ci/run`` runs as well (``python -m pytest -q -m "zoo or slow"``):

- ``zoo``: the same per-model tests for the other models (``one_per_family``); with the default tier, every model
  through every such test once.
- ``slow``: end-to-end runs of several seconds or more (training, compiling, command lines, benchmarks), marked in
  their files or listed in ``conftest.py``.
"""
import contextlib
from typing import Callable, Iterable, Iterator, List

import pytest

from timm_gradattn.families import FAMILIES, MODEL_NAMES, family_of

# One model per family for the default tier: the one with the family's least ordinary operators (GradAttn's rotary
# embedding and fused qkv, CNNtention's multi-head attention, Attention Shortcuts' depth attention with a projection
# set per stage and convolutions adapting its cache between stages).
REPRESENTATIVES = {
    'gradattn': 'gradattn_resnet18_rope',
    'cnntention': 'resnet20_mha',
    'attention-shortcuts': 'asnet50_kv',
}
assert REPRESENTATIVES.keys() == FAMILIES.keys() and all(
    name in FAMILIES[key].models for key, name in REPRESENTATIVES.items()), 'one representative of each family'


def is_representative(name: str) -> bool:
    """Whether ``name`` is its family's representative (the default tier's model for the per-model sweep)."""
    family = family_of(name)
    return family is not None and REPRESENTATIVES[family.key] == name


def one_per_family(names: Iterable[str] = MODEL_NAMES) -> List:
    """``names`` as parameters: each family's representative in the default tier, the others marked ``zoo``."""
    return [pytest.param(name, marks=() if is_representative(name) else pytest.mark.zoo) for name in names]


def for_each_tag(name: str, check: Callable[[str, str], None]) -> None:
    """``check(name, tag)`` for every pretrained tag of ``name``; a failure names the tag."""
    from timm_gradattn.models import model_tags
    for tag in model_tags(name):
        with case(tag):
            check(name, tag)


@contextlib.contextmanager
def case(label: str) -> Iterator[None]:
    """Inside a test's loop over tags, sizes or wrappers: a failure names the case it was on (Python >= 3.11)."""
    try:
        yield
    except Exception as error:
        if hasattr(error, 'add_note'):
            error.add_note(f'while checking {label}')
        raise
