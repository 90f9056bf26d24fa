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

``--study NAME`` runs a comparison no paper made: one protocol (an entry of ``STUDIES``: dataset, models, recipe,
epochs, default seeds) for models of every family, cell by cell, each cell its own ``python train.py`` process (so
the peak memory in its results.json is its own). Each finished cell leaves a light record to commit,
``<output>/<dataset>/cells/<model>-seed<S>.json`` (results.json less the label names, config.yaml, the epoch rows,
MACs per image, process wall time, load average), and ``results-<dataset>.csv`` (timm's results columns and the
study's), ``.md`` (the table beside the papers' figures, whether each difference from resnet18 and from the family's
baseline exceeds the seed SD, the cells, the machine) and ``.png`` (top-1 against MACs and training time) are
rebuilt from those records alone. ``--models`` and ``--seeds`` run a batch of cells; a recorded cell is reused, a
finished run folder recorded, a partial one resumed:

    python benchmarks/reproduce.py --study zoo-digits                     # 16 models x seeds 1 2 3, recipe default
    python benchmarks/reproduce.py --study zoo-digits --models resnet18 --seeds 1
    python benchmarks/reproduce.py --study gradattn-fashion-mnist --data-dir data -- --download
    python benchmarks/reproduce.py --study zoo-digits --aggregate-only    # the outputs from the committed records

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
import collections
import csv
import dataclasses
import datetime
import functools
import gc
import io
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import yaml
from torch.utils.data import DataLoader

import timm
import timm_gradattn  # noqa: F401  (registers the models)
from timm_gradattn.files import atomic_write_bytes, atomic_write_text
from timm_gradattn.data import DatasetNotFoundError, build_datasets, get_dataset_info
from timm_gradattn.families import FAMILIES as REGISTRY
from timm_gradattn.errors import UserError
from timm_gradattn.families import MODEL_NAMES, RECIPES, Family, family_key, family_of
from timm_gradattn.reporting import describe_machine, load_average, machine_line, markdown_table, read_summary_csv

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paper_results import (PAPER_CITATION, PAPER_MODEL_NAMES, PAPER_NOTES, literature_figure,  # noqa: E402
                           paper_figure)
import paper_results_families as families_paper  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = Path(__file__).resolve().parent / 'results'
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
TIMING_FILE = 'reproduce_timing.json'
LOAD_KEY = 'load_average_5_min_after_training'
EXTRA_FLAGS_KEY = 'extra_train_args'  # a study cell's flags after `--`, per invocation
# results.json's test metrics of the last epoch's weights (the top level holds the best validation epoch's).
LAST_EPOCH_KEY = 'test_last_epoch'


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
def cell_dir(runs_dir: Path, dataset: str, model: str, seed: int) -> Path:
    return runs_dir / dataset / model / f'seed{seed}'


def cell_state(run_dir: Path) -> str:
    """'done' (results.json), 'partial' (a run started there), 'new', or 'foreign' (files of something else)."""
    if (run_dir / 'results.json').is_file():
        return 'done'
    if (run_dir / 'config.yaml').is_file():
        return 'partial'
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return 'new'
    return 'foreign'


def train_argv(model: str, dataset: str, seed: int, run_dir: Path, options: argparse.Namespace,
               resume: bool) -> List[str]:
    """The train.py command line of one cell."""
    argv = ['--model', model, '--dataset', dataset, '--recipe', options.recipe, '--seed', str(seed)]
    if options.data_dir:
        argv += ['--data-dir', options.data_dir]
    if options.epochs:
        argv += ['--epochs', str(options.epochs)]
    if resume:
        argv += ['--resume', str(run_dir)]
    else:
        argv += ['--output', str(run_dir.parent), '--experiment', run_dir.name]
    return argv + list(options.train_args)


class DatasetMissing(Exception):
    """The dataset's files are not there: every cell of it is skipped."""


class CellFailed(Exception):
    """One cell could not be trained (explained); the grid goes on."""


def train_in_process(argv: List[str]) -> None:
    """One cell through the engine's own entry point, exactly as ``python train.py <argv>`` would run it."""
    from timm_gradattn.engine import train
    from timm_gradattn.settings import resolve_train_settings
    try:
        train(resolve_train_settings(argv))
    except UserError as error:  # a problem with the settings or the data, explained by the engine
        if isinstance(error.__cause__, DatasetNotFoundError):
            raise DatasetMissing(str(error.__cause__)) from error
        raise CellFailed(str(error)) from error


def train_with_launcher(argv: List[str], launcher: str) -> None:
    """One cell as its own launch, e.g. ``accelerate launch --multi_gpu --num_processes 4 train.py <argv>``."""
    command = [*shlex.split(launcher), str(REPO / 'train.py'), *argv]
    returncode = subprocess.run(command, cwd=REPO).returncode
    if returncode != 0:
        raise CellFailed(f'`{shlex.join(command)}` exited with code {returncode} (its messages are above).')


def check_dataset(dataset: str, options: argparse.Namespace) -> None:
    """With --launcher the data error would surface in a child process: look for the files here first."""
    try:
        build_datasets(dataset, data_dir=options.data_dir, download='--download' in options.train_args)
    except DatasetNotFoundError as error:
        raise DatasetMissing(str(error)) from error


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
                _record_time(run_dir, 'train_s', time.perf_counter() - start)
                _release_memory()
            _record_load(run_dir)
        if options.family.gradient_health and not (run_dir / GHS_FILE).is_file():
            print(f'{name}: measuring gradient health on up to {options.ghs_batches} test batches', flush=True)
            start = time.perf_counter()
            measure_gradient_health(run_dir, options.ghs_batches)
            _record_time(run_dir, 'gradient_health_s', time.perf_counter() - start)
            _release_memory()
        write_outputs(options, skipped, failed)  # the tables grow as the grid runs
    return dict(skipped=skipped, failed=failed)


