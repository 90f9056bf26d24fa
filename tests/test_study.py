"""benchmarks/study.py: one protocol for models of every family, cell by cell: its command line, the cell records and
the results files built from them alone, resuming, and the Grad-CAM grid across the models.

Nothing is trained here: records and run folders are written by hand, and a launch is replaced by one that writes
what train.py would leave.
"""
import csv
import json
import shlex
import sys
from pathlib import Path

import pytest

from timm_gradattn.families import FAMILIES as REGISTRY
from timm_gradattn.families import RECIPES

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'benchmarks'))
import study as study_script  # noqa: E402


def _study_results(model: str, seed: int, top1: float, **overrides) -> dict:
    """A results.json as train.py writes it, with the fields the study reads."""
    results = dict(top1=top1, top5=min(100.0, top1 + 4), model=model, seed=seed, num_classes=10,
                   num_params=11_170_000, best_epoch=14, epochs_run=15, train_img_s=400.0 + seed,
                   peak_rss_mb=900.0 + seed, mixed_precision='no', test_last_epoch=dict(top1=top1 - 0.5, epoch=15),
                   label_names=[str(i) for i in range(10)],
                   machine=dict(cpu='test cpu', cpu_count=2, gpu=None, num_processes=1, torch='x'))
    return dict(results, **overrides)


def _study_config(study, model: str, seed: int, **overrides) -> dict:
    """config.yaml as train.py writes it for the study's cell."""
    import yaml
    from timm_gradattn.settings import resolve_train_settings
    argv = ['--model', model, '--dataset', study.dataset, '--recipe', study.recipe, '--seed', str(seed),
            *(['--epochs', str(study.epochs)] if study.epochs else []), *study.train_flags]
    config = yaml.safe_load(resolve_train_settings(argv).to_yaml())
    return dict(config, img_size=None, in_chans=None, workers=0, **overrides)


