"""Speed of the zoo, side by side with timm's ResNet-18, on this machine.

For every model x input size x execution mode it measures training-step and inference throughput
(images/s, median over timed repeats after warm-up), and once per model and size the parameters,
FLOPs (torch's own FlopCounterMode, forward pass) and peak memory of a training step. Results go to
JSON and a Markdown table of ratios against ``resnet18``, plus a plot, next to the machine description.

    python benchmarks/speed.py                 # full grid (tens of minutes on a 2-core CPU)
    python benchmarks/speed.py --quick         # about a minute: two models, one size, eager only

The efficiency target compares each model's time ratio to its FLOP ratio against ``resnet18``: a
model that pays only for its arithmetic has (time ratio) / (FLOP ratio) close to 1.
"""
import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import timm
import timm_gradattn  # noqa: F401  (registers the zoo)

MODELS = ('resnet18', 'seresnet18', 'resnet18_se', 'resnet18_cbam',
          'gradattn_resnet18_nope', 'gradattn_resnet18_lpe', 'gradattn_resnet18_rope')
SIZES = (28, 32, 64, 96, 224)
BATCH_SIZES = {28: 64, 32: 64, 64: 32, 96: 16, 224: 8}
MODES = ('eager', 'compile', 'channels_last', 'bf16')
NUM_CLASSES = 10
RESULTS_DIR = Path(__file__).parent / 'results'


def machine_description() -> Dict[str, str]:
    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            names = [line.split(':', 1)[1].strip() for line in f if line.startswith('model name')]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu'
    return dict(cpu=cpu, cores=str(os.cpu_count()), threads=str(torch.get_num_threads()), device=device,
                torch=torch.__version__, timm=timm.__version__, python=platform.python_version())


def build(name: str, mode: str, device: torch.device) -> torch.nn.Module:
    model = timm.create_model(name, num_classes=NUM_CLASSES).to(device)
    if mode == 'channels_last':
        model = model.to(memory_format=torch.channels_last)
    return model


