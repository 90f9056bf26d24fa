"""Evaluate a classifier on one split of a dataset: the paper's metrics, a confusion matrix and plots.

    python -m timm_gradattn.evaluate --model gradattn_resnet18_rope --checkpoint run/model.safetensors \\
        --dataset tiny_imagenet --data-dir data/tiny-imagenet-200 --split test
    accelerate launch -m timm_gradattn.evaluate --model local-dir:exported/ --dataset cifar10 --data-dir data

The model is any timm name (sized for the dataset), ``hf-hub:<repo>`` or ``local-dir:<folder>`` (a
``save_for_hf`` export, whose config.json carries the classes, channels and normalisation), optionally
with weights from a ``.safetensors`` file. Runs on one or many processes through Accelerate; logits are
gathered with ``gather_for_metrics``, so the samples a distributed sampler pads with are not counted twice.

Writes into ``--output``: ``metrics.json`` (top1, top3, top5 in percent; precision, recall, F1 macro and
weighted, ECE as fractions; NLL in nats: the keys of a training run's ``results.json``; plus the confusion
matrix, label names and per-class scores), ``reliability.png`` and ``confusion_matrix.png``; with
``--routing`` the attention analysis the model exposes (``routing.png``: GradAttn's routing over its extraction
points; ``depth_routing.png``: which earlier outputs each Attention Shortcuts block reads; ``attention_maps.png``:
CNNtention SelfAtt / MHA spatial attention over a few images per class), with ``--gradient-health``
``gradient_norms.png``.
"""
import argparse
import json
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

import timm
from accelerate import Accelerator
from timm.models import parse_model_name, safe_model_name

from .analysis import (
    ATTENTION_MODELS, GRADIENT_MODES, REFERENCE_BAND, ROUTING_METHODS, attention_kind, depth_routing_summary,
    extraction_point_names, gradient_health_report, gradient_norms, images_per_class, routing_summary,
    spatial_attention,
)
from .checkpoint import load_weights
from .config import (
    TIMM_FLAG_HINTS, CommandLineParser, UserError, check_model_name, check_output_folder, expand_input_size,
    with_dataset_defaults,
)
from .data import DATASETS, DatasetInfo, DatasetNotFoundError, build_datasets
from .metrics import METRIC_KEYS, evaluate_logits, predict
from .models import MissingWeightsError
from .plots import (
    plot_confusion_matrix, plot_depth_routing, plot_gradient_norms, plot_reliability_diagram, plot_routing,
    plot_spatial_attention,
)

_logger = logging.getLogger('timm_gradattn.evaluate')


# Flags of timm's validate.py that this command line lacks, and what to do instead.
_EVALUATE_FLAG_HINTS = {
    **TIMM_FLAG_HINTS,
    **dict.fromkeys(('--results-file', '--results-format'), 'metrics.json and the plots are written into --output'),
    '--use-ema': "pass the EMA weights as --checkpoint (a run's model_best.safetensors is the EMA with --model-ema)",
    '--initial-checkpoint': 'pass the weights with --checkpoint FILE',
    '--num-classes': "the classes are the dataset's; the model must have been trained with as many",
    **dict.fromkeys(('--mean', '--std'), "the dataset's normalisation is used, or a local-dir:/hf-hub: export's own"),
    **dict.fromkeys(('--torchscript', '--test-pool', '--tf-preprocessing', '--real-labels', '--valid-labels',
                     '--retry', '--reparam', '--use-train-size', '--log-freq'),
                    'not available in this evaluation; drop the flag'),
}