def _write_study_record(folder: Path, study, model: str, seed: int, top1: float, gmacs: float = 0.5,
                        wall_time_s: float = 120.0, extra=None, **results) -> Path:
    """A cell record as the study's runner writes it."""
    path = study_script.study_cell_path(folder, model, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = dict(study=study.name, model=model, seed=seed, protocol=study.protocol, img_size=32, in_chans=1,
                  gmacs=gmacs, results=_study_results(model, seed, top1, **results),
                  epochs=[dict(epoch=e, epoch_time_s=4.0) for e in range(1, 16)],
                  config=_study_config(study, model, seed),
                  wall_time_s=wall_time_s, load_average_5_min=0.5, extra_train_args=extra,
                  run_dir=f'output/study/{study.dataset}/{model}/seed{seed}')
    path.write_text(json.dumps(record))
    return path


def _markdown_rows(markdown: str) -> dict:
    """The first table of a study's Markdown: {model: {column: text}}."""
    lines = [line for line in markdown.split('\n## ')[0].splitlines() if line.startswith('|')]
    header = [cell.strip() for cell in lines[0].strip('|').split(' | ')]
    return {cells[0]: dict(zip(header, cells)) for cells in
            ([cell.strip() for cell in line.strip('|').split(' | ')] for line in lines[2:])}


def test_studies_are_the_two_runs_the_issue_asks_for():
    digits, fashion = study_script.STUDIES['zoo-digits'], study_script.STUDIES['gradattn-fashion-mnist']
    assert digits.dataset == 'digits' and digits.seeds == (1, 2, 3) and len(digits.models) == 16
    assert digits.models == ('resnet18', *(m for f in REGISTRY.values() for m in f.models))
    assert digits.recipe == study_script.ZOO_DIGITS_RECIPE == 'default'
    assert digits.epochs is None and digits.length == RECIPES['default']['epochs'] == 12  # the default job's
    assert fashion.dataset == 'fashion_mnist' and fashion.seeds == (42,) and fashion.epochs == 30
    assert fashion.models == ('resnet18', *REGISTRY['gradattn'].models)
    assert fashion.recipe == 'paper' and fashion.length == 30
    # One folder per dataset: two studies on one dataset would write over each other's results files.
    assert len({s.dataset for s in study_script.STUDIES.values()}) == len(study_script.STUDIES)
    options = study_script.parse_options(['gradattn-fashion-mnist', '--models', 'resnet18_cbam', 'resnet18',
                                          '--', '--workers', '2'])
    assert options.models == ['resnet18', 'resnet18_cbam'] and options.seeds == [42]
    assert options.output == study_script.RESULTS_DIR / 'study' / 'fashion_mnist'
    assert options.runs_dir.parts[-2:] == ('output', 'study')  # weights stay out of the committed results
    argv = study_script.train_argv('resnet18', fashion.dataset, 42, Path('runs/r/seed42'), options, resume=False)
    assert argv == ['--model', 'resnet18', '--dataset', 'fashion_mnist', '--recipe', 'paper', '--seed', '42',
                    '--epochs', '30', '--output', 'runs/r', '--experiment', 'seed42', '--workers', '2']
    narrowed = study_script.parse_options(['zoo-digits', '--seeds', '3', '1'])
    assert narrowed.seeds == [3, 1] and narrowed.models == list(digits.models) and narrowed.epochs is None


@pytest.mark.parametrize('argv, hint', [
    (['zoo-digits', '--family', 'cnntention'], 'drop --family'),
    (['zoo-digits', '--recipe', 'paper'], 'drop --recipe'),
    (['zoo-digits', '--datasets', 'mnist'], 'drop --datasets'),
    (['gradattn-fashion-mnist', '--epochs', '5'], 'drop --epochs'),
    (['zoo-digits', '--quick'], 'unrecognized arguments: --quick'),  # a flag of reproduce.py's grids
    (['zoo-digits', '--', '--epochs', '3'], 'drop --epochs after `--`'),
    (['gradattn-fashion-mnist', '--models', 'resnet20'], 'resnet20 is not in study gradattn-fashion-mnist'),
    (['--aggregate-only'], 'the following arguments are required: STUDY'),
    (['zoo_digits'], "invalid choice: 'zoo_digits'"),
    (['zoo-digits', '--cam', '-1'], '--cam takes a number of images, 0 for no Grad-CAM grid; got -1'),
])
def test_study_argument_errors_are_one_line(argv, hint, capsys):
    with pytest.raises(SystemExit):
        study_script.parse_options(argv)
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert ': error: ' in message and hint in message, message


def test_seed_sd_verdict_needs_the_difference_to_exceed_the_larger_sd():
    def summary(mean, std):
        return dict(mean=mean, std=std)
    verdict = study_script.seed_sd_verdict
    assert verdict(summary(95.5, 0.5), summary(92.0, 2.0)) == dict(diff=3.5, sd=2.0, exceeds=True)
    assert verdict(summary(91.0, 2.0), summary(92.0, 0.5)) == dict(diff=-1.0, sd=2.0, exceeds=False)
    assert verdict(summary(90.0, 0.5), summary(92.0, 0.5))['exceeds'] is True  # either sign
    assert verdict(summary(93.0, 1.0), summary(92.0, 1.0))['exceeds'] is False  # equal: within
    assert verdict(summary(93.0, None), summary(92.0, 1.0)) == dict(diff=1.0, sd=None, exceeds=None)


def test_a_cells_own_threads_are_not_read_as_other_jobs():
    """Cell loads are taken while the cell trains, one thread per core: 2.1 on 2 cores is the cell alone."""
    from grid import load_notes
    alone, shared = load_notes(2, [1.9, 2.1]), load_notes(2, [2.0, 3.1])
    assert 'Other jobs' not in alone[0] and '1.9 to 2.1 on 2 cores' in alone[0]
    assert 'Other jobs shared the machine' in shared[0]
    assert 'Other jobs' in load_notes(2, [], [1.5, 1.5, 1.5])[0]  # an idle moment after the cells: half the cores


def test_the_cost_plot_keeps_labels_apart_and_reads_narrow_ranges_linearly():
    from matplotlib.figure import Figure
    ax = Figure(dpi=120).subplots()
    assert not study_script._cost_axis(ax, [0.035, 0.043]) and ax.get_xscale() == 'linear'
    assert study_script._cost_axis(ax, [0.035, 1.3]) and ax.get_xscale() == 'log'
    ax = Figure(dpi=120).subplots()
    points = [(1.0, 99.4), (1.0, 99.4), (2.0, 98.0)]  # resnet18_se and resnet18_cbam sit on top of each other
    ax.plot(*zip(*points), 'o')
    offsets = study_script._label_offsets(ax, points, ['resnet18_se', 'resnet18_cbam', 'resnet20'])
    assert offsets[0] != offsets[1]  # one of the two moved by a line
    assert offsets[2] == (4.0, 3.0)  # a label with room keeps its place


def test_study_outputs_hold_timms_columns_the_means_and_the_verdicts(tmp_path):
    study = study_script.STUDIES['zoo-digits']
    for seed, top1 in zip((1, 2, 3), (90.0, 92.0, 94.0)):  # mean 92, SD 2
        _write_study_record(tmp_path, study, 'resnet18', seed, top1, gmacs=0.0354)
    for seed, top1 in zip((1, 2, 3), (95.0, 95.5, 96.0)):  # +3.5 against resnet18's SD 2: exceeds
        _write_study_record(tmp_path, study, 'gradattn_resnet18_rope', seed, top1, gmacs=0.052, num_params=12_500_000)
    for seed, top1 in zip((1, 2, 3), (80.0, 81.0, 82.0)):
        _write_study_record(tmp_path, study, 'resnet20', seed, top1, gmacs=0.0403, num_params=269_434)
    for seed, top1 in zip((1, 2, 3), (81.0, 82.0, 83.0)):  # +1.0 against resnet20, both SDs 1.0: within
        _write_study_record(tmp_path, study, 'resnet20_cbam', seed, top1, gmacs=0.0404, num_params=270_403,
                            mixed_precision='bf16')
    for seed, top1 in zip((1, 2), (60.0, 62.0)):
        _write_study_record(tmp_path, study, 'resnet50_cifar', seed, top1, gmacs=1.3, num_params=23_500_000)
    _write_study_record(tmp_path, study, 'asnet50_out', 1, 70.0, gmacs=1.1, num_params=12_370_000, wall_time_s=780.0)
    written = study_script.write_study_outputs(study, tmp_path)
    assert [p.name for p in written] == ['results-digits.csv', 'results-digits.md', 'results-digits.png']

    with open(tmp_path / 'results-digits.csv', newline='') as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == ('model', 'img_size', 'top1', 'top1_err', 'top5', 'top5_err',
                                            'param_count', 'top1_std', 'n_seeds', 'gmacs', 'train_img_s',
                                            'peak_rss_mb', 'precision')
        rows = list(reader)
    # One row per model with a cell, best top-1 first (timm's order); models not run are left out.
    assert [r['model'] for r in rows] == ['gradattn_resnet18_rope', 'resnet18', 'resnet20_cbam', 'resnet20',
                                          'asnet50_out', 'resnet50_cifar']
    baseline = rows[1]
    assert baseline == dict(model='resnet18', img_size='32', top1='92.0', top1_err='8.0', top5='96.0', top5_err='4.0',
                            param_count='11.17', top1_std='2.0', n_seeds='3', gmacs='0.0354', train_img_s='402.0',
                            peak_rss_mb='902.0', precision='fp32')
    assert rows[3]['param_count'] == '0.27' and rows[2]['precision'] == 'bf16'
    assert rows[4]['top1_std'] == '' and rows[4]['n_seeds'] == '1'  # one seed: no SD

    markdown = (tmp_path / 'results-digits.md').read_text()
    table = _markdown_rows(markdown)
    assert table['resnet18']['Δ top-1 vs resnet18'] == '—' and table['resnet18']['seeds'] == '3'
    assert table['gradattn_resnet18_rope']['top-1 (%)'] == '95.50 ± 0.50'
    assert table['gradattn_resnet18_rope']['Δ top-1 vs resnet18'] == '+3.50 (exceeds SD 2.00)'
    assert table['gradattn_resnet18_rope']['Δ top-1 vs family baseline'] == '—'  # GradAttn's baseline is resnet18
    assert table['resnet20']['Δ top-1 vs resnet18'] == '-11.00 (exceeds SD 2.00)'
    assert table['resnet20_cbam']['Δ top-1 vs family baseline'] == '+1.00 (within SD 1.00)'
    assert table['asnet50_out']['Δ top-1 vs family baseline'] == '+9.00 (no SD: 1 seed)'
    assert table['asnet50_out']['wall time / cell'] == '13.0 min' and table['resnet20']['GMACs'] == '0.0403'
    assert table['resnet20_mha']['top-1 (%)'] == 'not run yet'
    assert table['resnet50_cifar']['family'] == 'Attention Shortcuts (baseline)'
    assert 'paper' not in table['resnet18'] and 'No paper of the zoo publishes figures on digits' in markdown
    assert 'larger of the two models\' sample standard deviations' in markdown  # the rule is stated
    assert 'Cells recorded: 15 (48 planned: 16 models x 3 seeds); models finished: 6 of 16' in markdown
    assert 'Wall time in all: 41.0 min over 15 cell(s)' in markdown  # 14 cells of 2 min and one of 13
    assert 'mixed_precision: no, bf16' in markdown  # the precisions differ between cells: said so
    assert '| resnet20_cbam | 2 | 82.00 | 81.50 | 14 of 15 |' in markdown
    png = (tmp_path / 'results-digits.png').read_bytes()
    assert png.startswith(b'\x89PNG') and len(png) > 20_000


def test_fashion_study_puts_the_papers_and_the_literatures_figures_beside_ours(tmp_path):
    study = study_script.STUDIES['gradattn-fashion-mnist']
    _write_study_record(tmp_path, study, 'resnet18', 42, 94.0)
    _write_study_record(tmp_path, study, 'gradattn_resnet18_lpe', 42, 93.0)
    _write_study_record(tmp_path, study, 'resnet18_se', 42, 93.5)
    study_script.write_study_outputs(study, tmp_path)
    markdown = (tmp_path / 'results-fashion_mnist.md').read_text()
    table = _markdown_rows(markdown)
    assert table['resnet18']['paper'] == '64.11 (GradAttn)' and table['resnet18']['literature'] == '94.9'
    assert table['gradattn_resnet18_lpe']['paper'] == '75.18 (GradAttn)'
    assert table['resnet18_se']['paper'] == '63.11 (GradAttn)'  # Table 9
    not_run = table['resnet18_cbam']  # the paper's figure is shown before ours exists
    assert not_run['paper'] == '66.98 (GradAttn)' and not_run['top-1 (%)'] == 'not run yet'
    assert table['gradattn_resnet18_lpe']['literature'] == 'n/a'
    assert table['gradattn_resnet18_lpe']['Δ top-1 vs resnet18'] == '-1.00 (no SD: 1 seed)'
    assert 'Δ top-1 vs family baseline' not in table['resnet18']  # one family, one baseline: one column
    assert 'normalised twice' in markdown and 'up to 100 epochs with early stopping; ours at most 30 epochs' in markdown
    assert '`train.py --dataset fashion_mnist --recipe paper --epochs 30`' in markdown
    assert 'Fashion-MNIST benchmark README' in markdown


def test_aggregate_only_rebuilds_the_outputs_from_the_records_alone(tmp_path, capsys, monkeypatch):
    study = study_script.STUDIES['zoo-digits']
    out = tmp_path / 'study'
    for seed in (1, 2):
        _write_study_record(out / 'digits', study, 'resnet20', seed, 80.0 + seed, extra=[['--workers', '4']])
    argv = ['zoo-digits', '--aggregate-only', '--output', str(out), '--runs-dir', str(tmp_path / 'gone')]
    assert study_script.main(argv) == 0
    first = {p.name: p.read_bytes() for p in (out / 'digits').glob('results-digits.*')}
    assert sorted(first) == ['results-digits.csv', 'results-digits.md', 'results-digits.png']
    assert b'Cells trained with train.py flags beyond the protocol' in first['results-digits.md']
    assert b'Not drawn yet' in first['results-digits.md']
    for name in first:
        (out / 'digits' / name).unlink()
    assert study_script.main(argv) == 0  # the same files again: nothing but the records is read
    assert {n: (out / 'digits' / n).read_bytes() for n in first if n.endswith(('.csv', '.md'))} == \
        {n: data for n, data in first.items() if n.endswith(('.csv', '.md'))}
    (out / 'digits' / 'cam-digits.png').write_bytes(b'png')  # a later step's Grad-CAM grid is linked when there
    assert study_script.main(argv) == 0
    assert '![Grad-CAM across models](cam-digits.png)' in (out / 'digits' / 'results-digits.md').read_text()
    # A record of another protocol is refused, in one line that says what to do.
    stale = json.loads(study_script.study_cell_path(out / 'digits', 'resnet20', 1).read_text())
    stale['protocol']['recipe'] = 'paper'
    study_script.study_cell_path(out / 'digits', 'resnet20', 1).write_text(json.dumps(stale))
    capsys.readouterr()
    assert study_script.main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and 'resnet20-seed1.json' in error and 'delete it' in error
    # ... and before any cell trains.
    def no_training(argv, launcher):
        raise AssertionError(f'a cell was launched: {argv}')
    monkeypatch.setattr(study_script, 'train_with_launcher', no_training)
    assert study_script.main(['zoo-digits', '--models', 'resnet18', '--output', str(out),
                           '--runs-dir', str(tmp_path / 'runs')]) == 2
    assert not (tmp_path / 'runs').exists()


def _write_run_folder(run_dir: Path, study, model: str, seed: int, finished: bool = True, **config) -> None:
    """A run folder as train.py leaves it: config.yaml, and when finished results.json and summary.csv."""
    import yaml
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / 'config.yaml').write_text(yaml.safe_dump(_study_config(study, model, seed, **config)))
    if finished:
        (run_dir / 'results.json').write_text(json.dumps(_study_results(model, seed, 90.0 + seed)))
        (run_dir / 'summary.csv').write_text('epoch,epoch_time_s,val_top1\n1,2.5,50\n2,2.5,\n')


