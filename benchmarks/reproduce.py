#!/usr/bin/env python3
"""Reproduce the tables of the zoo's papers: models x datasets x seeds, each trained under its paper's recipe.

Three families, chosen with ``--family`` (default ``gradattn``, as before families existed); their models,
datasets, recipes, papers and training lengths are those of ``timm_gradattn.families``, and ``attention_shortcuts``
is accepted for ``attention-shortcuts``:

- ``gradattn``: the GradAttn paper's Tables 3-9, its five models beside timm's ``resnet18`` (the family's
  baseline). Every cell is one ``train.py --recipe paper`` run (Adam 1e-3, plateau decay and early stopping on
  validation top-1, at most 100 epochs, best weights restored for the test).
  After training, the gradient norms of the best weights are measured on 20 shuffled test batches in train mode
  (both ``timm_gradattn.analysis`` modes) for the Gradient Health Score.
- ``cnntention``: CNNtention's four ResNet-20 models on CIFAR-10 and MNIST under ``--recipe cnntention`` (the
  authors' per-model recipe; ``--recipe cnntention-sgd``: their baseline's SGD for all four), test top-1 of the
  last epoch (the authors' measure) and of the best validation epoch, beside the authors' figures.
- ``attention-shortcuts``: the Attention Shortcuts paper's Table 2, six ResNet-50-sized models on CIFAR-10 and
  CIFAR-100 under ``--recipe attention-shortcuts`` (64k updates), test error of the last update (the paper's
  measure) and of the best validation epoch, mean ± SD over ``--seeds``.

``all`` runs the three one after the other. Each figure sits next to the paper's published one
(``benchmarks/paper_results.py``, ``benchmarks/paper_results_families.py``):

    python benchmarks/reproduce.py --data-dir data                  # GradAttn: 6 models x 8 datasets, seed 42
    python benchmarks/reproduce.py --data-dir data --datasets cifar10 svhn --seeds 42 43 44
    python benchmarks/reproduce.py --quick                          # GradAttn on digits, 6 models, CPU minutes
    python benchmarks/reproduce.py --family cnntention --data-dir data -- --download
    python benchmarks/reproduce.py --family attention-shortcuts --data-dir data --seeds 1 2 3 4 5
    python benchmarks/reproduce.py --family all --quick             # every family on digits, few epochs
    python benchmarks/reproduce.py --data-dir data -- --mixed-precision bf16 --workers 8
    python benchmarks/reproduce.py --data-dir data --launcher "accelerate launch --multi_gpu --num_processes 4"

The study across the families (one protocol for models of every family, which no paper ran) is
``benchmarks/study.py``; the helpers both scripts use (a cell's folder, state, command line and launch) are in
``benchmarks/grid.py``.

Flags after a bare ``--`` go to train.py for every cell. A dataset whose files are missing is skipped
with one line saying where they were looked for; a cell that fails with an explained error (e.g. a
non-finite loss) is reported and the grid goes on; anything else stops the grid. Interrupted grids
resume: a cell whose run folder has ``results.json`` is reused as it is, a cell with a partial run
continues with ``train.py --resume``; run the same command again.

How the cells run: by default in this process, through the engine's own entry point
``timm_gradattn.engine.train(parse_args(argv))`` with exactly the argv a user would give train.py, so
the settings resolve the same way, the libraries are imported once for the whole grid and a missing
dataset is recognised by its exception (``DatasetNotFoundError``) rather than by parsing messages.
``train()`` owns its Accelerate process group (it ends it when the job ends), so data-parallel cells
cannot share one launch: with ``--launcher`` each cell is started as ``<launcher> train.py <argv>``
instead, and the dataset files are looked for here before the first launch.

Output (``--output``, light, meant to be committed): ``table<N>_*.md`` / ``.json`` for each table,
``tables.md`` (all of them), ``cells.json`` (every cell's results.json, epoch rows and gradient health)
and ``run.json`` (command, machine, grid, skipped datasets, wall time). GradAttn's go to ``--output`` itself,
the other families' to a folder named after their recipe inside it (``<output>/cnntention/``,
``<output>/attention-shortcuts/``). The run folders (weights and resumable checkpoints, ~200 MB per GradAttn
cell) go to ``--runs-dir`` (the same way per recipe), under the git-ignored ``output/``.
"""
import argparse
import dataclasses
import datetime
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import yaml
from torch.utils.data import DataLoader

import timm
from timm_gradattn.data import get_dataset_info
from timm_gradattn.families import FAMILIES as REGISTRY
from timm_gradattn.families import RECIPES, Family, family_key
from timm_gradattn.files import atomic_write_text
from timm_gradattn.reporting import describe_machine, load_average, machine_line, markdown_table, read_summary_csv

sys.path.insert(0, str(Path(__file__).resolve().parent))
from grid import (LAST_EPOCH_KEY, LOAD_KEY, REPO, RESULTS_DIR, TIMING_FILE, CellFailed, DatasetMissing,  # noqa: E402
                  cell_dir, cell_state, check_dataset, load_notes, load_run_model, record_load, record_time,
                  refuse_inside_launch, release_memory, run_splits, stats, train_argv, train_in_process,
                  train_with_launcher)
from paper_results import PAPER_CITATION, PAPER_MODEL_NAMES, PAPER_NOTES, paper_figure  # noqa: E402
import paper_results_families as families_paper  # noqa: E402

_GRADATTN = REGISTRY['gradattn']
# The GradAttn paper's Tables 3-8 compare its variants (the family's models named after it) with the baseline,
# timm's resnet18; Table 9 compares the SE / CBAM ResNet-18s (the family's other models) with the same baseline.
MAIN_MODELS = (_GRADATTN.baseline, *(m for m in _GRADATTN.models if m.startswith(_GRADATTN.key)))
BASELINE_MODELS = (_GRADATTN.baseline, *(m for m in _GRADATTN.models if m not in MAIN_MODELS))
MODELS = MAIN_MODELS + BASELINE_MODELS[1:]
QUICK_DATASETS = ('digits',)
# Digits has 1,258 training images: with 5 epochs the six cells take a few minutes on a 2-core CPU.
QUICK_EPOCHS = 5
GHS_BATCHES = 20  # as the reference implementation measured it
GHS_FILE = 'gradient_health.json'


