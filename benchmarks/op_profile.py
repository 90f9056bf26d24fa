"""Where a training step's time goes, by kind of operation, for resnet18 and the GradAttn variants.

    python benchmarks/op_profile.py                     # 32 and 64 px, eager fp32: about a minute
    python benchmarks/op_profile.py --sizes 224                 # the same models at 224 px
    python benchmarks/op_profile.py --family attention-shortcuts   # op_profile_attention-shortcuts.json/.md
    python benchmarks/op_profile.py --family cnntention            # op_profile_cnntention.json/.md

``benchmarks/speed.py`` says how much slower than its FLOP ratio a model is; this says why. Each model's
eager training step (the same step as speed.py's: forward, cross-entropy, backward, SGD update) runs under
``torch.profiler`` (the models' steps interleaved, one profiled step each per round), and the self CPU time
of every operator is summed into kinds (convolutions, matrix products, dropout's random numbers, ...).
``FlopCounterMode`` counts the same step's FLOPs per kind, so the report gives each kind's arithmetic rate:
a kind that runs at a lower rate than the convolutions, or costs time without counted FLOPs, is what puts a
model above its FLOP ratio. Profiled times carry the profiler's own per-call overhead, so the unprofiled
median step time is given beside them.

``--family`` profiles a family of ``speed.py --family`` at its size and batch size against its baseline: the models
its speed targets are about (``:materialised`` references left out), baseline first. For the
Attention Shortcuts family the kinds split out what its per-pixel depth attention does without counted FLOPs
(products and sums of the scores and weighted values, softmax, stacking and copying the K/V cache).
"""
import argparse
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from torch.profiler import ProfilerActivity, profile

from speed import (BASELINE, BATCH_SIZES, FAMILIES, GRADATTN_VARIANTS, NUM_CLASSES, RESULTS_DIR, FamilyBenchmark,
                   create_model, family_choice, flop_counter, interleaved_medians, load_average, machine_description,
                   make_steps, wait_for_quiet, write_results)
from timm_gradattn.cpu import keep_freed_memory

MODELS = (BASELINE, *GRADATTN_VARIANTS)
_LINEAR, _ATTENTION = 'matrix products (linear layers)', 'attention (batched products, softmax)'
# (kind, substrings of operator names), first match wins; anything else is "other".
KINDS = (
    ('convolution', ('convolution',)),
    ('batch norm', ('batch_norm',)),
    (_LINEAR, ('aten::mm', 'aten::addmm', 'aten::linear')),
    (_ATTENTION, ('aten::bmm', 'softmax', 'scaled_dot_product')),
    ('layer norm', ('layer_norm',)),
    ('dropout random numbers', ('bernoulli', 'aten::rand')),
    ('max pool', ('max_pool',)),
    ('element-wise and copies', ('aten::add', 'aten::mul', 'aten::div', 'aten::sub', 'relu', 'threshold',
                                 'clamp', 'aten::copy_', 'aten::fill_', 'aten::zero_', 'aten::sum', 'aten::mean',
                                 'aten::cat', 'aten::stack', 'aten::where', 'aten::neg', 'aten::sqrt')),
    ('optimizer and zero_grad (Python)', ('Optimizer.',)),
)
# The Attention Shortcuts nets attend per pixel along depth with element-wise products and sums (no batched
# products) and keep a K/V cache: those operators get kinds of their own, ahead of the generic ones. In these
# nets and their ResNet-50 baselines little else multiplies, sums or stacks tensors (the classifier's bias
# gradient is a sum; the baselines' adds are the residuals, still "element-wise"); softmax includes the loss's
# log-softmax, a (batch, 10) tensor.
_DEPTH_ATTENTION = 'depth attention: score products and sums, weighted values'
DEPTH_ATTENTION_KINDS = (
    KINDS[0], KINDS[1], ('layer norm', ('layer_norm',)), (_LINEAR, KINDS[2][1]),
    ('softmax', ('softmax',)), KINDS[3],
    (_DEPTH_ATTENTION, ('aten::mul', 'aten::sum', 'aten::addcmul')),
    ('K/V cache: stack, unbind, strided and permuted copies', ('aten::stack', 'aten::unbind', 'aten::cat',
                                                               'aten::copy_', 'aten::clone', 'aten::contiguous')),
    *KINDS[5:],
)
KIND_SETS = {'default': KINDS, 'depth_attention': DEPTH_ATTENTION_KINDS}
FAMILY_KIND_SETS = {'attention-shortcuts': 'depth_attention'}
OTHER = 'other (dispatch, views, loss)'
# FlopCounterMode's operator packets, by the same kinds.
FLOP_KINDS = {'convolution': 'convolution', 'convolution_backward': 'convolution', 'mm': _LINEAR, 'addmm': _LINEAR,
              'bmm': _ATTENTION, '_scaled_dot_product_flash_attention_for_cpu': _ATTENTION,
              '_scaled_dot_product_flash_attention_for_cpu_backward': _ATTENTION,
              '_scaled_dot_product_efficient_attention': _ATTENTION, '_scaled_dot_product_flash_attention': _ATTENTION}