def test_study_reuses_recorded_and_finished_cells_and_resumes_partial_ones(tmp_path, monkeypatch):
    study = study_script.STUDIES['zoo-digits']
    out, runs = tmp_path / 'study', tmp_path / 'runs'
    folder = out / 'digits'
    recorded = _write_study_record(folder, study, 'resnet18', 1, 91.0)
    before = recorded.stat().st_mtime_ns
    _write_run_folder(runs / 'digits' / 'resnet20' / 'seed1', study, 'resnet20', 1)  # finished, not recorded
    _write_run_folder(runs / 'digits' / 'resnet18' / 'seed2', study, 'resnet18', 2, finished=False)  # interrupted
    launches = []

    def fake_launch(argv, launcher):  # what train.py would leave; no training here
        launches.append((argv, launcher))
        resume = argv.index('--resume') + 1 if '--resume' in argv else None
        run_dir = (Path(argv[resume]) if resume else
                   Path(argv[argv.index('--output') + 1]) / argv[argv.index('--experiment') + 1])
        model, seed = argv[argv.index('--model') + 1], int(argv[argv.index('--seed') + 1])
        _write_run_folder(run_dir, study, model, seed)

    monkeypatch.setattr(study_script, 'train_with_launcher', fake_launch)
    monkeypatch.setattr(study_script, 'check_dataset', lambda dataset, options: None)
    rc = study_script.main(['zoo-digits', '--models', 'resnet18', 'resnet20', '--seeds', '1', '2',
                         '--output', str(out), '--runs-dir', str(runs), '--', '--workers', '0'])
    assert rc == 0
    # Two launches: resnet18 seed 2 resumed in its folder, resnet20 seed 2 trained afresh; each its own process.
    assert [(a[a.index('--model') + 1], a[a.index('--seed') + 1]) for a, _ in launches] == [
        ('resnet18', '2'), ('resnet20', '2')]
    resumed, fresh = launches[0][0], launches[1][0]
    assert resumed[resumed.index('--resume') + 1] == str(runs / 'digits' / 'resnet18' / 'seed2')
    assert fresh[fresh.index('--output') + 1:fresh.index('--output') + 4] == [
        str(runs / 'digits' / 'resnet20'), '--experiment', 'seed2']
    assert all(a[-2:] == ['--workers', '0'] and '--recipe' in a and launcher == shlex.join([sys.executable])
               for a, launcher in launches)
    assert recorded.stat().st_mtime_ns == before  # the recorded cell was reused as it was
    assert sorted(p.name for p in (folder / 'cells').iterdir()) == [
        'resnet18-seed1.json', 'resnet18-seed2.json', 'resnet20-seed1.json', 'resnet20-seed2.json']
    from_folder = json.loads(study_script.study_cell_path(folder, 'resnet20', 1).read_text())
    assert from_folder['protocol'] == study.protocol and from_folder['img_size'] == 32 and from_folder['in_chans'] == 1
    assert 0.035 < from_folder['gmacs'] < 0.045  # ResNet-20 at 1x32x32: about 40 M multiply-adds, not FLOPs
    assert from_folder['wall_time_s'] is None and from_folder['extra_train_args'] is None  # not trained by the study
    assert 'label_names' not in from_folder['results'] and from_folder['epochs'][1]['val_top1'] is None
    trained = json.loads(study_script.study_cell_path(folder, 'resnet18', 2).read_text())
    assert trained['wall_time_s'] > 0 and trained['extra_train_args'] == [['--workers', '0']]
    assert trained['run_dir'] == str(runs / 'digits' / 'resnet18' / 'seed2')
    with open(folder / 'results-digits.csv', newline='') as f:
        assert {r['model']: r['n_seeds'] for r in csv.DictReader(f)} == {'resnet18': '2', 'resnet20': '2'}