@dataclasses.dataclass(frozen=True)
class Reproduction:
    """One family's grid: the registry's family (its models, datasets, recipes, paper and training length) and what
    only this script decides: the epochs of --quick and whether the tables need gradient health."""
    family: Family
    quick_epochs: int
    gradient_health: bool = False  # the GradAttn paper's Table 7 needs it; the others report none

    @property
    def key(self) -> str:  # --family
        return self.family.key

    @property
    def title(self) -> str:
        return self.family.title

    @property
    def models(self) -> Tuple[str, ...]:
        """The family's models, after its baseline where that is a timm model of its own (GradAttn's resnet18)."""
        family = self.family
        return family.models if family.baseline in family.models else (family.baseline, *family.models)

    @property
    def datasets(self) -> Tuple[str, ...]:
        return self.family.datasets

    @property
    def recipes(self) -> Tuple[str, ...]:
        """Recipe names, the paper's own first."""
        return tuple(self.family.recipes)

    @property
    def length(self) -> str:  # the paper's training length, named when --epochs caps it
        return self.family.length

    @property
    def citation(self) -> str:
        return self.family.paper.citation


FAMILIES = {grid.key: grid for grid in (
    Reproduction(REGISTRY['gradattn'], QUICK_EPOCHS, gradient_health=True),
    # SelfAtt and MHA attend over 1,024 positions at 32 px: an epoch of digits took the MHA model 850 s on 2 cores
    # shared with other jobs (load about 10), so the quick grid trains 5.
    Reproduction(REGISTRY['cnntention'], 5),
    # ResNet-50-sized (up to 2.5 G MACs an image): about a minute an epoch of digits each on 2 idle cores, so 3.
    Reproduction(REGISTRY['attention-shortcuts'], 3),
)}


def family_choice(name: str) -> str:
    """argparse ``type`` of ``--family``: the registry key for any spelling of a family (``attention_shortcuts`` is
    ``attention-shortcuts``); anything else is kept as typed, for ``choices`` to accept ('all') or refuse."""
    key = family_key(name)
    return key if key in FAMILIES else name


# --- the grid --------------------------------------------------------------------------------------------
def run_grid(options: argparse.Namespace) -> Dict[str, Any]:
    """Train (or reuse) every cell; returns {'skipped': {dataset: reason}, 'failed': {cell: reason}}."""
    cells = [(d, s, m) for d in options.datasets for s in options.seeds for m in options.models]
    skipped: Dict[str, str] = {}
    failed: Dict[str, str] = {}
    checked = set()
    for index, (dataset, seed, model) in enumerate(cells, 1):
        if dataset in skipped:
            continue
        run_dir = cell_dir(options.runs_dir, dataset, model, seed)
        name = f'[{index}/{len(cells)}] {dataset} / {model} / seed {seed}'
        state = cell_state(run_dir)
        if state == 'foreign':
            failed[f'{dataset}/{model}/seed{seed}'] = f'{run_dir} holds files but no training run (no config.yaml)'
            print(f'{name}: FAILED, {run_dir} holds files but no config.yaml, so it is not a train.py run. '
                  f'Move it away and run again.', flush=True)
            continue
        if state == 'done':
            print(f'{name}: finished earlier, reusing {run_dir / "results.json"}', flush=True)
            _warn_other_epochs(name, run_dir, options)
        else:
            print(f'{name}: ' + (f'resuming the partial run in {run_dir}' if state == 'partial'
                                 else f'training into {run_dir}'), flush=True)
            argv = train_argv(model, dataset, seed, run_dir, options, resume=state == 'partial')
            start = time.perf_counter()
            try:
                if options.launcher:
                    if dataset not in checked:
                        check_dataset(dataset, options)
                        checked.add(dataset)
                    train_with_launcher(argv, options.launcher)
                else:
                    train_in_process(argv)
            except DatasetMissing as error:
                skipped[dataset] = str(error)
                print(f'SKIPPED dataset {dataset}: its files are missing, so none of its cells run. {error} '
                      f'(reproduce.py passes flags after `--` to train.py, e.g. `-- --download`.)', flush=True)
                continue
            except CellFailed as error:
                failed[f'{dataset}/{model}/seed{seed}'] = str(error)
                print(f'{name}: FAILED: {error}', flush=True)
                continue
            finally:
                record_time(run_dir, 'train_s', time.perf_counter() - start)
                release_memory()
            record_load(run_dir)
        if options.family.gradient_health and not (run_dir / GHS_FILE).is_file():
            print(f'{name}: measuring gradient health on up to {options.ghs_batches} test batches', flush=True)
            start = time.perf_counter()
            measure_gradient_health(run_dir, options.ghs_batches)
            record_time(run_dir, 'gradient_health_s', time.perf_counter() - start)
            release_memory()
        write_outputs(options, skipped, failed)  # the tables grow as the grid runs
    return dict(skipped=skipped, failed=failed)


def _warn_other_epochs(name: str, run_dir: Path, options: argparse.Namespace) -> None:
    epochs = options.epochs or RECIPES[options.recipe].get('epochs')  # None: the recipe counts updates
    trained_for = yaml.safe_load((run_dir / 'config.yaml').read_text()).get('epochs')
    if trained_for != epochs:
        asked = f'the {epochs} asked now' if epochs else "the recipe's own length asked now"
        print(f'{name}: note: this run was trained with --epochs {trained_for}, not {asked}; '
              f'delete {run_dir} to train it again.', flush=True)


