"""Speed of the zoo, side by side with timm's ResNet-18, on this machine.

One run measures timm's ``resnet18`` and ``seresnet18``, the SE/CBAM baselines and the three GradAttn
variants (the GradAttn family of ``timm_gradattn.families``) at 28, 32, 64, 96 and 224 px in four execution
modes (eager, ``torch.compile``, channels-last, bf16 autocast): training-step and inference throughput
(images/s, median of timed steps after warm-up), ONNX Runtime inference throughput beside eager on CPU (when
onnxruntime is installed), parameters, FLOPs and the peak memory of a training step. Results go to JSON, a
Markdown report of ratios against ``resnet18`` and a plot, with the machine description and its load average
before and after.

    python benchmarks/speed.py                   # full grid: about 8 minutes on a 2-core CPU
    python benchmarks/speed.py --quick           # about a minute: resnet18 and GradAttn-RoPE, 32 px, eager
    python benchmarks/speed.py --max-load 1.3    # first wait (up to --wait-minutes) for a quiet machine
    python benchmarks/speed.py --family cnntention            # speed_cnntention.json/.md
    python benchmarks/speed.py --family attention-shortcuts   # speed_attention-shortcuts.json/.md

``--family`` measures one model family of ``timm_gradattn.families`` (its key; ``attention_shortcuts`` is accepted
for ``attention-shortcuts``) at its own input size and batch size against its own baseline (see ``FAMILIES``),
eager only unless ``--modes`` says otherwise, and reports the family's targets beside the measurements. A model
name followed by ``:materialised`` (e.g. CNNtention's MHA model, ``<name>:materialised``) is that model with
every attention module that has a ``fused_attn`` flag switched to its explicit path (scores, softmax, weighted
sum: the formulation that materialises the score matrix), the reference the fused kernels are measured against.

Efficiency = (time ratio) / (FLOP ratio) against ``resnet18``: 1.0 means a model pays exactly for its extra
arithmetic. FLOPs are torch's ``FlopCounterMode`` count of the forward pass. A direct convolution skips the
kernel taps that fall on zero padding, which on small maps is most of them (a 3x3 conv on a 1x1 map uses one
tap of nine), so the report also gives the executed FLOPs, with those taps left out, and the efficiency
against them.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch._dynamo
import torch._inductor.config
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

import timm
import timm_gradattn  # noqa: F401  (registers the zoo)
from timm_gradattn.cpu import keep_freed_memory
from timm_gradattn.families import Family, family_key, get_family
from timm_gradattn.reporting import describe_machine, load_average, machine_line, markdown_table

# Names other benchmark scripts import from here.
machine_description = describe_machine

GRADATTN = get_family('gradattn')
# The family's own designs (named after it) and the SE / CBAM baselines trained beside them.
GRADATTN_VARIANTS = tuple(name for name in GRADATTN.models if name.startswith(GRADATTN.key))
ATTENTION_BASELINES = tuple(name for name in GRADATTN.models if name not in GRADATTN_VARIANTS)
BASELINE = GRADATTN.baseline
# timm's own SE ResNet-18 is measured beside the zoo's SE / CBAM baselines.
MODELS = (BASELINE, 'seresnet18', *ATTENTION_BASELINES, *GRADATTN_VARIANTS)
# --quick: the baseline and GradAttn-RoPE, the paper's leading variant.
QUICK_MODELS = (BASELINE, next(name for name in GRADATTN_VARIANTS if name.endswith('_rope')))
SIZES = (28, 32, 64, 96, 224)
# At least 16 everywhere: below 16 the CPU convolution picks another backend, which would make a graph
# compiled with a dynamic batch dimension recompile at 224 px.
BATCH_SIZES = {28: 64, 32: 64, 64: 32, 96: 16, 224: 16}
MODES = ('eager', 'compile', 'channels_last', 'bf16')
TARGET_SIZES = (32, 64, 224)
TARGET_EFFICIENCY = 1.05
NUM_CLASSES = 10
RESULTS_DIR = Path(__file__).parent / 'results'


def write_results(out: Path, stem: str, result: Dict, markdown: str) -> None:
    """``<out>/<stem>.json`` (the measurements) and ``<out>/<stem>.md`` (the report); prints the report."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f'{stem}.json').write_text(json.dumps(result, indent=2))
    (out / f'{stem}.md').write_text(markdown)
    print(markdown)
