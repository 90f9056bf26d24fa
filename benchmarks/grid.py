"""What the papers' grids (``reproduce.py``) and the study across the families (``study.py``) share: where a cell's
run folder is and what state it is in, the ``train.py`` command line of a cell, training it in this process or as a
launch of its own, the dataset check before a launch, the timing and load records beside its run, the splits and
weights of a finished run, and the mean ± SD over seeds.

A cell is one model trained on one dataset with one seed, in ``<runs-dir>/<dataset>/<model>/seed<S>/``.
"""
import argparse
import functools
import gc
import json
import os
import shlex
import statistics
import subprocess
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

import timm
from timm_gradattn.data import DataSplits, DatasetNotFoundError, build_datasets
from timm_gradattn.errors import UserError
from timm_gradattn.files import atomic_write_text
from timm_gradattn.reporting import load_average

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = Path(__file__).resolve().parent / 'results'
TIMING_FILE = 'reproduce_timing.json'
LOAD_KEY = 'load_average_5_min_after_training'
# results.json's test metrics of the last epoch's weights (the top level holds the best validation epoch's).
LAST_EPOCH_KEY = 'test_last_epoch'


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


def refuse_inside_launch(parser: argparse.ArgumentParser, script: str) -> None:
    """A grid launches every cell itself; inside a launch each of its processes would train the whole grid."""
    if os.environ.get('WORLD_SIZE', '1') != '1':
        # The engine's train() owns its process group (it ends it when the job ends), so one process cannot
        # run a second cell inside a launch; each cell gets a launch of its own instead.
        parser.error(f'run {script} as a single process and let it launch every cell: python '
                     f'benchmarks/{script} --launcher "accelerate launch --multi_gpu --num_processes N" ...')


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
    """With a launcher the data error would surface in a child process: look for the files here first."""
    try:
        build_datasets(dataset, data_dir=options.data_dir, download='--download' in options.train_args)
    except DatasetNotFoundError as error:
        raise DatasetMissing(str(error)) from error


def update_timing(run_dir: Path, change: Callable[[Dict[str, Any]], None]) -> None:
    """Apply ``change`` to the cell's TIMING_FILE (its wall times, load and flags, kept beside its run)."""
    file = run_dir / TIMING_FILE
    timing = json.loads(file.read_text()) if file.is_file() else {}
    change(timing)
    atomic_write_text(file, json.dumps(timing))


def record_time(run_dir: Path, key: str, seconds: float) -> None:
    """Add to a cell's wall time (summed over the invocations that worked on it)."""
    if run_dir.is_dir():  # a skipped dataset leaves no run folder
        update_timing(run_dir, lambda timing: timing.update({key: timing.get(key, 0.0) + seconds}))


def record_load(run_dir: Path) -> None:
    """How busy the machine was while the cell trained: other jobs slow its epochs down."""
    load = load_average()
    if load is not None:
        update_timing(run_dir, lambda timing: timing.update({LOAD_KEY: load[1]}))


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def load_notes(cores: int, cell_loads: Sequence[float], run_load: Optional[Sequence[float]] = None) -> List[str]:
    """Whether other jobs shared the machine while the cells trained (then times do not compare models): from the
    cells' 5-minute loads, else from the 1/5/15-minute ``run_load`` when the tables were written."""
    if cell_loads:
        # Taken while the cell trained, so it counts the cell's own threads (one per core by default): only what
        # goes beyond them is another job.
        loads, when, busy = list(cell_loads), 'over the 5 minutes before each cell finished training', cores + 0.5
    elif run_load:
        loads, when, busy = [run_load[2]], 'over the 15 minutes before the tables were written', cores / 2
    else:
        return []
    note = f'Load average {when}: {min(loads):.1f}' + (f' to {max(loads):.1f}' if len(loads) > 1 else '') + \
        f' on {cores} cores' + (' (a training cell alone makes about one per core).' if cell_loads else '.')
    if max(loads) > busy:
        note += (' Other jobs shared the machine: these times measure the contention as much as the models, '
                 'so compare models only on times taken on an otherwise idle machine.')
    return [note]


def stats(values: Sequence[Optional[float]], seeds: Sequence[int]) -> Optional[Dict[str, Any]]:
    """Mean and sample standard deviation over the seeds that recorded a value (std None for one seed; a run records
    None where a figure does not apply, e.g. top-5 on 5 classes or fewer); None if none did."""
    seeds = [seed for seed, value in zip(seeds, values) if value is not None]
    values = [value for value in values if value is not None]
    if not values:
        return None
    return dict(mean=statistics.fmean(values), std=statistics.stdev(values) if len(values) > 1 else None,
                n=len(values), values=list(values), seeds=list(seeds))


# --- a finished run ----------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)  # a grid walks one dataset and seed at a time; its splits are built once
def _splits(dataset: str, data_dir: Optional[str], protocol: str, seed: int, img_size: Optional[int],
            in_chans: Optional[int]) -> DataSplits:
    return build_datasets(dataset, data_dir=data_dir, protocol=protocol, seed=seed, img_size=img_size,
                          in_chans=in_chans)


def run_splits(config: Dict[str, Any], data_dir: Optional[str] = None) -> DataSplits:
    """The splits a run trained and was tested on, as its config.yaml states them: the seed is the split's too, so
    runs of the same dataset with different seeds have different test images. ``data_dir`` replaces the run's."""
    return _splits(config['dataset'], data_dir or config.get('data_dir'), config.get('protocol', 'paper'),
                   config['seed'], config.get('img_size'), config.get('in_chans'))


def load_run_model(run_dir: Path) -> torch.nn.Module:
    """A finished run's best weights, from the hub/ export train.py writes before results.json, on the GPU if any
    (any import from timm_gradattn has registered its models with timm)."""
    model = timm.create_model(f'local-dir:{run_dir / "hub"}', pretrained=True)
    return model.to(torch.device('cuda' if torch.cuda.is_available() else 'cpu'))