def _warn_other_epochs(name: str, run_dir: Path, options: argparse.Namespace) -> None:
    epochs = options.epochs or RECIPES[options.recipe].get('epochs')  # None: the recipe counts updates
    trained_for = yaml.safe_load((run_dir / 'config.yaml').read_text()).get('epochs')
    if trained_for != epochs:
        asked = f'the {epochs} asked now' if epochs else "the recipe's own length asked now"
        print(f'{name}: note: this run was trained with --epochs {trained_for}, not {asked}; '
              f'delete {run_dir} to train it again.', flush=True)


def _record_time(run_dir: Path, key: str, seconds: float) -> None:
    """Add to a cell's wall time (summed over the invocations that worked on it)."""
    if not run_dir.is_dir():  # a skipped dataset leaves no run folder
        return
    file = run_dir / TIMING_FILE
    timing = json.loads(file.read_text()) if file.is_file() else {}
    timing[key] = timing.get(key, 0.0) + seconds
    atomic_write_text(file, json.dumps(timing))


def _record_extra_flags(run_dir: Path, flags: Sequence[str]) -> None:
    """Note the train.py flags a study cell was given beyond the study's protocol (one list per invocation)."""
    if not run_dir.is_dir():
        return
    file = run_dir / TIMING_FILE
    timing = json.loads(file.read_text()) if file.is_file() else {}
    timing.setdefault(EXTRA_FLAGS_KEY, []).append(list(flags))
    atomic_write_text(file, json.dumps(timing))


def _record_load(run_dir: Path) -> None:
    """How busy the machine was while the cell trained: other jobs slow its epochs down."""
    load = load_average()
    if load is not None:
        file = run_dir / TIMING_FILE
        timing = json.loads(file.read_text()) if file.is_file() else {}
        timing[LOAD_KEY] = load[1]
        atomic_write_text(file, json.dumps(timing))


def _release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- gradient health (paper Table 7) ---------------------------------------------------------------------
@functools.lru_cache(maxsize=1)  # the grid walks one dataset at a time; its splits are built once
def _test_split(dataset: str, data_dir: Optional[str], protocol: str, seed: int, img_size: Optional[int],
                in_chans: Optional[int]):
    return build_datasets(dataset, data_dir=data_dir, protocol=protocol, seed=seed, img_size=img_size,
                          in_chans=in_chans).test


def measure_gradient_health(run_dir: Path, max_batches: int = GHS_BATCHES) -> Dict[str, Any]:
    """Gradient norms of a finished run's best weights, on test batches in train mode; written to GHS_FILE."""
    from timm_gradattn.analysis import HEALTH_BANDS, gradient_health_report, gradient_norms

    config = yaml.safe_load((run_dir / 'config.yaml').read_text())
    model = timm.create_model(f'local-dir:{run_dir / "hub"}', pretrained=True)
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    model.to(device)
    test = _test_split(config['dataset'], config.get('data_dir'), config.get('protocol', 'paper'), config['seed'],
                       config.get('img_size'), config.get('in_chans'))

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


def stats(values: Sequence[float], seeds: Sequence[int]) -> Optional[Dict[str, Any]]:
    """Mean and sample standard deviation over seeds (std None for one seed)."""
    if not values:
        return None
    return dict(mean=statistics.fmean(values), std=statistics.stdev(values) if len(values) > 1 else None,
                n=len(values), values=list(values), seeds=list(seeds))


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
        notes += _load_notes(context)
    return notes + (grid_notes(context) if with_grid_notes else [])


def _load_notes(context: Dict[str, Any]) -> List[str]:
    """Whether other jobs shared the machine while the cells trained (then times do not compare models)."""
    cores = context['cores']
    if context['cell_loads']:
        loads, when = context['cell_loads'], 'over the 5 minutes before each cell finished training'
    elif context['run_load']:
        loads, when = [context['run_load'][2]], 'over the 15 minutes before the tables were written'
    else:
        return []
    note = f'Load average {when}: {min(loads):.1f}' + (f' to {max(loads):.1f}' if len(loads) > 1 else '') + \
        f' on {cores} cores.'
    if max(loads) > cores / 2:
        note += (' Other jobs shared the machine: these times measure the contention as much as the models, '
                 'so compare models only on times taken on an otherwise idle machine.')
    return [note]


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
        f"- Cells run " + (f"by `{run_info['launcher']} train.py`" if run_info['launcher'] else
                           'in one process through timm_gradattn.engine.train') + '.',
        f"- Grid: {len(run_info['models'])} model(s) x {len(run_info['datasets'])} dataset(s) x "
        f"{len(run_info['seeds'])} seed(s), recipe {run_info.get('recipe', 'paper')}"
        + (f", epochs capped at {run_info['epochs_override']}" if run_info['epochs_override'] else '')
        + f"; {run_info['finished_cells']} of {run_info['planned_cells']} cells finished",
        f"- Wall time: {wall}",
    ])


