"""The training engine: timm builds the model, optimizer, scheduler and losses; Accelerate runs them.

``train(args)`` runs one job described by the settings of ``timm_gradattn.config``: it checks everything
that can be checked before the first step (dataset, model, weights, run folder), trains with a
validation pass per epoch, keeps the best weights and a resumable state, reloads the best weights for
the test split and exports the model for the Hugging Face Hub. Devices, mixed precision, gradient
accumulation and multi-process runs (``accelerate launch``) are Accelerate's business.

A run folder ``<output>/<experiment>/`` holds ``config.yaml``, ``summary.csv``, ``model_best.safetensors``,
``last/`` (see ``timm_gradattn.checkpoint``), ``results.json``, ``hub/`` and, with ``--grad-stats-every``,
``grad_norms.jsonl``. Epochs are numbered from 1 in every file. ``results.json`` holds the test metrics of the
best validation epoch's weights and, under ``test_last_epoch``, those of the last epoch's (a run stopped by
``--max-updates`` ends with a partial epoch, validated and saved like the others).
"""
import argparse
import inspect
import json
import math
import os
import time
import warnings
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
from PIL import Image
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import DynamoBackend, TorchDynamoPlugin, broadcast_object_list, set_seed
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

import timm
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models import get_pretrained_cfg, parse_model_name, safe_model_name
from timm.optim import create_optimizer_v2, get_optimizer_class, param_groups_layer_decay, param_groups_weight_decay
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3

from .analysis import gradient_norms, read_grad_norms
from .checkpoint import (
    OptimizerStateError, atomic_save_weights, atomic_write_csv, atomic_write_text, capture_rng_state,
    find_last_checkpoint, load_scheduler_state_dict, load_training_state, load_weights, restore_rng_state,
    save_training_state, scheduler_state_dict,
)
from .config import UserError, check_model_name, settings_to_yaml, with_dataset_defaults
from .cpu import keep_freed_memory
from .data import DataSplits, build_datasets
from .data.folder import UnreadableImageError
from .hub import export_hub_folder
from .metrics import ClassificationResult, evaluate_logits, predict
from .reporting import describe_machine

__all__ = ['train', 'train_one_epoch', 'create_optimizer', 'NonFiniteLossError', 'GRAD_STATS_BATCHES']

GRAD_STATS_BATCHES = 5
SCHEDULERS = ('cosine', 'tanh', 'step', 'multistep', 'plateau', 'poly', 'wsd', 'rsqrt', 'constant', 'none')


class NonFiniteLossError(UserError):
    """The training loss became NaN or infinite."""


# --- one epoch of training ----------------------------------------------------------------------------------
def train_one_epoch(
        epoch: int,
        model: nn.Module,
        loader: DataLoader,
        optimizer: torch.optim.Optimizer,
        scheduler,
        loss_fn: nn.Module,
        accelerator: Accelerator,
        args: argparse.Namespace,
        num_updates: int,
        mixup_fn: Optional[Mixup] = None,
        ema: Optional[ModelEmaV3] = None,
) -> Tuple[Dict[str, float], int]:
    """Returns ({'train_loss', 'train_top1'}, updated optimizer-step count). Stops early, after the update
    that reaches ``args.max_updates``."""
    model.train()
    if args.freeze_backbone:
        _keep_frozen_layers_in_eval(_bare(accelerator, model))
    # Running sums stay on the device; the host reads them only at log intervals.
    totals = torch.zeros(2, device=accelerator.device)  # sum of losses, correct predictions
    seen = 0
    # disable=None: tqdm draws only on a terminal, so logs and pipes get just the one-line epoch summaries.
    progress = tqdm(total=len(loader), desc=f'epoch {epoch + 1}/{args.epochs}', leave=False, dynamic_ncols=True,
                    disable=None if accelerator.is_local_main_process else True)
    for step, (images, targets) in enumerate(loader):
        with accelerator.accumulate(model):
            inputs, loss_targets = mixup_fn(images, targets) if mixup_fn is not None else (images, targets)
            logits = model(inputs)
            loss = loss_fn(logits, loss_targets)
            accelerator.backward(loss)
            if args.clip_grad and accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), args.clip_grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        last_update = False
        if accelerator.sync_gradients:
            num_updates += 1
            if ema is not None:
                ema.update(_bare(accelerator, model), step=num_updates)
            if scheduler is not None:
                scheduler.step_update(num_updates=num_updates)
            last_update = _reached_max_updates(args, num_updates)
        totals += torch.stack([loss.detach().float() * len(targets), (logits.argmax(1) == targets).sum().float()])
        seen += len(targets)
        progress.update(1)
        if (step + 1) % args.log_interval == 0 or step + 1 == len(loader) or last_update:
            loss_sum, correct, total = _sum_over_processes(accelerator, totals, seen)
            if not math.isfinite(loss_sum):
                progress.close()
                kept = f'the state after epoch {epoch} is kept' if epoch else 'no epoch had finished'
                raise NonFiniteLossError(
                    f'The training loss became {loss_sum / total} at epoch {epoch + 1}, step {step + 1}; training '
                    f'stopped and {kept}. Lower --lr, add --clip-grad or train without --mixed-precision, then '
                    f'continue with --resume or start again.')
            progress.set_postfix(loss=f'{loss_sum / total:.4f}', top1=f'{100 * correct / total:.2f}',
                                 lr=f'{optimizer.param_groups[0]["lr"]:.2e}')
        if last_update:
            if hasattr(loader, 'end'):
                loader.end()  # what Accelerate's loader does when exhausted: it is no longer the active one
            break
    progress.close()
    loss_sum, correct, total = _sum_over_processes(accelerator, totals, seen)
    return {'train_loss': loss_sum / total, 'train_top1': 100 * correct / total}, num_updates


