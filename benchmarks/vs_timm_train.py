"""Our train.py beside timm's own train.py: the same model, images and settings, whole processes, paired runs.

    python benchmarks/vs_timm_train.py --timm-train ~/src/pytorch-image-models/train.py --epochs 1 2
    python benchmarks/vs_timm_train.py --timm-train PATH --pairs 5 --epochs 1 6 --max-load 1.3
    python benchmarks/vs_timm_train.py --timm-train PATH --epochs 1 6 --configs ours timm_default --name vs_timm_train_6ep
    python benchmarks/vs_timm_train.py --timm-train PATH --case photos --mode grey --epochs 1 2 --pairs 2

timm's ``train.py`` is not in the timm wheel: pass the one of a checkout of timm's repository (its commit is
recorded when the checkout is a git repository). It sees the zoo through its own ``--device-modules timm_gradattn``.

Both tools train ``--model`` (default: train.py's default model) on the same images, which each tool reads as image
files in ``train/``, ``validation/`` and ``test/``. ``--case digits`` (the default): scikit-learn's digits as 32x32
greyscale PNGs (the split our ``--dataset digits`` uses, seed 42), input 1x32x32, batch 64. ``--case photos``: a
folder at photo size, generated: 300x300 and 320x280 PNGs of 4 classes (stripes under noise, greyscale or RGB by
``--mode``), 96 / 32 / 32 images, read at 224 px (1x224x224 or 3x224x224), batch 32: where our defaults switch to
channels-last. Pinned on both sides: the input size, mean/std, the batch, 2 loader workers, Adam (lr 1e-3, weight
decay 1e-4), cosine schedule without warm-up, no label smoothing, no augmentation, seed 42. Each tool keeps its own
defaults otherwise (timm: fp32, NCHW, checkpoints of the best epochs;
ours: the machine's precision and memory-format defaults, best and last-epoch checkpoints, a test pass, a Hub export
and plots).

Timed: process wall time of a run of E1 and of E2 epochs (default 1 and 6), for our defaults, timm's defaults and
timm's fastest flags (``--amp --amp-dtype bfloat16 --channels-last``), in pairs (ours, timm default, timm best),
median of ``--pairs``. Per image per epoch = (t(E2) - t(E1)) / ((E2 - E1) x images an epoch trains on: timm drops
the last partial batch, we keep it); fixed cost = t(E1)
minus one epoch's per-image part (start-up, data reading, final test, export). Ratios are timm's per-image cost over
ours: above 1 means ours is faster. Targets: 1.5 against timm's default, 1.0 against its best, and a fixed cost no
higher than timm's. ``--configs`` leaves configurations out (timm's bf16 is emulated, and slow, on a CPU without
bf16 instructions); a ratio whose configurations were not run is not reported.
"""
import argparse
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
from PIL import Image

from speed import RESULTS_DIR, load_average, machine_description, wait_for_quiet, write_results
from timm_gradattn.data import build_datasets
from timm_gradattn.families import DEFAULT_MODEL

REPO = Path(__file__).resolve().parents[1]
CONFIGS = ('ours', 'timm_default', 'timm_best')
TARGETS = dict(ratio_vs_timm_default=1.5, ratio_vs_timm_best=1.0)
# What each case pins on both sides: channels, side, batch, mean and std (the digits': timm_gradattn.data.info).
CASES = {'digits': dict(side=32, batch=64, mean='0.3053', std='0.3760'),
         'photos': dict(side=224, batch=32, mean='0.5', std='0.25')}
PHOTOS = dict(classes=4, sizes=((300, 300), (320, 280)), counts=dict(train=24, validation=8, test=8))


def write_digits_folder(root: Path) -> Dict[str, int]:
    """Our digits split (seed 42) as 32x32 greyscale PNGs in train/, validation/ and test/; image counts."""
    splits = build_datasets('digits', seed=42)
    counts = {}
    for split, folder in (('train', 'train'), ('val', 'validation'), ('test', 'test')):
        view = getattr(splits, split)
        for index in view.indices:
            image, label = view.base[index]
            path = root / folder / str(label) / f'{index:04d}.png'
            path.parent.mkdir(parents=True, exist_ok=True)
            image.resize((32, 32), Image.BILINEAR).save(path)
        counts[folder] = len(view.indices)
    return counts


def write_photos_folder(root: Path, chans: int) -> Dict[str, int]:
    """``PHOTOS``: photo-sized PNGs, stripes whose angle is the class under noise, greyscale or RGB; image counts."""
    counts = {}
    for split, per_class in PHOTOS['counts'].items():
        for label in range(PHOTOS['classes']):
            for index in range(per_class):
                width, height = PHOTOS['sizes'][index % len(PHOTOS['sizes'])]
                rng = np.random.default_rng([label, index, len(split)])
                y, x = np.mgrid[:height, :width]
                angle = math.pi * label / PHOTOS['classes']
                stripes = 128 + 80 * np.sin((x * math.cos(angle) + y * math.sin(angle)) / 7)
                pixels = stripes[..., None] + rng.normal(0, 30, (height, width, chans))
                image = np.clip(pixels, 0, 255).astype(np.uint8)
                path = root / split / str(label) / f'{index:04d}.png'
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(image[..., 0] if chans == 1 else image).save(path)
        counts[split] = PHOTOS['classes'] * per_class
    return counts