# --- the study: one protocol for models of every family -----------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Study:
    """A comparison no paper made: ``models`` trained on ``dataset`` under one protocol (train.py ``--recipe``,
    ``epochs`` or None for the recipe's own, any other ``train_flags``), one cell per model and seed; ``seeds`` are
    the default ones (--seeds changes them)."""
    name: str
    dataset: str
    models: Tuple[str, ...]
    recipe: str
    seeds: Tuple[int, ...]
    epochs: Optional[int] = None
    train_flags: Tuple[str, ...] = ()
    description: str = ''

    @property
    def protocol(self) -> Dict[str, Any]:
        """What every cell shares, as its record stores it: a record of another protocol is refused."""
        return dict(dataset=self.dataset, recipe=self.recipe, epochs=self.epochs, train_flags=list(self.train_flags))

    @property
    def length(self) -> Optional[int]:
        """The epochs every cell trains for, as its config.yaml states them (None: the recipe counts updates)."""
        return self.epochs or RECIPES[self.recipe].get('epochs')

    @property
    def command(self) -> str:
        return f'python benchmarks/reproduce.py --study {self.name}'


# The zoo study's recipe, named once: the default job's (Adam 1e-3, cosine to 1e-6, 15 epochs, no early stopping).
ZOO_DIGITS_RECIPE = 'default'
# timm's resnet18 (GradAttn's baseline) is every study's reference; each other family's baseline is its second one.
STUDY_BASELINE = _GRADATTN.baseline
STUDIES: Dict[str, Study] = {study.name: study for study in (
    Study('zoo-digits', 'digits', (STUDY_BASELINE, *MODEL_NAMES), ZOO_DIGITS_RECIPE, seeds=(1, 2, 3),
          description="Every zoo model and timm's resnet18 on digits under one recipe, the default job's: the "
                      "comparison across the three families that none of their papers made."),
    Study('gradattn-fashion-mnist', 'fashion_mnist', MODELS, _GRADATTN.paper_recipe, seeds=(42,), epochs=30,
          description="The GradAttn paper's six models on Fashion-MNIST under its split (train + test pooled, "
                      "70/15/15 with seed 42) and its Table 1 recipe, capped at 30 epochs, with every image "
                      "normalised once: beside the paper's Tables 3 and 9, whose training images were normalised "
                      "twice, and the literature's ResNet-18."),
)}
# timm's results columns (validate.py's, param_count in millions), then the study's own.
STUDY_CSV_COLUMNS = ('model', 'img_size', 'top1', 'top1_err', 'top5', 'top5_err', 'param_count', 'top1_std',
                     'n_seeds', 'gmacs', 'train_img_s', 'peak_rss_mb', 'precision')
# Flags the study sets per cell; after `--` they would change its protocol.
STUDY_CELL_FLAGS = ('--model', '--dataset', '--seed', '--recipe', '--epochs', '--output', '--experiment', '--resume')
PRECISION_NAMES = {'no': 'fp32'}  # Accelerate's mixed_precision 'no' is plain fp32
SEED_SD_RULE = ('a difference of mean top-1 "exceeds SD" when its size is larger than the larger of the two models\' '
                'sample standard deviations over seeds, and is "within SD" otherwise; with 3 seeds this is a coarse '
                'screen against seed noise, not a significance test, and with one seed on either side there is no SD '
                'and no verdict.')


def study_cell_path(folder: Path, model: str, seed: int) -> Path:
    """Where a study cell's light record goes: committed, unlike its run folder."""
    return folder / 'cells' / f'{model}-seed{seed}.json'


@functools.lru_cache(maxsize=None)
def macs_per_image(model: str, in_chans: int, img_size: int, num_classes: int) -> float:
    """GMACs of one forward pass at a cell's input size: benchmarks/speed.py's FlopCounterMode count, halved."""
    import speed  # its torch.compile imports are paid only by the runs that count
    return speed.forward_flops(model, img_size, in_chans=in_chans, num_classes=num_classes)[0] / 2e9


def study_mismatch(study: Study, config: Dict[str, Any], model: str, seed: int) -> Optional[str]:
    """How a run's config.yaml differs from the study's cell (``model``, ``seed``) and protocol, or None."""
    expected = dict(model=model, seed=seed, dataset=study.dataset, recipe=study.recipe, epochs=study.length)
    wrong = [f'{key} {config.get(key)!r} (the study: {value!r})' for key, value in expected.items()
             if config.get(key) != value]
    return ', '.join(wrong) or None


def study_cell_record(study: Study, model: str, seed: int, run_dir: Path) -> Dict[str, Any]:
    """A finished cell's light record, all that the study's outputs are built from: its results.json (less the
    label names), config.yaml, epoch rows, input size, MACs, process wall time and load average."""
    config = yaml.safe_load((run_dir / 'config.yaml').read_text())
    mismatch = study_mismatch(study, config, model, seed)
    if mismatch:
        raise CellFailed(f'{run_dir} was trained with {mismatch}, not as the study\'s cell. Move it away and run '
                         f'again to train the cell.')
    results = json.loads((run_dir / 'results.json').read_text())
    info = get_dataset_info(study.dataset)
    in_chans, img_size = config.get('in_chans') or info.in_chans, config.get('img_size') or info.img_size
    timing_file = run_dir / TIMING_FILE
    timing = json.loads(timing_file.read_text()) if timing_file.is_file() else {}
    epochs = [{key: None if math.isnan(value) else value for key, value in row.items()}
              for row in read_summary_csv(run_dir / 'summary.csv')]
    try:  # where the weights are, for a later step (e.g. Grad-CAM): relative to the repository when inside it
        where = str(run_dir.resolve().relative_to(REPO))
    except ValueError:
        where = str(run_dir)
    return dict(
        study=study.name, model=model, seed=seed, protocol=study.protocol, img_size=img_size, in_chans=in_chans,
        gmacs=macs_per_image(model, in_chans, img_size, results['num_classes']),
        results={key: value for key, value in results.items() if key != 'label_names'},
        epochs=epochs, config=config, wall_time_s=timing.get('train_s'), load_average_5_min=timing.get(LOAD_KEY),
        # None: trained outside the study's runner, so unknown (config holds the settings either way)
        extra_train_args=timing.get(EXTRA_FLAGS_KEY), run_dir=where)