MATERIALISED = 'materialised'


@dataclass(frozen=True)
class FamilyBenchmark:
    """A model family's benchmark: the registry's family (its models and baseline), the input size and batch size,
    the ``:materialised`` variants measured beside the models, and the targets its issue sets. A target
    ``(model, reference, measure, limit)`` is reported, never asserted: ``measure`` is 'train_time' (training-step
    time per image / the reference's), 'train_time_per_mac' (that time ratio / the MAC ratio) or 'peak_memory'
    (peak training memory / the reference's), each at most ``limit``."""
    family: Family
    batch_size: int
    sizes: Tuple[int, ...] = (32,)
    variants: Tuple[str, ...] = ()
    targets: Tuple[Tuple[str, str, str, float], ...] = ()

    @property
    def key(self) -> str:
        return self.family.key

    @property
    def baseline(self) -> str:
        return self.family.baseline

    @property
    def models(self) -> Tuple[str, ...]:
        """The baseline first, then the family's other models, then the variants."""
        others = tuple(name for name in self.family.models if name != self.baseline)
        return (self.baseline, *others, *self.variants)


def _cnntention() -> FamilyBenchmark:
    family = get_family('cnntention')
    # SelfAtt and MHA (the registry's models after the baseline, before CBAM) attend over every position through
    # modules with a fused_attn flag: their fused kernels are measured against the materialised formulation.
    self_attention = family.models[1:3]
    return FamilyBenchmark(
        family, batch_size=128, variants=tuple(f'{name}:{MATERIALISED}' for name in self_attention),
        targets=tuple((name, f'{name}:{MATERIALISED}', measure, limit) for name in self_attention
                      for measure, limit in (('peak_memory', 1 / 3), ('train_time', 1.0))))


def _attention_shortcuts() -> FamilyBenchmark:
    family = get_family('attention-shortcuts')
    # The two AS-Nets (the paper's main designs, first in the registry) against the CIFAR ResNet-50.
    return FamilyBenchmark(
        family, batch_size=64,
        targets=tuple((name, family.baseline, measure, limit) for name in family.models[:2]
                      for measure, limit in (('train_time_per_mac', 1.10), ('peak_memory', 1.2))))


FAMILIES: Dict[str, FamilyBenchmark] = {benchmark.key: benchmark for benchmark in (
    # Batch 128 as the authors trained. The materialised formulations hold a (B, heads, 1024, 1024) score matrix
    # after stage 1: about 17 GB for MHA at batch 128. A model whose step does not fit in the memory available
    # is reported as such and left out of the timing; rerun it with --batch-size 64 (see the report).
    _cnntention(),
    # Batch 64: the memory target is set at batch 64.
    _attention_shortcuts(),
)}


def family_choice(name: str) -> str:
    """argparse ``type`` of ``--family``: the registry key for any spelling of a family (``attention_shortcuts``
    is ``attention-shortcuts``); an unknown name is kept as typed, so that ``choices`` rejects it in one line."""
    key = family_key(name)
    return key if key in FAMILIES else name


def create_model(spec: str, **kwargs) -> nn.Module:
    """The timm model ``spec`` names, with NUM_CLASSES outputs unless ``kwargs`` (timm.create_model's) say otherwise;
    ``name:materialised`` switches every module with a ``fused_attn`` flag (timm's attention, the zoo's spatial
    self-attention) to its explicit path."""
    name, _, variant = spec.partition(':')
    model = timm.create_model(name, **{'num_classes': NUM_CLASSES, **kwargs})
    if variant:
        switched = [module for module in model.modules() if hasattr(module, 'fused_attn')]
        if variant != MATERIALISED or not switched:
            raise ValueError(f'{spec!r}: the only variant is {name}:{MATERIALISED}, for a model with attention '
                             f'modules that have a fused_attn flag ({name} has {len(switched)}).')
        for module in switched:
            module.fused_attn = False
    return model