def common_flags(model: str, epochs: int, case: str = 'digits', chans: int = 1) -> List[str]:
    pinned = CASES[case]
    side = str(pinned['side'])
    return ['--model', model, '--input-size', str(chans), side, side, '--mean', *[pinned['mean']] * chans,
            '--std', *[pinned['std']] * chans, '-b', str(pinned['batch']), '-j', '2', '--opt', 'adam', '--lr', '1e-3',
            '--weight-decay', '1e-4', '--sched', 'cosine', '--warmup-epochs', '0', '--smoothing', '0', '--no-aug',
            '--seed', '42', '--epochs', str(epochs)]


def command(config: str, timm_train: Path, model: str, epochs: int, data: Path, output: Path, case: str = 'digits',
            chans: int = 1, classes: int = 10) -> List[str]:
    flags = common_flags(model, epochs, case, chans) + ['--output', str(output), '--experiment', f'{config}-{epochs}']
    if config == 'ours':
        return [sys.executable, str(REPO / 'train.py'), '--dataset', 'folder', '--data-dir', str(data), *flags]
    timm = [sys.executable, str(timm_train), str(data), '--device-modules', 'timm_gradattn', '--input-img-mode',
            'L' if chans == 1 else 'RGB', '--num-classes', str(classes), '--min-lr', '1e-6', '--device', 'cpu', *flags]
    return timm + (['--amp', '--amp-dtype', 'bfloat16', '--channels-last'] if config == 'timm_best' else [])


def timed_run(argv: List[str], cwd: Path) -> float:
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f'{" ".join(argv)} failed ({done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}')
    return seconds