def _stop_unless_finite(epoch: int, model: nn.Module, ema: Optional[ModelEmaV3], accelerator: Accelerator,
                        args: argparse.Namespace) -> None:
    """Stop before an epoch whose weights are NaN or infinite is validated or saved.

    The loss check inside the epoch sees the loss before each step; a non-finite gradient in the epoch's
    last step would otherwise reach the saved state, and NaN logits would score as correct.
    """
    modules = [_bare(accelerator, model)] + ([ema.module] if ema is not None else [])
    finite = torch.stack([p.isfinite().all() for module in modules for p in module.parameters()]).all()
    if finite:
        return
    kept = f'the state after epoch {epoch} is kept' if epoch else 'no epoch had finished'
    hint = (' On CPU, bf16 autocast has given garbage gradients for a stride-2 3x3 convolution on 1x1 feature '
            'maps (inputs of 16 px or less through an ImageNet stem); use --mixed-precision no or a larger '
            '--img-size.' if args.mixed_precision == 'bf16' and accelerator.device.type == 'cpu' else '')
    raise NonFiniteLossError(
        f'The weights became NaN or infinite during epoch {epoch + 1}: a non-finite gradient reached the optimizer. '
        f'Training stopped and {kept}. Lower --lr or train without --mixed-precision, then continue with --resume '
        f'or start again.{hint}')


def _sum_over_processes(accelerator: Accelerator, totals: torch.Tensor, seen: int):
    counts = torch.cat([totals, torch.tensor([float(seen)], device=totals.device)])
    return accelerator.reduce(counts, reduction='sum').tolist()


def _write_plots(run_dir: Path, summary_rows, test: ClassificationResult, label_names) -> None:
    """PNGs next to results.json: curves from summary.csv, and calibration and confusion on the test split."""
    from .plots import plot_confusion_matrix, plot_gradient_norms, plot_reliability_diagram, plot_training_curves
    plot_training_curves(summary_rows, run_dir / 'training_curves.png', title=run_dir.name)
    plot_reliability_diagram(test.reliability, run_dir / 'reliability.png', title=f'reliability (test): {run_dir.name}')
    plot_confusion_matrix(test.confusion, run_dir / 'confusion_matrix.png', label_names,
                          title=f'confusion (test): {run_dir.name}')
    if (run_dir / 'grad_norms.jsonl').exists():
        plot_gradient_norms(read_grad_norms(run_dir / 'grad_norms.jsonl'), run_dir / 'gradient_norms.png')


# --- the whole run ------------------------------------------------------------------------------------------
def train(args: argparse.Namespace, on_epoch_end: Optional[Callable[[Dict[str, Any]], None]] = None) -> Dict[str, Any]:
    """Run the job described by ``args`` (see ``timm_gradattn.config.parse_args``); returns results.json's content.

    ``on_epoch_end``, if given, is called on every process after each epoch's checkpoint with the epoch's
    summary.csv row plus the training images and the seconds its training loop, validation pass and checkpoint
    took (``train_images``, ``train_loop_s``, ``validate_s``, ``checkpoint_s``); the benchmarks time it so.

    Raises:
        UserError: a problem with the settings or the data, explained (most are found before training starts).
    """
    try:
        return _train(args, on_epoch_end)
    except UnreadableImageError as error:  # an image that passed the header check but cannot be decoded
        raise UserError(str(error)) from error


