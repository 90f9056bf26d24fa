"""What a finished run writes beside its weights: ``results.json``'s record, the plots and the closing message.

The engine calls these once the test passes are done; each takes plain values (the settings, the run's state and
data, the Accelerator and the bare model), not the engine's ``Run``.
"""
import argparse
from pathlib import Path
from typing import Any, Dict, List

import torch.nn as nn
from accelerate import Accelerator
from accelerate.utils import DynamoBackend

from .analysis import read_grad_norms
from .data import DataSplits
from .metrics import ClassificationResult
from .reporting import describe_machine, peak_rss_mb

# results.json's ``selection``: whose weights the run keeps, exports and reports at the top level.
SELECTED_ON_VALIDATION = 'best validation top-1'
LAST_EPOCH_WITHOUT_VALIDATION = 'last epoch (no validation split)'


def results_record(args: argparse.Namespace, state: Dict[str, Any], data: DataSplits, accelerator: Accelerator,
                   model: nn.Module, validates: bool, test: Dict[str, float], stopped_at_max_updates: bool) -> Dict:
    """results.json: the test metrics of the run's weights and the facts of the run."""
    rows = state['summary_rows']
    best = next(row for row in rows if row['epoch'] == state['best_epoch'])  # the last row without validation
    info = data.info
    backend = accelerator.state.dynamo_plugin.backend
    return dict(
        test,
        model=args.model, dataset=info.name, protocol=args.protocol, seed=args.seed, recipe=args.recipe,
        num_classes=info.num_classes, label_names=list(info.label_names) if info.label_names else None,
        split_sizes=data.sizes(),
        # Whose weights the top-level test figures are; best_epoch is that epoch either way.
        selection=SELECTED_ON_VALIDATION if validates else LAST_EPOCH_WITHOUT_VALIDATION,
        best_epoch=state['best_epoch'], epochs_run=len(rows), stopped_early=state['stopped_early'],
        num_updates=state['num_updates'], stopped_at_max_updates=stopped_at_max_updates,
        val_top1_best=state['best_top1'] if validates else None, train_top1_at_best=best['train_top1'],
        train_val_gap=abs(best['train_top1'] - best['val_top1']) if validates else None,
        seconds_per_epoch=sum(r['epoch_time_s'] for r in rows) / len(rows),
        # Training images a second over the training loops (this process's share under several processes), and
        # the process's peak resident memory (in a grid run in one process: the peak so far).
        train_img_s=state['train_images'] / state['train_loop_s'] if state.get('train_loop_s') else None,
        peak_rss_mb=peak_rss_mb(),
        num_params=sum(p.numel() for p in model.parameters()),
        mixed_precision=accelerator.mixed_precision,
        machine=describe_machine(accelerator.device, num_processes=accelerator.num_processes,
                                 mixed_precision=accelerator.mixed_precision,
                                 torch_compile=None if backend == DynamoBackend.NO else backend.value.lower()),
        pretrained_from=(args.model if args.pretrained else args.initial_checkpoint),
    )


def closing_message(results: Dict, state: Dict[str, Any], run_dir: Path, validates: bool) -> str:
    """The test figures and what the run folder holds, as train.py prints them at the end."""
    last_epoch = results['test_last_epoch']['epoch']
    if validates:
        weights = (f"(weights of epoch {state['best_epoch']}, val top-1 {state['best_top1']:.2f}); "
                   f"last epoch {last_epoch}: top-1 {results['test_last_epoch']['top1']:.2f}")
    else:
        weights = f'(weights of the last epoch, {last_epoch}: no validation split)'
    kept = 'best validation' if validates else "the last epoch's"
    top5 = f"top-5 {results['top5']:.2f}  " if results['top5'] is not None else ''  # None: 5 or fewer classes
    return (
        f"Test top-1 {results['top1']:.2f}  {top5}F1 (macro) {results['f1_macro']:.4f}  "
        f"ECE {results['ece']:.4f}  {weights}\n"
        f'Run folder {run_dir}:\n'
        f'  results.json            test metrics and run facts\n'
        f'  summary.csv             one row per epoch\n'
        f'  model_best.safetensors  {kept} weights\n'
        f'  *.png                   training curves, reliability diagram, confusion matrix (test split)\n'
        f'  hub/                    timm.create_model("local-dir:{run_dir / "hub"}", pretrained=True)\n'
        f'  last/                   resumable state: python train.py --resume {run_dir}')


def plot_curves(run_dir: Path, summary_rows: List[Dict]) -> None:
    """PNGs next to results.json: the curves from summary.csv (and the gradient norms where recorded)."""
    from .plots import plot_gradient_norms, plot_training_curves
    plot_training_curves(summary_rows, run_dir / 'training_curves.png', title=run_dir.name)
    if (run_dir / 'grad_norms.jsonl').exists():
        plot_gradient_norms(read_grad_norms(run_dir / 'grad_norms.jsonl'), run_dir / 'gradient_norms.png')


def plot_test(run_dir: Path, test: ClassificationResult, label_names) -> None:
    """PNGs next to results.json: calibration and confusion on the test split."""
    from .plots import plot_confusion_matrix, plot_reliability_diagram
    plot_reliability_diagram(test.reliability, run_dir / 'reliability.png', title=f'reliability (test): {run_dir.name}')
    plot_confusion_matrix(test.confusion, run_dir / 'confusion_matrix.png', label_names,
                          title=f'confusion (test): {run_dir.name}')