# --- gradient health (paper Table 7) ---------------------------------------------------------------------
def measure_gradient_health(run_dir: Path, max_batches: int = GHS_BATCHES) -> Dict[str, Any]:
    """Gradient norms of a finished run's best weights, on test batches in train mode; written to GHS_FILE."""
    from timm_gradattn.analysis import HEALTH_BANDS, gradient_health_report, gradient_norms

    config = yaml.safe_load((run_dir / 'config.yaml').read_text())
    model = load_run_model(run_dir)
    test = run_splits(config).test

    def batches():  # the same seeded sample of the test split for both modes
        generator = torch.Generator().manual_seed(config['seed'])
        return DataLoader(test, batch_size=config['batch_size'], shuffle=True, generator=generator)

    start = time.perf_counter()
    report = dict(split='test', batch_size=config['batch_size'], max_batches=max_batches,
                  batches=min(max_batches, len(batches())), bands={k: list(v) for k, v in HEALTH_BANDS.items()},
                  modes={})
    for mode in ('outputs', 'parameters'):
        norms = gradient_norms(model, batches(), mode=mode, max_batches=max_batches)
        report['modes'][mode] = dict(health=gradient_health_report(norms), norms=norms)
    report['seconds'] = time.perf_counter() - start
    atomic_write_text(run_dir / GHS_FILE, json.dumps(report, indent=2))
    return report


# --- collecting the cells --------------------------------------------------------------------------------
def read_cell(run_dir: Path) -> Optional[Dict[str, Any]]:
    """A finished cell's results.json, epoch rows and gradient health; None while it is unfinished."""
    if not (run_dir / 'results.json').is_file():
        return None
    cell = dict(results=json.loads((run_dir / 'results.json').read_text()), run_dir=str(run_dir))
    cell['epochs'] = read_summary_csv(run_dir / 'summary.csv')
    health = run_dir / GHS_FILE
    cell['gradient_health'] = json.loads(health.read_text()) if health.is_file() else None
    timing = run_dir / TIMING_FILE
    cell['wall_time_s'] = json.loads(timing.read_text()) if timing.is_file() else None
    return cell


def collect(options: argparse.Namespace) -> Dict[Tuple[str, str], Dict[int, Dict[str, Any]]]:
    """{(dataset, model): {seed: cell}} for every finished cell of the grid."""
    found: Dict[Tuple[str, str], Dict[int, Dict[str, Any]]] = {}
    for dataset in options.datasets:
        for model in options.models:
            for seed in options.seeds:
                cell = read_cell(cell_dir(options.runs_dir, dataset, model, seed))
                if cell is not None:
                    found.setdefault((dataset, model), {})[seed] = cell
    return found


# --- the tables --------------------------------------------------------------------------------------------
def _label(model: str) -> str:
    return PAPER_MODEL_NAMES.get(model, model)


def _format_number(value: float, digits: int) -> str:
    return f'{value:.{digits}f}'


def format_ours(record: Dict[str, Any], digits: int, num_seeds: int) -> str:
    ours = record['ours']
    if ours is None:
        return '—'
    text = _format_number(ours['mean'], digits)
    if ours['std'] is not None:
        text += f' ± {_format_number(ours["std"], digits)}'
    if ours['n'] < num_seeds:
        text += f' [{ours["n"]} of {num_seeds} seeds]'
    if record.get('fastest'):
        text += f', fastest {_format_number(record["fastest"]["mean"], digits)}'
    if 'vanishing' in record:
        counts = [f'{_count(record["vanishing"])} vanishing']
        if record['exploding']['mean'] > 0:
            counts.append(f'{_count(record["exploding"])} exploding')
        text += f' ({", ".join(counts)} of {_count(record["analysed"])})'
    return text


def _count(count_stats: Dict[str, Any]) -> str:
    mean = count_stats['mean']
    return str(int(mean)) if float(mean).is_integer() else f'{mean:.1f}'


def format_paper(value: Optional[float], digits: int) -> str:
    return 'n/a' if value is None else _format_number(value, digits)


def metric_records(found, datasets, models, table: int, metric: str, key: str,
                   fallback_table: Optional[int] = None) -> List[Dict[str, Any]]:
    """One record per (dataset, model): our mean ± std of results[key] over seeds and the paper's figure."""
    records = []
    for dataset in datasets:
        for model in models:
            cells = found.get((dataset, model), {})
            seeds = sorted(cells)
            paper = paper_figure(table, metric, dataset, model)
            if paper is None and fallback_table is not None:
                paper = paper_figure(fallback_table, metric, dataset, model)
            records.append(dict(dataset=dataset, model=model, metric=metric,
                                ours=stats([cells[s]['results'][key] for s in seeds], seeds), paper=paper))
    return records


def epoch_time_records(found, datasets, models) -> List[Dict[str, Any]]:
    """Mean seconds per epoch, and the fastest epoch: the one least slowed down by other jobs on the machine."""
    records = metric_records(found, datasets, models, 8, 'seconds_per_epoch', 'seconds_per_epoch')
    for record in records:
        cells = found.get((record['dataset'], record['model']), {})
        seeds = [s for s in sorted(cells) if cells[s]['epochs']]
        record['fastest'] = stats([min(row['epoch_time_s'] for row in cells[s]['epochs']) for s in seeds], seeds)
    return records


def health_records(found, datasets, models) -> List[Dict[str, Any]]:
    from timm_gradattn.analysis import HEALTH_BANDS
    records = []
    for dataset in datasets:
        for model in models:
            cells = found.get((dataset, model), {})
            seeds = [s for s in sorted(cells) if cells[s]['gradient_health'] is not None]
            for mode in ('outputs', 'parameters'):
                paper = paper_figure(7, 'ghs', dataset, model) if mode == 'outputs' else None
                paper_vanishing = paper_figure(7, 'vanishing', dataset, model) if mode == 'outputs' else None
                for band in HEALTH_BANDS:
                    health = [cells[s]['gradient_health']['modes'][mode]['health'][band] for s in seeds]
                    records.append(dict(
                        dataset=dataset, model=model, metric=f'ghs_{band}', mode=mode, band=list(HEALTH_BANDS[band]),
                        ours=stats([h['score'] for h in health], seeds),
                        vanishing=stats([len(h['vanishing']) for h in health], seeds),
                        exploding=stats([len(h['exploding']) for h in health], seeds),
                        analysed=stats([h['analysed'] for h in health], seeds),
                        paper=paper, paper_vanishing=paper_vanishing))
    return records