def _train(args: argparse.Namespace, on_epoch_end) -> Dict[str, Any]:
    check_model_name(args.model)
    accelerator = _create_accelerator(args)
    if args.keep_freed_memory and accelerator.device.type == 'cpu':
        keep_freed_memory()
    set_seed(args.seed, device_specific=True)  # process 0 draws exactly what a single-process run draws
    run_dir = _resolve_run_dir(args, accelerator)
    resume_from = find_last_checkpoint(run_dir) if args.resume else None
    if args.resume and resume_from is None and (run_dir / 'summary.csv').exists():
        raise UserError(f'--resume {run_dir}: the run has no complete checkpoint in last/. Start a new run instead.')

    data = _load_data(args)
    info = data.info
    args = with_dataset_defaults(args, info)
    per_process_batch = _check_batch_size(args, accelerator)
    model = _create_model(args, info)
    _check_model_computes(model, args, info, len(data.train), per_process_batch, accelerator.num_processes)
    optimizer = create_optimizer(args, model, accelerator.device)
    train_loader, val_loader, test_loader = _create_loaders(args, data)
    # Accelerate's accumulation also steps at the end of the loader, as timm's train.py counts.
    updates_per_epoch = math.ceil(len(train_loader) / args.grad_accum_steps)
    settings = args  # config.yaml keeps --epochs unset where --max-updates sets it, so a resume can raise the cap
    args = _with_epochs(args, updates_per_epoch)
    scheduler = _create_scheduler(args, optimizer, updates_per_epoch)
    if args.mixup > 0:
        mixup_fn = Mixup(mixup_alpha=args.mixup, label_smoothing=args.smoothing, num_classes=model.num_classes)
        train_loss_fn = SoftTargetCrossEntropy()
    else:
        mixup_fn = None
        train_loss_fn = LabelSmoothingCrossEntropy(args.smoothing) if args.smoothing > 0 else nn.CrossEntropyLoss()
    model, optimizer, train_loader, val_loader, test_loader = accelerator.prepare(
        model, optimizer, train_loader, val_loader, test_loader)
    ema = _create_ema(args, _bare(accelerator, model))

    state: Dict[str, Any] = dict(model=args.model, epochs_done=0, num_updates=0, best_top1=-1.0, best_epoch=0,
                                 bad_epochs=0, stopped_early=False, summary_rows=[])
    if resume_from is not None:
        state = _resume(resume_from, args, accelerator, model, optimizer, scheduler, ema)
    if accelerator.is_main_process:  # on resume too: flags such as --epochs may have changed
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / 'config.yaml', settings_to_yaml(settings))
    accelerator.wait_for_everyone()
    accelerator.print(
        f'{args.model} on {info.name} ({len(data.train)}/{len(data.val)}/{len(data.test)} train/val/test images, '
        f'{info.num_classes} classes, {info.input_size[0]}x{info.img_size}x{info.img_size}), '
        f'{accelerator.num_processes} process(es) on {accelerator.device}, batch {args.batch_size} '
        f'({per_process_batch} per process), run folder {run_dir}')

    eval_model = ema.module if ema is not None else model
    for epoch in range(state['epochs_done'], args.epochs):
        if state['stopped_early'] or _reached_max_updates(args, state['num_updates']):
            break
        start = time.perf_counter()
        lr = optimizer.param_groups[0]['lr']
        train_loader.set_epoch(epoch)  # data order depends on (seed, epoch) only, so a resumed run sees the same
        train_stats, state['num_updates'] = train_one_epoch(
            epoch, model, train_loader, optimizer, scheduler, train_loss_fn, accelerator, args,
            state['num_updates'], mixup_fn, ema)
        trained = time.perf_counter()
        _stop_unless_finite(epoch, model, ema, accelerator, args)
        val = evaluate_logits(*predict(eval_model, val_loader, accelerator), info.num_classes).metrics
        validated = time.perf_counter()
        row = dict(epoch=epoch + 1, **train_stats, val_loss=val['nll'], val_top1=val['top1'], val_top5=val['top5'],
                   val_f1_macro=val['f1_macro'], lr=lr, epoch_time_s=time.perf_counter() - start)
        state['summary_rows'].append(row)
        if val['top1'] > state['best_top1']:
            state.update(best_top1=val['top1'], best_epoch=epoch + 1, bad_epochs=0)
            if accelerator.is_main_process:
                atomic_save_weights(_bare(accelerator, eval_model), run_dir / 'model_best.safetensors',
                                    metadata=dict(model=args.model, epoch=str(epoch + 1), val_top1=str(val['top1'])))
        else:
            state['bad_epochs'] += 1
        if scheduler is not None:
            scheduler.step(epoch + 1, val['top1'])
        state['stopped_early'] = bool(args.patience) and state['bad_epochs'] >= args.patience
        state['epochs_done'] = epoch + 1
        state['scheduler'] = scheduler_state_dict(scheduler)
        if accelerator.is_main_process:
            atomic_write_csv(run_dir / 'summary.csv', state['summary_rows'])
        accelerator.print(
            f"epoch {epoch + 1}/{args.epochs}  train loss {row['train_loss']:.4f} top1 {row['train_top1']:.2f}  "
            f"val loss {row['val_loss']:.4f} top1 {row['val_top1']:.2f}  lr {lr:.2e}  "
            f"{row['epoch_time_s']:.1f}s{'  *best' if state['best_epoch'] == epoch + 1 else ''}")
        if args.grad_stats_every and (epoch + 1) % args.grad_stats_every == 0:
            _record_grad_norms(epoch, model, data.train, args, accelerator, run_dir)
        saved = time.perf_counter()
        save_training_state(run_dir, accelerator, _bare(accelerator, model), optimizer, state,
                            ema=ema.module if ema is not None else None)
        if on_epoch_end is not None:
            on_epoch_end(dict(row, train_images=len(data.train), train_loop_s=trained - start,
                              validate_s=validated - trained, checkpoint_s=time.perf_counter() - saved))
        if state['stopped_early']:
            accelerator.print(f"Early stopping: no better val top-1 for {args.patience} epochs "
                              f"(best {state['best_top1']:.2f} at epoch {state['best_epoch']}).")
        elif _reached_max_updates(args, state['num_updates']):
            accelerator.print(f"Stopped after {state['num_updates']} updates (--max-updates), in epoch {epoch + 1}.")

    # The test split sees the last epoch's weights (what both CNNtention and Attention Shortcuts report), then the
    # best validation epoch's, reloaded from their file: the run's headline figures.
    accelerator.wait_for_everyone()
    last_epoch = len(state['summary_rows'])
    test_last = None
    if state['best_epoch'] != last_epoch:
        test_last = evaluate_logits(*predict(eval_model, test_loader, accelerator), info.num_classes).metrics
    load_weights(_bare(accelerator, model), run_dir / 'model_best.safetensors', what='Best weights')
    test = evaluate_logits(*predict(model, test_loader, accelerator), info.num_classes)
    results = _results(args, data, test.metrics, state, accelerator, model)
    results['test_last_epoch'] = dict(test_last or test.metrics, epoch=last_epoch)
    if accelerator.is_main_process:
        export_hub_folder(
            _bare(accelerator, model), run_dir / 'hub', label_names=info.head_label_names(len(test.confusion)),
            input_size=info.input_size, mean=info.mean, std=info.std,
            pretrained_cfg=dict(tag=info.name, license=info.license, notes=(
                f'Trained on {info.title} with timm-gradattn train.py (recipe {args.recipe}); '
                f'best validation top-1 {state["best_top1"]:.2f} at epoch {state["best_epoch"]}.',)))
        atomic_write_text(run_dir / 'results.json', json.dumps(results, indent=2))
        _write_plots(run_dir, state['summary_rows'], test, info.head_label_names(len(test.confusion)))
    accelerator.wait_for_everyone()
    accelerator.print(
        f"Test top-1 {results['top1']:.2f}  top-5 {results['top5']:.2f}  F1 (macro) {results['f1_macro']:.4f}  "
        f"ECE {results['ece']:.4f}  (weights of epoch {state['best_epoch']}, val top-1 {state['best_top1']:.2f}); "
        f"last epoch {last_epoch}: top-1 {results['test_last_epoch']['top1']:.2f}\n"
        f'Run folder {run_dir}:\n'
        f'  results.json            test metrics and run facts\n'
        f'  summary.csv             one row per epoch\n'
        f'  model_best.safetensors  best validation weights\n'
        f'  *.png                   training curves, reliability diagram, confusion matrix (test split)\n'
        f'  hub/                    timm.create_model("local-dir:{run_dir / "hub"}", pretrained=True)\n'
        f'  last/                   resumable state: python train.py --resume {run_dir}')
    accelerator.end_training()
    return results