def build_parser() -> argparse.ArgumentParser:
    parser = CommandLineParser(
        flag_hints=_EVALUATE_FLAG_HINTS,
        prog='python -m timm_gradattn.evaluate',
        description='Top-1/3/5, precision/recall/F1 (macro, weighted), ECE, NLL and a confusion matrix '
                    'for a model on one split of a dataset, with plots.')
    parser.add_argument('--model', required=True,
                        help='timm model name, hf-hub:<repo id> or local-dir:<folder with config.json>.')
    parser.add_argument('--checkpoint', default=None,
                        help='Weights to load: a .safetensors file, or a .pth/.pt state dict (read as tensors only).')
    parser.add_argument('--pretrained', action='store_true',
                        help='Load the published weights (for a registry name, the tag of --dataset).')
    parser.add_argument('--dataset', default=None,
                        help="Dataset name (digits, cifar10, tiny_imagenet, ...; 'folder' for your own images).")
    parser.add_argument('--data-dir', default=None,
                        help='Where the dataset files are. Without --dataset, a folder of your own images '
                             '(as in timm).')
    parser.add_argument('--download', '--dataset-download', action='store_true',
                        help='Let the dataset loader download missing files.')
    parser.add_argument('--split', default='test', choices=('test', 'val', 'train'))
    parser.add_argument('--protocol', default='paper', choices=('paper', 'official'),
                        help="'paper' re-splits pooled data as the paper did; 'official' keeps the dataset's splits.")
    parser.add_argument('--seed', type=int, default=42, help='Seed of the split; must be the one used in training.')
    parser.add_argument('--img-size', type=int, default=None, help='Override the input side.')
    parser.add_argument('--input-size', type=int, nargs=3, default=None, metavar=('C', 'H', 'W'),
                        help="timm's form of --in-chans C --img-size H; images are square, so H = W.")
    parser.add_argument('--in-chans', type=int, default=None,
                        help="Channels of a registry model, if trained with other than the dataset's.")
    parser.add_argument('-b', '--batch-size', type=int, default=None, help="Default: the dataset's paper batch size.")
    parser.add_argument('-j', '--workers', type=int, default=None,
                        help='Data-loading processes per device (default: 0 for digits, which is in memory, else 2).')
    parser.add_argument('--ece-bins', type=int, default=10)
    parser.add_argument('--mixed-precision', default=None, choices=('no', 'bf16', 'fp16'),
                        help="Autocast for the forward pass; default: Accelerate's configuration.")
    parser.add_argument('--routing', action='store_true',
                        help='The attention analysis the model exposes: GradAttn, share of each extraction point '
                             'in the predictions; Attention Shortcuts, which earlier outputs each block reads; '
                             'CNNtention SelfAtt/MHA, spatial attention drawn over a few images per class.')
    parser.add_argument('--gradient-health', action='store_true',
                        help='Per-layer gradient norms on the first batches of the split (train mode) and the '
                             'Gradient Health Score in the paper\'s and the reference\'s bands.')
    parser.add_argument('--gradient-mode', default='outputs', choices=GRADIENT_MODES,
                        help="'outputs' is the paper's measurement (gradient w.r.t. each layer output).")
    parser.add_argument('--gradient-batches', type=int, default=20)
    parser.add_argument('--output', default=None,
                        help='Folder for metrics.json and the plots; default output/eval/<model>-<dataset>-<split>.')
    return parser