def flop_counter() -> FlopCounterMode:
    """torch's FlopCounterMode, also counting the CPU flash-attention kernel, for which torch has no formula
    (it counts the CUDA kernels): the fused and materialised formulations of an attention count the same."""
    aten = torch.ops.aten
    return FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu:
            lambda query, key, value, *args, out_shape=None, **kwargs: sdpa_flop_count(query, key, value),
        aten._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda grad_out, query, key, value, *args, out_shape=None, **kwargs: sdpa_backward_flop_count(
                grad_out, query, key, value),
    })


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


def forward_flops(name: str, size: int, in_chans: int = 3, **kwargs) -> Tuple[int, int]:
    """(counted, executed) forward FLOPs per image of ``size`` px and ``in_chans`` channels: FlopCounterMode's, and
    the same without padding taps. ``kwargs`` go to timm.create_model (e.g. ``num_classes``)."""
    model = create_model(name, in_chans=in_chans, **kwargs).eval()
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
    counter = flop_counter()
    with counter, torch.no_grad():
        model(torch.randn(1, in_chans, size, size))
    for hook in hooks:
        hook.remove()
    counted = counter.get_total_flops()
    return counted, counted - padding_flops[0]


_MEMORY_SCRIPT = '''
import resource, sys
name, size, batch_size, limit = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
if limit:  # a step that would not fit fails in torch's allocator rather than calling the kernel's OOM killer
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
sys.path.insert(0, sys.argv[5])
import torch, torch.nn.functional as F
from speed import create_model


def peak_kb():
    # VmHWM is this program's own peak. ru_maxrss also holds the RSS of the parent it was spawned from
    # (vfork + exec), which hides the step whenever the parent is the larger of the two.
    try:
        with open('/proc/self/status') as status:
            return next(int(line.split()[1]) for line in status if line.startswith('VmHWM:'))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


model = create_model(name)
x, y = torch.randn(batch_size, 3, size, size), torch.zeros(batch_size, dtype=torch.long)
base = peak_kb()
try:
    F.cross_entropy(model(x), y).backward()
except RuntimeError as error:
    if "can't allocate memory" not in str(error) and 'not enough memory' not in str(error):
        raise
    print('did not fit')
else:
    print((peak_kb() - base) / 1024)
'''


def available_memory_bytes() -> int:
    """MemAvailable of /proc/meminfo: what a process can take without swapping or the OOM killer; 0 if unknown."""
    try:
        with open('/proc/meminfo') as meminfo:
            return next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith('MemAvailable:'))
    except (OSError, StopIteration):
        return 0


