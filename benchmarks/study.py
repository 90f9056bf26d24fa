#!/usr/bin/env python3
"""A study across the families: one protocol for models of every family, a comparison none of the papers made.

A study is an entry of ``STUDIES`` (dataset, models, recipe, epochs, default seeds). Each cell (a model and a seed) is
its own ``python train.py`` process (so the peak memory in its results.json is its own). Each finished cell leaves a
light record to commit, ``<output>/<dataset>/cells/<model>-seed<S>.json`` (results.json less the label names,
config.yaml, the epoch rows, MACs per image, process wall time, load average), and ``results-<dataset>.csv`` (timm's
results columns and the study's), ``.md`` (the table beside the papers' figures, whether each difference from
resnet18 and from the family's baseline exceeds the seed SD, the cells, the machine) and ``.png`` (top-1 against MACs
and training time) are rebuilt from those records alone. ``--models`` and ``--seeds`` run a batch of cells; a recorded
cell is reused, a finished run folder recorded, a partial one resumed:

    python benchmarks/study.py zoo-digits                          # 16 models x seeds 1 2 3, recipe default
    python benchmarks/study.py zoo-digits --models resnet18 --seeds 1
    python benchmarks/study.py gradattn-fashion-mnist --data-dir data -- --download
    python benchmarks/study.py zoo-digits --aggregate-only         # the outputs from the committed records

Flags after a bare ``--`` go to train.py for every cell and are recorded with it. ``--launcher`` replaces ``python``
before train.py (e.g. ``accelerate launch --num_processes 2``).

After the cells (and with ``--aggregate-only``), ``--cam N`` (default 8; 0: none) draws ``cam-<dataset>.png``: Grad-CAM
over the first N test images of the lowest recorded seed's split, a row per model whose run folder for that seed is
still there (its hub/ export), each at the layer ``timm_gradattn.analysis.cam_target_layers`` picks; the layers and
predictions go to ``cam-<dataset>.json`` beside it, which the Markdown reads. The seed also seeds the split, so the
grid shows one seed's models on that seed's test images. Needs grad-cam (``pip install "timm-gradattn[cam]"``).

The run folders (weights, resumable checkpoints) go to ``--runs-dir`` (default ``output/study``, git-ignored).
"""
import argparse
import collections
import csv
import dataclasses
import functools
import io
import json
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import yaml
from torch.utils.data import DataLoader

from timm_gradattn.analysis import class_activation_maps, import_grad_cam
from timm_gradattn.data import DatasetNotFoundError, get_dataset_info
from timm_gradattn.errors import UserError
from timm_gradattn.families import FAMILIES as REGISTRY
from timm_gradattn.families import MODEL_NAMES, RECIPES, Family, family_of
from timm_gradattn.files import atomic_write_bytes, atomic_write_text
from timm_gradattn.plots import plot_cam_grid
from timm_gradattn.reporting import machine_line, markdown_table, read_summary_csv
from timm_gradattn.settings import recipe_values

sys.path.insert(0, str(Path(__file__).resolve().parent))
from grid import (LAST_EPOCH_KEY, LOAD_KEY, REPO, RESULTS_DIR, TIMING_FILE, CellFailed, DatasetMissing,  # noqa: E402
                  cell_dir, cell_state, check_dataset, load_notes, load_run_model, record_load, record_time,
                  refuse_inside_launch, release_memory, run_splits, stats, train_argv, train_with_launcher,
                  update_timing)
from paper_results import PAPER_CITATION, PAPER_NOTES, literature_figure, paper_figure  # noqa: E402
import paper_results_families as families_paper  # noqa: E402

_GRADATTN = REGISTRY['gradattn']
EXTRA_FLAGS_KEY = 'extra_train_args'  # a cell's flags after `--`, per invocation
CAM_IMAGES = 8


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
        return f'python benchmarks/study.py {self.name}'