def _band_label(band: Sequence[float]) -> str:
    low, high = band
    return f'[{low:g}, {high:g}]'


def build_tables(found, options) -> List[Dict[str, Any]]:
    """Every table of the grid's family as a dict: number, name, title, records (long format), Markdown layout."""
    if options.family.key == 'cnntention':
        return [cnntention_table(found, options)]
    if options.family.key == 'attention-shortcuts':
        return [attention_shortcuts_table(found, options)]
    datasets = list(options.datasets)
    main = [m for m in MAIN_MODELS if m in options.models]
    baselines = [m for m in BASELINE_MODELS if m in options.models]
    models = list(options.models)
    return [
        dict(number=3, name='table3_top1', title='Top-1 test accuracy (%)', layout='pivot', digits=2,
             records=metric_records(found, datasets, main, 3, 'top1', 'top1')),
        dict(number=4, name='table4_top3_top5_f1_ece', title='Top-3 / top-5 accuracy (%), macro F1 and ECE',
             layout='rows', digits={'top3': 2, 'top5': 2, 'f1': 3, 'ece': 3},
             records=[r for metric, key in (('top3', 'top3'), ('top5', 'top5'), ('f1', 'f1_macro'), ('ece', 'ece'))
                      for r in metric_records(found, datasets, models, 4, metric, key)]),
        dict(number=5, name='table5_precision_recall_f1', title='Precision, recall and F1, macro and weighted',
             layout='rows', digits=3, paper_column='trailing',
             records=[r for key in ('precision_macro', 'recall_macro', 'f1_macro', 'precision_weighted',
                                    'recall_weighted', 'f1_weighted')
                      for r in metric_records(found, datasets, models, 5, key, key)]),
        dict(number=6, name='table6_train_val_gap', title='Train-validation top-1 gap at the best epoch (points)',
             layout='pivot', digits=2, records=metric_records(found, datasets, models, 6, 'train_val_gap',
                                                              'train_val_gap')),
        dict(number=7, name='table7_gradient_health', title='Gradient Health Score after training', layout='health',
             digits=2, paper_column='trailing', records=health_records(found, datasets, models)),
        dict(number=8, name='table8_seconds_per_epoch', title='Training time per epoch (s)', layout='pivot',
             digits=2, records=epoch_time_records(found, datasets, models)),
        dict(number=9, name='table9_attention_baselines', title='Top-1 test accuracy (%) of the SE / CBAM baselines',
             layout='pivot', digits=2,
             records=metric_records(found, datasets, baselines, 9, 'top1', 'top1', fallback_table=3)),
    ]


# --- the other families: the last epoch's figure (the papers' measure) beside the best validation epoch's ----
def _last_epoch_top1(results: Dict[str, Any]) -> Optional[float]:
    """Test top-1 of the last epoch's weights; for a run from before results.json recorded them, known only when
    its best epoch was its last."""
    if LAST_EPOCH_KEY in results:
        return results[LAST_EPOCH_KEY]['top1']
    return results['top1'] if results.get('best_epoch') == results.get('epochs_run') else None


def last_and_best_records(found, datasets, models, metric: str, paper_lookup) -> List[Dict[str, Any]]:
    """One record per (dataset, model): our figure of the last epoch ('ours') and of the best validation epoch
    ('ours_best_val'), mean ± std over seeds, with the paper's figure ('paper', and 'paper_sd' where it gives one).
    ``metric`` is 'top1' (accuracy, %) or 'error' (100 - top-1)."""
    def measure(top1: float) -> float:
        return 100.0 - top1 if metric == 'error' else top1

    records = []
    for dataset in datasets:
        for model in models:
            cells = found.get((dataset, model), {})
            last = {s: _last_epoch_top1(cells[s]['results']) for s in sorted(cells)}
            last_seeds = [s for s, top1 in last.items() if top1 is not None]
            seeds = sorted(cells)
            paper = paper_lookup(dataset, model)
            paper_mean, paper_sd = paper if isinstance(paper, tuple) else (paper, None)
            records.append(dict(
                dataset=dataset, model=model, metric=metric,
                ours=stats([measure(last[s]) for s in last_seeds], last_seeds),
                ours_best_val=stats([measure(cells[s]['results']['top1']) for s in seeds], seeds),
                best_epoch=stats([cells[s]['results']['best_epoch'] for s in seeds], seeds),
                epochs_run=stats([cells[s]['results']['epochs_run'] for s in seeds], seeds),
                num_updates=stats([cells[s]['results']['num_updates'] for s in seeds], seeds),
                paper=paper_mean, paper_sd=paper_sd))
    return records


SELECTION_NOTE = ('Validation split (--protocol official): 10 % of the official training images, never the test set; '
                  'digits, which has no official split, is split 70/15/15 as in the GradAttn grid.')


def cnntention_table(found, options) -> Dict[str, Any]:
    models = [m for m in options.family.models if m in options.models]
    return dict(
        number=None, name='cnntention_top1', title='CNNtention: test top-1 accuracy (%)', layout='last_and_best',
        digits=2, paper_label='authors', last_label='last epoch', model_names=families_paper.CNNTENTION_MODEL_NAMES,
        source=families_paper.CNNTENTION_CITATION,
        records=last_and_best_records(found, options.datasets, models, 'top1', families_paper.cnntention_figure),
        notes=[f'Ours: test top-1 of the last epoch\'s weights (the authors\' measure) and of the best validation '
               f'epoch\'s ("epoch": which one), train.py --recipe {options.recipe}. {SELECTION_NOTE}',
               f'Authors: {families_paper.CNNTENTION_CITATION}; n/a where they published none. '
               + ' '.join(families_paper.CNNTENTION_NOTES)])


