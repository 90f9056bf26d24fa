"""Speed of the zoo, side by side with timm's ResNet-18, on this machine.

One run measures timm's ``resnet18`` and ``seresnet18``, the SE/CBAM baselines and the three GradAttn
variants at 28, 32, 64, 96 and 224 px in four execution modes (eager, ``torch.compile``, channels-last,
bf16 autocast): training-step and inference throughput (images/s, median of timed steps after warm-up),
parameters, FLOPs and the peak memory of a training step. Results go to JSON, a Markdown report of ratios
against ``resnet18`` and a plot, with the machine description and its load average before and after.

    python benchmarks/speed.py                   # full grid: about 8 minutes on a 2-core CPU
    python benchmarks/speed.py --quick           # about a minute: resnet18 and GradAttn-RoPE, 32 px, eager
    python benchmarks/speed.py --max-load 1.3    # first wait (up to --wait-minutes) for a quiet machine

Efficiency = (time ratio) / (FLOP ratio) against ``resnet18``: 1.0 means a model pays exactly for its extra
arithmetic. FLOPs are torch's ``FlopCounterMode`` count of the forward pass. A direct convolution skips the
kernel taps that fall on zero padding, which on small maps is most of them (a 3x3 conv on a 1x1 map uses one
tap of nine), so the report also gives the executed FLOPs, with those taps left out, and the efficiency
against them.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch._dynamo
import torch._inductor.config
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import timm
import timm_gradattn  # noqa: F401  (registers the zoo)
from timm_gradattn.cpu import keep_freed_memory

MODELS = ('resnet18', 'seresnet18', 'resnet18_se', 'resnet18_cbam',
          'gradattn_resnet18_nope', 'gradattn_resnet18_lpe', 'gradattn_resnet18_rope')
BASELINE = 'resnet18'
SIZES = (28, 32, 64, 96, 224)
# At least 16 everywhere: below 16 the CPU convolution picks another backend, which would make a graph
# compiled with a dynamic batch dimension recompile at 224 px.
BATCH_SIZES = {28: 64, 32: 64, 64: 32, 96: 16, 224: 16}
MODES = ('eager', 'compile', 'channels_last', 'bf16')
TARGET_SIZES = (32, 64, 224)
TARGET_EFFICIENCY = 1.05
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


def load_average() -> Optional[List[float]]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # not available on this platform
        return None


def wait_for_quiet(max_load: float, wait_minutes: float) -> Tuple[bool, float]:
    """Wait until the 1-minute load average is below ``max_load``; returns (quiet, seconds waited)."""
    start = time.time()
    while True:
        load = load_average()
        if load is None or load[0] < max_load:
            return True, time.time() - start
        if time.time() - start > wait_minutes * 60:
            return False, time.time() - start
        print(f'load average {load[0]:.2f} >= {max_load}; waiting for a quiet machine...', flush=True)
        time.sleep(30)


# --- arithmetic ---------------------------------------------------------------------------------------------
def _taps_inside(in_size: int, out_size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """Kernel taps, summed over output positions, that land inside the input rather than on padding."""
    return sum(sum(0 <= o * stride - padding + k * dilation < in_size for k in range(kernel))
               for o in range(out_size))


def forward_flops(name: str, size: int) -> Tuple[int, int]:
    """(counted, executed) forward FLOPs per image: FlopCounterMode's, and the same without padding taps."""
    model = timm.create_model(name, num_classes=NUM_CLASSES).eval()
    padding_flops = [0]

    def count_padding_taps(module: nn.Conv2d, inputs, output):
        height, width = inputs[0].shape[-2:]
        inside = (_taps_inside(height, output.shape[-2], module.kernel_size[0], module.stride[0],
                               module.padding[0], module.dilation[0])
                  * _taps_inside(width, output.shape[-1], module.kernel_size[1], module.stride[1],
                                 module.padding[1], module.dilation[1]))
        all_taps = output.shape[-2] * output.shape[-1] * module.kernel_size[0] * module.kernel_size[1]
        macs_per_tap = module.in_channels // module.groups * module.out_channels
        padding_flops[0] += 2 * macs_per_tap * (all_taps - inside)

    hooks = [m.register_forward_hook(count_padding_taps) for m in model.modules() if isinstance(m, nn.Conv2d)]
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.randn(1, 3, size, size))
    for hook in hooks:
        hook.remove()
    counted = counter.get_total_flops()
    return counted, counted - padding_flops[0]