# The zoo study's recipe, named once: the default job's as it was when the study began (Adam 1e-3, cosine to 1e-6,
# 12 epochs, label smoothing 0.1, no early stopping). The default recipe has since moved to Adam 5e-4; the study
# keeps 1e-3, so that its cells stay comparable.
ZOO_DIGITS_RECIPE = 'default'
ZOO_DIGITS_FLAGS = ('--lr', '1e-3')
# timm's resnet18 (GradAttn's baseline) is every study's reference; each other family's baseline is its second one.
STUDY_BASELINE = _GRADATTN.baseline
STUDIES: Dict[str, Study] = {study.name: study for study in (
    Study('zoo-digits', 'digits', (STUDY_BASELINE, *MODEL_NAMES), ZOO_DIGITS_RECIPE, seeds=(1, 2, 3),
          train_flags=ZOO_DIGITS_FLAGS,
          description="Every zoo model and timm's resnet18 on digits under one recipe, the default job's as the study "
                      "began (Adam 1e-3): the comparison across the three families that none of their papers made."),
    Study('gradattn-fashion-mnist', 'fashion_mnist', (STUDY_BASELINE, *_GRADATTN.models), _GRADATTN.paper_recipe,
          seeds=(42,), epochs=30,
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
    """How a run's config.yaml differs from the study's cell (``model``, ``seed``) and protocol, or None.

    The protocol's values are compared, not only its recipe's name: every value the recipe sets, as the study's
    flags leave it, so a recipe changed since the study began cannot slip a cell of another protocol in."""
    expected = recipe_values(['--model', model, '--dataset', study.dataset, '--recipe', study.recipe,
                              *study.train_flags])
    expected.update(model=model, seed=seed, dataset=study.dataset, recipe=study.recipe, epochs=study.length)
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
        top5=_rounded(r['top5'] and r['top5']['mean'], 4), top5_err=_rounded(r['top5'] and 100 - r['top5']['mean'], 4),
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
    lines += ['', '## Grad-CAM', ''] + _cam_section(folder, dataset)
    return '\n'.join(lines) + '\n'


def _cam_section(folder: Path, dataset: str) -> List[str]:
    """The Grad-CAM grid, and from cam-<dataset>.json which images, and which layer each model was read at."""
    picture, facts = cam_paths(folder, dataset)
    if not picture.is_file():
        return [f'Not drawn yet: `--cam N` (8 by default, after the cells and with `--aggregate-only`) draws '
                f'`{picture.name}` beside these files from the run folders of the lowest recorded seed '
                f'(`<runs-dir>/{dataset}/<model>/seed<S>/hub`, not committed).']
    lines = [f'![Grad-CAM across models]({picture.name})']
    if not facts.is_file():
        return lines
    cam = json.loads(facts.read_text())
    count = len(cam['indices'])
    lines += ['', f'The first {count} images of seed {cam["seed"]}\'s {cam["split"]} split (the seed draws the split '
                  f'too, so the other seeds\' test images differ); each map explains the model\'s predicted class. '
                  f'Every model is read at the deepest feature map at least 4 px on a side '
                  f'(`timm_gradattn.analysis.cam_target_layers`):', '']
    rows = [[row['model'], ', '.join(_layer_text(layer) for layer in row['layers']),
             ', '.join('x'.join(map(str, layer['grid'])) for layer in row['layers']), f'{row["correct"]} of {count}']
            for row in cam['models']]
    header = ['model', 'layer read', 'map', 'predicted right']
    counted = all('empty' in row for row in cam['models'])  # grids drawn before empty maps were counted lack them
    if counted:
        header.append('empty maps')
        for cells, row in zip(rows, cam['models']):
            cells.append(f'{row["empty"]} of {count}')
    lines.append(markdown_table(header, rows))
    if counted:
        lines += ['', 'An empty map is one with no positive value: at the layer read, no location\'s activations '
                      'weighted by their gradients raise the explained class\'s score, and Grad-CAM\'s ReLU leaves '
                      'nothing to draw.']
    if cam['skipped']:
        lines += ['', f'Not in the grid (no finished run folder of seed {cam["seed"]} when it was drawn): '
                      + ', '.join(f'{model} ({why})' for model, why in cam['skipped'].items()) + '.']
    return lines


def _layer_text(layer: Dict[str, Any]) -> str:
    """The module read, and the feature_info module it stands for when the model never calls that one itself."""
    text = f'`{layer["module"]}`'
    return text if layer['module'] == layer['feature'] else f'{text} (the last to run inside `{layer["feature"]}`)'


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
        notes += load_notes(min(cores), loads)
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


LABEL_POINTS = 6  # font size of the points' labels


def _cost_axis(ax, xs: Sequence[float]) -> bool:
    """A log x axis with plain numbers when the costs span a decade or more (True), else a linear one: a log axis
    over less than a decade labels its minor ticks in scientific notation, on top of each other."""
    from matplotlib.ticker import FuncFormatter, NullFormatter
    if max(xs) < 10 * min(xs):
        ax.margins(x=0.15)
        return False
    ax.set_xscale('log')
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f'{value:g}'))
    ax.xaxis.set_minor_formatter(NullFormatter())
    return True


def _label_offsets(ax, points: Sequence[Tuple[float, float]], labels: Sequence[str]) -> List[Tuple[float, float]]:
    """Offsets in points, right of each point, moved up or down until a label's box clears the ones placed before
    it (boxes estimated from the font size: about 0.6 em a character, 1.2 em a line)."""
    ax.autoscale_view()
    to_points = 72 / ax.figure.dpi
    height = 1.2 * LABEL_POINTS
    placed: List[Tuple[float, float, float, float]] = []
    offsets: List[Tuple[float, float]] = [(0.0, 0.0)] * len(points)
    anchors = [tuple(v * to_points for v in ax.transData.transform(point)) for point in points]
    for index in sorted(range(len(points)), key=lambda i: (-anchors[i][1], anchors[i][0])):
        (x, y), width = anchors[index], 0.6 * LABEL_POINTS * len(labels[index])
        for step in range(40):
            dy = 3 + (step + 1) // 2 * height * (1 if step % 2 else -1)
            box = (x + 4, y + dy, x + 4 + width, y + dy + height)
            if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in placed):
                break
        placed.append(box)
        offsets[index] = (4.0, dy)
    return offsets