def read_study_records(folder: Path, study: Study) -> List[Dict[str, Any]]:
    """Every cell record under ``folder``/cells; one of another study or protocol is an error, not skipped."""
    records = []
    for path in sorted((folder / 'cells').glob('*.json')):
        record = json.loads(path.read_text())
        check_study_record(record, study, path)
        records.append(record)
    return records


def check_study_record(record: Dict[str, Any], study: Study, path: Path) -> None:
    """Refuse a record of another study, protocol or model list, saying what to do (UserError)."""
    if record.get('study') != study.name or record.get('protocol') != study.protocol:
        raise UserError(f'{path} is a cell of study {record.get("study")!r} with protocol {record.get("protocol")}, '
                        f'not of {study.name!r} with {study.protocol}: delete it (and its run folder) to train the '
                        f'cell again, or restore the study\'s definition in STUDIES.')
    if record['model'] not in study.models:
        raise UserError(f'{path}: {record["model"]} is not a model of study {study.name} '
                        f'({", ".join(study.models)}); delete the record or add the model to the study.')


def seed_sd_verdict(ours: Dict[str, Any], baseline: Dict[str, Any]) -> Dict[str, Any]:
    """Our mean top-1 against a baseline's (``stats`` records): the difference, the larger seed SD and whether the
    difference exceeds it (None without an SD on both sides); SEED_SD_RULE says why this rule."""
    diff = ours['mean'] - baseline['mean']
    if ours['std'] is None or baseline['std'] is None:
        return dict(diff=diff, sd=None, exceeds=None)
    sd = max(ours['std'], baseline['std'])
    return dict(diff=diff, sd=sd, exceeds=abs(diff) > sd)


def _study_family(model: str) -> Family:
    """The family a model is compared within: its own, or the one it is the baseline of (resnet18: GradAttn)."""
    return family_of(model) or next((f for f in REGISTRY.values() if f.baseline == model), _GRADATTN)


def _agreed(values: Sequence[Any]) -> Any:
    """The one value the cells share, else all of them joined by '/' (the table shows that they differ)."""
    distinct = list(dict.fromkeys(values))
    return distinct[0] if len(distinct) == 1 else '/'.join(map(str, distinct))


def _over_seeds(values: Sequence[Optional[float]], seeds: Sequence[int]) -> Optional[Dict[str, Any]]:
    """``stats`` of the values a cell recorded (older results.json files lack some)."""
    kept = [(seed, value) for seed, value in zip(seeds, values) if value is not None]
    return stats([value for _, value in kept], [seed for seed, _ in kept])


def study_rows(study: Study, records: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One row per study model, in the study's order: means and SDs over its recorded seeds (only ``n_seeds`` 0
    where none is recorded) and its difference from resnet18 and from its family's baseline."""
    rows = []
    for model in study.models:
        cells = sorted((r for r in records if r['model'] == model), key=lambda r: r['seed'])
        seeds = [cell['seed'] for cell in cells]
        row: Dict[str, Any] = dict(model=model, family=_study_family(model), seeds=seeds, n_seeds=len(cells))
        if cells:
            results = [cell['results'] for cell in cells]
            row.update(
                img_size=_agreed([cell['img_size'] for cell in cells]),
                top1=stats([r['top1'] for r in results], seeds), top5=stats([r['top5'] for r in results], seeds),
                top1_last_epoch=_over_seeds([r.get(LAST_EPOCH_KEY, {}).get('top1') for r in results], seeds),
                param_count=results[0]['num_params'] / 1e6, gmacs=cells[0]['gmacs'],
                train_img_s=_over_seeds([r.get('train_img_s') for r in results], seeds),
                peak_rss_mb=_over_seeds([r.get('peak_rss_mb') for r in results], seeds),
                precision=_agreed([PRECISION_NAMES.get(p, p) for p in
                                   (r.get('mixed_precision', r['machine'].get('mixed_precision')) for r in results)]),
                wall_time_s=_over_seeds([cell['wall_time_s'] for cell in cells], seeds),
                train_time_s=stats([sum(e['epoch_time_s'] for e in cell['epochs']) for cell in cells], seeds),
                epochs_run=stats([r['epochs_run'] for r in results], seeds))
        rows.append(row)
    by_model = {row['model']: row for row in rows if row['n_seeds']}
    for row in rows:
        for key, baseline in (('vs_study_baseline', STUDY_BASELINE), ('vs_family_baseline', row['family'].baseline)):
            compared = row['n_seeds'] and baseline in by_model and baseline != row['model']
            if key == 'vs_family_baseline' and baseline == STUDY_BASELINE:
                compared = False  # GradAttn's baseline is the study's: one comparison, in the first column
            row[key] = dict(seed_sd_verdict(row['top1'], by_model[baseline]['top1']), baseline=baseline) \
                if compared else None
    return rows