def _bare(accelerator: Accelerator, model: nn.Module) -> nn.Module:
    """The model without Accelerate's wrappers (DDP, autocast) or torch.compile's: what weights are saved from
    and loaded into, under the parameter names of the model's own ``state_dict``."""
    return accelerator.unwrap_model(model, keep_torch_compile=False)


# --- setup: everything that can fail does so before the first step ------------------------------------------
def _create_accelerator(args: argparse.Namespace) -> Accelerator:
    if args.mixed_precision == 'fp16' and not torch.cuda.is_available():
        raise UserError('--mixed-precision fp16 needs a CUDA GPU; on CPU use --mixed-precision bf16 or no.')
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    # Accelerate forms a multi-process CPU group only when told to use the CPU; without this a multi-process
    # launch on a machine without CUDA would start independent single-process runs.
    accelerator = Accelerator(
        cpu=world_size > 1 and not torch.cuda.is_available(),
        dynamo_plugin=_dynamo_plugin(args),
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.grad_accum_steps,
        # split_batches: --batch-size is the global batch, so a recipe means the same on any number of devices.
        dataloader_config=DataLoaderConfiguration(split_batches=True, use_seedable_sampler=True, data_seed=args.seed),
    )
    if world_size > 1 and accelerator.num_processes != world_size:
        raise UserError(f'{world_size} processes were launched but Accelerate joined {accelerator.num_processes}. '
                        f'Launch with `accelerate launch --multi_gpu --num_processes N train.py ...`.')
    return accelerator