def peak_train_memory_mb(name: str, size: int, batch_size: int) -> Optional[float]:
    """Peak resident memory added by one eager training step, in a fresh process so earlier runs don't mask it;
    None when the step does not fit in the memory available."""
    env = dict(os.environ, OMP_NUM_THREADS='1')  # two of these run side by side; memory does not depend on it
    out = subprocess.run([sys.executable, '-c', _MEMORY_SCRIPT, name, str(size), str(batch_size),
                          str(available_memory_bytes()), str(Path(__file__).resolve().parent)],
                         capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(f'Memory measurement of {name} at {size} px failed:\n{out.stderr[-2000:]}')
    result = out.stdout.strip().splitlines()[-1]
    return None if result == 'did not fit' else float(result)


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


def make_onnxruntime_steps(models: List[nn.Module], x: torch.Tensor) -> List[Callable[[], None]]:
    """One ONNX Runtime inference step per model, or none without onnxruntime.

    Each model goes through timm's ``onnx_export`` (TorchScript exporter, dynamic batch axis) at ``x``'s size
    and runs on onnxruntime's CPU provider with torch's thread count, so both libraries get the same cores.
    """
    try:
        import onnxruntime
    except ImportError:
        return []
    from timm.utils.onnx import onnx_export
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = torch.get_num_threads(), 1
    # onnxruntime's idle threads otherwise spin for a while after each run, taking cores from the eager
    # step timed next.
    options.add_session_config_entry('session.intra_op.allow_spinning', '0')
    inputs = x.cpu().numpy()
    steps = []
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter('ignore')  # the TorchScript exporter's tracer warnings
        for index, model in enumerate(models):
            path = os.path.join(folder, f'{index}.onnx')
            onnx_export(model.eval(), path, example_input=x[:2].cpu(), check=False)
            session = onnxruntime.InferenceSession(path, options, providers=['CPUExecutionProvider'])
            feed = {session.get_inputs()[0].name: inputs}
            steps.append(lambda session=session, feed=feed: session.run(None, feed))
    return steps


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


def measure(models, sizes, modes, warmup, repeats, memory, device, batch_sizes=BATCH_SIZES,
            onnxruntime=True) -> List[Dict]:
    """Every mode builds all models once; at each size the models' steps are timed interleaved.

    The compile pass also times each model eagerly, interleaved with its compiled steps, so that compile
    and eager are compared under the same conditions rather than minutes apart. On CPU the eager pass times
    ONNX Runtime inference the same way (with ``onnxruntime``), interleaved with eager inference. A model whose
    training step did not fit in memory (``memory`` holds None for it) is left out at that size.
    """
    params = {name: sum(p.numel() for p in create_model(name).parameters()) for name in models}
    flops = {(name, size): forward_flops(name, size) for name in models for size in sizes}
    rows = []
    for mode in modes:
        torch._dynamo.reset()
        built = []
        for name in models:
            torch.manual_seed(0)
            model = create_model(name).to(device)
            if mode == 'channels_last':
                model = model.to(memory_format=torch.channels_last)
            built.append((model, *make_steps(model, mode, device)))
        if mode == 'compile':
            built += [(model, *make_steps(model, 'eager', device)) for model, _, _ in built]
        for size in sizes:
            batch_size = batch_sizes[size]
            fits = [i for i, name in enumerate(models) if (name, size) not in memory or memory[name, size] is not None]
            fitting = [built[i] for i in fits] + ([built[len(models) + i] for i in fits] if mode == 'compile' else [])
            x = torch.randn(batch_size, 3, size, size, device=device)
            if mode == 'channels_last':
                x = x.contiguous(memory_format=torch.channels_last)
            y = torch.randint(0, NUM_CLASSES, (batch_size,), device=device)
            steps = repeats_at(size, repeats)
            onnx_steps = make_onnxruntime_steps([b[0] for b in fitting], x) if (
                onnxruntime and mode == 'eager' and device.type == 'cpu') else []
            results = {}
            for kind in ('infer', 'train'):
                def step_of(model, step):
                    def run():
                        model.train(kind == 'train')
                        step(x, y)
                    return run
                index = 1 if kind == 'infer' else 2
                results[kind] = interleaved_medians([step_of(b[0], b[index]) for b in fitting]
                                                    + (onnx_steps if kind == 'infer' else []), warmup, steps, device)
            for i, name in enumerate(models[j] for j in fits):
                row = dict(model=name, size=size, batch_size=batch_size, mode=mode, repeats=steps, params=params[name],
                           gflops_per_image=flops[name, size][0] / 1e9,
                           executed_gflops_per_image=flops[name, size][1] / 1e9,
                           peak_train_mem_mb=memory.get((name, size)),
                           infer_img_s=batch_size / results['infer'][0][i],
                           train_img_s=batch_size / results['train'][0][i])
                if mode == 'compile':
                    eager = len(fits) + i
                    row.update(infer_first_call_s=round(results['infer'][1][i], 2),
                               train_first_call_s=round(results['train'][1][i], 2),
                               eager_infer_img_s_same_pass=batch_size / results['infer'][0][eager],
                               eager_train_img_s_same_pass=batch_size / results['train'][0][eager])
                if onnx_steps:
                    row['onnxruntime_infer_img_s'] = batch_size / results['infer'][0][len(fitting) + i]
                rows.append(row)
                print(f"{name:24s} {size:4d}px b{batch_size:<3d} {mode:14s} infer {row['infer_img_s']:9.1f} img/s  "
                      f"train {row['train_img_s']:8.1f} img/s  {row['gflops_per_image']:.3f} GFLOP", flush=True)
        del built
    return rows


def measure_memory(models, sizes, batch_sizes=BATCH_SIZES) -> Dict[Tuple[str, int], Optional[float]]:
    """Peak training-step memory of each model and size (None: did not fit). Materialised attention runs last,
    alone: it can take most of the machine's memory."""
    jobs = [(name, size) for name in models for size in sizes]
    alone = [job for job in jobs if job[0].endswith(f':{MATERIALISED}')]
    together = [job for job in jobs if job not in alone]
    with ThreadPoolExecutor(max_workers=2) as pool:  # separate processes; nothing is being timed meanwhile
        peaks = dict(zip(together, pool.map(lambda job: peak_train_memory_mb(*job, batch_sizes[job[1]]), together)))
    peaks.update({job: peak_train_memory_mb(*job, batch_sizes[job[1]]) for job in alone})
    return {job: peaks[job] for job in jobs}


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


def _size_header(rows: List[Dict], *first: str) -> List[str]:
    return [*first, *(f'{s} px' for s in sorted({r['size'] for r in rows}))]


def efficiency_table(rows: List[Dict], key: str) -> str:
    """GradAttn rows: '<inference> / <training>' efficiency per size, one line per model and mode."""
    sizes = sorted({r['size'] for r in rows})
    modes = [m for m in MODES if any(r['mode'] == m for r in rows)]
    names = [n for n in dict.fromkeys(r['model'] for r in rows) if n.startswith(GRADATTN.key)]

    def cell(r: Optional[Dict], size: int) -> str:
        if r is None or f'infer_{key}' not in r:
            return ''
        flag = ('' if size not in TARGET_SIZES else ' ok' if max(r[f'infer_{key}'], r[f'train_{key}'])
                <= TARGET_EFFICIENCY else ' **over**')
        return f"{r[f'infer_{key}']:.2f} / {r[f'train_{key}']:.2f}{flag}"
    return markdown_table(_size_header(rows, 'model', 'mode'), [
        [name, mode, *(cell(_find(rows, name, size, mode), size) for size in sizes)]
        for name in names for mode in modes])


def flop_ratio_table(rows: List[Dict]) -> str:
    sizes = sorted({r['size'] for r in rows})
    names = [n for n in dict.fromkeys(r['model'] for r in rows) if n != BASELINE]

    def cell(name: str, size: int) -> str:
        r = next((r for r in rows if r['model'] == name and r['size'] == size and 'flop_ratio' in r), None)
        return f"{r['flop_ratio']:.3f} / {r['executed_flop_ratio']:.3f}" if r else ''
    return markdown_table(_size_header(rows, 'model'), [[name, *(cell(name, s) for s in sizes)] for name in names])


def relative_table(rows: List[Dict], reference: Callable[[Dict], Optional[Dict]], names: List[str],
                   modes: List[str]) -> str:
    """'<inference> / <training>' speed-up of each row over the row ``reference`` picks for it."""
    sizes = sorted({r['size'] for r in rows})

    def cell(r: Optional[Dict]) -> str:
        other = reference(r) if r is not None else None
        return (f"{r['infer_img_s'] / other['infer_img_s']:.2f} / {r['train_img_s'] / other['train_img_s']:.2f}"
                if r and other else '')
    return markdown_table(_size_header(rows, 'model', 'mode'), [
        [name, mode, *(cell(_find(rows, name, size, mode)) for size in sizes)] for name in names for mode in modes])


def full_table(rows: List[Dict]) -> str:
    header = ['model', 'size', 'batch', 'mode', 'params', 'GFLOP/img', 'executed GFLOP/img', 'peak train MB',
              'infer img/s', 'ONNX Runtime infer img/s', 'train img/s', 'FLOP ratio', 'infer time ratio',
              'train time ratio', 'infer eff.', 'train eff.']
    return markdown_table(header, [
        [r['model'], r['size'], r['batch_size'], r['mode'], f"{r['params'] / 1e6:.2f} M",
         f"{r['gflops_per_image']:.3f}", f"{r['executed_gflops_per_image']:.3f}",
         f"{r['peak_train_mem_mb']:.0f}" if r.get('peak_train_mem_mb') is not None else '',
         f"{r['infer_img_s']:.1f}",
         f"{r['onnxruntime_infer_img_s']:.1f}" if r.get('onnxruntime_infer_img_s') is not None else '',
         f"{r['train_img_s']:.1f}", f"{r['flop_ratio']:.3f}",
         f"{r['infer_time_ratio']:.3f}", f"{r['train_time_ratio']:.3f}", f"{r['infer_efficiency']:.3f}",
         f"{r['train_efficiency']:.3f}"] for r in rows if 'flop_ratio' in r])


def _run_description(result: Dict) -> str:
    at_224 = '' if result.get('family') else f"({repeats_at(224, result['repeats'])} at 224 px) "
    malloc = 'keeps freed memory (no trimming)' if result['malloc_keeps_freed_memory'] else 'with its default trimming'
    return (
        f"Machine: {machine_line(result['machine'])}.  \n"
        f"Load average (1, 5, 15 min) before: {result['load_before']}, after: "
        f"{result['load_after']}{'' if result['quiet'] else ' (the machine did not get quiet; timings are noisy)'}."
        f"  \nWall time of this run: {result['seconds'] / 60:.1f} min. Median of {result['repeats']} timed steps "
        f"{at_224}after {result['warmup']} warm-up steps; batch sizes "
        f"{result['batch_sizes']}. Training step: forward, cross-entropy, backward, SGD update. glibc malloc "
        f"{malloc}.")


def report(result: Dict) -> str:
    if result.get('family'):
        return family_report(result)
    rows = result['rows']
    names = list(dict.fromkeys(r['model'] for r in rows))
    modes = [m for m in MODES if any(r['mode'] == m for r in rows)]
    parts = [
        '# Speed against resnet18',
        _run_description(result),
        'Modes: eager fp32 NCHW; compile = `torch.compile(fullgraph=True, dynamic=False)`, one graph per size '
        '(on CPU without inductor\'s layout pass and with aten\'s random numbers); channels_last = eager with '
        'channels-last model and input; '
        'bf16 = eager under `torch.autocast(bfloat16)`. ONNX Runtime (CPU, eager pass): timm\'s `onnx_export` '
        '(TorchScript exporter, dynamic batch) run by onnxruntime\'s CPU provider with torch\'s thread count.',
        '## FLOP ratio against resnet18 (counted / executed)',
        'Counted: `FlopCounterMode`. Executed: the same without the convolution taps that fall on zero padding, '
        'which a direct convolution does not compute.',
        flop_ratio_table(rows),
    ]
    if any(n.startswith(GRADATTN.key) for n in names):
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
    onnx_rows = [r for r in rows if r.get('onnxruntime_infer_img_s') is not None]
    if onnx_rows:
        sizes = sorted({r['size'] for r in onnx_rows})
        parts += ['## ONNX Runtime against eager: inference speed-up (above 1 = ONNX Runtime is faster)',
                  'Timed in the eager pass, interleaved with eager inference.',
                  markdown_table(_size_header(onnx_rows, 'model'), [
                      [name, *(f"{r['onnxruntime_infer_img_s'] / r['infer_img_s']:.2f}" if r else ''
                               for r in (_find(onnx_rows, name, size, 'eager') for size in sizes))]
                      for name in dict.fromkeys(r['model'] for r in onnx_rows)])]
    attention_baselines = [n for n in ATTENTION_BASELINES if n in names]
    if attention_baselines and 'seresnet18' in names:
        parts += ["## SE / CBAM baselines against timm's seresnet18: speed-up (inference / training; "
                  'at least 1 = no slower)',
                  relative_table(rows, lambda r: _find(rows, 'seresnet18', r['size'], r['mode']),
                                 attention_baselines, modes)]
    parts += ['## All measurements', full_table(rows)]
    return '\n\n'.join(parts) + '\n'


def _target_value(rows: List[Dict], model: str, reference: str, measure: str, size: int, mode: str
                  ) -> Optional[float]:
    row, other = _find(rows, model, size, mode), _find(rows, reference, size, mode)
    if row is None or other is None:
        return None
    if measure == 'peak_memory':
        mine, theirs = row.get('peak_train_mem_mb'), other.get('peak_train_mem_mb')
        return mine / theirs if mine and theirs else None
    time_ratio = other['train_img_s'] / row['train_img_s']
    if measure == 'train_time':
        return time_ratio
    return time_ratio / (row['gflops_per_image'] / other['gflops_per_image'])  # train_time_per_mac


_TARGET_WORDING = {'peak_memory': 'peak training memory / {reference}\'s',
                   'train_time': 'training-step time / {reference}\'s',
                   'train_time_per_mac': 'training-step time ratio to {reference} / MAC ratio'}


def family_report(result: Dict) -> str:
    """One family against its baseline: MAC, time and memory ratios per model, and the family's targets."""
    # Files written before the families had one spelling say 'attention_shortcuts'.
    key = family_key(result['family'])
    rows, family, baseline = result['rows'], FAMILIES[key], result['baseline']
    sizes = sorted({r['size'] for r in rows})
    modes = [m for m in MODES if any(r['mode'] == m for r in rows)]
    names = list(dict.fromkeys(r['model'] for r in rows))
    parts = [f"# Speed of the {key} family against {baseline}", _run_description(result),
             'MACs: `FlopCounterMode` count of the forward pass / 2, with the attention products of torch\'s CPU '
             'flash kernel counted as for its other attention kernels (so a fused and a materialised formulation '
             'count the same). Neither counts softmax, normalisation or element-wise work. Peak memory: the resident '
             'memory one eager training step adds, in a fresh single-threaded process. '
             f'`:{MATERIALISED}` = the same model with its attention on the explicit path (scores, softmax, '
             'weighted sum as batched products), which holds the whole score matrix.']
    for miss in result.get('did_not_fit', []):
        smaller = max(1, miss['batch_size'] // 2)
        parts.append(f"**Did not fit**: {miss['model']} at {miss['size']} px, batch {miss['batch_size']} (its "
                     f"training step needs more than the {result['available_memory_gb']:.1f} GB available; left out "
                     f"of the timing). Measure it at a smaller batch: `python benchmarks/speed.py --family "
                     f"{key} --batch-size {smaller} --models {baseline} <its fused counterpart> "
                     f"{miss['model']} --name speed_{key}_b{smaller}`.")
    for size in sizes:
        for mode in modes:
            base = _find(rows, baseline, size, mode)
            table = []
            for name in names:
                r = _find(rows, name, size, mode)
                if r is None or base is None:
                    continue
                memory, base_memory = r.get('peak_train_mem_mb'), base.get('peak_train_mem_mb')
                table.append([
                    name, f"{r['params'] / 1e6:.2f} M", f"{r['gflops_per_image'] / 2:.4f}", f"{r['flop_ratio']:.2f}",
                    f"{r['infer_img_s']:.0f}", f"{r['train_img_s']:.0f}", f"{r['infer_time_ratio']:.2f}",
                    f"{r['train_time_ratio']:.2f}", f"{r['train_efficiency']:.2f}",
                    f'{memory:.0f}' if memory else '', f'{memory / base_memory:.2f}' if memory and base_memory else ''])
            parts += [f"## {size} px, batch {base['batch_size'] if base else ''}, {mode}: against {baseline}",
                      'Time ratio = time per image / the baseline\'s; time / MACs = training time ratio / MAC ratio '
                      '(1.0: the model pays for its multiply-adds and nothing more).',
                      markdown_table(['model', 'params', 'GMAC/img', 'MAC ratio', 'infer img/s', 'train img/s',
                                      'infer time ratio', 'train time ratio', 'train time / MACs', 'peak train MB',
                                      'memory ratio'], table)]
    if family.targets:
        table = []
        for model, reference, measure, limit in family.targets:
            for size in sizes:
                for mode in modes:
                    value = _target_value(rows, model, reference, measure, size, mode)
                    verdict = '' if value is None else 'ok' if value <= limit else '**over**'
                    table.append([model, _TARGET_WORDING[measure].format(reference=reference), f'{size} px, {mode}',
                                  '' if value is None else f'{value:.2f}', f'<= {limit:.2f}', verdict])
        parts += ['## Targets (reported, not asserted; timing noise on a shared machine exceeds 10 %)',
                  markdown_table(['model', 'measure', 'at', 'value', 'target', ''], table)]
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
                        linestyle='-' if name.startswith(GRADATTN.key) else '--')
            gradattn = [r for r in rows if r['model'].startswith(GRADATTN.key) and r['mode'] == mode]
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
    parser.add_argument('--family', type=family_choice, choices=sorted(FAMILIES), default=None,
                        help='one family at its own sizes and batch size against its baseline, eager, without '
                             'ONNX Runtime; writes speed_<family>.json/.md (underscores are accepted for hyphens)')
    parser.add_argument('--batch-size', type=int, default=None,
                        help='one batch size for every size (default: the family\'s, or per size: '
                             f'{BATCH_SIZES})')
    parser.add_argument('--models', nargs='+', default=None,
                        help=f'default: {" ".join(MODELS)}; name:{MATERIALISED} = explicit attention path')
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
    if args.quick and args.family:
        parser.error('--quick and --family are two different grids; choose one')
    family = FAMILIES[args.family] if args.family else None
    baseline = family.baseline if family else BASELINE
    if args.quick:
        models = args.models or list(QUICK_MODELS)
        sizes, modes, repeats, memory = args.sizes or [32], args.modes or ['eager'], 9, False
    elif family:
        models, sizes, modes = args.models or family.models, args.sizes or family.sizes, args.modes or ['eager']
        repeats, memory = args.repeats, not args.no_memory
    else:
        models, sizes, modes = args.models or MODELS, args.sizes or SIZES, args.modes or MODES
        repeats, memory = args.repeats, not args.no_memory
    if args.batch_size is not None or family:
        if (args.batch_size or 1) < 1:
            parser.error(f'--batch-size {args.batch_size}: at least 1')
        batch_sizes = {size: args.batch_size or family.batch_size for size in sizes}
    else:
        unknown = [s for s in sizes if s not in BATCH_SIZES]
        if unknown:
            parser.error(f'no batch size defined for sizes {unknown}; choose from {sorted(BATCH_SIZES)} '
                         f'or give --batch-size')
        batch_sizes = BATCH_SIZES
    if args.warmup < 1:
        parser.error(f'--warmup {args.warmup}: at least one warm-up step is needed (the first call compiles)')
    try:
        for name in models:
            if ':' in name:
                create_model(name)
    except ValueError as error:
        parser.error(str(error))
    if baseline not in models:
        print(f'note: {baseline} is not among --models, so no ratios can be computed')
    device = torch.device(args.device)
    configure_compile(device)
    malloc_tuned = False if args.default_malloc else keep_freed_memory()

    quiet, waited = True, 0.
    if args.max_load is not None:
        quiet, waited = wait_for_quiet(args.max_load, args.wait_minutes)
    machine = describe_machine(device)
    load_before = load_average()
    print('machine:', json.dumps(machine), '| load average:', load_before, flush=True)
    started = time.time()
    memory_mb = measure_memory(models, sizes, batch_sizes) if memory and device.type == 'cpu' else {}
    memory_s = time.time() - started
    rows = measure(models, sizes, modes, args.warmup, repeats, memory_mb, device, batch_sizes,
                   onnxruntime=family is None)
    add_ratios(rows, baseline)
    load_after = load_average()
    result = dict(machine=machine, load_before=load_before, load_after=load_after, quiet=quiet,
                  waited_for_quiet_s=round(waited), malloc_keeps_freed_memory=malloc_tuned,
                  seconds=round(time.time() - started, 1),
                  memory_seconds=round(memory_s, 1), warmup=args.warmup, repeats=repeats,
                  batch_sizes=batch_sizes, command=' '.join(['python', 'benchmarks/speed.py'] + (argv or sys.argv[1:])),
                  rows=rows)
    if family:
        result.update(family=args.family, baseline=baseline, available_memory_gb=available_memory_bytes() / 2 ** 30,
                      did_not_fit=[dict(model=name, size=size, batch_size=batch_sizes[size])
                                   for (name, size), mb in memory_mb.items() if mb is None])
    stem = args.name or ('speed_quick' if args.quick else f'speed_{args.family}' if family else 'speed')
    write_results(args.out, stem, result, report(result))
    if not family:  # the plot draws ratios across sizes; a family runs at one
        plot(rows, args.out / f'{stem}.png')
    print(f"wrote {args.out / stem}.json/.md{'' if family else '/.png'} in {time.time() - started:.0f} s")


if __name__ == '__main__':
    main()