def _rounded(value: Optional[float], digits: int) -> Optional[float]:
    return None if value is None else round(value, digits)


def study_csv_rows(rows: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The rows of results-<dataset>.csv: timm's columns and roundings (validate.py: accuracies to 4 decimals,
    parameters in millions to 2), best top-1 first as timm's results files are; models without a cell left out."""
    finished = sorted((r for r in rows if r['n_seeds']), key=lambda r: (-r['top1']['mean'], r['model']))
    return [dict(
        model=r['model'].split('.', 1)[0], img_size=r['img_size'],
        top1=round(r['top1']['mean'], 4), top1_err=round(100 - r['top1']['mean'], 4),
        top5=round(r['top5']['mean'], 4), top5_err=round(100 - r['top5']['mean'], 4),
        param_count=round(r['param_count'], 2), top1_std=_rounded(r['top1']['std'], 4), n_seeds=r['n_seeds'],
        gmacs=round(r['gmacs'], 4),
        train_img_s=_rounded(r['train_img_s'] and r['train_img_s']['mean'], 1),
        peak_rss_mb=_rounded(r['peak_rss_mb'] and r['peak_rss_mb']['mean'], 1), precision=r['precision'],
    ) for r in finished]


def published_top1(dataset: str, model: str) -> Optional[Tuple[float, str]]:
    """(top-1 %, family key) a paper of the zoo published for ``model`` on ``dataset``, or None."""
    for table in (3, 9):
        figure = paper_figure(table, 'top1', dataset, model)
        if figure is not None:
            return figure, 'gradattn'
    figure = families_paper.cnntention_figure(dataset, model)
    if figure is not None:
        return figure, 'cnntention'
    error = families_paper.attention_shortcuts_figure(dataset, model)
    return (100.0 - error[0], 'attention-shortcuts') if error is not None else None


# What a reader must know about each paper's figures beside a study's.
_PUBLISHED_NOTES = {
    'gradattn': f'{PAPER_CITATION}, Tables 3 and 9. {PAPER_NOTES[3]}',
    'cnntention': f'{families_paper.CNNTENTION_CITATION}. {families_paper.CNNTENTION_NOTES[0]}',
    'attention-shortcuts': f'{families_paper.ATTENTION_SHORTCUTS_CITATION}, as 100 - test error. '
                           f'{families_paper.ATTENTION_SHORTCUTS_NOTES[0]}',
}


def _mean_sd(summary: Optional[Dict[str, Any]], digits: int = 2, scale: float = 1.0) -> str:
    if not summary:
        return '—'
    text = f'{summary["mean"] / scale:.{digits}f}'
    return text + (f' ± {summary["std"] / scale:.{digits}f}' if summary['std'] is not None else '')


def _versus_text(versus: Optional[Dict[str, Any]]) -> str:
    if versus is None:
        return '—'
    text = f'{versus["diff"]:+.2f}'
    if versus['exceeds'] is None:
        return f'{text} (no SD: 1 seed)'
    return f'{text} ({"exceeds" if versus["exceeds"] else "within"} SD {versus["sd"]:.2f})'


def _minutes(seconds: float) -> str:
    return f'{seconds / 60:.1f} min' if seconds < 3600 else f'{seconds / 3600:.2f} h'


