#!/usr/bin/env python3
"""Does the bf16 default cost accuracy? The same study cells trained in fp32 and under bf16 autocast, side by side.

Each arm is a folder of ``benchmarks/study.py`` cell records of one study (same protocol, models and seeds), trained
with ``--mixed-precision no`` in one and ``--mixed-precision bf16`` in the other, on the same machine:

    S="python benchmarks/study.py zoo-digits --cam 0 --models MODEL [MODEL ...]"
    $S --seeds 1 2 3 4 5 --output benchmarks/results/precision/fp32 -- --mixed-precision no
    $S --seeds 1 2 3 4 5 --output benchmarks/results/precision/bf16 --runs-dir output/precision-bf16 \
        -- --mixed-precision bf16
    python benchmarks/precision_accuracy.py            # -> benchmarks/results/precision/accuracy.{json,md}

The committed arms hold one model of each family (the default model among them): accuracy.md names them.

For every model with cells in both arms: mean top-1 and its sample SD over seeds per arm, the difference bf16 - fp32,
and whether it lies within one fp32 seed-SD (the bar the bf16 default has to meet); beside them the training
throughput of each arm and its ratio, the speed the bf16 default buys. An fp32 cell may come from another machine (a
study's own fp32 record copied into the fp32 arm, say): its accuracy counts, as a run on another CPU differs by float
rounding only, but the speeds are taken from the cells of a machine both arms ran on, and the table says which
machines the cells ran on and how many cells each speed averages.
"""
import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from grid import REPO, RESULTS_DIR  # noqa: E402
from study import STUDIES, PRECISION_NAMES, read_study_records, study_rows  # noqa: E402

from timm_gradattn.files import atomic_write_text  # noqa: E402
from timm_gradattn.reporting import machine_line, markdown_table  # noqa: E402

ARMS = ('fp32', 'bf16')
DEFAULT_FOLDER = RESULTS_DIR / 'precision'


def arm_records(folder: Path, study_name: str, precision: str) -> List[Dict[str, Any]]:
    """The cell records of one arm; every cell must have been trained at ``precision``."""
    records = read_study_records(folder, STUDIES[study_name])
    for record in records:
        found = record['results'].get('mixed_precision')
        if PRECISION_NAMES.get(found, found) != precision:
            raise SystemExit(f'precision_accuracy.py: {folder}/cells holds {record["model"]} seed {record["seed"]} '
                             f'trained with mixed precision {found!r}, not {precision}; it belongs in the other arm.')
    return records


def _machine(record: Dict[str, Any]) -> str:
    return machine_line(record['results']['machine'])


def same_machine_speed(arms: Dict[str, List[Dict[str, Any]]], model: str) -> Dict[str, Any]:
    """Training images/s of each arm, mean over the model's cells that ran on a machine both arms used (speed is
    compared on one machine only; accuracy is not tied to one); ``cells``: how many cells of each arm that is."""
    cells = {arm: [r for r in records if r['model'] == model] for arm, records in arms.items()}
    shared = set(map(_machine, cells['fp32'])) & set(map(_machine, cells['bf16']))
    speed, counted = {}, {}
    for arm, records in cells.items():
        rates = [r['results']['train_img_s'] for r in records
                 if _machine(r) in shared and r['results'].get('train_img_s')]
        speed[arm], counted[arm] = (sum(rates) / len(rates) if rates else None), len(rates)
    return dict(train_img_s=speed, cells=counted,
                bf16_speedup=speed['bf16'] / speed['fp32'] if speed['fp32'] and speed['bf16'] else None)


def compare(fp32: Dict[str, Any], bf16: Dict[str, Any], speed: Dict[str, Any]) -> Dict[str, Any]:
    """One model's two arms (study.py's rows): top-1 (mean, SD, seeds), the difference, its verdict, and the speed
    of each arm on a shared machine."""
    diff = bf16['top1']['mean'] - fp32['top1']['mean']
    sd = fp32['top1']['std']
    return dict(
        model=fp32['model'], family=fp32['family'].title,
        top1={arm: {key: row['top1'][key] for key in ('mean', 'std', 'n', 'seeds', 'values')}
              for arm, row in zip(ARMS, (fp32, bf16))},
        diff=diff, fp32_sd=sd, within_fp32_sd=None if sd is None else abs(diff) <= sd,
        train_img_s=speed['train_img_s'], speed_cells=speed['cells'], bf16_speedup=speed['bf16_speedup'],
        peak_rss_mb={arm: row['peak_rss_mb'] and row['peak_rss_mb']['mean'] for arm, row in zip(ARMS, (fp32, bf16))},
        same_seeds=fp32['top1']['seeds'] == bf16['top1']['seeds'])