def plot_study(study: Study, rows: Sequence[Dict[str, Any]], path: Path) -> Optional[Path]:
    """Top-1 (mean, SD error bars) against forward GMACs and against training time (log scale where the costs span a
    decade or more); one colour per family, baselines as squares, every point labelled without overlapping
    another label. None when no cell has finished."""
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
    panels = ((lambda r: r['gmacs'], 'forward GMACs per image'),
              (lambda r: r['train_time_s']['mean'] / 60, 'training time per cell, minutes'))
    for ax, (x_of, label) in zip(axes, panels):
        points = [(x_of(r), r['top1']['mean']) for r in finished]
        for r, (x, y) in zip(finished, points):
            ax.errorbar(x, y, yerr=r['top1']['std'] or 0.0, fmt='s' if r['model'] == r['family'].baseline else 'o',
                        color=colours[r['family'].key], capsize=3, markersize=6)
        log = _cost_axis(ax, [x for x, _ in points])
        ax.set_xlabel(label + (' (log scale)' if log else ''))
        ax.grid(alpha=0.3, which='both')
        for r, (x, y), offset in zip(finished, points, _label_offsets(ax, points, [r['model'] for r in finished])):
            ax.annotate(r['model'], (x, y), textcoords='offset points', xytext=offset, fontsize=LABEL_POINTS)
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


# --- Grad-CAM across the models -------------------------------------------------------------------------------
def cam_paths(folder: Path, dataset: str) -> Tuple[Path, Path]:
    """cam-<dataset>.png and the .json of its images, layers and predictions, beside the results files."""
    return folder / f'cam-{dataset}.png', folder / f'cam-{dataset}.json'


def require_grad_cam() -> None:
    """Stop in one line, before any work, when grad-cam is missing (the message says what to install)."""
    try:
        import_grad_cam()
    except ImportError as error:
        raise UserError(f'--cam: {error} (or --cam 0 to draw no Grad-CAM grid)') from error