def study_markdown(study: Study, rows: Sequence[Dict[str, Any]], records: Sequence[Dict[str, Any]],
                   folder: Path) -> str:
    """results-<dataset>.md: the table with the papers' figures and the seed-SD verdicts, the cells, the machine."""
    dataset = study.dataset
    finished = [r for r in rows if r['n_seeds']]
    published = {r['model']: published_top1(dataset, r['model']) for r in rows}
    literature = {r['model']: literature_figure(dataset, r['model']) for r in rows}
    family_column = any(r['family'].baseline != STUDY_BASELINE for r in rows)  # a second family in the study
    header = ['model', 'family', 'top-1 (%)', 'seeds', 'top-5 (%)', f'Δ top-1 vs {STUDY_BASELINE}']
    header += ['Δ top-1 vs family baseline'] if family_column else []
    header += ['GMACs', 'params (M)', 'train img/s', 'peak RSS (MB)', 'precision', 'wall time / cell']
    extra = (['paper'] if any(published.values()) else []) + (['literature'] if any(literature.values()) else [])
    header += extra
    table = []
    for r in rows:
        family = r['family'].title + (' (baseline)' if r['model'] == r['family'].baseline else '')
        if not r['n_seeds']:
            line = [r['model'], family, 'not run yet'] + ['—'] * (len(header) - 3 - len(extra))
        else:
            line = [r['model'], family, _mean_sd(r['top1']), r['n_seeds'], _mean_sd(r['top5']),
                    _versus_text(r['vs_study_baseline'])]
            line += [_versus_text(r['vs_family_baseline'])] if family_column else []
            wall = _minutes(r['wall_time_s']['mean']) if r['wall_time_s'] else '—'
            line += [f'{r["gmacs"]:.4f}', f'{r["param_count"]:.3f}', _mean_sd(r['train_img_s'], 0),
                     _mean_sd(r['peak_rss_mb'], 0), r['precision'], wall]
        if 'paper' in header:
            figure = published[r['model']]
            line.append(f'{figure[0]:.2f} ({REGISTRY[figure[1]].title})' if figure else 'n/a')
        if 'literature' in header:
            line.append(f'{literature[r["model"]][0]:.1f}' if literature[r['model']] else 'n/a')
        table.append(line)

    epochs = f' --epochs {study.epochs}' if study.epochs else ''
    flags = f' {" ".join(study.train_flags)}' if study.train_flags else ''
    planned = len(study.models) * len(study.seeds)
    lines = [f'# Study {study.name}: {dataset}', '', study.description, '',
             f'- Protocol: `train.py --dataset {dataset} --recipe {study.recipe}{epochs}{flags}` for every cell, each '
             f'cell its own train.py process; default seeds {", ".join(map(str, study.seeds))}.',
             f'- Command: `{study.command}` (resumable cell by cell; `--aggregate-only` rebuilds these files from '
             f'`cells/`).',
             f'- Cells recorded: {len(records)} ({planned} planned: {len(study.models)} models x {len(study.seeds)} '
             f'seeds); models finished: {len(finished)} of {len(study.models)}.', '']
    if finished:
        lines += [f'![top-1 against cost](results-{dataset}.png)', '']
    lines += [markdown_table(header, table), '']
    lines += [f'- {note}' for note in _study_notes(study, rows, records, published, literature)]
    lines += ['', '## Cells', '']
    cell_rows = []
    for record in sorted(records, key=lambda r: (study.models.index(r['model']), r['seed'])):
        results = record['results']
        last = results.get(LAST_EPOCH_KEY, {}).get('top1')
        cell_rows.append([
            record['model'], record['seed'], f'{results["top1"]:.2f}', '—' if last is None else f'{last:.2f}',
            f'{results["best_epoch"]} of {results["epochs_run"]}',
            '—' if results.get('train_img_s') is None else f'{results["train_img_s"]:.0f}',
            '—' if results.get('peak_rss_mb') is None else f'{results["peak_rss_mb"]:.0f}',
            '—' if record['wall_time_s'] is None else _minutes(record['wall_time_s']),
            '—' if record['load_average_5_min'] is None else f'{record["load_average_5_min"]:.1f}'])
    if cell_rows:
        lines.append(markdown_table(['model', 'seed', 'top-1 (%)', 'last epoch top-1 (%)', 'best epoch',
                                     'train img/s', 'peak RSS (MB)', 'wall time', 'load (5 min)'], cell_rows))
    else:
        lines.append('No cell finished yet.')
    timed = [r['wall_time_s'] for r in records if r['wall_time_s'] is not None]
    if timed:
        lines += ['', f'Wall time in all: {_minutes(sum(timed))} over {len(timed)} cell(s) (each cell\'s train.py '
                      f'processes, start to exit, summed over resumptions).']
    machines = collections.Counter(machine_line(r['results']['machine']) for r in records)
    lines += ['', '## Machine', '']
    lines += [f'- {line} ({count} cell(s))' for line, count in machines.items()] or ['- none yet']
    lines += ['', '## Grad-CAM', '']
    cam = f'cam-{dataset}.png'
    if (folder / cam).is_file():
        lines.append(f'![Grad-CAM across models]({cam})')
    else:
        lines.append(f'Not drawn yet: a later step writes `{cam}` beside these files from the cells\' weights '
                     f'(`<runs-dir>/{dataset}/<model>/seed<S>/hub`, not committed), and `--aggregate-only` links it '
                     f'here.')
    return '\n'.join(lines) + '\n'


def _study_notes(study: Study, rows, records, published, literature) -> List[str]:
    notes = [f'top-1 / top-5: test split, best validation epoch\'s weights; mean ± sample SD over seeds (the '
             f'cells below also give the last epoch\'s). Δ: in points. Seed-SD rule: {SEED_SD_RULE}',
             'GMACs: multiply-accumulates of one forward pass at the cell\'s input (torch FlopCounterMode FLOPs / 2, '
             'counted as benchmarks/speed.py counts them). train img/s: training images a second over the training '
             'loops; peak RSS: the cell process\'s peak resident memory; wall time: the cell\'s train.py process(es), '
             'start to exit, summed over resumptions.']
    sources = sorted({figure[1] for figure in published.values() if figure})
    if sources:
        notes += [f'Paper: {_PUBLISHED_NOTES[key]}' for key in sources]
        notes.append(f'Training length: the paper\'s {" / ".join(REGISTRY[k].length for k in sources)}; ours at most '
                     f'{study.length} epochs.')
    else:
        notes.append(f'No paper of the zoo publishes figures on {study.dataset} (GradAttn: '
                     f'benchmarks/paper_results.py; CNNtention, Attention Shortcuts: '
                     f'benchmarks/paper_results_families.py), so ours stand alone.')
    for model, anchor in literature.items():
        if anchor:
            notes.append(f'Literature, {model}: {anchor[0]} % ({anchor[1]}).')
    extra = [f'{r["model"]} seed {r["seed"]}: {" / ".join(shlex.join(flags) for flags in r["extra_train_args"])}'
             for r in records if any(r.get('extra_train_args') or [])]
    if extra:
        notes.append('Cells trained with train.py flags beyond the protocol (after `--`): ' + '; '.join(extra) + '.')
    differing = _differing_settings(records)
    if differing:
        notes.append('Settings that differ between cells (compare with care): ' + '; '.join(
            f'{key}: {", ".join(map(str, values))}' for key, values in differing.items()) + '.')
    cores = [r['results']['machine'].get('cpu_count') for r in records if r['results']['machine'].get('cpu_count')]
    loads = [r['load_average_5_min'] for r in records if r['load_average_5_min'] is not None]
    if cores and loads:
        notes += _load_notes(dict(cores=min(cores), cell_loads=loads, run_load=None))
    return notes