_MEMORY_SCRIPT = '''
import resource, sys, torch, timm, timm_gradattn, torch.nn.functional as F
name, size, batch_size, num_classes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
model = timm.create_model(name, num_classes=num_classes)
x, y = torch.randn(batch_size, 3, size, size), torch.zeros(batch_size, dtype=torch.long)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
F.cross_entropy(model(x), y).backward()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
'''


def peak_train_memory_mb(name: str, size: int, batch_size: int) -> float:
    """Peak resident memory added by one eager training step, in a fresh process so earlier runs don't mask it."""
    env = dict(os.environ, OMP_NUM_THREADS='1')  # two of these run side by side; memory does not depend on it
    out = subprocess.run([sys.executable, '-c', _MEMORY_SCRIPT, name, str(size), str(batch_size), str(NUM_CLASSES)],
                         capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(f'Memory measurement of {name} at {size} px failed:\n{out.stderr[-2000:]}')
    return float(out.stdout.strip().splitlines()[-1])


# --- timing -------------------------------------------------------------------------------------------------
def configure_compile(device: torch.device) -> None:
    # All models of a mode live side by side, and models of one class share a forward code object, which
    # keeps two graphs (inference, training) per model and size.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 2 * len(SIZES) * len(MODELS))
    if device.type == 'cpu':
        # Inductor's channels-last layout pass re-lays-out every convolution weight on every training step
        # of an NCHW model, which on CPU costs more than it saves (resnet18 at 32 px: 1.3x eager).
        torch._inductor.config.layout_optimization = False
        # aten's random numbers for dropout: the same masks as eager for a seed, so compiled and eager training
        # steps do the same work (inductor's own CPU generator is a different, code-generated sampler).
        torch._inductor.config.fallback_random = True


def make_steps(model: nn.Module, mode: str, device: torch.device) -> Tuple[Callable, Callable]:
    """One inference step and one training step (forward, cross-entropy, backward, SGD update) under ``mode``."""
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if mode == 'bf16' else nullcontext()
    if mode == 'compile':
        # Static shapes: one graph per size and train/eval. Inductor's CPU kernels for dynamic shapes are
        # 5-25 % slower here (the stem's max-pool above all), and its convolution-backward lowering specialises
        # training graphs to the input size anyway, so dynamic shapes would save only inference compiles.
        forward = torch.compile(model, fullgraph=True, dynamic=False)
    else:
        forward = model
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


def interleaved_medians(steps: List[Callable[[], None]], warmup: int, repeats: int,
                        device: torch.device) -> Tuple[List[float], List[float]]:
    """Median seconds of each step, timed in rotating round-robin order, and the duration of each first call.

    Interleaving puts every model under the same background conditions, so slow drifts of a shared machine
    (seconds to minutes) cancel in the ratios. The first call includes any compilation.
    """
    def timed(step) -> float:
        if device.type == 'cuda':
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == 'cuda':
            torch.cuda.synchronize()
        return time.perf_counter() - start

    first = [timed(step) for step in steps]
    for _ in range(warmup - 1):
        for step in steps:
            step()
    times: List[List[float]] = [[] for _ in steps]
    for repeat in range(repeats):
        for offset in range(len(steps)):
            index = (repeat + offset) % len(steps)
            times[index].append(timed(steps[index]))
    return [statistics.median(t) for t in times], first


def repeats_at(size: int, repeats: int) -> int:
    # A 224 px step takes ~5x a 64 px one; fewer repeats there keep the grid within its time budget.
    return max(3, repeats // 2) if size >= 224 else repeats


def measure(models, sizes, modes, warmup, repeats, memory, device) -> List[Dict]:
    """Every mode builds all models once; at each size the models' steps are timed interleaved.

    The compile pass also times each model eagerly, interleaved with its compiled steps, so that compile
    and eager are compared under the same conditions rather than minutes apart.
    """
    params = {name: sum(p.numel() for p in timm.create_model(name, num_classes=NUM_CLASSES).parameters())
              for name in models}
    flops = {(name, size): forward_flops(name, size) for name in models for size in sizes}
    rows = []
    for mode in modes:
        torch._dynamo.reset()
        built = []
        for name in models:
            torch.manual_seed(0)
            model = timm.create_model(name, num_classes=NUM_CLASSES).to(device)
            if mode == 'channels_last':
                model = model.to(memory_format=torch.channels_last)
            built.append((model, *make_steps(model, mode, device)))
        if mode == 'compile':
            built += [(model, *make_steps(model, 'eager', device)) for model, _, _ in built]
        for size in sizes:
            batch_size = BATCH_SIZES[size]
            x = torch.randn(batch_size, 3, size, size, device=device)
            if mode == 'channels_last':
                x = x.contiguous(memory_format=torch.channels_last)
            y = torch.randint(0, NUM_CLASSES, (batch_size,), device=device)
            steps = repeats_at(size, repeats)
            results = {}
            for kind in ('infer', 'train'):
                def step_of(model, step):
                    def run():
                        model.train(kind == 'train')
                        step(x, y)
                    return run
                index = 1 if kind == 'infer' else 2
                results[kind] = interleaved_medians([step_of(b[0], b[index]) for b in built], warmup, steps, device)
            for i, name in enumerate(models):
                row = dict(model=name, size=size, batch_size=batch_size, mode=mode, repeats=steps, params=params[name],
                           gflops_per_image=flops[name, size][0] / 1e9,
                           executed_gflops_per_image=flops[name, size][1] / 1e9,
                           peak_train_mem_mb=memory.get((name, size)),
                           infer_img_s=batch_size / results['infer'][0][i],
                           train_img_s=batch_size / results['train'][0][i])
                if mode == 'compile':
                    eager = len(models) + i
                    row.update(infer_first_call_s=round(results['infer'][1][i], 2),
                               train_first_call_s=round(results['train'][1][i], 2),
                               eager_infer_img_s_same_pass=batch_size / results['infer'][0][eager],
                               eager_train_img_s_same_pass=batch_size / results['train'][0][eager])
                rows.append(row)
                print(f"{name:24s} {size:4d}px b{batch_size:<3d} {mode:14s} infer {row['infer_img_s']:9.1f} img/s  "
                      f"train {row['train_img_s']:8.1f} img/s  {row['gflops_per_image']:.3f} GFLOP", flush=True)
        del built
    return rows


def measure_memory(models, sizes) -> Dict[Tuple[str, int], float]:
    jobs = [(name, size) for name in models for size in sizes]
    with ThreadPoolExecutor(max_workers=2) as pool:  # separate processes; nothing is being timed meanwhile
        peaks = list(pool.map(lambda job: peak_train_memory_mb(job[0], job[1], BATCH_SIZES[job[1]]), jobs))
    return dict(zip(jobs, peaks))


# --- report -------------------------------------------------------------------------------------------------
def add_ratios(rows: List[Dict], baseline: str = BASELINE) -> None:
    """Time and FLOP ratios against the baseline at the same size and mode, and their quotient (efficiency)."""
    base = {(r['size'], r['mode']): r for r in rows if r['model'] == baseline}
    for r in rows:
        b = base.get((r['size'], r['mode']))
        if b is None:
            continue
        r['flop_ratio'] = r['gflops_per_image'] / b['gflops_per_image']
        r['executed_flop_ratio'] = r['executed_gflops_per_image'] / b['executed_gflops_per_image']
        for kind in ('infer', 'train'):
            r[f'{kind}_time_ratio'] = b[f'{kind}_img_s'] / r[f'{kind}_img_s']
            r[f'{kind}_efficiency'] = r[f'{kind}_time_ratio'] / r['flop_ratio']
            r[f'{kind}_executed_efficiency'] = r[f'{kind}_time_ratio'] / r['executed_flop_ratio']


def _find(rows, model, size, mode) -> Optional[Dict]:
    return next((r for r in rows if (r['model'], r['size'], r['mode']) == (model, size, mode)), None)


def efficiency_table(rows: List[Dict], key: str) -> str:
    """GradAttn rows: '<inference> / <training>' efficiency per size, one line per model and mode."""
    sizes = sorted({r['size'] for r in rows})
    modes = [m for m in MODES if any(r['mode'] == m for r in rows)]
    names = [n for n in dict.fromkeys(r['model'] for r in rows) if n.startswith('gradattn')]
    lines = ['| model | mode | ' + ' | '.join(f'{s} px' for s in sizes) + ' |', '|---|---|' + '---|' * len(sizes)]
    for name in names:
        for mode in modes:
            cells = []
            for size in sizes:
                r = _find(rows, name, size, mode)
                if r is None or f'infer_{key}' not in r:
                    cells.append('')
                    continue
                flag = ('' if size not in TARGET_SIZES else ' ok' if max(r[f'infer_{key}'], r[f'train_{key}'])
                        <= TARGET_EFFICIENCY else ' **over**')
                cells.append(f"{r[f'infer_{key}']:.2f} / {r[f'train_{key}']:.2f}{flag}")
            lines.append(f'| {name} | {mode} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def flop_ratio_table(rows: List[Dict]) -> str:
    sizes = sorted({r['size'] for r in rows})
    names = [n for n in dict.fromkeys(r['model'] for r in rows) if n != BASELINE]
    lines = ['| model | ' + ' | '.join(f'{s} px' for s in sizes) + ' |', '|---|' + '---|' * len(sizes)]
    for name in names:
        cells = []
        for size in sizes:
            r = next((r for r in rows if r['model'] == name and r['size'] == size and 'flop_ratio' in r), None)
            cells.append(f"{r['flop_ratio']:.3f} / {r['executed_flop_ratio']:.3f}" if r else '')
        lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def relative_table(rows: List[Dict], reference: Callable[[Dict], Optional[Dict]], names: List[str],
                   modes: List[str]) -> str:
    """'<inference> / <training>' speed-up of each row over the row ``reference`` picks for it."""
    sizes = sorted({r['size'] for r in rows})
    lines = ['| model | mode | ' + ' | '.join(f'{s} px' for s in sizes) + ' |', '|---|---|' + '---|' * len(sizes)]
    for name in names:
        for mode in modes:
            cells = []
            for size in sizes:
                r, other = _find(rows, name, size, mode), None
                if r is not None:
                    other = reference(r)
                cells.append(f"{r['infer_img_s'] / other['infer_img_s']:.2f} / "
                             f"{r['train_img_s'] / other['train_img_s']:.2f}" if r and other else '')
            lines.append(f'| {name} | {mode} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def full_table(rows: List[Dict]) -> str:
    lines = [
        '| model | size | batch | mode | params | GFLOP/img | executed GFLOP/img | peak train MB | infer img/s | '
        'train img/s | FLOP ratio | infer time ratio | train time ratio | infer eff. | train eff. |',
        '|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|',
    ]
    for r in rows:
        if 'flop_ratio' not in r:
            continue
        mem = f"{r['peak_train_mem_mb']:.0f}" if r.get('peak_train_mem_mb') is not None else ''
        lines.append(
            f"| {r['model']} | {r['size']} | {r['batch_size']} | {r['mode']} | {r['params'] / 1e6:.2f} M | "
            f"{r['gflops_per_image']:.3f} | {r['executed_gflops_per_image']:.3f} | {mem} | {r['infer_img_s']:.1f} | "
            f"{r['train_img_s']:.1f} | {r['flop_ratio']:.3f} | {r['infer_time_ratio']:.3f} | "
            f"{r['train_time_ratio']:.3f} | {r['infer_efficiency']:.3f} | {r['train_efficiency']:.3f} |")
    return '\n'.join(lines)


def report(result: Dict) -> str:
    rows = result['rows']
    names = list(dict.fromkeys(r['model'] for r in rows))
    modes = [m for m in MODES if any(r['mode'] == m for r in rows)]
    parts = [
        '# Speed against resnet18',
        f"Machine: {result['machine']}.  \nLoad average (1, 5, 15 min) before: {result['load_before']}, after: "
        f"{result['load_after']}{'' if result['quiet'] else ' (the machine did not get quiet; timings are noisy)'}."
        f"  \nWall time of this run: {result['seconds'] / 60:.1f} min. Median of {result['repeats']} timed steps "
        f"({repeats_at(224, result['repeats'])} at 224 px) after {result['warmup']} warm-up steps; batch sizes "
        f"{result['batch_sizes']}. Training step: forward, cross-entropy, backward, SGD update. glibc malloc "
        f"{'keeps freed memory (no trimming)' if result['malloc_keeps_freed_memory'] else 'with its default trimming'}.",
        'Modes: eager fp32 NCHW; compile = `torch.compile(fullgraph=True, dynamic=False)`, one graph per size '
        '(on CPU without inductor\'s layout pass and with aten\'s random numbers); channels_last = eager with '
        'channels-last model and input; '
        'bf16 = eager under `torch.autocast(bfloat16)`.',
        '## FLOP ratio against resnet18 (counted / executed)',
        'Counted: `FlopCounterMode`. Executed: the same without the convolution taps that fall on zero padding, '
        'which a direct convolution does not compute.',
        flop_ratio_table(rows),
    ]
    if any(n.startswith('gradattn') for n in names):
        parts += [
            '## GradAttn efficiency: time ratio / FLOP ratio against resnet18 (inference / training)',
            f'Target: at most {TARGET_EFFICIENCY} at {", ".join(map(str, TARGET_SIZES))} px ("ok" / "**over**").',
            efficiency_table(rows, 'efficiency'),
            '### The same against executed FLOPs',
            efficiency_table(rows, 'executed_efficiency'),
        ]
    if 'compile' in modes:
        parts += ['## torch.compile against eager: speed-up (inference / training; above 1 = compile is faster)',
                  'Eager timed in the compile pass, interleaved with the compiled steps.',
                  relative_table(rows, lambda r: dict(infer_img_s=r['eager_infer_img_s_same_pass'],
                                                      train_img_s=r['eager_train_img_s_same_pass']),
                                 names, ['compile'])]
    attention_baselines = [n for n in ('resnet18_se', 'resnet18_cbam') if n in names]
    if attention_baselines and 'seresnet18' in names:
        parts += ["## SE / CBAM baselines against timm's seresnet18: speed-up (inference / training; "
                  'at least 1 = no slower)',
                  relative_table(rows, lambda r: _find(rows, 'seresnet18', r['size'], r['mode']),
                                 attention_baselines, modes)]
    parts += ['## All measurements', full_table(rows)]
    return '\n\n'.join(parts) + '\n'


def plot(rows: List[Dict], path: Path) -> None:
    """Time per image relative to resnet18 (training row, inference row; one column per mode), with the
    GradAttn FLOP ratio (counted: dotted, executed: dash-dotted) that a model paying only for its arithmetic
    would follow."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    rows = [r for r in rows if 'flop_ratio' in r]
    if not rows:
        return
    modes = [m for m in MODES if any(r['mode'] == m for r in rows)]
    sizes = sorted({r['size'] for r in rows})
    names = [n for n in dict.fromkeys(r['model'] for r in rows) if n != BASELINE]
    fig, axes = plt.subplots(2, len(modes), figsize=(4.5 * len(modes), 7.5), squeeze=False, sharey=True)
    for row_axes, kind in zip(axes, ('train', 'infer')):
        for ax, mode in zip(row_axes, modes):
            for name in names:
                pts = sorted((r['size'], r[f'{kind}_time_ratio'])
                             for r in rows if r['model'] == name and r['mode'] == mode)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker='o', label=name,
                        linestyle='-' if name.startswith('gradattn') else '--')
            gradattn = [r for r in rows if r['model'].startswith('gradattn') and r['mode'] == mode]
            for key, style, label in (('flop_ratio', ':', 'GradAttn FLOP ratio'),
                                      ('executed_flop_ratio', '-.', 'GradAttn executed-FLOP ratio')):
                pts = sorted({(r['size'], r[key]) for r in gradattn})
                ax.plot([p[0] for p in pts], [p[1] for p in pts], color='black', linestyle=style, label=label)
            ax.axhline(1.0, color='grey', linewidth=0.8)
            ax.set(xscale='log', title=f"{'training step' if kind == 'train' else 'inference'}, {mode}",
                   xlabel='input size (px)')
            ax.set_xticks(sizes, labels=[str(s) for s in sizes])
            ax.minorticks_off()
        row_axes[0].set_ylabel(f'time per image / {BASELINE}\'s')
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--quick', action='store_true', help='resnet18 and GradAttn-RoPE, 32 px, eager: about a minute')
    parser.add_argument('--models', nargs='+', default=None, help=f'default: {" ".join(MODELS)}')
    parser.add_argument('--sizes', nargs='+', type=int, default=None, help=f'default: {" ".join(map(str, SIZES))}')
    parser.add_argument('--modes', nargs='+', default=None, choices=MODES)
    parser.add_argument('--warmup', type=int, default=2, help='untimed steps per size and mode (the first compiles)')
    parser.add_argument('--repeats', type=int, default=9, help='timed steps per size and mode (halved at 224 px)')
    parser.add_argument('--no-memory', action='store_true', help='skip the per-process peak-memory measurement')
    parser.add_argument('--max-load', type=float, default=None,
                        help='wait until the 1-minute load average is below this before measuring')
    parser.add_argument('--wait-minutes', type=float, default=40, help='longest wait for --max-load')
    parser.add_argument('--default-malloc', action='store_true',
                        help="keep glibc's default trimming of freed memory (see keep_freed_memory)")
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--out', type=Path, default=RESULTS_DIR, help='folder for <name>.json/.md/.png')
    parser.add_argument('--name', default=None, help='file stem (default speed, or speed_quick with --quick)')
    args = parser.parse_args(argv)
    if args.quick:
        models = args.models or [BASELINE, 'gradattn_resnet18_rope']
        sizes, modes, repeats, memory = args.sizes or [32], args.modes or ['eager'], 9, False
    else:
        models, sizes, modes = args.models or MODELS, args.sizes or SIZES, args.modes or MODES
        repeats, memory = args.repeats, not args.no_memory
    unknown = [s for s in sizes if s not in BATCH_SIZES]
    if unknown:
        parser.error(f'no batch size defined for sizes {unknown}; choose from {sorted(BATCH_SIZES)}')
    if args.warmup < 1:
        parser.error(f'--warmup {args.warmup}: at least one warm-up step is needed (the first call compiles)')
    if BASELINE not in models:
        print(f'note: {BASELINE} is not among --models, so no ratios can be computed')
    device = torch.device(args.device)
    configure_compile(device)
    malloc_tuned = False if args.default_malloc else keep_freed_memory()

    quiet, waited = True, 0.
    if args.max_load is not None:
        quiet, waited = wait_for_quiet(args.max_load, args.wait_minutes)
    machine = machine_description()
    load_before = load_average()
    print('machine:', json.dumps(machine), '| load average:', load_before, flush=True)
    started = time.time()
    memory_mb = measure_memory(models, sizes) if memory and device.type == 'cpu' else {}
    memory_s = time.time() - started
    rows = measure(models, sizes, modes, args.warmup, repeats, memory_mb, device)
    add_ratios(rows)
    load_after = load_average()
    result = dict(machine=machine, load_before=load_before, load_after=load_after, quiet=quiet,
                  waited_for_quiet_s=round(waited), malloc_keeps_freed_memory=malloc_tuned,
                  seconds=round(time.time() - started, 1),
                  memory_seconds=round(memory_s, 1), warmup=args.warmup, repeats=repeats,
                  batch_sizes=BATCH_SIZES, command=' '.join(['python', 'benchmarks/speed.py'] + (argv or sys.argv[1:])),
                  rows=rows)
    stem = args.name or ('speed_quick' if args.quick else 'speed')
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f'{stem}.json').write_text(json.dumps(result, indent=2))
    text = report(result)
    (args.out / f'{stem}.md').write_text(text)
    plot(rows, args.out / f'{stem}.png')
    print(text)
    print(f'wrote {args.out / stem}.json/.md/.png in {time.time() - started:.0f} s')


if __name__ == '__main__':
    main()
