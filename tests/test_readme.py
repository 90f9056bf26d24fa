"""README.md and docs/ state facts the code can check: keep them in step.

The README is the front door (what the zoo is, the model table, the two commands, a usage example, where the
published weights stand, links); the details live in docs/*.md, and each check reads the file that holds its text.
"""
import functools
import os
import re
from pathlib import Path

import pytest
import timm
from PIL import Image

import timm_gradattn
from timm_gradattn.families import family_of
from timm_gradattn.hub import export_hub_folder
from timm_gradattn.publish import weights_table

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / 'README.md'
DOCS = ROOT / 'docs'
README_MAX_LINES = 220  # a front door, not the house: the rest belongs in docs/
SMALL_GRADATTN = dict(channels=(16, 32, 64, 128), embed_dim=64, mlp_dim=128, num_heads=4)


def python_block(path: Path, heading: str) -> str:
    """The first ```python block after the Markdown heading ``heading`` of ``path``."""
    block = re.search(rf'^#+ {re.escape(heading)}\n.*?^```python\n(.*?)^```', path.read_text(), re.S | re.M)
    assert block, f'{path.name} lost the python block under "{heading}"'
    return block.group(1)


def run_block(code: str, where: str, **names: str) -> dict:
    """Execute ``code`` with each of the quoted ``names`` (keys) swapped for its value, as a reader would edit it."""
    for name, value in names.items():
        assert code.count(name) == 1, f'{where}: {name} is not in the example once'
        code = code.replace(name, value)
    namespace = {}
    exec(compile(code, where, 'exec'), namespace)
    return namespace


@pytest.fixture(scope='module')
def exports(tmp_path_factory):
    """``{1: folder, 3: folder}``: a small GradAttn of 10 classes exported as train.py exports ``<run>/hub``, for grey
    32-px and colour 48-px images, each in a run folder of its own under ``output/train``."""
    root = tmp_path_factory.mktemp('readme')
    folders = {}
    for chans, side in ((1, 32), (3, 48)):
        model = timm.create_model('gradattn_resnet18_rope', num_classes=10, in_chans=chans, **SMALL_GRADATTN)
        folders[chans] = export_hub_folder(model, root / 'output' / 'train' / f'run-{chans}ch' / 'hub',
                                           input_size=(chans, side, side), mean=(0.5,) * chans, std=(0.25,) * chans)
    return folders


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


def test_readme_usage_example_runs_as_written(exports, monkeypatch):
    """The README's example works today, copied as it is after `python train.py`: no published weights, no
    placeholder, the newest run's export (here the grey one) fed its own channels and size."""
    newest = exports[3].stat().st_mtime + 10
    os.utime(exports[1], (newest, newest))  # the grey run is the newest
    monkeypatch.chdir(exports[1].parents[3])
    namespace = run_block(python_block(README, 'Usage'), 'README.md')
    assert [tuple(f.shape[1:]) for f in namespace['features']] == [(64, 16, 16), (128, 8, 8), (256, 4, 4), (512, 2, 2)]
    assert namespace['export'] == Path('output/train/run-1ch/hub')
    assert namespace['model'].in_chans == 1 and tuple(namespace['logits'].shape) == (2, 10)


@pytest.mark.parametrize('chans', (1, 3))
def test_client_examples_run_on_grey_and_colour_exports(chans, exports, tmp_path, monkeypatch):
    """docs/clients.md's transformers and ONNX examples, given a run's hub/ folder where they name a Hub repo, read
    the channels and size from the export: the same code serves a grey and a colour model."""
    folder, clients = exports[chans], DOCS / 'clients.md'
    monkeypatch.chdir(tmp_path)
    Image.new('RGB', (40, 56), (200, 120, 40)).save('image.png')  # a colour photo, for either model
    hf = run_block(python_block(clients, 'From Hugging Face transformers'), 'clients.md (transformers)',
                   **{"'timm-gradattn/gradattn_resnet18_rope.cifar10'": repr(str(folder))})
    assert tuple(hf['inputs']['pixel_values'].shape) == (1, *hf['processor'].data_config['input_size'])
    assert tuple(hf['logits'].shape) == (1, 10)
    onnx = run_block(python_block(clients, 'ONNX Runtime and torch.export'), 'clients.md (ONNX)',
                     **{"'gradattn_resnet18_rope.cifar10'": repr(f'local-dir:{folder}')})
    assert tuple(onnx['input_size']) == (chans, 32 if chans == 1 else 48, 32 if chans == 1 else 48)
    assert onnx['logits'].shape == (8, 10) and onnx['program'] is not None


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