def _dynamo_plugin(args: argparse.Namespace) -> Optional[TorchDynamoPlugin]:
    """torch.compile settings for Accelerate's prepare(); None leaves them to ``accelerate launch`` / its config."""
    if not args.torchcompile:
        return None
    backends = [b.value.lower() for b in DynamoBackend if b is not DynamoBackend.NO]
    if args.torchcompile.lower() not in backends:
        raise UserError(f'--torchcompile {args.torchcompile!r} is not a torch.compile backend Accelerate knows; '
                        f'use one of {backends} (inductor is torch\'s default).')
    return TorchDynamoPlugin(backend=args.torchcompile.upper(), mode=args.torchcompile_mode)


def _resolve_run_dir(args: argparse.Namespace, accelerator: Accelerator) -> Path:
    """The run folder (not created yet); process 0 decides and tells the others."""
    decision = [None, None]
    if accelerator.is_main_process:
        decision = _choose_run_dir(args)
    broadcast_object_list(decision)
    run_dir, problem = decision
    if problem:
        raise UserError(problem)
    return Path(run_dir)


def _choose_run_dir(args: argparse.Namespace) -> Tuple[str, Optional[str]]:
    if args.resume:
        return str(Path(args.resume)), None
    if args.experiment:
        run_dir = Path(args.output) / args.experiment
        if run_dir.exists() and any(run_dir.iterdir()):
            return str(run_dir), (
                f'Run folder {run_dir} already holds a run; it is never overwritten. Continue it with '
                f'--resume {run_dir}, or choose another --experiment name.')
        return str(run_dir), None
    _, model_name = parse_model_name(args.model)
    name = '-'.join([safe_model_name(Path(model_name).name), args.dataset, time.strftime('%Y%m%d-%H%M%S')])
    run_dir, count = Path(args.output) / name, 1
    while run_dir.exists():  # two runs started in the same second get their own folders
        run_dir, count = Path(args.output) / f'{name}-{count}', count + 1
    return str(run_dir), None


def _load_data(args: argparse.Namespace) -> DataSplits:
    try:
        data = build_datasets(args.dataset, data_dir=args.data_dir, protocol=args.protocol, download=args.download,
                              seed=args.seed, img_size=args.img_size, in_chans=args.in_chans, mean=args.mean,
                              std=args.std, augment=args.train_augment, val_fraction=args.val_fraction)
    # The data pipeline's messages name the problem and the fix (ImportError: a missing reader package).
    except (ValueError, FileNotFoundError, ImportError) as error:
        raise UserError(f'Dataset {args.dataset!r}: {error}') from error
    if data.info.num_classes < 2:
        raise UserError(f'Dataset {args.dataset!r} has {data.info.num_classes} class; a classifier needs at least 2.')
    _check_image_files(data)
    for split in ('train', 'val', 'test'):
        try:  # decode one image per split now rather than fail mid-epoch
            getattr(data, split)[0]
        except OSError as error:
            raise UserError(f'Dataset {args.dataset!r}, {split} split: {error}') from error
    if args.train_subset:
        data.train = Subset(data.train, range(min(args.train_subset, len(data.train))))
    return data


def _check_image_files(data: DataSplits) -> None:
    """Image files (folder datasets): check every header now rather than fail when an epoch reaches the file."""
    files = {path for split in (data.train, data.val, data.test)
             for path, _ in getattr(getattr(split, 'base', None), 'samples', ())}
    broken = []
    for path in sorted(files):
        try:
            with Image.open(path) as image:
                image.verify()
        except Exception:  # noqa: BLE001 - PIL raises many types for a damaged file; each means unreadable
            broken.append(path)
    if broken:
        raise UserError(f'{len(broken)} image file(s) cannot be read: {", ".join(broken[:5])}'
                        f'{" ..." if len(broken) > 5 else ""}. Replace or delete them.')