def test_a_finished_run_of_another_protocol_is_not_recorded(tmp_path):
    study = study_script.STUDIES['gradattn-fashion-mnist']
    run_dir = tmp_path / 'resnet18' / 'seed42'
    _write_run_folder(run_dir, study, 'resnet18', 42, epochs=100)
    with pytest.raises(study_script.CellFailed, match=r"epochs 100 \(the study: 30\)"):
        study_script.study_cell_record(study, 'resnet18', 42, run_dir)
    # The recipe's values count, not only its name: zoo-digits keeps Adam 1e-3, which the default recipe has left.
    digits = study_script.STUDIES['zoo-digits']
    run_dir = tmp_path / 'resnet20' / 'seed1'
    _write_run_folder(run_dir, digits, 'resnet20', 1, lr=RECIPES['default']['lr'])
    assert RECIPES['default']['lr'] != 1e-3
    with pytest.raises(study_script.CellFailed, match=r"lr 0.0005 \(the study: 0.001\)"):
        study_script.study_cell_record(digits, 'resnet20', 1, run_dir)


def test_the_default_job_benchmark_does_not_reuse_a_run_of_a_changed_recipe(tmp_path, monkeypatch):
    import default_job
    run_dir = tmp_path / 'default' / 'seed1'
    _write_run_folder(run_dir, study_script.STUDIES['zoo-digits'], 'gradattn_resnet18_rope', 1)  # Adam 1e-3
    (run_dir / 'process_wall_s.json').write_text('{"process_wall_s": 40.0}')
    (run_dir / 'summary.csv').write_text('epoch,val_top1,val_loss\n14,99.5,0.05\n')
    monkeypatch.setattr(default_job.subprocess, 'run', lambda *a, **k: pytest.fail('nothing is trained here'))
    with pytest.raises(SystemExit, match=r"trained with lr 0.001 \(now 0.0005\): the recipe has changed"):
        default_job.run_cell('default', 1, tmp_path, [])
    reused = default_job.run_cell('default', 1, tmp_path, ['--lr', '1e-3'])  # what the run was trained with
    assert (reused['test_top1'], reused['val_top1'], reused['process_wall_s']) == (91.0, 99.5, 40.0)