def attention_shortcuts_table(found, options) -> Dict[str, Any]:
    models = [m for m in options.family.models if m in options.models]
    return dict(
        number=2, name='table2_test_error', title='Test classification error (%), mean ± SD',
        layout='last_and_best', digits=2, paper_label='paper', last_label='last update',
        model_names=families_paper.ATTENTION_SHORTCUTS_MODEL_NAMES, source=families_paper.ATTENTION_SHORTCUTS_CITATION,
        records=last_and_best_records(found, options.datasets, models, 'error',
                                      families_paper.attention_shortcuts_figure),
        notes=[f'Ours: test error (100 - top-1) of the last update\'s weights (the paper\'s measure) and of the best '
               f'validation epoch\'s ("epoch": which one), train.py --recipe {options.recipe}. {SELECTION_NOTE}',
               f'Paper: {families_paper.ATTENTION_SHORTCUTS_CITATION}; n/a where it publishes no figure. '
               + ' '.join(families_paper.ATTENTION_SHORTCUTS_NOTES)])


def _render_last_and_best(table: Dict[str, Any], num_seeds: int) -> Tuple[List[str], List[List[str]]]:
    """One row per model; for each dataset our last-epoch figure with the paper's beside it, then our
    best-validation figure with its epoch."""
    records, digits, label, last = table['records'], table['digits'], table['paper_label'], table['last_label']
    datasets = list(dict.fromkeys(r['dataset'] for r in records))
    models = list(dict.fromkeys(r['model'] for r in records))
    by_key = {(r['dataset'], r['model']): r for r in records}
    header = ['model']
    for dataset in datasets:
        header += [f'{dataset}: {last} ({label})', f'{dataset}: best validation (epoch)']
    rows = []
    for model in models:
        row = [table['model_names'].get(model, model)]
        for dataset in datasets:
            record = by_key[dataset, model]
            paper = format_paper(record['paper'], digits)
            if record['paper_sd'] is not None:
                paper += f' ± {_format_number(record["paper_sd"], digits)}'
            best = format_ours(dict(ours=record['ours_best_val']), digits, num_seeds)
            if record['best_epoch'] is not None:
                best += f' (epoch {_count(record["best_epoch"])})'
            row += [f'{format_ours(record, digits, num_seeds)} ({label} {paper})', best]
        rows.append(row)
    return header, rows


METRIC_LABELS = {
    'top3': 'top-3', 'top5': 'top-5', 'f1': 'F1 (macro)', 'ece': 'ECE',
    'precision_macro': 'precision (macro)', 'recall_macro': 'recall (macro)', 'f1_macro': 'F1 (macro)',
    'precision_weighted': 'precision (weighted)', 'recall_weighted': 'recall (weighted)',
    'f1_weighted': 'F1 (weighted)',
}


def _has_figures(records: Sequence[Dict[str, Any]]) -> bool:
    """A row is shown when it has a figure of ours or of the paper."""
    return any(r['ours'] is not None or r['paper'] is not None for r in records)


def _digits(table: Dict[str, Any], metric: str) -> int:
    return table['digits'][metric] if isinstance(table['digits'], dict) else table['digits']


def _cell_text(record, digits: int, num_seeds: int, inline_paper: bool) -> str:
    text = format_ours(record, digits, num_seeds)
    return f'{text} (paper {format_paper(record["paper"], digits)})' if inline_paper else text


def render_markdown(table: Dict[str, Any], context: Dict[str, Any], with_grid_notes: bool = True) -> str:
    """A table in the paper's shape; each of our figures is followed by the paper's (or n/a)."""
    records, num_seeds, layout = table['records'], len(context['seeds']), table['layout']
    datasets = list(dict.fromkeys(r['dataset'] for r in records))
    models = list(dict.fromkeys(r['model'] for r in records))
    heading = f'Table {table["number"]}: {table["title"]}' if table['number'] is not None else table['title']
    lines = [f'### {heading}', '']
    rows: List[List[str]] = []
    if not records:
        lines.append('No model of this table is in the grid.')
    elif layout == 'last_and_best':
        header, rows = _render_last_and_best(table, num_seeds)
        lines.append(markdown_table(header, rows))
    elif layout == 'pivot':
        by_key = {(r['dataset'], r['model']): r for r in records}
        rows = [[d] + [_cell_text(by_key[d, m], table['digits'], num_seeds, True) for m in models] for d in datasets]
        lines.append(markdown_table(['dataset'] + [_label(m) for m in models], rows))
    elif layout == 'rows':
        metrics = list(dict.fromkeys(r['metric'] for r in records))
        by_key = {(r['dataset'], r['model'], r['metric']): r for r in records}
        trailing = table.get('paper_column') == 'trailing'
        rows = []
        for d in datasets:
            for m in models:
                cells = [by_key[d, m, metric] for metric in metrics]
                if not _has_figures(cells):
                    continue
                row = [d, _label(m)] + [_cell_text(c, _digits(table, c['metric']), num_seeds, not trailing)
                                        for c in cells]
                rows.append(row + (['n/a'] if trailing else []))
        lines.append(markdown_table(['dataset', 'model'] + [METRIC_LABELS[m] for m in metrics]
                                    + (['paper'] if trailing else []), rows))
    else:  # health: one row per (dataset, model, mode), one column per band
        bands = list(dict.fromkeys(r['metric'] for r in records))
        band_of = {r['metric']: r['band'] for r in records}
        by_key = {(r['dataset'], r['model'], r['mode'], r['metric']): r for r in records}
        rows = []
        for d in datasets:
            for m in models:
                for mode in ('outputs', 'parameters'):
                    cells = [by_key[d, m, mode, band] for band in bands]
                    if not _has_figures(cells):
                        continue
                    paper = cells[0]['paper']
                    paper_text = format_paper(paper, 2)
                    if paper is not None and cells[0]['paper_vanishing']:
                        paper_text += f' ({cells[0]["paper_vanishing"]} vanishing)'
                    rows.append([d, _label(m), mode] + [format_ours(c, 2, num_seeds) for c in cells] + [paper_text])
        header = ['dataset', 'model', 'gradient of'] + [
            ('reference ' if 'reference' in band else 'paper band ') + _band_label(band_of[band]) for band in bands]
        lines.append(markdown_table(header + ['paper GHS'], rows))
    if not rows and records:
        lines.append('(no finished cell yet)')
    lines += [''] + [f'- {note}' for note in table_notes(table, context, with_grid_notes)]
    return '\n'.join(lines) + '\n'