def _check_batch_size(args: argparse.Namespace, accelerator: Accelerator) -> int:
    processes = accelerator.num_processes
    if args.batch_size % processes:
        raise UserError(f'--batch-size {args.batch_size} is the global batch and must split evenly over '
                        f'{processes} processes; pass a multiple of {processes}.')
    per_process = args.batch_size // processes
    if args.mixup > 0 and per_process % 2:
        raise UserError(f'Mixup pairs images within a batch: the per-process batch {per_process} must be even.')
    return per_process


def _create_model(args: argparse.Namespace, info) -> nn.Module:
    source, name = parse_model_name(args.model)  # the name was checked by check_model_name
    num_classes = args.num_classes or info.num_classes
    if num_classes < info.num_classes:
        raise UserError(f'--num-classes {num_classes} is fewer than the {info.num_classes} classes of {info.name}.')
    kwargs: Dict[str, Any] = dict(args.model_kwargs or {}, num_classes=num_classes, in_chans=info.in_chans)
    if args.drop is not None:
        kwargs['drop_rate'] = args.drop
    if source is None and getattr(get_pretrained_cfg(name), 'fixed_input_size', False):
        kwargs['img_size'] = info.img_size  # e.g. ViTs build their position table for one size
    try:
        model = timm.create_model(args.model, pretrained=args.pretrained, **kwargs)
    except (RuntimeError, OSError, ValueError) as error:  # missing weights, unreachable Hub, bad local export
        raise UserError(f'Cannot create {args.model!r}: {error}') from error
    if args.initial_checkpoint:  # a classifier of another size stays freshly initialised (fine-tuning)
        load_weights(model, args.initial_checkpoint, what='--initial-checkpoint', new_head=True)
    if args.freeze_backbone:
        model.requires_grad_(False)
        model.get_classifier().requires_grad_(True)
    return model