# --- the Grad-CAM grid across the models (tiny models saved as hub exports in run folders written here) ----------
def _run_folder_with_export(runs: Path, study, model: str, seed: int) -> Path:
    """A finished run folder of a tiny ``model`` (its family's representative's size in test_cam.py) with its hub/
    export, as train.py leaves it."""
    import timm
    import torch
    from timm_gradattn.families import family_of
    from timm_gradattn.hub import export_hub_folder
    from test_cam import TINY
    from tiers import REPRESENTATIVES
    run_dir = study_script.cell_dir(runs, study.dataset, model, seed)
    _write_run_folder(run_dir, study, model, seed)
    torch.manual_seed(seed)
    info = study_script.get_dataset_info(study.dataset)
    size = TINY[REPRESENTATIVES[family_of(model).key]]
    network = timm.create_model(model, num_classes=info.num_classes, in_chans=info.in_chans, **size)
    export_hub_folder(network, run_dir / 'hub', label_names=[str(c) for c in range(info.num_classes)],
                      input_size=info.input_size, mean=info.mean, std=info.std)
    return run_dir


def test_cam_grid_has_a_row_per_model_with_a_run_folder_of_the_lowest_seed(tmp_path, capsys, monkeypatch):
    from test_cam import EXPECTED_LAYERS
    from timm_gradattn.data import build_datasets
    study = study_script.STUDIES['zoo-digits']
    real_maps = study_script.class_activation_maps

    def two_empty_for_resnet20(network, images):  # resnet20's maps of images 0 and 2 have no positive value
        cams = real_maps(network, images)
        if type(network).__name__ == 'CifarResNet':
            cams.maps[:] = 0.5
            cams.maps[[0, 2]] = 0.0
        return cams
    monkeypatch.setattr(study_script, 'class_activation_maps', two_empty_for_resnet20)
    out, runs = tmp_path / 'study', tmp_path / 'runs'
    folder = out / 'digits'
    # One model of each family, in the study's order (CNNtention's at seconds less than its attention models take at
    # 32 px); asnet50_kv is read inside a stage it never calls.
    drawn = ['gradattn_resnet18_rope', 'resnet20', 'asnet50_kv']
    for model in drawn:
        _write_study_record(folder, study, model, 1, 90.0)
        _run_folder_with_export(runs, study, model, 1)
    _write_study_record(folder, study, 'resnet18', 1, 91.0)  # recorded, its run folder gone
    _write_study_record(folder, study, 'resnet20_mha', 2, 80.0)  # a run folder of seed 2 only: not seed 1's grid
    (study_script.cell_dir(runs, 'digits', 'resnet20_mha', 2) / 'hub').mkdir(parents=True)
    _write_run_folder(study_script.cell_dir(runs, 'digits', 'resnet20_mha', 2), study, 'resnet20_mha', 2)
    argv = ['zoo-digits', '--aggregate-only', '--cam', '5', '--output', str(out), '--runs-dir', str(runs)]
    assert study_script.main(argv) == 0

    skipped = [line for line in capsys.readouterr().out.splitlines() if 'skipped' in line]
    assert len(skipped) == 1 and skipped[0].startswith('Grad-CAM, seed 1: skipped 13 model(s)'), skipped
    assert 'resnet18 (no run folder)' in skipped[0] and 'resnet20_mha (not recorded)' in skipped[0]
    cam = json.loads((folder / 'cam-digits.json').read_text())
    assert cam['seed'] == 1 and cam['indices'] == [0, 1, 2, 3, 4]
    assert [row['model'] for row in cam['models']] == drawn  # one row per model, in the study's order
    for row in cam['models']:
        feature, module, _, grid = EXPECTED_LAYERS[row['model']]
        assert [(layer['feature'], layer['module'], tuple(layer['grid'])) for layer in row['layers']] == [
            (feature, module, grid)]
        assert len(row['predictions']) == 5 and 0 <= row['correct'] <= 5 and 0 <= row['empty'] <= 5
    assert cam['models'][1]['empty'] == 2
    # The images are seed 1's split's (the seed draws the split): its first five test labels.
    test = build_datasets('digits', seed=1).test
    assert cam['labels'] == [str(test[i][1]) for i in range(5)]
    assert set(cam['skipped']) == set(study.models) - set(drawn)
    png = (folder / 'cam-digits.png').read_bytes()
    assert png.startswith(b'\x89PNG') and len(png) > 20_000
    markdown = (folder / 'results-digits.md').read_text()
    assert '![Grad-CAM across models](cam-digits.png)' in markdown and "seed 1's test split" in markdown
    assert '| asnet50_kv | `stages.3.2` (the last to run inside `stages.3`) | 4x4 |' in markdown
    resnet20 = cam['models'][1]
    assert f'| resnet20 | `layer3` | 8x8 | {resnet20["correct"]} of 5 | 2 of 5 |' in markdown
    assert '| model | layer read | map | predicted right | empty maps |' in markdown
    assert 'resnet18 (no run folder)' in markdown

    # Without run folders (another machine) the grid and its record stay as they were, and so does the Markdown.
    before = {name: (folder / name).read_bytes() for name in ('cam-digits.png', 'cam-digits.json', 'results-digits.md')}
    argv[argv.index('--runs-dir') + 1] = str(tmp_path / 'gone')
    assert study_script.main(argv) == 0
    assert {name: (folder / name).read_bytes() for name in before} == before
    # A grid recorded before empty maps were counted keeps its table without that column.
    for row in cam['models']:
        del row['empty']
    (folder / 'cam-digits.json').write_text(json.dumps(cam))
    assert study_script.main(argv) == 0
    markdown = (folder / 'results-digits.md').read_text()
    assert '| model | layer read | map | predicted right |\n' in markdown and 'empty map' not in markdown