def make_steps(model, mode, device):
    """Callables for one inference step and one training step under ``mode``."""
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if mode == 'bf16' else nullcontext()
    forward = torch.compile(model, fullgraph=True) if mode == 'compile' else model
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

    def infer(x, y):
        with torch.inference_mode(), autocast:
            forward(x)

    def train(x, y):
        with autocast:
            loss = F.cross_entropy(forward(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return infer, train


def time_step(step, x, y, warmup: int, repeats: int, device) -> float:
    for _ in range(warmup):
        step(x, y)
    times = []
    for _ in range(repeats):
        if device.type == 'cuda':
            torch.cuda.synchronize()
        start = time.perf_counter()
        step(x, y)
        if device.type == 'cuda':
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def forward_flops(name: str, size: int) -> int:
    model = timm.create_model(name, num_classes=NUM_CLASSES).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.randn(1, 3, size, size))
    return counter.get_total_flops()


def peak_train_memory_mb(name: str, size: int, batch_size: int) -> float:
    """Peak resident memory of one training step, in a fresh process so earlier runs don't mask it."""
    code = (
        'import resource, torch, timm, timm_gradattn, torch.nn.functional as F\n'
        f'm = timm.create_model({name!r}, num_classes={NUM_CLASSES})\n'
        f'x = torch.randn({batch_size}, 3, {size}, {size}); y = torch.zeros({batch_size}, dtype=torch.long)\n'
        'base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n'
        'F.cross_entropy(m(x), y).backward()\n'
        'print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)\n'
    )
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def run(models, sizes, modes, warmup, repeats, memory, device) -> List[Dict]:
    rows = []
    for size in sizes:
        batch_size = BATCH_SIZES[size]
        for name in models:
            flops = forward_flops(name, size)
            params = sum(p.numel() for p in timm.create_model(name, num_classes=NUM_CLASSES).parameters())
            mem = peak_train_memory_mb(name, size, batch_size) if memory and device.type == 'cpu' else None
            for mode in modes:
                torch.manual_seed(0)
                model = build(name, mode, device)
                x = torch.randn(batch_size, 3, size, size, device=device)
                if mode == 'channels_last':
                    x = x.contiguous(memory_format=torch.channels_last)
                y = torch.randint(0, NUM_CLASSES, (batch_size,), device=device)
                infer, train = make_steps(model.eval(), mode, device)
                infer_s = time_step(infer, x, y, warmup, repeats, device)
                model.train()
                train_s = time_step(train, x, y, warmup, repeats, device)
                row = dict(model=name, size=size, batch_size=batch_size, mode=mode, params=params,
                           gflops_per_image=flops / 1e9, peak_train_mem_mb=mem,
                           infer_img_s=batch_size / infer_s, train_img_s=batch_size / train_s)
                rows.append(row)
                print(f"{name:24s} {size:4d}px {mode:14s} infer {row['infer_img_s']:9.1f} img/s  "
                      f"train {row['train_img_s']:8.1f} img/s  {row['gflops_per_image']:.3f} GFLOP", flush=True)
                del model
    return rows


def ratio_table(rows: List[Dict], baseline: str = 'resnet18') -> str:
    """Markdown: per model/size/mode, time and FLOP ratios against the baseline, and their quotient."""
    base = {(r['size'], r['mode']): r for r in rows if r['model'] == baseline}
    lines = [
        '| model | size | mode | params | GFLOP/img | infer img/s | train img/s | FLOP ratio | '
        'infer time ratio | train time ratio | infer eff. | train eff. |',
        '|---|---|---|---|---|---|---|---|---|---|---|---|',
    ]
    for r in rows:
        b = base.get((r['size'], r['mode']))
        if b is None:
            continue
        flop_ratio = r['gflops_per_image'] / b['gflops_per_image']
        infer_ratio = b['infer_img_s'] / r['infer_img_s']
        train_ratio = b['train_img_s'] / r['train_img_s']
        lines.append(
            f"| {r['model']} | {r['size']} | {r['mode']} | {r['params'] / 1e6:.2f} M | {r['gflops_per_image']:.3f} | "
            f"{r['infer_img_s']:.1f} | {r['train_img_s']:.1f} | {flop_ratio:.3f} | {infer_ratio:.3f} | "
            f"{train_ratio:.3f} | {infer_ratio / flop_ratio:.3f} | {train_ratio / flop_ratio:.3f} |")
    return '\n'.join(lines)


def plot(rows: List[Dict], path: Path) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    modes = sorted({r['mode'] for r in rows}, key=MODES.index)
    fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 4), squeeze=False, sharey=True)
    for ax, mode in zip(axes[0], modes):
        for name in dict.fromkeys(r['model'] for r in rows):
            pts = sorted((r['size'], r['train_img_s']) for r in rows if r['model'] == name and r['mode'] == mode)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker='o', label=name)
        ax.set(xscale='log', yscale='log', title=f'training step, {mode}', xlabel='input size (px)')
        ax.set_xticks(sorted({r['size'] for r in rows}), labels=[str(s) for s in sorted({r['size'] for r in rows})])
    axes[0][0].set_ylabel('images / s')
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--quick', action='store_true', help='two models, 32 px, eager: about a minute')
    parser.add_argument('--models', nargs='+', default=None)
    parser.add_argument('--sizes', nargs='+', type=int, default=None)
    parser.add_argument('--modes', nargs='+', default=None, choices=MODES)
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--repeats', type=int, default=7)
    parser.add_argument('--no-memory', action='store_true', help='skip the per-process peak-memory measurement')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--out', type=Path, default=RESULTS_DIR, help='folder for speed.json/.md/.png')
    parser.add_argument('--name', default=None, help='file stem (default speed or speed_quick)')
    args = parser.parse_args(argv)
    if args.quick:
        models = args.models or ['resnet18', 'gradattn_resnet18_rope']
        sizes, modes, repeats, memory = args.sizes or [32], args.modes or ['eager'], 5, False
    else:
        models, sizes, modes = args.models or MODELS, args.sizes or SIZES, args.modes or MODES
        repeats, memory = args.repeats, not args.no_memory
    unknown = [s for s in sizes if s not in BATCH_SIZES]
    if unknown:
        parser.error(f'no batch size defined for sizes {unknown}; choose from {sorted(BATCH_SIZES)}')
    device = torch.device(args.device)
    machine = machine_description()
    print('machine:', json.dumps(machine))
    started = time.time()
    rows = run(models, sizes, modes, args.warmup, repeats, memory, device)
    stem = args.name or ('speed_quick' if args.quick else 'speed')
    args.out.mkdir(parents=True, exist_ok=True)
    result = dict(machine=machine, seconds=round(time.time() - started, 1), warmup=args.warmup, repeats=repeats,
                  batch_sizes=BATCH_SIZES, rows=rows)
    (args.out / f'{stem}.json').write_text(json.dumps(result, indent=2))
    table = ratio_table(rows)
    header = (f'# Speed against resnet18\n\nMachine: {machine}\n\nMedian of {repeats} timed steps after '
              f'{args.warmup} warm-up steps. Efficiency = time ratio / FLOP ratio (1.0 = pays only for its arithmetic).\n\n')
    (args.out / f'{stem}.md').write_text(header + table + '\n')
    plot(rows, args.out / f'{stem}.png')
    print(table)
    print(f'wrote {args.out / stem}.json/.md/.png in {time.time() - started:.0f} s')


if __name__ == '__main__':
    main()