OURS_NOTES = {
    3: 'Ours: test split, best-validation weights.',
    4: 'Ours: test split, best-validation weights; F1 is the macro average, ECE uses 10 equal-width bins.',
    5: 'Ours: test split, best-validation weights; zero_division = 0.',
    6: 'Ours: |train top-1 - val top-1| at the best validation epoch, in percentage points.',
    7: f'Ours: gradient norms of the best weights on shuffled test batches in train mode (up to {GHS_BATCHES} '
       f'as in the paper, fewer with --ghs-batches or a small split). "outputs": gradient w.r.t. every Conv2d / '
       f'Linear / encoder-layer output (the paper\'s measurement); "parameters": gradient of each module\'s own '
       f'parameters. Score = healthy / analysed layers, counting only layers that received a gradient; '
       f'"(k vanishing, j exploding of n)": layers below / above the band.',
    8: 'Ours: mean wall time of an epoch, training plus the validation pass.',
    9: 'Ours: test split, best-validation weights.',
}


def table_notes(table: Dict[str, Any], context: Dict[str, Any], with_grid_notes: bool = True) -> List[str]:
    """The notes under a table: what our figures are, the paper's caveats and, optionally, the grid's."""
    if 'notes' in table:  # the other families' tables carry their own
        return list(table['notes']) + (grid_notes(context) if with_grid_notes else [])
    number = table['number']
    notes = [OURS_NOTES[number],
             f"Paper: {PAPER_CITATION}, Table {number}; n/a where the paper publishes no figure. {PAPER_NOTES[number]}"]
    if number == 7 and context['ghs_batches_used']:
        notes.append(f'Test batches used here: {", ".join(map(str, context["ghs_batches_used"]))}.')
    if number == 8:
        machines = sorted({machine_line(m) for m in context['cell_machines']})
        notes.append('Our machine: ' + ('; '.join(machines) if machines else 'none yet') + '. "fastest": the '
                     'fastest epoch of the run (mean over seeds).')
        notes += load_notes(context['cores'], context['cell_loads'], context['run_load'])
    return notes + (grid_notes(context) if with_grid_notes else [])


def grid_notes(context: Dict[str, Any]) -> List[str]:
    """What holds for every table of the grid: seeds, epoch cap, skipped datasets, failed cells."""
    seeds = context['seeds']
    notes = [(f'Mean ± sample standard deviation over seeds {", ".join(map(str, seeds))}' if len(seeds) > 1
              else f'One run per cell (seed {seeds[0]})') + '; "—": no finished run.']
    if context['epochs_override']:
        notes.append(f'Epochs capped at {context["epochs_override"]} (--epochs): NOT the paper\'s protocol of '
                     f'{context["paper_length"]}.')
    for dataset, reason in context['skipped'].items():
        notes.append(f'Skipped {dataset}: {_first_sentence(reason)}')
    for cell, reason in context['failed'].items():
        notes.append(f'Failed {cell}: {_first_sentence(reason)}')
    return notes


def _first_sentence(text: str) -> str:
    sentence = text.strip().split('. ')[0].rstrip('.')
    return sentence + '.'


def table_context(options, found, skipped: Dict[str, str], failed: Dict[str, str],
                  machine: Dict[str, Any]) -> Dict[str, Any]:
    """What the notes under the tables need to know about the grid and the machine."""
    finished = [c for seeds in found.values() for c in seeds.values()]
    return dict(
        seeds=options.seeds, skipped=skipped, failed=failed, epochs_override=options.epochs,
        paper_length=options.family.length,
        cell_machines=[c['results']['machine'] for c in finished],
        cell_loads=[c['wall_time_s'][LOAD_KEY] for c in finished if c['wall_time_s'] and LOAD_KEY in c['wall_time_s']],
        run_load=machine.get('load_average_1_5_15_min'), cores=machine['cpu_count'],
        ghs_batches_used=sorted({c['gradient_health']['batches'] for c in finished if c['gradient_health']}))


def write_outputs(options: argparse.Namespace, skipped: Dict[str, str], failed: Dict[str, str],
                  wall_time_s: Optional[float] = None) -> List[Path]:
    """Write every table (Markdown + JSON), tables.md, cells.json and run.json; returns the table files."""
    found = collect(options)
    output = Path(options.output)
    output.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')
    recorded = getattr(options, 'recorded_run', None) or {}
    # Other jobs on the machine slow every epoch down: the load says how far the timings can be trusted.
    machine = recorded.get('machine') or dict(describe_machine(), load_average_1_5_15_min=load_average())
    run_info = dict(
        command=options.command, date=recorded.get('date', now), machine=machine,
        tables_written=now, models=list(options.models), datasets=list(options.datasets),
        seeds=list(options.seeds), epochs_override=options.epochs, train_args=list(options.train_args),
        launcher=options.launcher, family=options.family.key,
        recipe=options.recipe, runs_dir=str(options.runs_dir), skipped_datasets=skipped, failed_cells=failed,
        finished_cells=sum(len(seeds) for seeds in found.values()),
        cells_wall_time_s=sum(seconds for seeds in found.values() for c in seeds.values()
                              for key, seconds in (c['wall_time_s'] or {}).items() if key.endswith('_s')),
        planned_cells=len(options.models) * len(options.datasets) * len(options.seeds),
        wall_time_s=wall_time_s, paper=options.family.citation)
    context = table_context(options, found, skipped, failed, run_info['machine'])
    header = _header(run_info) + '\n' + '\n'.join(f'- {note}' for note in grid_notes(context))
    written, markdown = [], [f'# {options.family.title} reproduction: tables\n\n{header}\n']
    for table in build_tables(found, options):
        markdown.append(render_markdown(table, context, with_grid_notes=False))
        base = output / table['name']
        atomic_write_text(base.with_suffix('.md'), f'{render_markdown(table, context)}\n{_header(run_info)}\n')
        atomic_write_text(base.with_suffix('.json'), json.dumps(dict(
            table=table['number'], title=table['title'], paper_source=table.get('source', PAPER_CITATION),
            notes=table_notes(table, context), records=table['records']), indent=2))
        written += [base.with_suffix('.md'), base.with_suffix('.json')]
    atomic_write_text(output / 'tables.md', '\n'.join(markdown))
    cells = [dict(dataset=d, model=m, seed=s, **{k: v for k, v in cell.items() if k != 'run_dir'})
             for (d, m), seeds in found.items() for s, cell in sorted(seeds.items())]
    atomic_write_text(output / 'cells.json', json.dumps(cells, indent=1))
    atomic_write_text(output / 'run.json', json.dumps(run_info, indent=2))
    return written