def _differing_settings(records: Sequence[Dict[str, Any]]) -> Dict[str, List[Any]]:
    """config.yaml settings (other than model and seed) and precisions that are not the same in every cell."""
    values: Dict[str, List[Any]] = {}
    for record in records:
        settings = dict(record['config'], mixed_precision=record['results'].get('mixed_precision'),
                        img_size=record['img_size'])
        for key, value in settings.items():
            if key not in ('model', 'seed'):
                values.setdefault(key, [])
                if value not in values[key]:
                    values[key].append(value)
    return {key: found for key, found in values.items() if len(found) > 1}


def plot_study(study: Study, rows: Sequence[Dict[str, Any]], path: Path) -> Optional[Path]:
    """Top-1 (mean, SD error bars) against forward GMACs and against training time, both log scale; one colour per
    family, baselines as squares, every point labelled. None when no cell has finished."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    finished = [r for r in rows if r['n_seeds']]
    if not finished:
        return None
    colours = {key: colormaps['tab10'](index) for index, key in enumerate(REGISTRY)}
    fig = Figure(figsize=(13, 5.5), dpi=120, layout='constrained')
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=True)
    panels = ((lambda r: r['gmacs'], 'forward GMACs per image (log scale)'),
              (lambda r: r['train_time_s']['mean'] / 60, 'training time per cell, minutes (log scale)'))
    for ax, (x_of, label) in zip(axes, panels):
        for r in finished:
            x, y = x_of(r), r['top1']['mean']
            ax.errorbar(x, y, yerr=r['top1']['std'] or 0.0, fmt='s' if r['model'] == r['family'].baseline else 'o',
                        color=colours[r['family'].key], capsize=3, markersize=6)
            ax.annotate(r['model'], (x, y), textcoords='offset points', xytext=(4, 3), fontsize=6)
        ax.set_xscale('log')
        ax.set_xlabel(label)
        ax.grid(alpha=0.3, which='both')
    axes[0].set_ylabel('test top-1 (%), mean ± SD over seeds')
    shown = dict.fromkeys(r['family'].key for r in finished)
    handles = [Line2D([], [], color=colours[key], marker='o', linestyle='', label=REGISTRY[key].title) for key in shown]
    handles.append(Line2D([], [], color='grey', marker='s', linestyle='', label='family baseline'))
    axes[1].legend(handles=handles, fontsize=8, loc='lower right')
    fig.suptitle(f'Study {study.name}: {study.dataset}, train.py --recipe {study.recipe}'
                 + (f' --epochs {study.epochs}' if study.epochs else ''))
    buffer = io.BytesIO()
    fig.savefig(buffer, format='png', facecolor='white')
    atomic_write_bytes(path, buffer.getvalue())
    return path


def write_study_outputs(study: Study, folder: Path) -> List[Path]:
    """results-<dataset>.csv, .md and .png from the committed cell records alone; returns the files written."""
    records = read_study_records(folder, study)
    rows = study_rows(study, records)
    folder.mkdir(parents=True, exist_ok=True)
    base = folder / f'results-{study.dataset}'
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=STUDY_CSV_COLUMNS, lineterminator='\n')
    writer.writeheader()
    writer.writerows(study_csv_rows(rows))
    atomic_write_text(base.with_suffix('.csv'), buffer.getvalue())
    plot = plot_study(study, rows, base.with_suffix('.png'))
    atomic_write_text(base.with_suffix('.md'), study_markdown(study, rows, records, folder))
    return [base.with_suffix('.csv'), base.with_suffix('.md')] + ([plot] if plot else [])


def run_study(options: argparse.Namespace) -> bool:
    """Train (or reuse) the study's cells one by one, each as its own train.py process, record each finished cell
    and rebuild the outputs after it; True when a cell failed or the dataset is missing."""
    study, folder = options.study, options.output
    if options.aggregate_only:
        written = write_study_outputs(study, folder)
        print(f'Study {study.name}: rebuilt {", ".join(str(p) for p in written)} from {folder / "cells"}.')
        return False
    read_study_records(folder, study)  # a record of another protocol stops the study here, before any training
    cells = [(seed, model) for seed in options.seeds for model in options.models]
    print(f'Study {study.name}: {len(options.models)} model(s) x {len(options.seeds)} seed(s) on {study.dataset}, '
          f'train.py --recipe {study.recipe}' + (f' --epochs {study.epochs}' if study.epochs else '')
          + f'; records in {folder / "cells"}', flush=True)
    launcher = options.launcher or shlex.join([sys.executable])
    if options.extra_train_args:
        print(f'note: {shlex.join(options.extra_train_args)} (after `--`) is outside the study\'s protocol; each cell '
              f'trained now records it and results-{study.dataset}.md names those cells.', flush=True)
    failed: Dict[str, str] = {}
    checked = False
    for index, (seed, model) in enumerate(cells, 1):
        name = f'[{index}/{len(cells)}] {study.name} / {model} / seed {seed}'
        record_path = study_cell_path(folder, model, seed)
        if record_path.is_file():
            print(f'{name}: recorded earlier, reusing {record_path}', flush=True)
            continue
        run_dir = cell_dir(options.runs_dir, study.dataset, model, seed)
        state = cell_state(run_dir)
        try:
            if state == 'foreign':
                raise CellFailed(f'{run_dir} holds files but no config.yaml, so it is not a train.py run. Move it '
                                 f'away and run again.')
            if state == 'done':
                print(f'{name}: finished earlier, recording {run_dir / "results.json"}', flush=True)
            else:
                if not checked:
                    check_dataset(study.dataset, options)
                    checked = True
                print(f'{name}: ' + (f'resuming the partial run in {run_dir}' if state == 'partial'
                                     else f'training into {run_dir}'), flush=True)
                argv = train_argv(model, study.dataset, seed, run_dir, options, resume=state == 'partial')
                start = time.perf_counter()
                try:
                    train_with_launcher(argv, launcher)
                finally:
                    _record_time(run_dir, 'train_s', time.perf_counter() - start)
                    _record_extra_flags(run_dir, options.extra_train_args)
                _record_load(run_dir)
            record = study_cell_record(study, model, seed, run_dir)
        except DatasetMissing as error:
            print(f'SKIPPED study {study.name}: the files of {study.dataset} are missing. {error} (reproduce.py '
                  f'passes flags after `--` to train.py, e.g. `-- --download`.)', flush=True)
            return True
        except CellFailed as error:
            failed[f'{model}/seed{seed}'] = str(error)
            print(f'{name}: FAILED: {error}', flush=True)
            continue
        record_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(record_path, json.dumps(record, indent=1))
        print(f'{name}: recorded {record_path} (commit it; the run folder {run_dir} stays out of git)', flush=True)
        write_study_outputs(study, folder)  # the outputs grow as the cells finish
    written = write_study_outputs(study, folder)
    print(f'Study {study.name}: wrote {", ".join(str(p) for p in written)}'
          + (f'; {len(failed)} cell(s) failed: {", ".join(failed)}' if failed else ''))
    return bool(failed)


# --- command line ------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train a grid of models x datasets under a paper's protocol and write its tables next to the "
                    "paper's figures. Flags after a bare `--` are passed to train.py for every cell.")
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
    study = parser.add_argument_group(
        'study', 'One named protocol for models of every family, cell by cell, each cell its own train.py process; '
                 'light per-cell records and results-<dataset>.csv/.md/.png go to --output (default '
                 'benchmarks/results/study)/<dataset>, run folders to --runs-dir (default output/study). --models and '
                 '--seeds narrow a run to a batch of cells; --launcher replaces `python` before train.py.')
    study.add_argument('--study', default=None, choices=STUDIES,
                       help='; '.join(f'{s.name}: {s.dataset}, {len(s.models)} models, --recipe {s.recipe}'
                                      + (f' --epochs {s.epochs}' if s.epochs else '')
                                      + f', seeds {" ".join(map(str, s.seeds))}' for s in STUDIES.values()) + '.')
    study.add_argument('--aggregate-only', action='store_true',
                       help="Train nothing: rebuild the study's results files from its committed cell records.")
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
    if os.environ.get('WORLD_SIZE', '1') != '1':
        # The engine's train() owns its process group (it ends it when the job ends), so one process cannot
        # run a second cell inside a launch; each cell gets a launch of its own instead.
        parser.error('run reproduce.py as a single process and let it launch every cell: python '
                     'benchmarks/reproduce.py --launcher "accelerate launch --multi_gpu --num_processes N" ...')
    if options.study:
        return _study_options(parser, options)
    if options.aggregate_only:
        parser.error("--aggregate-only rebuilds a study's outputs: add --study NAME (a grid's tables are rewritten "
                     "with --tables-only).")
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


def _study_options(parser: argparse.ArgumentParser, options: argparse.Namespace) -> argparse.Namespace:
    """The command line of a study: its cells (--models, --seeds: the study's by default) and folders; what the
    study fixes may not be given."""
    study = STUDIES[options.study]
    fixed = [flag for flag, value in (('--family', options.family), ('--recipe', options.recipe),
                                      ('--datasets', options.datasets), ('--epochs', options.epochs),
                                      ('--quick', options.quick), ('--tables-only', options.tables_only))
             if value] + [f'{flag} after `--`' for flag in STUDY_CELL_FLAGS if flag in options.train_args]
    if fixed:
        parser.error(f'--study {study.name} fixes the dataset and protocol of every cell ({study.dataset}, --recipe '
                     f'{study.recipe}' + (f' --epochs {study.epochs}' if study.epochs else '') + f'); drop '
                     f'{", ".join(fixed)}. --models and --seeds choose the cells; another protocol is another '
                     f'entry in STUDIES (benchmarks/reproduce.py).')
    outside = [model for model in options.models or () if model not in study.models]
    if outside:
        parser.error(f'--models: {", ".join(outside)} is not in study {study.name}, whose models are '
                     f'{", ".join(study.models)}.')
    options.study = study
    options.models = [model for model in study.models if model in (options.models or study.models)]
    options.seeds = list(dict.fromkeys(options.seeds or study.seeds))
    options.recipe, options.epochs = study.recipe, study.epochs
    options.extra_train_args = list(options.train_args)
    options.train_args = [*study.train_flags, *options.train_args]
    options.output = Path(options.output or RESULTS_DIR / 'study') / study.dataset
    options.runs_dir = Path(options.runs_dir or REPO / 'output' / 'study')
    options.grids = []
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
    if options.study:
        try:
            return 1 if run_study(options) else 0
        except UserError as error:  # a cell record of another protocol: say which and what to do
            print(f'reproduce.py: error: {error}', file=sys.stderr)
            return 2
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