def create_eval_model(
        model_name: str,
        info: DatasetInfo,
        checkpoint: Optional[str] = None,
        pretrained: bool = False,
        in_chans: Optional[int] = None,
) -> nn.Module:
    """The model to evaluate on the dataset described by ``info``, with its weights loaded.

    A registry name is created with the dataset's classes and channels (with ``pretrained``, from the
    weights tagged with the dataset's name when they exist); ``hf-hub:`` and ``local-dir:`` models bring
    their own configuration and weights. ``checkpoint`` (safetensors) replaces the weights; ``in_chans``
    overrides the dataset's channel count (a model trained on grey images converted to RGB).
    """
    source, name = parse_model_name(model_name)
    kwargs: Dict[str, Any] = {}
    if source is None:
        tagged = f'{name}.{info.name}'
        if pretrained and '.' not in name and tagged in timm.list_pretrained(tagged):
            model_name = tagged  # the weights trained on this dataset
        elif not pretrained:
            kwargs = dict(num_classes=info.num_classes, in_chans=in_chans or info.in_chans)
    # A hub / local export is pointless without its weights, unless a checkpoint replaces them.
    load_source_weights = pretrained or (source is not None and checkpoint is None)
    try:
        model = timm.create_model(model_name, pretrained=load_source_weights, **kwargs)
    except (RuntimeError, OSError, ValueError) as error:  # missing weights, unreachable Hub, bad local export
        raise UserError(f'Cannot create {model_name!r}: {" ".join(str(error).split())}') from error
    if checkpoint is not None:
        load_weights(model, checkpoint, what='--checkpoint')
    elif not load_source_weights:
        _logger.warning('No --checkpoint and no --pretrained: evaluating randomly initialised weights.')
    num_classes = getattr(model, 'num_classes', info.num_classes)
    if num_classes < info.num_classes:
        raise UserError(
            f'{model_name} predicts {num_classes} classes but {info.title} has {info.num_classes}. '
            f'Evaluate it on the dataset it was trained on, or pass a checkpoint trained on {info.name}.')
    if num_classes > info.num_classes:  # as train.py --num-classes allows: the extra outputs name no class here
        _logger.warning(f'{model_name} predicts {num_classes} classes and {info.title} has {info.num_classes}: '
                        f'outputs {info.num_classes}-{num_classes - 1} match no image of it.')
    return model


def _data_overrides(model: nn.Module, img_size: Optional[int]) -> Dict[str, Any]:
    """Input size and normalisation: the model's own when it came with weights and a config, else the dataset's."""
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    in_chans = getattr(model, 'in_chans', None) or (cfg.get('input_size') or (None,))[0]
    overrides: Dict[str, Any] = dict(in_chans=in_chans, img_size=img_size)
    if cfg.get('source') in ('local-dir', 'hf-hub') or cfg.get('file'):
        if img_size is None and cfg.get('input_size'):
            overrides['img_size'] = cfg['input_size'][-1]
        overrides.update(mean=cfg.get('mean'), std=cfg.get('std'))
    return overrides