def _header(run_info: Dict[str, Any]) -> str:
    machine = run_info['machine']
    load = '/'.join(map(str, machine.get('load_average_1_5_15_min') or ['?']))
    # run.json files written before the machine description was shared name every GPU under 'gpus'
    gpu = machine.get('gpu') or ', '.join(machine.get('gpus') or [])
    device = gpu or f"CPU only: {machine['cpu']}"
    wall = (f"{run_info['wall_time_s'] / 60:.1f} min for the command above"
            if run_info['wall_time_s'] is not None else 'the command above is still running')
    wall += f"; {run_info['cells_wall_time_s'] / 60:.1f} min of cell time (training, test, gradient health)"
    return '\n'.join([
        f"- Command: `{run_info['command']}`",
        f"- Machine: {device}; {machine['cpu_count']} cores (load average {load} over 1/5/15 min when the tables "
        f"were written); torch {machine['torch']}, timm {machine['timm']}, accelerate {machine['accelerate']}, "
        f"Python {machine['python']}; {run_info['date']}",
        "- Cells run " + (f"by `{run_info['launcher']} train.py`" if run_info['launcher'] else
                           'in one process through timm_gradattn.engine.train') + '.',
        f"- Grid: {len(run_info['models'])} model(s) x {len(run_info['datasets'])} dataset(s) x "
        f"{len(run_info['seeds'])} seed(s), recipe {run_info.get('recipe', 'paper')}"
        + (f", epochs capped at {run_info['epochs_override']}" if run_info['epochs_override'] else '')
        + f"; {run_info['finished_cells']} of {run_info['planned_cells']} cells finished",
        f"- Wall time: {wall}",
    ])


# --- command line ------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train a grid of models x datasets under a paper's protocol and write its tables next to the "
                    "paper's figures. Flags after a bare `--` are passed to train.py for every cell. (One protocol "
                    "for models of every family, which no paper ran: benchmarks/study.py.)")
    parser.add_argument('--family', default=None, type=family_choice, choices=(*FAMILIES, 'all'),
                        help="Whose tables: the GradAttn paper's Tables 3-9 (gradattn, the default), CNNtention's "
                             "results (cnntention), Attention Shortcuts' Table 2 (attention-shortcuts; "
                             "attention_shortcuts is accepted too), or all three one after the other.")
    parser.add_argument('--recipe', default=None, choices=[r for f in FAMILIES.values() for r in f.recipes],
                        help='The train.py recipe of the family that has it (default: each family\'s own: '
                             + ', '.join(f.recipes[0] for f in FAMILIES.values()) + '). cnntention-sgd: the '
                             'CNNtention baseline\'s SGD recipe for all the CNNtention models.')
    parser.add_argument('--models', nargs='+', default=None, metavar='MODEL',
                        help=f'timm model names (default: the family\'s; gradattn: {" ".join(MODELS)}, which also '
                             'takes any other timm model).')
    parser.add_argument('--datasets', nargs='+', default=None, metavar='DATASET',
                        help='Dataset names (default: the paper\'s; '
                             + ', '.join(f'{f.key} {" ".join(f.datasets)}' for f in FAMILIES.values())
                             + '; --quick: digits).')
    parser.add_argument('--seeds', nargs='+', type=int, default=None, metavar='SEED',
                        help='One run per seed for every cell, reported as mean ± std (default: 42; Attention '
                             'Shortcuts reports 5 runs).')
    parser.add_argument('--data-dir', default=None, metavar='DIR', help="Passed to train.py's --data-dir.")
    parser.add_argument('--output', default=None, metavar='DIR',
                        help='Where the tables go (default: benchmarks/results/reproduce, '
                             'with --quick benchmarks/results/reproduce_quick); the families other than gradattn '
                             'write to a folder named after their recipe inside it.')
    parser.add_argument('--runs-dir', default=None, metavar='DIR',
                        help='Parent of the training run folders, ~200 MB each (default: output/reproduce, '
                             'with --quick output/reproduce_quick; per recipe as for --output).')
    parser.add_argument('--epochs', type=int, default=None,
                        help="Cap every run at this many epochs (default: the recipe's; with --quick "
                             + ', '.join(f'{f.key} {f.quick_epochs}' for f in FAMILIES.values()) + ').')
    parser.add_argument('--ghs-batches', type=int, default=GHS_BATCHES, metavar='N',
                        help='Test batches for the gradient health score (default: %(default)s, as the paper).')
    parser.add_argument('--launcher', default=None, metavar='COMMAND',
                        help='Run each cell as `COMMAND train.py ...` in its own processes, e.g. "accelerate launch '
                             '--multi_gpu --num_processes 4" (default: in this process, one device).')
    parser.add_argument('--quick', action='store_true',
                        help='Smoke-level grid: the family\'s models on digits for a few epochs, into '
                             'benchmarks/results/reproduce_quick (GradAttn: a few minutes on a laptop CPU; Attention '
                             'Shortcuts: tens of minutes).')
    parser.add_argument('--tables-only', action='store_true',
                        help='Train nothing: rewrite the tables from the finished runs in --runs-dir (the grid, '
                             'command and machine of the last training invocation are kept from run.json).')
    return parser