def family_models(benchmark: FamilyBenchmark) -> Tuple[str, ...]:
    """The models a --family profiles: the ones its speed targets are about, with the baseline first (a
    ``:materialised`` reference is a formulation of a model already there, left out)."""
    named = (name for target in benchmark.targets for name in target[:2] if ':' not in name)
    return tuple(dict.fromkeys((benchmark.baseline, *named)))


def kind_of(operator: str, kinds=KINDS) -> str:
    for kind, needles in kinds:
        if any(needle in operator for needle in needles):
            return kind
    return OTHER


def step_flops(train_step, x, y) -> Dict[str, float]:
    """FLOPs of one training step (forward and backward), by kind."""
    counter = flop_counter()
    with counter:
        train_step(x, y)
    flops: Dict[str, float] = defaultdict(float)
    for operator, count in counter.get_flop_counts()['Global'].items():
        name = str(operator).split('.')[-1]
        flops[FLOP_KINDS.get(name, OTHER)] += count
    return dict(flops)


def profile_models(names: List[str], size: int, warmup: int, steps: int, batch_size: Optional[int] = None,
                   kind_set=KINDS) -> List[Dict]:
    """Median step time and median per-kind profiled time of each model, with the models' steps interleaved
    (timed round-robin, then profiled one step each per round) so that a shared machine's drifts hit all alike."""
    batch_size = batch_size or BATCH_SIZES[size]
    x, y = torch.randn(batch_size, 3, size, size), torch.randint(0, NUM_CLASSES, (batch_size,))
    train_steps = []
    for name in names:
        torch.manual_seed(0)
        model = create_model(name)
        train_steps.append(make_steps(model, 'eager', torch.device('cpu'))[1])
    medians, _ = interleaved_medians([lambda step=step: step(x, y) for step in train_steps], warmup, steps,
                                     torch.device('cpu'))
    per_round: List[List[Dict[str, float]]] = [[] for _ in names]
    for _ in range(steps):
        for index, step in enumerate(train_steps):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step(x, y)
            milliseconds: Dict[str, float] = defaultdict(float)
            for event in prof.key_averages():
                milliseconds[kind_of(event.key, kind_set)] += event.self_cpu_time_total / 1000
            per_round[index].append(milliseconds)
    rows = []
    for name, step, median, rounds in zip(names, train_steps, medians, per_round):
        kinds = {kind for r in rounds for kind in r}
        rows.append(dict(model=name, size=size, batch_size=batch_size, step_ms=1000 * median,
                         profiled_ms={kind: statistics.median(r.get(kind, 0.) for r in rounds) for kind in kinds},
                         flops=step_flops(step, x, y)))
    return rows