def draw_cam_grid(study: Study, folder: Path, runs_dir: Path, count: int,
                  data_dir: Optional[str] = None) -> List[Path]:
    """cam-<dataset>.png and .json: Grad-CAM over the first ``count`` test images of the lowest recorded seed's split,
    a row per model with a record and a finished run folder (its hub/ export) of that seed, read at the default layer.
    The other models are listed in one line; with no model to draw the files are left as they are. Returns the files
    written."""
    records = read_study_records(folder, study)
    if not records:
        return []
    seed = min(record['seed'] for record in records)
    recorded = {record['model'] for record in records if record['seed'] == seed}
    drawn, skipped = [], {}
    for model in study.models:
        run_dir = cell_dir(runs_dir, study.dataset, model, seed)
        if model not in recorded:
            skipped[model] = 'not recorded'
        elif not (run_dir / 'results.json').is_file() or not (run_dir / 'hub').is_dir():
            skipped[model] = 'no run folder'
        else:
            drawn.append((model, run_dir))
    where = cell_dir(runs_dir, study.dataset, '<model>', seed)
    if skipped:
        print(f'Grad-CAM, seed {seed}: skipped {len(skipped)} model(s) without a finished run folder {where}: '
              + ', '.join(f'{model} ({why})' for model, why in skipped.items()), flush=True)
    if not drawn:
        print(f'Grad-CAM: no model to draw; {cam_paths(folder, study.dataset)[0].name} left as it is.', flush=True)
        return []
    require_grad_cam()
    config = yaml.safe_load((drawn[0][1] / 'config.yaml').read_text())
    try:
        splits = run_splits(config, data_dir)
    except DatasetNotFoundError as error:
        raise UserError(f'--cam: {error} (--data-dir says where; --cam 0 draws no grid)') from error
    info = splits.info
    label_names = list(info.label_names or [str(c) for c in range(info.num_classes)])
    images, targets = next(iter(DataLoader(splits.test, batch_size=min(count, len(splits.test)), shuffle=False)))
    labels = [label_names[int(c)] for c in targets]
    maps, predictions, rows = {}, {}, []
    for model, run_dir in drawn:
        network = load_run_model(run_dir)
        cams = class_activation_maps(network, images.to(next(network.parameters()).device))
        maps[model], predictions[model] = cams.maps, [label_names[c] for c in cams.predictions.tolist()]
        rows.append(dict(model=model, layers=[dataclasses.asdict(layer) for layer in cams.layers],
                         predictions=predictions[model], correct=int(np.sum(cams.predictions == targets.numpy())),
                         empty=int(np.sum(cams.maps.reshape(len(cams.maps), -1).max(axis=1) <= 0))))
        del network
        release_memory()
    picture, facts = cam_paths(folder, study.dataset)
    plot_cam_grid(images, maps, picture, labels=labels, predictions_by_model=predictions, mean=info.mean,
                  std=info.std, title=f'Study {study.name}: Grad-CAM of seed {seed}\'s models on the first '
                                      f'{len(labels)} {info.name} test images (prediction above each map; red: wrong)')
    atomic_write_text(facts, json.dumps(dict(
        study=study.name, dataset=study.dataset, seed=seed, split='test', indices=list(range(len(labels))),
        labels=labels, method='Grad-CAM (grad-cam), explaining the predicted class', models=rows, skipped=skipped),
        indent=1))
    print(f'Grad-CAM, seed {seed}: {len(drawn)} model(s) over {len(labels)} test images in {picture}', flush=True)
    return [picture, facts]


# --- the runner --------------------------------------------------------------------------------------------------
def record_extra_flags(run_dir: Path, flags: Sequence[str]) -> None:
    """Note the train.py flags a cell was given beyond the study's protocol (one list per invocation)."""
    if run_dir.is_dir():
        update_timing(run_dir, lambda timing: timing.setdefault(EXTRA_FLAGS_KEY, []).append(list(flags)))


def finish_study(study: Study, options: argparse.Namespace) -> List[Path]:
    """The Grad-CAM grid (``--cam``), then the results files, whose Markdown links the grid."""
    cam = draw_cam_grid(study, options.output, options.runs_dir, options.cam, options.data_dir) if options.cam else []
    return write_study_outputs(study, options.output) + cam


