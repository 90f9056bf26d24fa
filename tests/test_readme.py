"""README.md and docs/ state facts the code can check: keep them in step."""
import re
from pathlib import Path

import timm

import timm_gradattn
from timm_gradattn.publish import weights_table

DOCS = Path(__file__).resolve().parents[1] / 'docs'


def test_weights_table_is_generated_from_the_registry(monkeypatch):
    monkeypatch.delenv('TIMM_GRADATTN_HUB_NAMESPACE', raising=False)
    text = (DOCS / 'publishing.md').read_text()
    block = re.search(r'<!-- weights-table:[^\n]*-->\n(.*?)<!-- end weights-table -->', text, re.S)
    assert block, 'docs/publishing.md lost its weights-table markers'
    assert block.group(1).strip() == weights_table().strip(), (
        'docs/publishing.md weights table is stale: paste the output of '
        '`python -m timm_gradattn.publish --weights-table`')


def test_model_table_parameter_counts_match_the_models():
    text = (DOCS / 'models.md').read_text()
    for name in timm_gradattn.MODEL_NAMES:
        row = re.search(rf'^\| `{name}` \| ([\d,]+) \| ([\d,]+) \|', text, re.M)
        assert row, f'{name} missing from the docs/models.md model table'
        for in_chans, stated in zip((3, 1), row.groups()):
            model = timm.create_model(name, num_classes=10, in_chans=in_chans)
            assert sum(p.numel() for p in model.parameters()) == int(stated.replace(',', ''))