def git_commit(path: Path) -> Optional[str]:
    done = subprocess.run(['git', '-C', str(path.parent), 'rev-parse', 'HEAD'], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


def images_per_epoch(config: str, train_images: int, batch_size: int = 64) -> int:
    """The images a training epoch sees: timm's training loader drops the last partial batch, ours keeps it."""
    return train_images if config == 'ours' else train_images // batch_size * batch_size


def summarise(runs: Dict[str, Dict[int, List[float]]], epochs: List[int], train_images: int,
              batch_size: int = 64) -> Dict[str, Dict]:
    short, long = epochs
    out = {}
    for config, times in runs.items():
        images = images_per_epoch(config, train_images, batch_size)
        per_image = [(b - a) / ((long - short) * images) for a, b in zip(times[short], times[long])]
        ms = statistics.median(per_image) * 1e3
        one_epoch = statistics.median(times[short])
        out[config] = dict(ms_per_image=ms, fixed_cost_s=one_epoch - short * images * ms / 1e3,
                           images_per_epoch=images, seconds={str(e): times[e] for e in epochs})
    return out


def report(result: Dict) -> str:
    s, r, configs = result['summary'], result['ratios'], result['configs']
    lines = [
        '# train.py beside timm\'s train.py',
        '',
        f"Machine: {result['machine']}.  \nLoad average (1, 5, 15 min) before: {result['load_before']}, after: "
        f"{result['load_after']}.  \ntimm's train.py: `{result['timm_train']}` (commit {result['timm_commit']}); "
        f"model `{result['model']}`; {result['data']} ({result['images']}); "
        f"{result['pairs']} pairs of runs of {result['epochs'][0]} and {result['epochs'][1]} epochs; "
        f"our precision default here: `{result['our_precision']}`.  \nPinned on both sides: `{result['pinned']}`.",
        '',
        '| configuration | ms per image per epoch | fixed cost s | run times s |',
        '|---|---|---|---|',
    ]
    for config in configs:
        times = '; '.join(f"{e} ep: " + ', '.join(f'{t:.1f}' for t in ts) for e, ts in s[config]['seconds'].items())
        lines.append(f"| {config} | {s[config]['ms_per_image']:.2f} | {s[config]['fixed_cost_s']:.1f} | {times} |")
    lines.append('')
    for key, what in (('ratio_vs_timm_default', 'timm fp32 per image / ours'),
                      ('ratio_vs_timm_best', 'timm `--amp --amp-dtype bfloat16 --channels-last` / ours')):
        if key in r:
            lines.append(f"- **{key}** ({what}): **{r[key]:.2f}** (target {TARGETS[key]}: "
                         f"{'met' if r[key] >= TARGETS[key] else 'not met'})")
    if 'fixed_cost_timm_s' in r:
        lines.append(f"- fixed cost: ours {r['fixed_cost_ours_s']:.1f} s, timm {r['fixed_cost_timm_s']:.1f} s "
                     f"({'no higher' if r['fixed_cost_ours_s'] <= r['fixed_cost_timm_s'] else 'higher'} than timm's)")
    return '\n'.join(lines) + '\n'


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--timm-train', type=Path, required=True, help="timm's train.py, from a checkout of timm")
    parser.add_argument('--model', default=DEFAULT_MODEL, help=f'default: train.py\'s, {DEFAULT_MODEL}')
    parser.add_argument('--pairs', type=int, default=3, help='paired runs per epoch count (median reported)')
    parser.add_argument('--epochs', type=int, nargs=2, default=[1, 6], metavar=('E1', 'E2'))
    parser.add_argument('--max-load', type=float, default=None, help='first wait for a 1-minute load below this')
    parser.add_argument('--wait-minutes', type=float, default=30)
    parser.add_argument('--out', type=Path, default=RESULTS_DIR)
    parser.add_argument('--name', default=None, help='results file name (default: vs_timm_train, or '
                        'vs_timm_train_photos_<mode> for --case photos)')
    parser.add_argument('--case', choices=tuple(CASES), default='digits',
                        help='digits: 32-px greyscale digits; photos: a generated folder read at 224 px')
    parser.add_argument('--mode', choices=('grey', 'rgb'), default='grey', help='--case photos: the images\' colour')
    parser.add_argument('--configs', nargs='+', choices=CONFIGS, default=list(CONFIGS),
                        help='configurations to run (ours is always run); default: all three')
    args = parser.parse_args(argv)
    if not args.timm_train.is_file():
        parser.error(f'--timm-train {args.timm_train}: no such file; pass train.py of a checkout of '
                     f'https://github.com/huggingface/pytorch-image-models (the timm wheel does not ship it)')
    if not 0 < args.epochs[0] < args.epochs[1]:
        parser.error(f'--epochs {args.epochs[0]} {args.epochs[1]}: E1 must be at least 1 and below E2')
    from timm_gradattn.precision import default_mixed_precision
    if args.max_load is not None:
        wait_for_quiet(args.max_load, args.wait_minutes)
    load_before, started = load_average(), time.time()
    configs = [c for c in CONFIGS if c == 'ours' or c in args.configs]
    runs = {config: {e: [] for e in args.epochs} for config in configs}
    chans = 3 if args.case == 'photos' and args.mode == 'rgb' else 1
    classes = PHOTOS['classes'] if args.case == 'photos' else 10
    name = args.name or ('vs_timm_train' if args.case == 'digits' else f'vs_timm_train_photos_{args.mode}')
    with tempfile.TemporaryDirectory() as scratch:
        data, output = Path(scratch) / f'{args.case}_png', Path(scratch) / 'runs'
        counts = write_digits_folder(data) if args.case == 'digits' else write_photos_folder(data, chans)
        for pair in range(args.pairs):
            for epochs in args.epochs:
                for config in configs:
                    seconds = timed_run(command(config, args.timm_train.resolve(), args.model, epochs, data,
                                                output / str(pair), args.case, chans, classes), cwd=Path(scratch))
                    runs[config][epochs].append(seconds)
                    print(f'pair {pair + 1}/{args.pairs}: {config}, {epochs} epoch(s): {seconds:.1f} s', flush=True)
    summary = summarise(runs, args.epochs, counts['train'], CASES[args.case]['batch'])
    ours = summary['ours']
    ratios = dict(fixed_cost_ours_s=ours['fixed_cost_s'])
    for key, config in (('ratio_vs_timm_default', 'timm_default'), ('ratio_vs_timm_best', 'timm_best')):
        if config in summary:
            ratios[key] = summary[config]['ms_per_image'] / ours['ms_per_image']
    if 'timm_default' in summary:
        ratios['fixed_cost_timm_s'] = summary['timm_default']['fixed_cost_s']
    result = dict(
        machine=machine_description(), load_before=load_before, load_after=load_average(),
        seconds=round(time.time() - started, 1), timm_train=str(args.timm_train),
        timm_commit=git_commit(args.timm_train.resolve()), model=args.model, images=counts, pairs=args.pairs,
        case=args.case, data=('digits as 32x32 greyscale PNG files' if args.case == 'digits' else
                              f"generated {'greyscale' if chans == 1 else 'RGB'} 300x300 and 320x280 PNG files "
                              f"read at {chans}x224x224"),
        epochs=args.epochs, configs=configs, our_precision=default_mixed_precision()[0],
        pinned=' '.join(common_flags(args.model, 0, args.case, chans)[:-2]), **ratios, ratios=ratios, summary=summary,
        targets=TARGETS)
    write_results(args.out, name, result, report(result))
    print(f"wrote {args.out / name}.json/.md in {result['seconds']:.0f} s")


if __name__ == '__main__':
    main()