def test_cam_without_grad_cam_is_one_line_naming_the_extra(tmp_path, capsys, monkeypatch):
    from timm_gradattn.analysis import CAM_INSTALL
    monkeypatch.setitem(sys.modules, 'pytorch_grad_cam', None)  # as if it were not installed
    study = study_script.STUDIES['zoo-digits']
    out, runs = tmp_path / 'study', tmp_path / 'runs'
    _write_study_record(out / 'digits', study, 'resnet20', 1, 80.0)
    run_dir = study_script.cell_dir(runs, 'digits', 'resnet20', 1)
    _write_run_folder(run_dir, study, 'resnet20', 1)
    (run_dir / 'hub').mkdir()

    def no_work(*args, **kwargs):
        raise AssertionError('work started before the grad-cam check')
    monkeypatch.setattr(study_script, 'load_run_model', no_work)
    monkeypatch.setattr(study_script, 'train_with_launcher', no_work)
    common = ['--output', str(out), '--runs-dir', str(runs)]
    for argv in (['zoo-digits', '--aggregate-only', *common],  # a run folder to draw from
                 ['zoo-digits', '--models', 'resnet18', '--seeds', '1', *common]):  # before any cell trains
        capsys.readouterr()
        assert study_script.main(argv) == 2, argv
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1 and CAM_INSTALL in error[0] and '--cam 0' in error[0], error
    assert not study_script.cell_dir(runs, 'digits', 'resnet18', 1).exists()
    # --cam 0 draws nothing, so it needs no grad-cam.
    assert study_script.main(['zoo-digits', '--aggregate-only', '--cam', '0', *common]) == 0
    assert not (out / 'digits' / 'cam-digits.png').exists()


