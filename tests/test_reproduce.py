"""benchmarks/reproduce.py: the paper-table grids of the three families, their skipping and resuming, and the
tables they write.

The end-to-end runs train resnet18 and a GradAttn model (and, for CNNtention, resnet20) for one epoch on 64
digits images at 16 px, enough to exercise every path (training, test, gradient health, tables) in seconds; the
aggregation and formatting are also checked on synthetic cells and hand-written run folders, without training.
The ResNet-50-sized Attention Shortcuts models are never trained here.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest

from timm_gradattn.analysis import gradient_health_report
from timm_gradattn.families import FAMILIES as REGISTRY

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'benchmarks'))
import paper_results  # noqa: E402
import reproduce  # noqa: E402

SCRIPT = str(REPO / 'benchmarks' / 'reproduce.py')
ENV = dict(os.environ, TOKENIZERS_PARALLELISM='false')
GRID = ['--models', 'resnet18', 'gradattn_resnet18_nope', '--epochs', '1']
TINY_CELLS = ['--ghs-batches', '2', '--', '--train-subset', '64', '--img-size', '16']
TABLES = ('table3_top1', 'table4_top3_top5_f1_ece', 'table5_precision_recall_f1', 'table6_train_val_gap',
          'table7_gradient_health', 'table8_seconds_per_epoch', 'table9_attention_baselines')


def run_reproduce(args: List[str], expect_rc: int = 0) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, SCRIPT, *args], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == expect_rc, f'{args} -> {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}'
    return done


@pytest.fixture(scope='module')
def quick_grid(tmp_path_factory):
    """A --quick grid of 2 models on digits plus cifar10, whose files are missing, run once."""
    root = tmp_path_factory.mktemp('reproduce')
    (root / 'no_data').mkdir()
    args = ['--quick', *GRID, '--datasets', 'digits', 'cifar10', '--data-dir', str(root / 'no_data'),
            '--output', str(root / 'tables'), '--runs-dir', str(root / 'runs'), *TINY_CELLS]
    return dict(root=root, args=args, first=run_reproduce(args))


@pytest.mark.slow
def test_quick_grid_writes_every_table_with_the_papers_column(quick_grid):
    tables = quick_grid['root'] / 'tables'
    for name in TABLES:
        markdown = (tables / f'{name}.md').read_text()
        assert 'paper' in markdown.lower() and 'Machine:' in markdown and 'Command:' in markdown, name
        records = json.loads((tables / f'{name}.json').read_text())['records']
        assert records and all('paper' in r and 'ours' in r for r in records), name
    table3 = (tables / 'table3_top1.md').read_text()
    # digits has no paper figure; the skipped cifar10 row still shows the paper's.
    assert '(paper n/a)' in table3 and '— (paper 92.10)' in table3 and '— (paper 88.68)' in table3
    for name in ('tables.md', 'cells.json', 'run.json'):
        assert (tables / name).is_file()
    run = json.loads((tables / 'run.json').read_text())
    assert run['machine']['cpu_count'] == os.cpu_count() and run['machine']['torch']
    assert 'reproduce.py --quick' in run['command'] and run['wall_time_s'] > 0


@pytest.mark.slow
def test_tables_hold_what_the_runs_measured(quick_grid):
    root = quick_grid['root']
    top1 = {r['model']: r for r in json.loads((root / 'tables' / 'table3_top1.json').read_text())['records']
            if r['dataset'] == 'digits'}
    for model in ('resnet18', 'gradattn_resnet18_nope'):
        results = json.loads((root / 'runs' / 'digits' / model / 'seed42' / 'results.json').read_text())
        assert results['epochs_run'] == 1 and results['split_sizes']['train'] == 64
        assert top1[model]['ours']['values'] == [results['top1']] and top1[model]['paper'] is None
    health = json.loads((root / 'tables' / 'table7_gradient_health.json').read_text())['records']
    digits = [r for r in health if r['dataset'] == 'digits']
    assert {(r['model'], r['mode']) for r in digits} == {
        (m, mode) for m in ('resnet18', 'gradattn_resnet18_nope') for mode in ('outputs', 'parameters')}
    for record in digits:
        assert 0.0 <= record['ours']['mean'] <= 1.0 and record['analysed']['mean'] > 0


@pytest.mark.slow
def test_missing_dataset_is_skipped_with_one_clear_line(quick_grid):
    out = quick_grid['first'].stdout
    skip_lines = [line for line in out.splitlines() if line.startswith('SKIPPED dataset cifar10')]
    assert len(skip_lines) == 1, out[-3000:]
    assert 'files are missing' in skip_lines[0] and str(quick_grid['root'] / 'no_data') in skip_lines[0]
    assert not (quick_grid['root'] / 'runs' / 'cifar10').exists()
    assert 'cifar10' in json.loads((quick_grid['root'] / 'tables' / 'run.json').read_text())['skipped_datasets']


@pytest.mark.slow
def test_second_invocation_reuses_finished_cells(quick_grid):
    runs = quick_grid['root'] / 'runs' / 'digits'
    files = [runs / m / 'seed42' / f for m in ('resnet18', 'gradattn_resnet18_nope')
             for f in ('results.json', 'model_best.safetensors', reproduce.GHS_FILE)]
    before = {f: f.stat().st_mtime_ns for f in files}
    again = run_reproduce(quick_grid['args'])
    assert again.stdout.count('finished earlier, reusing') == 2, again.stdout[-3000:]
    assert 'epoch 1/1' not in again.stdout
    assert {f: f.stat().st_mtime_ns for f in files} == before


@pytest.mark.slow
def test_partial_cell_is_resumed_by_a_launched_train_py(quick_grid, tmp_path):
    # A finished one-epoch run without results.json is what an interrupted run leaves; ask for 2 epochs.
    cell = tmp_path / 'runs' / 'digits' / 'resnet18' / 'seed42'
    shutil.copytree(quick_grid['root'] / 'runs' / 'digits' / 'resnet18' / 'seed42', cell)
    for name in ('results.json', reproduce.GHS_FILE, reproduce.TIMING_FILE):
        (cell / name).unlink()
    done = run_reproduce(['--models', 'resnet18', '--datasets', 'digits', 'cifar10', '--epochs', '2',
                          '--data-dir', str(quick_grid['root'] / 'no_data'), '--launcher', sys.executable,
                          '--output', str(tmp_path / 'tables'), '--runs-dir', str(tmp_path / 'runs'), *TINY_CELLS])
    assert f'resuming the partial run in {cell}' in done.stdout, done.stdout[-3000:]
    assert 'epoch 2/2' in done.stdout and 'epoch 1/2' not in done.stdout
    assert json.loads((cell / 'results.json').read_text())['epochs_run'] == 2
    assert (cell / reproduce.GHS_FILE).is_file()
    # With a launcher the missing files are found before any launch.
    assert done.stdout.count('SKIPPED dataset cifar10') == 1 and not (tmp_path / 'runs' / 'cifar10').exists()
    assert f'{sys.executable} train.py' in (tmp_path / 'tables' / 'tables.md').read_text()


# --- without training -----------------------------------------------------------------------------------
def _fake_cell(top1: float, seed: int) -> dict:
    metrics = dict(top1=top1, top3=top1 + 5, top5=top1 + 8, precision_macro=0.5, recall_macro=0.5, f1_macro=0.4,
                   precision_weighted=0.5, recall_weighted=0.5, f1_weighted=0.4, ece=0.1, nll=1.0,
                   train_val_gap=3.0, seconds_per_epoch=10.0, seed=seed,
                   machine=dict(cpu='test cpu', cpu_count=2, gpu=None, num_processes=1, torch='x'))
    norms = {'conv1': 1e-3, 'layer1': 1e-9, 'fc': 50.0}
    modes = {mode: dict(health=gradient_health_report(norms), norms=norms) for mode in ('outputs', 'parameters')}
    epochs = [dict(epoch=1.0, epoch_time_s=12.0), dict(epoch=2.0, epoch_time_s=8.0)]
    return dict(results=metrics, epochs=epochs, gradient_health=dict(modes=modes, batches=20), wall_time_s=None)


def _options(**overrides):
    options, = reproduce.parse_options(['--datasets', 'tiny_imagenet', 'digits', '--seeds', '42', '43', '44',
                                        '--output', '/nonexistent']).grids
    for key, value in overrides.items():
        setattr(options, key, value)
    return options


def test_tables_aggregate_seeds_and_place_the_papers_figure():
    options = _options()
    found = {('tiny_imagenet', 'gradattn_resnet18_rope'): {42: _fake_cell(36.0, 42), 43: _fake_cell(38.0, 43)},
             ('digits', 'resnet18'): {42: _fake_cell(90.0, 42), 43: _fake_cell(92.0, 43), 44: _fake_cell(94.0, 44)}}
    context = reproduce.table_context(options, found, {}, {}, dict(cpu_count=2, load_average_1_5_15_min=[3, 3, 3]))
    tables = {t['number']: t for t in reproduce.build_tables(found, options)}
    table3 = reproduce.render_markdown(tables[3], context)
    assert '37.00 ± 1.41 [2 of 3 seeds] (paper 37.67)' in table3
    assert '92.00 ± 2.00 (paper n/a)' in table3
    assert '— (paper 33.02)' in table3  # resnet18 on tiny_imagenet: not run, the paper's figure still shown
    table4 = reproduce.render_markdown(tables[4], context)
    assert '(paper 56.45)' in table4 and '(paper 0.197)' in table4
    table7 = reproduce.render_markdown(tables[7], context)
    # conv1 healthy, layer1 vanishing, fc exploding in the paper's first band.
    assert '| 0.33 ± 0.00 [2 of 3 seeds] (1 vanishing, 1 exploding of 3) |' in table7
    assert '| 0.73 (8 vanishing) |' in table7 and '| tiny_imagenet | ResNet-18 | outputs | — |' in table7
    table8 = reproduce.render_markdown(tables[8], context)
    assert '10.00 ± 0.00 [2 of 3 seeds], fastest 8.00 (paper 58.59)' in table8
    assert 'Load average over the 15 minutes before the tables were written: 3.0 on 2 cores. Other jobs' in table8
    table9 = reproduce.render_markdown(tables[9], context)
    assert '(paper 32.01)' in table9 and '(paper 31.76)' in table9


def test_cell_states(tmp_path):
    assert reproduce.cell_state(tmp_path / 'absent') == 'new'
    (tmp_path / 'empty').mkdir()
    assert reproduce.cell_state(tmp_path / 'empty') == 'new'
    (tmp_path / 'other').mkdir()
    (tmp_path / 'other' / 'notes.txt').write_text('x')
    assert reproduce.cell_state(tmp_path / 'other') == 'foreign'
    (tmp_path / 'other' / 'config.yaml').write_text('model: resnet18\n')
    assert reproduce.cell_state(tmp_path / 'other') == 'partial'
    (tmp_path / 'other' / 'results.json').write_text('{}')
    assert reproduce.cell_state(tmp_path / 'other') == 'done'


def test_options_reject_what_the_grid_sets_itself(monkeypatch):
    with pytest.raises(SystemExit):
        reproduce.parse_options(['--datasets', 'digits', '--', '--model', 'resnet18'])
    with pytest.raises(SystemExit):
        reproduce.parse_options(['--models', 'not_a_model'])
    with pytest.raises(SystemExit):
        reproduce.parse_options(['--datasets', 'mnist_typo'])
    with monkeypatch.context() as patch, pytest.raises(SystemExit):  # each cell needs a launch of its own
        patch.setenv('WORLD_SIZE', '2')
        reproduce.parse_options(['--quick'])
    quick, = reproduce.parse_options(['--quick']).grids
    assert quick.family.key == 'gradattn' and quick.recipe == 'paper'
    assert quick.datasets == ['digits'] and quick.models == list(reproduce.MODELS)
    assert quick.epochs == reproduce.QUICK_EPOCHS and quick.output.name == 'reproduce_quick'
    assert 'output' in quick.runs_dir.parts  # weights stay out of the committed results


def test_paper_figures_are_looked_up_by_table():
    assert paper_results.paper_figure(3, 'top1', 'tiny_imagenet', 'gradattn_resnet18_rope') == 37.67
    assert paper_results.paper_figure(9, 'top1', 'fashion_mnist', 'resnet18_cbam') == 66.98
    assert paper_results.paper_figure(6, 'train_val_gap', 'pcam', 'gradattn_resnet18_rope') == 8.33
    assert paper_results.paper_figure(3, 'top1', 'digits', 'resnet18') is None
    assert paper_results.paper_figure(5, 'f1_macro', 'cifar10', 'resnet18') is None
    with pytest.raises(KeyError):
        paper_results.paper_figure(2, 'top1', 'cifar10', 'resnet18')
    assert set(paper_results.PAPER_NOTES) == set(paper_results.PAPER_TABLES)


# --- the CNNtention and Attention Shortcuts families -----------------------------------------------------
def _write_run(run_dir: Path, best_top1: float, last_top1: float, seed: int, best_epoch: int = 3,
               epochs: int = 4) -> None:
    """A finished run folder as train.py leaves it, written by hand: results.json and summary.csv."""
    run_dir.mkdir(parents=True)
    results = dict(top1=best_top1, best_epoch=best_epoch, epochs_run=epochs, num_updates=10 * epochs, seed=seed,
                   test_last_epoch=dict(top1=last_top1, epoch=epochs),
                   machine=dict(cpu='test cpu', cpu_count=2, gpu=None, num_processes=1, torch='x'))
    (run_dir / 'results.json').write_text(json.dumps(results))
    (run_dir / 'summary.csv').write_text('epoch,epoch_time_s\n' + ''.join(f'{e},1.5\n' for e in range(1, epochs + 1)))


def test_cnntention_table_puts_the_authors_figure_beside_our_last_epoch(tmp_path):
    grid, = reproduce.parse_options(['--family', 'cnntention', '--seeds', '42', '43', '--output', str(tmp_path / 't'),
                                     '--runs-dir', str(tmp_path / 'runs')]).grids
    assert grid.datasets == ['cifar10', 'mnist'] and grid.runs_dir == tmp_path / 'runs' / 'cnntention'
    for seed, best, last in ((42, 91.0, 90.0), (43, 92.0, 91.0)):
        _write_run(reproduce.cell_dir(grid.runs_dir, 'cifar10', 'resnet20_selfatt', seed), best, last, seed)
    _write_run(reproduce.cell_dir(grid.runs_dir, 'mnist', 'resnet20', 42), 99.0, 98.9, 42, best_epoch=4)
    reproduce.write_outputs(grid, {}, {})
    markdown = (tmp_path / 't' / 'cnntention' / 'cnntention_top1.md').read_text()
    lines = {line.split(' | ')[0].lstrip('| '): line for line in markdown.splitlines() if line.startswith('| ResNet')}
    # Last epoch beside the authors' 91.44; best validation (mean epoch 3) beside it; MNIST baseline one seed of 2.
    assert '| 90.50 ± 0.71 (authors 91.44) | 91.50 ± 0.71 (epoch 3) |' in lines['ResNet-20 + SelfAtt']
    assert '| 98.90 [1 of 2 seeds] (authors 98.52) | 99.00 [1 of 2 seeds] (epoch 4) |' in lines['ResNet-20']
    assert '— (authors 91.32) | — |' in lines['ResNet-20 + CBAM']
    assert 'cifar10: last epoch (authors)' in markdown and '98.86-99.04%' in markdown  # the MNIST disagreement
    record = next(r for r in json.loads((tmp_path / 't' / 'cnntention' / 'cnntention_top1.json').read_text())['records']
                  if r['dataset'] == 'cifar10' and r['model'] == 'resnet20_selfatt')
    assert record['ours']['values'] == [90.0, 91.0] and record['ours_best_val']['values'] == [91.0, 92.0]
    assert record['paper'] == 91.44 and record['paper_sd'] is None
    run = json.loads((tmp_path / 't' / 'cnntention' / 'run.json').read_text())
    assert run['family'] == 'cnntention' and run['recipe'] == 'cnntention' and run['finished_cells'] == 3


def test_attention_shortcuts_table2_is_test_error_mean_and_sd_over_seeds():
    grid, = reproduce.parse_options(['--family', 'attention-shortcuts', '--seeds', '1', '2', '3']).grids
    def cell(best_top1: float, last_top1: float) -> dict:
        return dict(results=dict(top1=best_top1, best_epoch=150, epochs_run=182, num_updates=64000,
                                 test_last_epoch=dict(top1=last_top1, epoch=182)))

    found = {('cifar10', 'asnet50_out'): {1: cell(95.0, 94.0), 2: cell(95.0, 95.0), 3: cell(95.0, 96.0)}}
    table, = reproduce.build_tables(found, grid)
    context = dict(seeds=[1, 2, 3], skipped={}, failed={}, epochs_override=None, paper_length=grid.family.length)
    markdown = reproduce.render_markdown(table, context)
    assert markdown.startswith('### Table 2: Test classification error (%), mean ± SD')
    assert 'cifar10: last update (paper)' in markdown and 'cifar100: best validation (epoch)' in markdown
    # Errors 6, 5, 4: sample SD 1; the best-validation weights all scored 95.0.
    assert '| AS_out-Net-50 | 5.00 ± 1.00 (paper 5.63 ± 0.13) | 5.00 ± 0.00 (epoch 150) |' in markdown
    assert '| plain-ResNet-50 | — (paper 8.41 ± 0.20) | — | — (paper 40.02 ± 2.15) | — |' in markdown
    assert [r['model'] for r in table['records'][:6]] == list(REGISTRY['attention-shortcuts'].models)


def test_paper_figures_of_the_other_families():
    import paper_results_families as families
    assert families.cnntention_figure('cifar10', 'resnet20_mha') == 91.06
    assert families.cnntention_figure('mnist', 'resnet20_cbam') == 98.00
    assert families.cnntention_figure('digits', 'resnet20') is None
    assert families.attention_shortcuts_figure('cifar100', 'as_resnet50_stages') == (22.47, 0.34)
    assert families.attention_shortcuts_figure('cifar10', 'resnet50_cifar_050') == (5.74, 0.14)
    for dataset in ('cifar10', 'mnist'):
        assert set(families.CNNTENTION_TOP1[dataset]) == set(REGISTRY['cnntention'].models)
    for dataset in ('cifar10', 'cifar100'):
        assert set(families.ATTENTION_SHORTCUTS_ERROR[dataset]) == set(REGISTRY['attention-shortcuts'].models)


def test_family_selection_and_where_each_writes():
    default, = reproduce.parse_options([]).grids
    assert default.family.key == 'gradattn' and default.output == reproduce.RESULTS_DIR / 'reproduce'
    grids = reproduce.parse_options(['--family', 'all', '--quick']).grids
    assert [(g.family.key, g.recipe, g.epochs, g.datasets) for g in grids] == [
        ('gradattn', 'paper', 5, ['digits']), ('cnntention', 'cnntention', 5, ['digits']),
        ('attention-shortcuts', 'attention-shortcuts', 3, ['digits'])]
    quick = reproduce.RESULTS_DIR / 'reproduce_quick'
    assert [g.output for g in grids] == [quick, quick / 'cnntention', quick / 'attention-shortcuts']
    assert grids[2].runs_dir.parts[-3:] == ('output', 'reproduce_quick', 'attention-shortcuts')
    sgd, = reproduce.parse_options(['--family', 'cnntention', '--recipe', 'cnntention-sgd', '--epochs', '2']).grids
    assert sgd.recipe == 'cnntention-sgd' and sgd.output.name == 'cnntention-sgd' and sgd.epochs == 2
    assert sgd.models == list(REGISTRY['cnntention'].models) and sgd.datasets == ['cifar10', 'mnist']
    # --models picks the families: each model goes to the family that lists it.
    picked = reproduce.parse_options(['--family', 'all', '--models', 'resnet20', 'asnet50_out', 'resnet18']).grids
    assert [(g.family.key, g.models) for g in picked] == [
        ('gradattn', ['resnet18']), ('cnntention', ['resnet20']), ('attention-shortcuts', ['asnet50_out'])]
    mixed = reproduce.parse_options(['--family', 'all', '--recipe', 'cnntention-sgd']).grids
    assert [g.recipe for g in mixed] == ['paper', 'cnntention-sgd', 'attention-shortcuts']
    # The underscore spelling is an alias of the registry key.
    alias, = reproduce.parse_options(['--family', 'attention_shortcuts', '--quick']).grids
    assert alias.family.key == 'attention-shortcuts' and alias.output == quick / 'attention-shortcuts'


def test_grids_are_the_registrys_families():
    assert list(reproduce.FAMILIES) == list(REGISTRY)
    for key, grid in reproduce.FAMILIES.items():
        family = REGISTRY[key]
        assert grid.family is family and grid.title == family.title and grid.length == family.length
        assert grid.datasets == family.datasets and grid.recipes == tuple(family.recipes)
        assert grid.citation == family.paper.citation
    # GradAttn's grid trains timm's resnet18, the family's baseline, beside the family's five models.
    gradattn = REGISTRY['gradattn']
    assert reproduce.FAMILIES['gradattn'].models == reproduce.MODELS == (gradattn.baseline, *gradattn.models)
    assert reproduce.MAIN_MODELS == ('resnet18', 'gradattn_resnet18_nope', 'gradattn_resnet18_lpe',
                                     'gradattn_resnet18_rope')
    assert reproduce.BASELINE_MODELS == ('resnet18', 'resnet18_se', 'resnet18_cbam')
    for key in ('cnntention', 'attention-shortcuts'):  # their baselines are models of their own
        assert reproduce.FAMILIES[key].models == REGISTRY[key].models
    import paper_results_families as families
    assert paper_results.PAPER_CITATION == gradattn.paper.citation
    assert families.CNNTENTION_CITATION.startswith(REGISTRY['cnntention'].paper.citation + ';')
    assert families.ATTENTION_SHORTCUTS_CITATION == REGISTRY['attention-shortcuts'].paper.citation + ', Table 2'


@pytest.mark.parametrize('argv, hint', [
    (['--recipe', 'cnntention-sgd'], 'add --family cnntention'),
    (['--family', 'cnntention', '--recipe', 'attention-shortcuts'], 'add --family attention-shortcuts'),
    (['--family', 'cnntention', '--models', 'resnet18'], 'add --family gradattn'),
    (['--family', 'attention-shortcuts', '--models', 'resnet20'], 'add --family cnntention'),
    (['--family', 'gradattn_typo'], "invalid choice: 'gradattn_typo'"),
    (['--family', 'attention_shortcuts', '--models', 'resnet20'], 'add --family cnntention'),
    (['--family', 'cnntention', '--', '--recipe', 'cnntention-sgd'], 'use --models, --datasets'),
])
def test_family_argument_errors_are_one_line(argv, hint, capsys):
    with pytest.raises(SystemExit):
        reproduce.parse_options(argv)
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert ': error: ' in message and hint in message, message


@pytest.mark.slow
def test_cnntention_quick_cell_trains_and_reports_its_last_epoch(tmp_path):
    """One real resnet20 cell on 64 digits images at 16 px, through --family cnntention --quick."""
    run_reproduce(['--family', 'cnntention', '--quick', '--models', 'resnet20', '--epochs', '1',
                   '--output', str(tmp_path / 'tables'), '--runs-dir', str(tmp_path / 'runs'),
                   '--', '--train-subset', '64', '--img-size', '16'])
    run_dir = tmp_path / 'runs' / 'cnntention' / 'digits' / 'resnet20' / 'seed42'
    results = json.loads((run_dir / 'results.json').read_text())
    assert results['recipe'] == 'cnntention' and results['epochs_run'] == 1
    assert not (run_dir / reproduce.GHS_FILE).exists()  # only the GradAttn tables use gradient health
    record, = json.loads((tmp_path / 'tables' / 'cnntention' / 'cnntention_top1.json').read_text())['records']
    assert record['ours']['values'] == [results['test_last_epoch']['top1']] and record['paper'] is None
    markdown = (tmp_path / 'tables' / 'cnntention' / 'tables.md').read_text()
    assert markdown.startswith('# CNNtention reproduction: tables') and 'recipe cnntention' in markdown
    assert "NOT the paper's protocol of 182 epochs" in markdown