def run_study(options: argparse.Namespace) -> bool:
    """Train (or reuse) the study's cells one by one, each as its own train.py process, record each finished cell
    and rebuild the outputs after it; True when a cell failed or the dataset is missing."""
    study, folder = options.study, options.output
    if options.aggregate_only:
        written = finish_study(study, options)
        print(f'Study {study.name}: rebuilt {", ".join(str(p) for p in written)} from {folder / "cells"}.')
        return False
    read_study_records(folder, study)  # a record of another protocol stops the study here, before any training
    if options.cam:
        require_grad_cam()  # the grid is drawn after the cells: say so before hours of training
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
                    record_time(run_dir, 'train_s', time.perf_counter() - start)
                    record_extra_flags(run_dir, options.extra_train_args)
                record_load(run_dir)
            record = study_cell_record(study, model, seed, run_dir)
        except DatasetMissing as error:
            print(f'SKIPPED study {study.name}: the files of {study.dataset} are missing. {error} (study.py '
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
    written = finish_study(study, options)
    print(f'Study {study.name}: wrote {", ".join(str(p) for p in written)}'
          + (f'; {len(failed)} cell(s) failed: {", ".join(failed)}' if failed else ''))
    return bool(failed)



# --- command line ------------------------------------------------------------------------------------------------
# What a study fixes for every cell: refused on its command line, with the reason.
FIXED_FLAGS = ('--dataset', '--datasets', '--recipe', '--epochs', '--family')


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description='Train one named protocol for models of every family, cell by cell, each cell its own train.py '
                    'process; light per-cell records and results-<dataset>.csv/.md/.png (and cam-<dataset>.png) go to '
                    '--output/<dataset>. Flags after a bare `--` are passed to train.py for every cell.')
    parser.add_argument('study', choices=STUDIES, metavar='STUDY',
                        help='; '.join(f'{s.name}: {s.dataset}, {len(s.models)} models, --recipe {s.recipe}'
                                       + (f' --epochs {s.epochs}' if s.epochs else '')
                                       + f', seeds {" ".join(map(str, s.seeds))}' for s in STUDIES.values()) + '.')
    parser.add_argument('--models', nargs='+', default=None, metavar='MODEL',
                        help="The cells' models (default: all the study's).")
    parser.add_argument('--seeds', nargs='+', type=int, default=None, metavar='SEED',
                        help="The cells' seeds (default: the study's); every recorded seed is averaged.")
    parser.add_argument('--data-dir', default=None, metavar='DIR', help="Passed to train.py's --data-dir.")
    parser.add_argument('--output', default=None, metavar='DIR',
                        help='Where the records and results files go, in a folder per dataset (default: '
                             'benchmarks/results/study).')
    parser.add_argument('--runs-dir', default=None, metavar='DIR',
                        help='Parent of the training run folders (default: output/study, not committed).')
    parser.add_argument('--launcher', default=None, metavar='COMMAND',
                        help='Run each cell as `COMMAND train.py ...`, e.g. "accelerate launch --num_processes 2" '
                             '(default: this Python).')
    parser.add_argument('--aggregate-only', action='store_true',
                        help="Train nothing: rebuild the results files from the committed cell records (and the "
                             "Grad-CAM grid where the run folders are).")
    parser.add_argument('--cam', type=int, default=CAM_IMAGES, metavar='N',
                        help='Grad-CAM over the first N test images of the lowest recorded seed, a row per model with '
                             'a run folder of that seed, in cam-<dataset>.png (default: %(default)s; 0: none). Needs '
                             'pip install "timm-gradattn[cam]".')
    return parser


def parse_options(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line: the study, its cells (--models, --seeds: the study's by default) and folders; what the study
    fixes may not be given."""
    argv = list(sys.argv[1:] if argv is None else argv)
    own, train_args = (argv[:argv.index('--')], argv[argv.index('--') + 1:]) if '--' in argv else (argv, [])
    parser = build_parser()
    refuse_inside_launch(parser, 'study.py')
    options, unknown = parser.parse_known_args(own)
    study = STUDIES[options.study]
    fixed = [flag for flag in unknown if flag.split('=')[0] in FIXED_FLAGS] + [
        f'{flag} after `--`' for flag in STUDY_CELL_FLAGS if flag in train_args]
    if fixed:
        parser.error(f'study {study.name} fixes the dataset and protocol of every cell ({study.dataset}, --recipe '
                     f'{study.recipe}' + (f' --epochs {study.epochs}' if study.epochs else '') + f'); drop '
                     f'{", ".join(fixed)}. --models and --seeds choose the cells; another protocol is another '
                     f'entry in STUDIES (benchmarks/study.py).')
    if unknown:
        parser.error(f'unrecognized arguments: {" ".join(unknown)}')
    outside = [model for model in options.models or () if model not in study.models]
    if outside:
        parser.error(f'--models: {", ".join(outside)} is not in study {study.name}, whose models are '
                     f'{", ".join(study.models)}.')
    if options.cam < 0:
        parser.error(f'--cam takes a number of images, 0 for no Grad-CAM grid; got {options.cam}.')
    options.study = study
    options.models = [model for model in study.models if model in (options.models or study.models)]
    options.seeds = list(dict.fromkeys(options.seeds or study.seeds))
    options.recipe, options.epochs = study.recipe, study.epochs
    options.extra_train_args = list(train_args)
    options.train_args = [*study.train_flags, *train_args]
    options.output = Path(options.output or RESULTS_DIR / 'study') / study.dataset
    options.runs_dir = Path(options.runs_dir or REPO / 'output' / 'study')
    return options


def main(argv: Optional[Sequence[str]] = None) -> int:
    options = parse_options(argv)
    try:
        return 1 if run_study(options) else 0
    except UserError as error:  # a cell record of another protocol, grad-cam missing: say which and what to do
        print(f'study.py: error: {error}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
