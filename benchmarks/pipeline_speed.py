"""Throughput of train.py's training loop against the bare training step of the same model.

    python benchmarks/pipeline_speed.py                      # train.py's default model and dataset: about a minute
    python benchmarks/pipeline_speed.py --max-load 1.3       # first wait for a quiet machine
    python benchmarks/pipeline_speed.py -- --workers 1       # flags after -- go to train.py unchanged

Pipeline: images/s of each epoch's training loop inside ``timm_gradattn.engine.train`` (data loading and
augmentation, Accelerate, loss and accuracy bookkeeping, logging), as the engine's ``on_epoch_end`` callback
reports it, so the validation pass and checkpointing are left out. Bare step: the same model, optimizer (the
engine's ``create_optimizer``), loss and batch size on one fixed batch of the input shape, timed before the
first epoch and after every epoch, so that each epoch is compared with the bare step measured just before and
just after it. Efficiency =
pipeline / bare; the data-only figure (iterating the training loader without a model) shows how much of the
gap is input work. A second, plain run of the same settings gives each epoch's overhead: (epoch wall time -
training loop) / epoch wall time, the share spent validating, saving and logging (target: at most 10 %).
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

import timm

from speed import RESULTS_DIR, load_average, machine_description, wait_for_quiet, write_results
from timm_gradattn.settings import resolve_train_settings
from timm_gradattn.engine import train
from timm_gradattn.factory import create_optimizer
from timm_gradattn.cpu import keep_freed_memory
from timm_gradattn import precision
from timm_gradattn.data import build_datasets


def bare_step_timer(args: argparse.Namespace, info, warmup: int, repeats: int) -> Callable[[], float]:
    """A function timing ``repeats`` bare steps (forward, loss, backward, optimizer step, zero_grad) on one fixed
    batch and returning images/s; the model and optimizer are built once, as the engine builds them, at the run's
    precision (bf16 autocast with the engine's fp32 guard for 1x1 maps) and memory format."""
    torch.manual_seed(0)
    model = timm.create_model(args.model, num_classes=info.num_classes, in_chans=info.in_chans).train()
    bf16 = args.mixed_precision == 'bf16'
    if bf16:
        precision.guard_one_pixel_convolutions(model)
    memory_format = torch.channels_last if channels_last(args, info) else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    optimizer = create_optimizer(args, model, torch.device('cpu'))
    loss_fn = nn.CrossEntropyLoss()
    images = torch.randn(args.batch_size, *info.input_size).to(memory_format=memory_format)
    targets = torch.randint(0, info.num_classes, (args.batch_size,))

    def step():
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(model(images), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()

    def images_per_s() -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        return args.batch_size / statistics.median(times)
    return images_per_s


def channels_last(args: argparse.Namespace, info) -> bool:
    """The run's memory format: as given, else the engine's default for a CPU at the input size."""
    if args.channels_last is not None:
        return args.channels_last
    return precision.default_channels_last('cpu', info.img_size)[0]


def data_only_images_per_s(args: argparse.Namespace, data, epochs: int) -> float:
    """The training loader on its own: decoding, augmentation and collation, no model."""
    loader = DataLoader(data.train, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                        persistent_workers=args.workers > 0)
    rates = []
    for _ in range(epochs):
        start, seen = time.perf_counter(), 0
        for images, _ in loader:
            seen += len(images)
        rates.append(seen / (time.perf_counter() - start))
    return statistics.median(rates)


def run_pipeline(args: argparse.Namespace, bare_img_s: Callable[[], float]) -> Dict:
    """Train through the engine, recording its training loop, evaluation pass and checkpoint write per epoch,
    and the bare step before the first epoch and after each."""
    epochs: List[Dict] = []
    bare = [bare_img_s()]

    def record(row: Dict) -> None:
        row['wait_for_checkpoint']()  # the bare step is timed alone, not beside the checkpoint's writes
        bare.append(bare_img_s())
        images = row['train_images']
        epochs.append(dict(epoch=row['epoch'], images=images, seconds=round(row['train_loop_s'], 3),
                           img_s=images / row['train_loop_s'], bare_img_s=(bare[-2] + bare[-1]) / 2,
                           predict_s=round(row['validate_s'], 3), save_training_state_s=round(row['checkpoint_s'], 3)))
        epochs[-1]['efficiency'] = epochs[-1]['img_s'] / epochs[-1]['bare_img_s']

    start = time.perf_counter()
    results = train(args, on_epoch_end=record)
    seconds = time.perf_counter() - start
    return dict(epochs=epochs, bare_img_s=bare, engine_seconds=round(seconds, 2), test_top1=results.get('top1'))


def run_overhead(args: argparse.Namespace) -> Dict:
    """A plain run (nothing timed between its epochs, as a user's run): each epoch's wall time against its
    training loop. Overhead = (epoch wall time - training loop) / epoch wall time: validation, best-weights and
    checkpoint writes, logging; a checkpoint written on the writer thread counts where it slows the next loop."""
    epochs: List[Dict] = []
    last_epoch_end = [0.0]

    def record(row: Dict) -> None:
        wall, loop = row['epoch_wall_s'], row['train_loop_s']
        epochs.append(dict(epoch=row['epoch'], wall_s=round(wall, 3), train_loop_s=round(loop, 3),
                           validate_s=round(row['validate_s'], 3), checkpoint_s=round(row['checkpoint_s'], 3),
                           overhead=(wall - loop) / wall))
        last_epoch_end[0] = time.perf_counter()

    start = time.perf_counter()
    train(args.replace(experiment='overhead'), on_epoch_end=record)
    end = time.perf_counter()
    return dict(epochs=epochs, engine_seconds=round(end - start, 2), end_of_run_s=round(end - last_epoch_end[0], 2),
                overhead=statistics.median(e['overhead'] for e in epochs[1:]))


def report(result: Dict) -> str:
    epochs = result['pipeline']['epochs']
    lines = [
        '# Training pipeline against the bare training step',
        f"Machine: {result['machine']}.  \nLoad average (1, 5, 15 min) before: {result['load_before']}, after: "
        f"{result['load_after']}{'' if result['quiet'] else ' (the machine did not get quiet; timings are noisy)'}."
        f"  \ntrain.py settings: `{result['train_args']}` ({result['model']} on {result['dataset']}, batch "
        f"{result['batch_size']}, input {result['input_size']}, precision {result.get('mixed_precision', 'no')}, "
        f"{'channels-last' if result.get('channels_last') else 'NCHW'}, {result['opt']} "
        f"({'fused' if result['fused_opt'] else 'per-parameter loop'}), {result['workers']} loader workers, glibc "
        f"malloc {'keeping freed memory' if result['malloc_keeps_freed_memory'] else 'with its default trimming'}).",
        '',
        '| measurement | images/s |',
        '|---|---|',
        f"| bare training step (median of {result['repeats']} steps; before the first epoch, after each) | "
        f"{' / '.join(f'{v:.1f}' for v in result['pipeline']['bare_img_s'])} |",
        f"| train.py training loop, median of epochs 2-{len(epochs)} | {result['pipeline_img_s']:.1f} |",
        f"| training loader alone (no model) | {result['data_only_img_s']:.1f} |",
        '',
        f"**Pipeline efficiency: {100 * result['efficiency']:.1f} %** of the bare step (median over epochs "
        f"2-{len(epochs)} of each epoch's images/s over the bare step's just before and after it; target 90 %). "
        f"The loader alone would take {100 * result['data_share']:.1f} % of the bare step's time.",
        '',
        f"The whole `engine.train` call took {result['pipeline']['engine_seconds']:.1f} s (bare-step timings "
        f"included): the training loops {sum(e['seconds'] for e in epochs):.1f} s, evaluation passes "
        f"{sum(e.get('predict_s', 0) for e in epochs):.1f} s, checkpoint writes (`last/`) "
        f"{sum(e.get('save_training_state_s', 0) for e in epochs):.1f} s.",
        '',
        '| epoch | images | training loop s | images/s | bare step images/s | efficiency | evaluation s | '
        'checkpoint s |',
        '|---|---|---|---|---|---|---|---|',
    ]
    for e in epochs:
        lines.append(f"| {e['epoch']} | {e['images']} | {e['seconds']:.2f} | {e['img_s']:.1f} | "
                     f"{e['bare_img_s']:.1f} | {100 * e['efficiency']:.1f} % | {e.get('predict_s', 0):.2f} | "
                     f"{e.get('save_training_state_s', 0):.2f} |")
    overhead = result.get('overhead')
    if overhead:
        lines += [
            '',
            '## Time off the training loop',
            '',
            f"A second, plain run of the same settings (nothing timed between its epochs): **overhead "
            f"{100 * overhead['overhead']:.1f} %** (median over epochs 2-{len(overhead['epochs'])} of (epoch wall "
            f"time - training loop) / epoch wall time; target at most 10 %). Checkpoints are taken in the epoch "
            f"(`checkpoint s`) and written on a thread of their own beside the next epoch's training. After the "
            f"last epoch, the end of the run (test passes, Hub export, results.json and the three plots, the last "
            f"checkpoint completing) took {overhead['end_of_run_s']:.2f} s.",
            '',
            '| epoch | wall s | training loop s | evaluation s | checkpoint s | overhead |',
            '|---|---|---|---|---|---|',
        ]
        for e in overhead['epochs']:
            lines.append(f"| {e['epoch']} | {e['wall_s']:.2f} | {e['train_loop_s']:.2f} | {e['validate_s']:.2f} | "
                         f"{e['checkpoint_s']:.2f} | {100 * e['overhead']:.1f} % |")
    return '\n'.join(lines) + '\n'


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    train_argv = argv[argv.index('--') + 1:] if '--' in argv else []
    own_argv = argv[:argv.index('--')] if '--' in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--epochs', type=int, default=6, help='epochs of train.py (the first is left out)')
    parser.add_argument('--warmup', type=int, default=3, help='untimed bare steps')
    parser.add_argument('--repeats', type=int, default=10,
                        help='timed bare steps before the first epoch and after each')
    parser.add_argument('--max-load', type=float, default=None,
                        help='wait until the 1-minute load average is below this before measuring')
    parser.add_argument('--wait-minutes', type=float, default=40, help='longest wait for --max-load')
    parser.add_argument('--out', type=Path, default=RESULTS_DIR, help='folder for <name>.json/.md')
    parser.add_argument('--name', default='pipeline_speed', help='file stem')
    own = parser.parse_args(own_argv)
    if own.epochs < 2:
        parser.error(f'--epochs {own.epochs}: at least 2 are needed, the first epoch is left out as warm-up')

    with tempfile.TemporaryDirectory() as output:
        train_args = ['--epochs', str(own.epochs), '--output', output, '--experiment', 'pipeline'] + train_argv
        args = resolve_train_settings(train_args)  # dataset defaults (batch, workers) included, as the engine
        data = build_datasets(args.dataset, data_dir=args.data_dir, protocol=args.protocol, seed=args.seed,
                              img_size=args.img_size, in_chans=args.in_chans)
        info = data.info
        # The allocator setting is process-wide, so it is made before the first bare step, as the engine makes it.
        malloc_tuned = keep_freed_memory() if args.keep_freed_memory else False

        quiet = True
        if own.max_load is not None:
            quiet, _ = wait_for_quiet(own.max_load, own.wait_minutes)
        load_before = load_average()
        started = time.time()
        bare_img_s = bare_step_timer(args, info, own.warmup, own.repeats)
        pipeline = run_pipeline(args, bare_img_s)
        overhead = run_overhead(args)
        data_only = data_only_images_per_s(args, data, epochs=3)
        load_after = load_average()

    measured = pipeline['epochs'][1:]
    result = dict(
        machine=machine_description(), load_before=load_before, load_after=load_after, quiet=quiet,
        malloc_keeps_freed_memory=malloc_tuned, fused_opt=args.fused_opt, seconds=round(time.time() - started, 1),
        train_args=' '.join(train_argv) or '(defaults)', model=args.model, dataset=info.name,
        batch_size=args.batch_size, input_size=list(info.input_size), opt=args.opt, workers=args.workers,
        mixed_precision=args.mixed_precision, channels_last=channels_last(args, info),
        warmup=own.warmup, repeats=own.repeats,
        pipeline_img_s=statistics.median(e['img_s'] for e in measured), data_only_img_s=data_only,
        efficiency=statistics.median(e['efficiency'] for e in measured),
        data_share=statistics.median(e['bare_img_s'] for e in measured) / data_only, pipeline=pipeline,
        overhead=overhead)
    write_results(own.out, own.name, result, report(result))
    print(f"wrote {own.out / own.name}.json/.md in {result['seconds']:.0f} s")


if __name__ == '__main__':
    main()