def report(result: Dict) -> str:
    baseline = result.get('baseline', BASELINE)
    lines = ['# Where a training step\'s time goes',
             f"Machine: {result['machine']}.  \nLoad average (1, 5, 15 min) before: {result['load_before']}, after: "
             f"{result['load_after']}. Eager fp32 training step (forward, cross-entropy, backward, SGD update), "
             f"self CPU time per kind of operator under `torch.profiler`, median of {result['steps']} steps; "
             'GFLOP/s = counted FLOPs of the kind (forward and backward) / its profiled time.', '']
    kinds = [k for k, _ in KIND_SETS[result.get('kinds', 'default')]] + [OTHER]
    for size in result['sizes']:
        rows = [r for r in result['rows'] if r['size'] == size]
        base = next((r for r in rows if r['model'] == baseline), None)
        lines += [f"## {size} px, batch {rows[0]['batch_size']}", '',
                  '| kind | ' + ' | '.join(r['model'] for r in rows) + ' |',
                  '|---|' + '---|' * len(rows)]
        for kind in kinds:
            cells = []
            for r in rows:
                ms = r['profiled_ms'].get(kind, 0.)
                cell = f'{ms:.2f} ms'
                if r['flops'].get(kind) and ms > 0 and kind != OTHER:
                    cell += f" ({r['flops'][kind] / ms / 1e6:.0f} GFLOP/s)"
                if base is not None and r is not base:
                    cell += f" ({ms - base['profiled_ms'].get(kind, 0.):+.2f})"
                cells.append(cell)
            lines.append(f'| {kind} | ' + ' | '.join(cells) + ' |')
        totals = [sum(r['profiled_ms'].values()) for r in rows]
        lines.append('| **profiled total** | ' + ' | '.join(f'**{t:.1f} ms**' for t in totals) + ' |')
        lines.append('| unprofiled step (median) | ' + ' | '.join(f"{r['step_ms']:.1f} ms" for r in rows) + ' |')
        if base is not None:
            flop_total = {r['model']: sum(r['flops'].values()) for r in rows}
            lines.append(f'| step FLOP ratio against {baseline} | ' + ' | '.join(
                f"{flop_total[r['model']] / flop_total[baseline]:.3f}" for r in rows) + ' |')
            lines.append('| profiled time ratio | ' + ' | '.join(f'{t / totals[rows.index(base)]:.3f}'
                                                              for t in totals) + ' |')
            lines.append('| unprofiled time ratio | ' + ' | '.join(f"{r['step_ms'] / base['step_ms']:.3f}"
                                                                for r in rows) + ' |')
        lines.append('')
    lines.append(f'In brackets after a time: the difference from {baseline}.')
    return '\n'.join(lines) + '\n'


def main(argv: List[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--family', type=family_choice, choices=sorted(FAMILIES), default=None,
                        help="a family's models at its size and batch size against its baseline (speed.py's "
                             "FAMILIES; underscores are accepted for hyphens)")
    parser.add_argument('--models', nargs='+', default=None, help=f'default: {" ".join(MODELS)}, or the family\'s')
    parser.add_argument('--sizes', nargs='+', type=int, default=None, help='default: 32 64, or the family\'s')
    parser.add_argument('--batch-size', type=int, default=None,
                        help=f'default: the family\'s, or per size {BATCH_SIZES}')
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument('--steps', type=int, default=10, help='timed steps, then as many profiled ones')
    parser.add_argument('--max-load', type=float, default=None,
                        help='wait until the 1-minute load average is below this before measuring')
    parser.add_argument('--wait-minutes', type=float, default=40, help='longest wait for --max-load')
    parser.add_argument('--out', type=Path, default=RESULTS_DIR)
    parser.add_argument('--name', default=None, help='file stem (default op_profile, or op_profile_<family>)')
    args = parser.parse_args(argv)
    family = FAMILIES[args.family] if args.family else None
    models = args.models or (family_models(family) if family else MODELS)
    sizes = args.sizes or (list(family.sizes) if family else [32, 64])
    batch_size = args.batch_size or (family.batch_size if family else None)
    baseline = family.baseline if family else BASELINE
    kinds = FAMILY_KIND_SETS.get(args.family, 'default')
    unknown = [size for size in sizes if size not in BATCH_SIZES]
    if batch_size is None and unknown:
        parser.error(f'no batch size defined for sizes {unknown}; choose from {sorted(BATCH_SIZES)} '
                     'or give --batch-size')
    name = args.name or (f'op_profile_{args.family}' if family else 'op_profile')
    keep_freed_memory()  # as speed.py measures
    if args.max_load is not None:
        wait_for_quiet(args.max_load, args.wait_minutes)
    load_before = load_average()
    rows = [row for size in sizes for row in profile_models(list(models), size, args.warmup, args.steps, batch_size,
                                                            KIND_SETS[kinds])]
    result = dict(machine=machine_description(), load_before=load_before, load_after=load_average(),
                  sizes=sizes, steps=args.steps, rows=rows,
                  command=' '.join(['python', 'benchmarks/op_profile.py', *(sys.argv[1:] if argv is None else argv)]))
    if family:
        result.update(family=args.family, baseline=baseline, kinds=kinds)
    write_results(args.out, name, result, report(result))


if __name__ == '__main__':
    main()