# --- benchmarks/precision_accuracy.py: the same cells in fp32 and bf16 -------------------------------------------
import precision_accuracy  # noqa: E402


def _precision_arms(folder: Path, top1s: dict) -> None:
    """Cell records of study zoo-digits in ``folder``/fp32 and /bf16: ``top1s[(arm, model)]`` is one top-1 per seed;
    bf16 cells train twice as fast."""
    study = study_script.STUDIES['zoo-digits']
    for (arm, model), values in top1s.items():
        for seed, top1 in enumerate(values, start=1):
            _write_study_record(folder / arm / 'digits', study, model, seed, top1,
                                mixed_precision='no' if arm == 'fp32' else 'bf16',
                                train_img_s=(200.0 if arm == 'fp32' else 400.0) + seed)


def test_precision_accuracy_compares_each_model_against_its_fp32_seed_sd(tmp_path):
    _precision_arms(tmp_path, {('fp32', 'gradattn_resnet18_rope'): [98.0, 99.0, 100.0],   # SD 1.0
                               ('bf16', 'gradattn_resnet18_rope'): [98.5, 99.5, 99.9],    # +0.3: within
                               ('fp32', 'resnet20_selfatt'): [97.0, 97.5, 98.0],          # SD 0.5
                               ('bf16', 'resnet20_selfatt'): [95.0, 95.0, 95.5],          # -2.33: beyond
                               ('fp32', 'resnet18'): [99.0]})                             # one arm only: no row
    assert precision_accuracy.main(['--folder', str(tmp_path)]) == 0
    result = json.loads((tmp_path / 'accuracy.json').read_text())
    rows = {row['model']: row for row in result['rows']}
    assert set(rows) == {'gradattn_resnet18_rope', 'resnet20_selfatt'}
    rope, selfatt = rows['gradattn_resnet18_rope'], rows['resnet20_selfatt']
    assert rope['diff'] == pytest.approx(0.3) and rope['fp32_sd'] == pytest.approx(1.0) and rope['within_fp32_sd']
    assert selfatt['diff'] == pytest.approx(95.1666667 - 97.5) and selfatt['within_fp32_sd'] is False
    assert rope['bf16_speedup'] == pytest.approx(402.0 / 202.0) and rope['same_seeds']
    table = (tmp_path / 'accuracy.md').read_text()
    assert '| gradattn_resnet18_rope | GradAttn | 99.00 ± 1.00 (n=3) | 99.30 ± 0.72 (n=3) | +0.30 | within |' in table
    assert '| resnet20_selfatt | CNNtention |' in table and '| beyond |' in table
    assert 'Machines (bf16): test cpu (2 cores)' in table


