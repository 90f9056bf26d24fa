"""README.md and docs/ state facts the code can check: keep them in step.

The README is the front door (what the zoo is, the model table, the two commands, a usage example, where the
published weights stand, links); the details live in docs/*.md, and each check reads the file that holds its text.
"""
import functools
import re
from pathlib import Path

import timm

import timm_gradattn
from timm_gradattn.families import family_of
from timm_gradattn.hub import export_hub_folder
from timm_gradattn.publish import weights_table

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / 'README.md'
DOCS = ROOT / 'docs'
README_MAX_LINES = 220  # a front door, not the house: the rest belongs in docs/


@functools.lru_cache(maxsize=None)
def parameter_count(name: str, in_chans: int) -> int:
    model = timm.create_model(name, num_classes=10, in_chans=in_chans)
    return sum(p.numel() for p in model.parameters())


def test_weights_table_is_generated_from_the_registry(monkeypatch):
    monkeypatch.delenv('TIMM_GRADATTN_HUB_NAMESPACE', raising=False)
    text = (DOCS / 'publishing.md').read_text()
    block = re.search(r'<!-- weights-table:[^\n]*-->\n(.*?)<!-- end weights-table -->', text, re.S)
    assert block, 'docs/publishing.md lost its weights-table markers'
    assert block.group(1).strip() == weights_table().strip(), (
        'docs/publishing.md weights table is stale: paste the output of '
        '`python -m timm_gradattn.publish --weights-table`')


def test_readme_states_how_many_weights_are_published(monkeypatch):
    """The first screen's 'Published: N of M.' is the generated table's own sentence."""
    monkeypatch.delenv('TIMM_GRADATTN_HUB_NAMESPACE', raising=False)
    count = re.search(r'^Published: \d+ of \d+\.[^\n]*$', weights_table(), re.M)
    assert count, 'the weights table no longer says how many weights are published'
    head = '\n'.join(README.read_text().splitlines()[:60])
    assert count.group(0) in head, (
        f'README.md must say "{count.group(0)}" on its first screen (first 60 lines), as the weights table does')


def test_model_table_parameter_counts_match_the_models():
    text = (DOCS / 'models.md').read_text()
    for name in timm_gradattn.MODEL_NAMES:
        row = re.search(rf'^\| `{name}` \| ([\d,]+) \| ([\d,]+) \|', text, re.M)
        assert row, f'{name} missing from the docs/models.md model table'
        for in_chans, stated in zip((3, 1), row.groups()):
            assert parameter_count(name, in_chans) == int(stated.replace(',', ''))


def test_readme_model_table_lists_every_model_with_its_family_and_size():
    text = README.read_text()
    for name in timm_gradattn.MODEL_NAMES:
        row = re.search(rf'^\| `{name}` \| ([^|]+) \| ([\d.]+) M \|', text, re.M)
        assert row, f'{name} missing from the README model table'
        family, millions = row.group(1).strip(), row.group(2)
        assert family == family_of(name).title, f'{name}: README says family {family!r}'
        assert millions == f'{parameter_count(name, 3) / 1e6:.2f}', f'{name}: README says {millions} M parameters'


def test_readme_usage_example_runs(tmp_path):
    """The README's example works today: no published weights needed, only a run's export."""
    code = re.search(r'^## Usage\n\n```python\n(.*?)^```', README.read_text(), re.S | re.M)
    assert code, 'README.md lost its ## Usage python block'
    code = code.group(1)
    placeholder = 'local-dir:output/train/<experiment>/hub'
    assert placeholder in code
    export = export_hub_folder(timm.create_model('gradattn_resnet18_rope', num_classes=10), tmp_path / 'hub')
    namespace = {}
    exec(compile(code.replace(placeholder, f'local-dir:{export}'), 'README.md', 'exec'), namespace)
    assert tuple(namespace['logits'].shape) == (2, 10)
    assert [tuple(f.shape[1:]) for f in namespace['features']] == [(64, 16, 16), (128, 8, 8), (256, 4, 4), (512, 2, 2)]
    assert namespace['model'].num_classes == 10


def test_readme_is_a_front_door():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f'README.md has {len(lines)} lines (at most {README_MAX_LINES}): move the details into docs/')


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r'<[^>]+>', '', heading.strip().lower())
    return re.sub(r'[^\w\- ]', '', text).replace(' ', '-')


def _anchors(path: Path) -> set:
    text = re.sub(r'^```.*?^```', '', path.read_text(), flags=re.S | re.M)
    return {_slug(m.group(1)) for m in re.finditer(r'^#+ (.+)$', text, re.M)}


def test_relative_links_point_at_files_that_exist():
    pages = [README, *sorted(DOCS.glob('*.md'))]
    assert len(pages) > 1, 'docs/ has no pages'
    broken = []
    for page in pages:
        text = re.sub(r'^```.*?^```', '', page.read_text(), flags=re.S | re.M)  # links, not code
        for target in re.findall(r'\]\(([^)\s]+)\)', text):
            if re.match(r'[a-z][a-z0-9+.-]*:', target):  # https:, mailto:, ...
                continue
            path, _, anchor = target.partition('#')
            resolved = (page.parent / path).resolve() if path else page
            if not resolved.exists():
                broken.append(f'{page.relative_to(ROOT)}: {target} (no such file)')
            elif anchor and resolved.suffix == '.md' and anchor not in _anchors(resolved):
                broken.append(f'{page.relative_to(ROOT)}: {target} (no such heading)')
    assert not broken, 'broken relative links:\n' + '\n'.join(broken)