def evaluate(args: argparse.Namespace, accelerator: Optional[Accelerator] = None) -> Dict[str, Any]:
    """Run the evaluation described by parsed command-line ``args``; returns what metrics.json holds."""
    accelerator = accelerator or Accelerator(mixed_precision=args.mixed_precision)
    data_args = dict(data_dir=args.data_dir, protocol=args.protocol, download=args.download, seed=args.seed)
    key = args.dataset.strip().lower().replace('-', '_')
    # An image folder's classes are only known once it has been read.
    try:  # the data pipeline's messages name the problem and the fix (ImportError: a missing reader package)
        info = DATASETS[key] if key in DATASETS else build_datasets(args.dataset, **data_args).info
    except (ValueError, FileNotFoundError, ImportError) as error:
        raise UserError(f'Dataset {args.dataset!r}: {error}') from error
    model = create_eval_model(args.model, info, args.checkpoint, args.pretrained, args.in_chans)
    kind = attention_kind(model) if args.routing else None
    if args.routing:
        try:
            if kind is None:
                *others, last = ATTENTION_MODELS.values()
                raise TypeError(
                    f'{args.model} exposes no attention maps; --routing needs {", ".join(others)} or {last}. '
                    f'Every model gets the metrics and --gradient-health.')
            if kind == 'tokens':
                extraction_point_names(model)  # also refuses a GradAttn model without average pooling
        except (TypeError, ValueError) as error:
            raise UserError(f'--routing: {error}') from error
    overrides = _data_overrides(model, args.img_size)
    splits = build_datasets(args.dataset, **data_args, **overrides)
    info = splits.info
    dataset = getattr(splits, args.split)
    preprocessing = dict(
        in_chans=overrides['in_chans'] or info.in_chans, img_size=overrides['img_size'] or info.img_size,
        mean=list(overrides.get('mean') or info.mean), std=list(overrides.get('std') or info.std))
    label_names = list(info.label_names or (getattr(model, 'pretrained_cfg', {}) or {}).get('label_names') or
                       [str(i) for i in range(info.num_classes)])
    loading = with_dataset_defaults(args, info)
    loader = DataLoader(dataset, batch_size=loading.batch_size, shuffle=False, num_workers=loading.workers,
                        pin_memory=accelerator.device.type == 'cuda')
    model, loader = accelerator.prepare(model, loader)

    start = time.perf_counter()
    logits, targets = predict(model, loader, accelerator)
    seconds = time.perf_counter() - start
    if len(targets) != len(dataset):
        raise RuntimeError(f'Gathered {len(targets)} predictions for {len(dataset)} images: samples were lost '
                           f'or counted twice across {accelerator.num_processes} processes.')

    default_dir = Path('output') / 'eval' / f'{safe_model_name(args.model)}-{info.name}-{args.split}'
    output_dir = Path(args.output) if args.output else default_dir
    try:
        measured = evaluate_logits(logits, targets, info.num_classes, ece_bins=args.ece_bins)
    except ValueError as error:  # non-finite logits, labels beyond the model's classes
        raise UserError(f'--model {args.model} on {info.name} ({args.split}): {error}') from error
    label_names += [str(i) for i in range(len(label_names), len(measured.confusion))]  # a head wider than the data
    results: Dict[str, Any] = dict(
        measured.metrics,
        model=args.model, checkpoint=args.checkpoint, dataset=info.name, split=args.split, protocol=args.protocol,
        seed=args.seed, num_samples=len(targets), num_processes=accelerator.num_processes,
        eval_time_s=round(seconds, 3), label_names=label_names,
        preprocessing=preprocessing, confusion_matrix=measured.confusion.tolist(),
        per_class={name: {key: float(measured.per_class[key][i]) for key in ('precision', 'recall', 'f1', 'support')}
                   for i, name in enumerate(label_names)},
        reliability=asdict(measured.reliability),
    )

    core = accelerator.unwrap_model(model)
    if kind == 'tokens':
        summaries = [routing_summary(core, loader, method, info.num_classes, label_names, accelerator)
                     for method in ROUTING_METHODS]
        results['routing'] = {s.method: dict(points=s.points, overall=s.overall, per_class=s.per_class,
                                             class_counts=s.class_counts) for s in summaries}
    elif kind == 'depth':
        depth_routing = depth_routing_summary(core, loader, accelerator)
        results['depth_routing'] = asdict(depth_routing)
    elif kind == 'spatial' and accelerator.is_main_process:
        # A picture of a few images per class, not a statistic of the split: the main process alone.
        picture_loader = DataLoader(dataset, batch_size=loading.batch_size, shuffle=False, num_workers=loading.workers)
        picture_images, picture_classes = images_per_class(picture_loader, info.num_classes)
        spatial = spatial_attention(core, picture_images.to(accelerator.device))
        picture_labels = [label_names[c] for c in picture_classes.tolist()]
        results['spatial_attention'] = dict(spatial.summary(), labels=picture_labels)
    if args.gradient_health and accelerator.is_main_process:
        # A plain loader on the main process: the first batches of the split, as the reference measured.
        local_loader = DataLoader(dataset, batch_size=loading.batch_size, shuffle=False, num_workers=loading.workers)
        norms = gradient_norms(core, local_loader, mode=args.gradient_mode, max_batches=args.gradient_batches)
        results['gradient_norms'] = dict(mode=args.gradient_mode, batches=args.gradient_batches, norms=norms)
        results['gradient_health'] = gradient_health_report(norms)

    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        with open(output_dir / 'metrics.json', 'w') as f:
            json.dump(results, f, indent=2)
        name = f'{args.model} on {info.name} ({args.split})'
        plot_reliability_diagram(measured.reliability, output_dir / 'reliability.png', title=f'reliability: {name}')
        plot_confusion_matrix(measured.confusion, output_dir / 'confusion_matrix.png', label_names,
                              title=f'{name}: top-1 {results["top1"]:.2f}%')
        if 'routing' in results:
            plot_routing(summaries, output_dir / 'routing.png', title=f'attention routing: {name}')
        if 'depth_routing' in results:
            plot_depth_routing(depth_routing, output_dir / 'depth_routing.png',
                               title=f'depth-attention routing: {name}')
        if 'spatial_attention' in results:
            plot_spatial_attention(spatial, picture_images, output_dir / 'attention_maps.png', picture_labels,
                                   preprocessing['mean'], preprocessing['std'], title=f'spatial attention: {name}')
        if 'gradient_norms' in results:
            plot_gradient_norms([dict(epoch=f'{args.split} split', norms=results['gradient_norms']['norms'])],
                                output_dir / 'gradient_norms.png', band=REFERENCE_BAND,
                                title=f'gradient norms ({args.gradient_mode}), {name}')
        _print_summary(results, output_dir)
    return results