def machines(records: Sequence[Dict[str, Any]]) -> List[str]:
    """The distinct machines an arm's cells ran on, each with its count of cells."""
    lines = [_machine(record) for record in records]
    return [f'{line} ({lines.count(line)} cell(s))' for line in dict.fromkeys(lines)]


def _pm(top1: Dict[str, Any]) -> str:
    sd = f' ± {top1["std"]:.2f}' if top1['std'] is not None else ''
    return f'{top1["mean"]:.2f}{sd} (n={top1["n"]})'


def markdown(study_name: str, rows: Sequence[Dict[str, Any]], folders: Dict[str, Path],
             machine_lines: Dict[str, List[str]]) -> str:
    verdicts = {True: 'within', False: 'beyond', None: 'no SD'}
    table = markdown_table(
        ['model', 'family', 'fp32 top-1', 'bf16 top-1', 'bf16 - fp32', 'within one fp32 SD', 'fp32 img/s',
         'bf16 img/s', 'bf16 speed-up', 'speed from cells (fp32/bf16)'],
        [[r['model'], r['family'], _pm(r['top1']['fp32']), _pm(r['top1']['bf16']), f'{r["diff"]:+.2f}',
          verdicts[r['within_fp32_sd']], _fixed(r['train_img_s']['fp32'], 0), _fixed(r['train_img_s']['bf16'], 0),
          _fixed(r['bf16_speedup'], 2, 'x'), f"{r['speed_cells']['fp32']}/{r['speed_cells']['bf16']}"] for r in rows])
    lines = [f'# bf16 autocast against fp32: study {study_name}', '',
             f'Generated by `python benchmarks/precision_accuracy.py` from the cell records in '
             f'`{folders["fp32"]}` and `{folders["bf16"]}` (each cell a `benchmarks/study.py` run under the study\'s '
             f'protocol, `--mixed-precision no` or `bf16`). Top-1 on the test split, mean ± sample SD over seeds; '
             f'"within one fp32 SD": |bf16 - fp32| is at most the fp32 arm\'s SD over seeds. img/s: training images '
             f'per second of the training loop, mean over the cells that ran on a machine both arms used (speed is '
             f'compared on one machine; accuracy is not tied to one).', '', table, '']
    for arm in ARMS:
        lines.append(f'Machines ({arm}): ' + '; '.join(machine_lines[arm]) + '.')
    mismatched = [r['model'] for r in rows if not r['same_seeds']]
    if mismatched:
        lines += ['', 'The arms hold different seeds for: ' + ', '.join(mismatched) + '.']
    return '\n'.join(lines) + '\n'


def _fixed(value: Optional[float], digits: int, suffix: str = '') -> str:
    return '' if value is None else f'{value:.{digits}f}{suffix}'


def build(study_name: str, folder: Path) -> Dict[str, Any]:
    dataset = STUDIES[study_name].dataset
    folders = {arm: folder / arm / dataset for arm in ARMS}
    missing = [str(path / 'cells') for path in folders.values() if not (path / 'cells').is_dir()]
    if missing:
        raise SystemExit(f'precision_accuracy.py: no cell records in {", ".join(missing)}; train the cells first '
                         f'(how: this script\'s docstring and docs/speed.md).')
    records = {arm: arm_records(path, study_name, arm) for arm, path in folders.items()}
    study = STUDIES[study_name]
    arms = {arm: {row['model']: row for row in study_rows(study, found) if row['n_seeds']}
            for arm, found in records.items()}
    rows = [compare(arms['fp32'][model], arms['bf16'][model], same_machine_speed(records, model))
            for model in arms['fp32'] if model in arms['bf16']]
    if not rows:
        raise SystemExit(f'precision_accuracy.py: no model has cells in both {folders["fp32"]} and '
                         f'{folders["bf16"]}.')
    machine_lines = {arm: machines(found) for arm, found in records.items()}
    return dict(study=study_name, dataset=dataset, folders={arm: str(p) for arm, p in folders.items()},
                rows=rows, machines=machine_lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--study', default='zoo-digits', choices=STUDIES, help='The study the cells belong to.')
    parser.add_argument('--folder', default=str(DEFAULT_FOLDER), metavar='DIR',
                        help="Holds the arms' study outputs, fp32/<dataset>/ and bf16/<dataset>/, and receives "
                             'accuracy.json and accuracy.md (default: %(default)s).')
    options = parser.parse_args(argv)
    folder = Path(options.folder)
    result = build(options.study, folder)
    shown = {arm: _relative(Path(path)) for arm, path in result['folders'].items()}
    text = markdown(options.study, result['rows'], shown, result['machines'])
    atomic_write_text(folder / 'accuracy.json', json.dumps(result, indent=1) + '\n')
    atomic_write_text(folder / 'accuracy.md', text)
    print(text, end='')
    return 0


def _relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


if __name__ == '__main__':
    sys.exit(main())
