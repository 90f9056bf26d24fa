"""The wheel holds every package and the model-card templates, so that a normal (non-editable) install can
publish. CI also installs the project with `pip install .` and publishes a run with --dry-run."""
import fnmatch
from pathlib import Path

import pytest
from setuptools import find_packages

tomllib = pytest.importorskip('tomllib')  # Python 3.11+

REPO = Path(__file__).resolve().parents[1]


def _setuptools_config():
    return tomllib.loads((REPO / 'pyproject.toml').read_text())['tool']['setuptools']


def test_every_package_is_listed():
    # pyproject lists the packages (find cannot map hub_cards/ into the package): a new subpackage must be added.
    found = set(find_packages(str(REPO), include=['timm_gradattn*']))
    assert set(_setuptools_config()['packages']) == found | {'timm_gradattn.hub_cards'}


def test_hub_cards_ship_inside_the_package():
    config = _setuptools_config()
    assert config['package-dir']['timm_gradattn.hub_cards'] == 'hub_cards'
    patterns = config['package-data']['timm_gradattn.hub_cards']
    cards = [p.name for p in (REPO / 'hub_cards').iterdir() if p.is_file()]
    assert cards and all(any(fnmatch.fnmatch(name, pattern) for pattern in patterns) for name in cards), cards