def parse_options(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line; ``options.grids`` holds one namespace per family to run, each what ``run_grid`` and
    ``write_outputs`` take (its family, recipe, models, datasets, seeds, epochs, output and runs folders)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    own, train_args = (argv[:argv.index('--')], argv[argv.index('--') + 1:]) if '--' in argv else (argv, [])
    parser = build_parser()
    options = parser.parse_args(own)
    options.train_args = train_args
    options.command = shlex.join(['python', 'benchmarks/reproduce.py'] + argv)
    refuse_inside_launch(parser, 'reproduce.py')
    options.family = options.family or 'gradattn'
    options.given = {k for k in ('models', 'datasets', 'seeds', 'epochs') if getattr(options, k) is not None}
    options.seeds = options.seeds or [42]
    chosen = list(FAMILIES.values()) if options.family == 'all' else [FAMILIES[options.family]]
    if options.recipe and not any(options.recipe in f.recipes for f in chosen):
        owner = next(f for f in FAMILIES.values() if options.recipe in f.recipes)
        parser.error(f'--recipe {options.recipe} is a recipe of the {owner.key} family, not of --family '
                     f'{options.family}; add --family {owner.key}.')
    models = _models_by_family(parser, options.models, chosen)
    try:
        datasets = [get_dataset_info(d).name for d in options.datasets or []]
    except ValueError as error:
        parser.error(f'--datasets: {error}')
    for flag, value in (('--epochs', options.epochs), ('--ghs-batches', options.ghs_batches)):
        if value is not None and value < 1:
            parser.error(f'{flag} must be at least 1, got {value}.')
    for flag in ('--model', '--dataset', '--seed', '--epochs', '--output', '--experiment', '--resume', '--recipe'):
        if flag in train_args:
            parser.error(f'{flag} after `--` would change what the grid itself sets per cell; use --models, '
                         f'--datasets, --seeds, --epochs, --output, --recipe of reproduce.py instead.')
    name = 'reproduce_quick' if options.quick else 'reproduce'
    output = Path(options.output or RESULTS_DIR / name)
    runs_dir = Path(options.runs_dir or REPO / 'output' / name)
    options.grids = []
    for family in chosen:
        if not models[family.key]:
            continue  # --models named none of this family's
        recipe = options.recipe if options.recipe in family.recipes else family.recipes[0]
        # GradAttn's folders stay where they were before families existed; the others' are named by recipe.
        subfolder = '' if family.key == 'gradattn' else recipe
        per_family = ('grids', 'family', 'recipe', 'models', 'datasets', 'epochs', 'output', 'runs_dir')
        options.grids.append(argparse.Namespace(
            **{k: v for k, v in vars(options).items() if k not in per_family},
            family=family, recipe=recipe, models=models[family.key],
            datasets=datasets or list(QUICK_DATASETS if options.quick else family.datasets),
            epochs=options.epochs or (family.quick_epochs if options.quick else None),
            output=output / subfolder, runs_dir=runs_dir / subfolder))
    return options


def _models_by_family(parser: argparse.ArgumentParser, names: Optional[Sequence[str]],
                      chosen: Sequence[Reproduction]) -> Dict[str, List[str]]:
    """--models split among the chosen families: a model goes to the family that lists it; GradAttn's grid takes
    any other timm model, the other families' recipes only theirs."""
    if names is None:
        return {f.key: list(f.models) for f in chosen}
    split: Dict[str, List[str]] = {f.key: [] for f in chosen}
    for model in names:
        if not timm.is_model(model):
            parser.error(f'--models: {model!r} is not a timm model name; the chosen families train '
                         f'{", ".join(m for f in chosen for m in f.models)}.')
        family = next((f for f in chosen if model in f.models), None)
        if family is None and 'gradattn' in split:
            family = FAMILIES['gradattn']
        if family is None:
            owner = next((f.key for f in FAMILIES.values() if model in f.models), 'gradattn')
            parser.error(f'--models: {model} is not a model of --family {" / ".join(f.key for f in chosen)} '
                         f'(their recipes train only their own models); add --family {owner}.')
        split[family.key].append(model)
    return split


def main(argv: Optional[Sequence[str]] = None) -> int:
    options = parse_options(argv)
    failed = False
    for grid in options.grids:
        failed |= run_family(grid)
    return 1 if failed else 0


def run_family(options: argparse.Namespace) -> bool:
    """Train (or reuse) one family's grid and write its tables; True when a cell failed."""
    start = time.perf_counter()
    if options.tables_only:
        outcome = dict(skipped={}, failed={}, wall_time_s=None)
        previous = options.output / 'run.json'
        if previous.is_file():  # keep what the training invocation recorded: its command, machine and time
            recorded = json.loads(previous.read_text())
            options.command, options.recorded_run = recorded['command'], recorded
            for key, recorded_key in (('models', 'models'), ('datasets', 'datasets'), ('seeds', 'seeds'),
                                      ('epochs', 'epochs_override')):
                if key not in options.given:
                    setattr(options, key, recorded[recorded_key])
            options.train_args = recorded['train_args']
            outcome = dict(skipped=recorded['skipped_datasets'], failed=recorded['failed_cells'],
                           wall_time_s=recorded['wall_time_s'])
    else:
        print(f'{options.family.title}: {len(options.models)} model(s) x {len(options.datasets)} dataset(s) x '
              f'{len(options.seeds)} seed(s), train.py --recipe {options.recipe}', flush=True)
        outcome = run_grid(options)
        outcome['wall_time_s'] = time.perf_counter() - start
    written = write_outputs(options, outcome['skipped'], outcome['failed'], wall_time_s=outcome['wall_time_s'])
    print(f'Wrote {len(written)} table files, tables.md, cells.json and run.json to {options.output} '
          f'(wall time {time.perf_counter() - start:.0f} s).')
    return bool(outcome['failed'])


if __name__ == '__main__':
    sys.exit(main())