def _print_summary(results: Dict[str, Any], output_dir: Path) -> None:
    print(f"{results['model']} on {results['dataset']} {results['split']} ({results['num_samples']} images):")
    for key in METRIC_KEYS:
        if key in results:
            unit = '%' if key.startswith('top') else ''
            print(f'  {key:<20} {results[key]:.4f}{unit}')
    for band, health in results.get('gradient_health', {}).items():
        print(f"  GHS {band:<20} {health['score']:.3f} ({health['healthy']}/{health['analysed']}, "
              f"{len(health['vanishing'])} vanishing, {len(health['exploding'])} exploding)")
    print(f'  written to {output_dir}')


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line, checked before any model or data is loaded (every problem is a UserError)."""
    args = build_parser().parse_args(argv)
    args = argparse.Namespace(**expand_input_size(vars(args)))
    if args.dataset is None:
        if not args.data_dir:
            raise UserError('--dataset is required (digits, cifar10, ...), or --data-dir with a folder of your '
                            'own images (one sub-folder per class).')
        _logger.info(f'--data-dir {args.data_dir} without --dataset: evaluating on it as an image folder '
                     f'(--dataset folder), as timm does; pass --dataset NAME if it holds a named dataset.')
        args.dataset = 'folder'
    for key in ('img_size', 'batch_size', 'ece_bins', 'gradient_batches'):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            raise UserError(f'--{key.replace("_", "-")} must be at least 1, got {getattr(args, key)}.')
    for key in ('workers', 'seed'):
        if getattr(args, key) is not None and getattr(args, key) < 0:
            raise UserError(f'--{key.replace("_", "-")} must not be negative, got {getattr(args, key)}.')
    if args.in_chans is not None and args.in_chans not in (1, 3):
        raise UserError(f'--in-chans {args.in_chans} is not supported: images are read as 1 (greyscale) or '
                        f'3 (RGB) channels. Pass --in-chans 1 or 3.')
    if args.mixed_precision == 'fp16' and not torch.cuda.is_available():
        raise UserError('--mixed-precision fp16 needs a CUDA GPU; on CPU use --mixed-precision bf16 or no.')
    if args.data_dir and Path(args.data_dir).expanduser().is_file():
        raise UserError(f'--data-dir {args.data_dir} is a file; pass the folder that holds the dataset.')
    if args.checkpoint and not Path(args.checkpoint).expanduser().is_file():
        problem = 'is a folder; pass the weights file in it' if Path(args.checkpoint).is_dir() else 'does not exist'
        raise UserError(f'--checkpoint {args.checkpoint} {problem}.')
    if args.output:
        check_output_folder(args.output)
    check_model_name(args.model)
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    return evaluate(parse_args(argv))


def cli(argv: Optional[Sequence[str]] = None) -> int:
    """``main`` for the shell: a problem with what was asked for is one line on stderr and exit code 2."""
    try:
        main(argv)
    except (UserError, DatasetNotFoundError, MissingWeightsError) as error:
        print(f'timm_gradattn.evaluate: error: {error}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(cli())