def test_precision_accuracy_refuses_a_cell_in_the_wrong_arm_and_missing_arms(tmp_path):
    with pytest.raises(SystemExit, match='no cell records in .*fp32/digits/cells'):
        precision_accuracy.main(['--folder', str(tmp_path)])
    _precision_arms(tmp_path, {('fp32', 'resnet20'): [97.0, 98.0], ('bf16', 'resnet20'): [97.0, 98.0]})
    study = study_script.STUDIES['zoo-digits']
    _write_study_record(tmp_path / 'fp32' / 'digits', study, 'resnet20', 3, 97.5, mixed_precision='bf16')
    with pytest.raises(SystemExit, match="resnet20 seed 3 trained with mixed precision 'bf16', not fp32"):
        precision_accuracy.main(['--folder', str(tmp_path)])


def test_precision_accuracy_takes_speeds_from_a_shared_machine_only(tmp_path):
    # fp32 seeds 1-2 come from another machine (e.g. the study's own records): their accuracy counts, their speed not.
    study = study_script.STUDIES['zoo-digits']
    other = dict(cpu='other cpu', cpu_count=2, gpu=None, num_processes=1, torch='x')
    for seed, top1 in ((1, 97.0), (2, 98.0)):
        _write_study_record(tmp_path / 'fp32' / 'digits', study, 'resnet20', seed, top1, machine=other,
                            train_img_s=100.0)
    _write_study_record(tmp_path / 'fp32' / 'digits', study, 'resnet20', 3, 99.0, train_img_s=300.0)
    _precision_arms(tmp_path, {('bf16', 'resnet20'): [97.0, 98.0, 99.0]})  # 401, 402, 403 images/s
    assert precision_accuracy.main(['--folder', str(tmp_path)]) == 0
    row, = json.loads((tmp_path / 'accuracy.json').read_text())['rows']
    assert row['top1']['fp32']['n'] == row['top1']['bf16']['n'] == 3
    assert row['speed_cells'] == dict(fp32=1, bf16=3) and row['train_img_s']['fp32'] == 300.0
    assert row['bf16_speedup'] == pytest.approx(402.0 / 300.0)
    table = (tmp_path / 'accuracy.md').read_text()
    assert 'Machines (fp32): other cpu (2 cores), 1 process(es), torch x (2 cell(s)); test cpu' in table