def _check_model_computes(model: nn.Module, args: argparse.Namespace, info, train_images: int, per_process_batch: int,
                          processes: int) -> None:
    """One forward pass in training mode, on CPU, on blank images of the run's size and smallest training batch,
    so that what the model cannot compute (a kernel larger than its input, a BatchNorm that would see one value
    per channel) is refused in one line now, not mid-epoch. Any model, no size rule: it computes or it does not.
    Weights, normalisation statistics and random state are left as they were."""
    # One process gets the epoch's last, partial batch as it is; several get full ones (Accelerate's even_batches).
    last = train_images % per_process_batch if processes == 1 and not args.mixup > 0 else 0
    smallest = min(per_process_batch, last or per_process_batch)

    def fails(batch: int) -> Optional[str]:
        buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
        was_training = model.training
        model.train()
        if args.freeze_backbone:
            _keep_frozen_layers_in_eval(model)
        try:
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                model(torch.zeros(batch, *info.input_size))
        except (RuntimeError, ValueError, AssertionError, IndexError) as error:
            return ' '.join(str(error).split())[:300] or type(error).__name__
        finally:
            with torch.no_grad():
                for name, buffer in model.named_buffers():
                    buffer.copy_(buffers[name])
            model.train(was_training)
        return None

    problem = fails(min(smallest, 2))
    if problem is None:
        return
    size = 'x'.join(map(str, info.input_size))
    if smallest == 1 and fails(2) is None:
        why = (f'--batch-size {args.batch_size} over {processes} process(es) is 1 image each' if per_process_batch == 1
               else f'the last batch of each epoch holds 1 image ({train_images} training images, --batch-size '
                    f'{args.batch_size})')
        batch = next(b for b in range(args.batch_size + 1, args.batch_size + 4 * processes + 4)
                     if b % processes == 0 and b // processes > 1 and (processes > 1 or train_images % b != 1))
        raise UserError(f'{args.model} cannot train on a batch of one {size} image ({problem}), and {why}. Pass '
                        f'another --batch-size (e.g. {batch}) or a larger --img-size.')
    raise UserError(f'{args.model} cannot compute on {size} images ({problem}). Pass a larger --img-size.')


def create_optimizer(args: argparse.Namespace, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """timm's optimizer for ``model`` as ``args`` set it, with a fused kernel where torch has one for ``device``.

    ``--decay-norm-and-bias`` (the paper recipe) decays every parameter, as the reference's Adam does:
    biases, norms and the model's ``no_weight_decay()`` names (e.g. ``pos_embed``) too; timm's factory would
    still exempt those names, so the groups are built here with timm's own helpers.
    """
    fused = dict(fused=True) if args.fused_opt and _has_fused_kernel(args.opt, device) else {}
    exclude_1d = not args.decay_norm_and_bias
    no_decay = model.no_weight_decay() if exclude_1d and hasattr(model, 'no_weight_decay') else ()
    try:
        if args.layer_decay is not None:
            params = param_groups_layer_decay(model, args.weight_decay, no_decay, weight_decay_exclude_1d=exclude_1d,
                                              layer_decay=args.layer_decay)
        else:
            params = param_groups_weight_decay(model, args.weight_decay, exclude_1d, no_decay)
        return create_optimizer_v2(params, opt=args.opt, lr=args.lr, momentum=args.momentum, **fused)
    except (ValueError, AssertionError) as error:
        raise UserError(f'Cannot create optimizer --opt {args.opt!r}: {error}. See timm.optim.list_optimizers().') \
            from error


def _has_fused_kernel(opt: str, device: torch.device) -> bool:
    """Whether timm's ``opt`` is one of torch's optimizers with a fused implementation for ``device``.

    On CPU torch otherwise runs a Python loop over the parameters (its multi-tensor path is for CUDA); see
    ``benchmarks/results/pipeline_speed*.md`` for train.py with and without this and ``keep_freed_memory``.
    """
    if device.type not in ('cpu', 'cuda'):
        return False
    try:
        opt_class = get_optimizer_class(opt, bind_defaults=False)
    except (ValueError, AssertionError):
        return False  # create_optimizer_v2 reports the unknown name
    return opt_class.__module__.startswith('torch.optim.') and 'fused' in inspect.signature(opt_class).parameters


def _with_epochs(args: argparse.Namespace, updates_per_epoch: int) -> argparse.Namespace:
    """``args`` with the epoch count filled in where only ``--max-updates`` bounds the run."""
    if args.max_updates is not None and args.max_updates < 1:
        raise UserError(f'--max-updates must be at least 1, got {args.max_updates}.')
    if args.epochs is not None:
        return args
    if args.max_updates is None:
        raise UserError('Neither --epochs nor --max-updates is set, so the run has no length; pass one of them.')
    return argparse.Namespace(**dict(vars(args), epochs=math.ceil(args.max_updates / updates_per_epoch)))


def _reached_max_updates(args: argparse.Namespace, num_updates: int) -> bool:
    return args.max_updates is not None and num_updates >= args.max_updates


def _create_scheduler(args: argparse.Namespace, optimizer: torch.optim.Optimizer, updates_per_epoch: int):
    """timm's scheduler for ``args``; with ``--sched-on-updates`` it steps per update and its epoch counts are
    scaled by ``updates_per_epoch`` by timm, except ``--decay-milestones``, which are given in updates."""
    if args.sched not in SCHEDULERS:
        raise UserError(f'Unknown --sched {args.sched!r}; choose one of {", ".join(SCHEDULERS)}.')
    milestones = args.decay_milestones
    unit = 'updates' if args.sched_on_updates else 'epochs'
    if args.sched == 'multistep' and not milestones:
        raise UserError(f'--sched multistep needs --decay-milestones: the {unit} (counted from 1) that start at a '
                        f'rate multiplied by --decay-rate, e.g. --decay-milestones 92 137.')
    if milestones and (min(milestones) < 1 or list(milestones) != sorted(set(milestones))):
        raise UserError(f'--decay-milestones {" ".join(map(str, milestones))} must be increasing {unit}, each at '
                        f'least 1.')
    if args.sched_on_updates and args.sched == 'plateau':
        raise UserError("--sched plateau follows the validation top-1 once per epoch; drop --sched-on-updates or "
                        "choose a scheduler that steps per update (e.g. cosine, multistep).")
    with warnings.catch_warnings():
        # timm deprecates its plateau scheduler because timm's own checkpoints drop its counters;
        # timm_gradattn.checkpoint saves the complete state, so resumed runs continue it exactly.
        warnings.filterwarnings('ignore', message='PlateauLRScheduler is deprecated', category=FutureWarning)
        scheduler, _ = create_scheduler_v2(
            optimizer, sched=args.sched, num_epochs=args.epochs, decay_epochs=args.decay_epochs,
            decay_milestones=list(milestones or ()),
            decay_rate=args.decay_rate, min_lr=args.min_lr, warmup_epochs=args.warmup_epochs,
            patience_epochs=args.patience_epochs, plateau_mode='max',
            step_on_epochs=not args.sched_on_updates, updates_per_epoch=updates_per_epoch)
    if scheduler is not None and args.sched_on_updates and milestones:
        scheduler.decay_t = list(milestones)  # timm scaled them by updates_per_epoch; these are updates already
    return scheduler


def _create_ema(args: argparse.Namespace, model: nn.Module) -> Optional[ModelEmaV3]:
    """timm's weight average for ``--model-ema`` (``--model-ema-warmup``: its decay rises from 0 to the cap)."""
    if not args.model_ema:
        return None
    return ModelEmaV3(model, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup)


def _create_loaders(args: argparse.Namespace, data: DataSplits) -> Tuple[DataLoader, DataLoader, DataLoader]:
    common = dict(batch_size=args.batch_size, num_workers=args.workers, persistent_workers=args.workers > 0,
                  pin_memory=torch.cuda.is_available())
    # Mixup needs an even batch; shuffling is seeded per epoch by Accelerate's seedable sampler.
    train = DataLoader(data.train, shuffle=True, drop_last=args.mixup > 0, **common)
    return train, DataLoader(data.val, **common), DataLoader(data.test, **common)


def _resume(folder: Path, args, accelerator, model, optimizer, scheduler, ema) -> Dict[str, Any]:
    try:
        state = load_training_state(folder, accelerator, _bare(accelerator, model), optimizer,
                                    ema=ema.module if ema is not None else None)
    except OptimizerStateError as error:
        raise UserError(f'--resume {folder.parent}: {error}') from error
    except ValueError as error:
        raise UserError(f'--resume {folder.parent}: {error} Resume with the --model the run was trained with.') \
            from error
    load_scheduler_state_dict(scheduler, state.get('scheduler'))
    if scheduler is not None:  # the learning rate of the next epoch (update), also when --epochs was raised
        scheduler.step(state['epochs_done'])
        scheduler.step_update(state['num_updates'])  # each call is a no-op unless the scheduler counts its unit
    if state.pop('rng_restored', True) is False:
        print(f'Process {accelerator.process_index}: no saved random state (the run had fewer processes); '
              f'the resumed run will not repeat an uninterrupted one exactly.')
    if (folder.parent / 'results.json').is_file():
        if _reached_max_updates(args, state['num_updates']):
            raise UserError(f'--resume {folder.parent}: the run already made {state["num_updates"]} of '
                            f'{args.max_updates} updates and has results.json. Pass a larger --max-updates to '
                            f'train on.')
        if state['epochs_done'] >= args.epochs:
            raise UserError(f'--resume {folder.parent}: the run already finished {state["epochs_done"]} of '
                            f'{args.epochs} epochs and has results.json. Pass a larger --epochs to train on.')
    accelerator.print(f'Resuming {folder.parent} after epoch {state["epochs_done"]}.')
    return state


def _keep_frozen_layers_in_eval(model: nn.Module) -> None:
    # A frozen backbone keeps its BatchNorm statistics and runs without dropout, as at inference.
    for module in model.modules():
        if not any(p.requires_grad for p in module.parameters()):
            module.eval()


def _record_grad_norms(epoch, model, train_set, args, accelerator, run_dir: Path) -> None:
    if not accelerator.is_main_process:
        return
    rng = capture_rng_state()  # drawing augmented batches must not shift the training's random stream
    loader = DataLoader(train_set, batch_size=args.batch_size // accelerator.num_processes, shuffle=False)
    batches = [(x.to(accelerator.device), y.to(accelerator.device)) for x, y in islice(loader, GRAD_STATS_BATCHES)]
    restore_rng_state(rng['tensors'], rng['python'], rng['numpy'])
    norms = gradient_norms(_bare(accelerator, model), batches, max_batches=GRAD_STATS_BATCHES)
    with open(run_dir / 'grad_norms.jsonl', 'a') as f:
        f.write(json.dumps({'epoch': epoch + 1, 'norms': norms}) + '\n')


def _results(args, data: DataSplits, test: Dict[str, float], state: Dict[str, Any], accelerator, model) -> Dict:
    rows = state['summary_rows']
    best = next(row for row in rows if row['epoch'] == state['best_epoch'])
    info = data.info
    return dict(
        test,
        model=args.model, dataset=info.name, protocol=args.protocol, seed=args.seed, recipe=args.recipe,
        num_classes=info.num_classes, label_names=list(info.label_names) if info.label_names else None,
        split_sizes=data.sizes(),
        best_epoch=state['best_epoch'], epochs_run=len(rows), stopped_early=state['stopped_early'],
        num_updates=state['num_updates'], stopped_at_max_updates=_reached_max_updates(args, state['num_updates']),
        val_top1_best=state['best_top1'], train_top1_at_best=best['train_top1'],
        train_val_gap=abs(best['train_top1'] - best['val_top1']),
        seconds_per_epoch=sum(r['epoch_time_s'] for r in rows) / len(rows),
        num_params=sum(p.numel() for p in _bare(accelerator, model).parameters()),
        machine=describe_machine(accelerator.device, num_processes=accelerator.num_processes,
                                 mixed_precision=accelerator.mixed_precision,
                                 torch_compile=_compile_backend(accelerator)),
        pretrained_from=(args.model if args.pretrained else args.initial_checkpoint),
    )


def _compile_backend(accelerator: Accelerator) -> Optional[str]:
    backend = accelerator.state.dynamo_plugin.backend
    return None if backend == DynamoBackend.NO else backend.value.lower()
