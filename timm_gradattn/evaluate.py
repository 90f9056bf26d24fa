"""Evaluate a classifier on one split of a dataset: the paper's metrics, a confusion matrix and plots.

    python -m timm_gradattn.evaluate --model <model> --checkpoint run/model.safetensors \\
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
``gradient_norms.png``, with ``--cam N`` ``cam.png`` (Grad-CAM over the first N images of the split; the maps in
``cam.npz``, the layers read in metrics.json; needs ``pip install "timm-gradattn[cam]"``).
"""
import argparse
import json
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch.nn as nn
from torch.utils.data import DataLoader

import timm
from accelerate import Accelerator
from timm.models import parse_model_name, safe_model_name

from .analysis import (
    ATTENTION_MODELS, GRADIENT_MODES, REFERENCE_BAND, ROUTING_METHODS, attention_kind, class_activation_maps,
    depth_routing_summary, extraction_point_names, gradient_health_report, gradient_norms, images_per_class,
    import_grad_cam, routing_summary, spatial_attention,
)
from .checkpoint import load_weights
from .cli import run_entry_point
from .data import DatasetInfo, build_datasets, dataset_info, loader_workers
from .errors import UserError
from .files import atomic_write_text, writing
from .metrics import METRIC_KEYS, evaluate_logits, predict
from .plots import (
    plot_cam, plot_confusion_matrix, plot_depth_routing, plot_gradient_norms, plot_reliability_diagram, plot_routing,
    plot_spatial_attention,
)
from .precision import guard_one_pixel_convolutions
from .settings import resolve_evaluate_settings

_logger = logging.getLogger('timm_gradattn.evaluate')


def create_eval_model(
        model_name: str,
        info: DatasetInfo,
        checkpoint: Optional[str] = None,
        pretrained: bool = False,
        in_chans: Optional[int] = None,
) -> nn.Module:
    """The model to evaluate on the dataset described by ``info``, with its weights loaded.

    A registry name is created with the dataset's classes and channels; with ``pretrained``, with those of the
    weights of the tag it names (``resolve_evaluate_settings`` gives a name without a tag the tag of
    ``models.pretrained_name``, train.py's rule); ``hf-hub:`` and ``local-dir:`` models bring their own configuration
    and weights. ``checkpoint`` (safetensors) replaces the weights; ``in_chans`` overrides the dataset's channel
    count (a model trained on grey images converted to RGB).
    """
    source, _ = parse_model_name(model_name)
    kwargs: Dict[str, Any] = {}
    if source is None and not pretrained:
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
    if args.cam:
        try:  # before any model or data is loaded
            import_grad_cam()
        except ImportError as error:
            raise UserError(f'--cam: {error}') from error
    owns_accelerator = accelerator is None
    accelerator = accelerator or Accelerator(mixed_precision=args.mixed_precision)
    data_args = dict(data_dir=args.data_dir, protocol=args.protocol, download=args.download, seed=args.seed)
    # An image folder's classes are only known once it has been read; its images are decoded once, below, for the
    # input the model sets.
    try:  # the data pipeline's messages name the problem and the fix (ImportError: a missing reader package)
        info = dataset_info(args.dataset, args.data_dir, args.protocol, args.download)
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
    loading = argparse.Namespace(  # batch size and workers: the dataset's defaults, filled in with the settings
        batch_size=args.batch_size, workers=loader_workers(args.workers, dataset))
    loader = DataLoader(dataset, batch_size=loading.batch_size, shuffle=False, num_workers=loading.workers,
                        pin_memory=accelerator.device.type == 'cuda')
    if accelerator.mixed_precision == 'bf16' and accelerator.device.type == 'cpu':
        guard_one_pixel_convolutions(model)  # a PyTorch bf16 bug on 1x1 maps (--gradient-health, --cam): fp32 there
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
    if args.cam and accelerator.is_main_process:
        # The first N images in split order, so that evaluations of different models show the same images.
        count = min(args.cam, len(dataset))
        cam_images, cam_targets = next(iter(DataLoader(dataset, batch_size=count, shuffle=False, num_workers=0)))
        cams = class_activation_maps(core, cam_images.to(accelerator.device))
        cam_labels = [label_names[int(c)] for c in cam_targets]
        cam_predictions = [label_names[c] for c in cams.predictions.tolist()]
        results['cam'] = dict(
            method='Grad-CAM (grad-cam)', explains='predicted class', num_images=count, indices=list(range(count)),
            layers=[asdict(layer) for layer in cams.layers], labels=cam_labels, predictions=cam_predictions)

    if accelerator.is_main_process:
        with writing(output_dir):  # a full disk or a read-only folder: one line naming the file
            output_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(output_dir / 'metrics.json', json.dumps(results, indent=2))
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
            if 'cam' in results:
                cam_title = f'Grad-CAM at {", ".join(layer.module for layer in cams.layers)}: {name}'
                plot_cam(cam_images, cams.maps, output_dir / 'cam.png', cam_labels, cam_predictions,
                         mean=preprocessing['mean'], std=preprocessing['std'], title=cam_title)
                # The maps and the images they cover (in [0, 1]) for a figure across models (plots.plot_cam_grid).
                mean, std = (np.asarray(preprocessing[key], dtype=np.float32)[:, None, None] for key in ('mean', 'std'))
                np.savez_compressed(output_dir / 'cam.npz', maps=cams.maps,
                                    images=np.clip(cam_images.float().numpy() * std + mean, 0, 1),
                                    targets=cam_targets.numpy(), predictions=cams.predictions,
                                    indices=np.arange(count))
            if 'gradient_norms' in results:
                plot_gradient_norms([dict(epoch=f'{args.split} split', norms=results['gradient_norms']['norms'])],
                                    output_dir / 'gradient_norms.png', band=REFERENCE_BAND,
                                    title=f'gradient norms ({args.gradient_mode}), {name}')
        _print_summary(results, output_dir)
    if owns_accelerator:
        accelerator.end_training()  # the process group down before exit: a live one can abort a process at exit
    return results


def _print_summary(results: Dict[str, Any], output_dir: Path) -> None:
    print(f"{results['model']} on {results['dataset']} {results['split']} ({results['num_samples']} images):")
    for key in METRIC_KEYS:
        if results.get(key) is not None:  # top-k is None where k is at least the classes (metrics.topk_informs)
            unit = '%' if key.startswith('top') else ''
            print(f'  {key:<20} {results[key]:.4f}{unit}')
    for band, health in results.get('gradient_health', {}).items():
        print(f"  GHS {band:<20} {health['score']:.3f} ({health['healthy']}/{health['analysed']}, "
              f"{len(health['vanishing'])} vanishing, {len(health['exploding'])} exploding)")
    print(f'  written to {output_dir}')


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line, checked before any model or data is loaded (every problem is a UserError)."""
    return resolve_evaluate_settings(argv, GRADIENT_MODES)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    return evaluate(parse_args(argv))


def cli(argv: Optional[Sequence[str]] = None) -> int:
    """``main`` for the shell: a problem with what was asked for is one line on stderr and exit code 2."""
    return run_entry_point('timm_gradattn.evaluate', main, argv)


if __name__ == '__main__':
    sys.exit(cli())
