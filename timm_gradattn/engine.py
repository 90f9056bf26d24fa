"""The training engine: ``train(settings)`` sets a run up, trains it epoch by epoch and finishes it.

The settings come resolved from ``timm_gradattn.settings``; the parts (model, optimizer, scheduler, losses,
loaders) are built by ``timm_gradattn.factory`` from timm's factories, and Accelerate runs them: devices, mixed
precision, gradient accumulation and multi-process runs (``accelerate launch``) are Accelerate's business.

A run folder ``<output>/<experiment>/`` holds ``config.yaml``, ``summary.csv``, ``model_best.safetensors``,
``last/`` (see ``timm_gradattn.checkpoint``), ``results.json``, ``hub/`` and, with ``--grad-stats-every``,
``grad_norms.jsonl``. Epochs are numbered from 1 in every file. ``results.json`` holds the test metrics of the
best validation epoch's weights and, under ``test_last_epoch``, those of the last epoch's (a run stopped by
``--max-updates`` ends with a partial epoch, validated and saved like the others); its ``selection`` says which.
A run without a validation split (``--protocol official --val-fraction 0``) has no validation pass and no early
stopping, and its weights are the last epoch's. ``--test-every-epoch`` adds the test split's loss and top-1 to every
summary.csv row, for the curve only.

Faults end a run in one line, at once, with the last complete state kept and resumable: Ctrl-C (exit 130) and a
scheduler's SIGTERM (exit 143) wait for the checkpoint being written; a write that fails (disk full, permissions,
read-only) stops the run in the epoch it happened and names the file, the reason and the state that is intact.
"""
import argparse
import json
import math
import signal
import threading
import time
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import torch
import torch.nn as nn
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader

from timm.data import Mixup
from timm.utils import ModelEmaV3

from . import factory, precision, run_files
from .analysis import gradient_norms
from .checkpoint import (
    MODEL_BEST, STATE_FILE, BackgroundWriter, OptimizerStateError, cpu_copy, find_last_checkpoint,
    load_scheduler_state_dict, load_training_state, load_weights, publish_best, save_training_state,
    scheduler_state_dict,
)
from .cpu import keep_freed_memory
from .data import DataSplits
from .errors import UserError
from .files import WriteError, atomic_write_csv, atomic_write_text, writing
from .hub import export_hub_folder
from .loop import NonFiniteLossError, reached_max_updates, stop_unless_finite, train_one_epoch
from .metrics import evaluate_logits, predict
from .preserve import preserved_state
from .run_files import LAST_EPOCH_WITHOUT_VALIDATION, SELECTED_ON_VALIDATION

__all__ = ['train', 'train_one_epoch', 'NonFiniteLossError', 'TrainingInterrupted', 'GRAD_STATS_BATCHES',
           'SELECTED_ON_VALIDATION', 'LAST_EPOCH_WITHOUT_VALIDATION']

GRAD_STATS_BATCHES = 5
bare = factory.bare


class TrainingInterrupted(UserError):
    """Ctrl-C (SIGINT, exit code 130) or SIGTERM (143) during training: one line that says what is kept and how to
    continue."""
    interrupted = True

    def __init__(self, message: str, exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's preemption, ``kill``), raised in the main thread so that it stops a run as Ctrl-C does."""
    exit_code = 143


class RunStopped(UserError):
    """A run's file could not be written: training stopped, the last complete state is named."""


@dataclass
class Run:
    """Everything ``setup`` builds for one run; ``state`` is what a checkpoint keeps besides the weights."""
    args: argparse.Namespace
    settings: argparse.Namespace  # as given: config.yaml keeps --epochs unset where --max-updates sets it
    accelerator: Accelerator
    run_dir: Path
    data: DataSplits
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loss_fn: nn.Module
    mixup_fn: Optional[Mixup]
    ema: Optional[ModelEmaV3]
    loaders: Tuple[DataLoader, DataLoader, DataLoader]
    state: Dict[str, Any] = field(default_factory=dict)
    # Checkpoints are written beside the next epoch's training (one process) or in step with the others.
    writer: BackgroundWriter = field(default_factory=BackgroundWriter)
    # The best epoch's weights as saved this session (main process): tested without waiting for their file.
    best_weights: Optional[Dict[str, torch.Tensor]] = None

    @property
    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model

    @property
    def validates(self) -> bool:
        return self.data.has_validation


# --- the whole run ------------------------------------------------------------------------------------------
def train(args: argparse.Namespace, on_epoch_end: Optional[Callable[[Dict[str, Any]], None]] = None) -> Dict[str, Any]:
    """Run the job described by ``args`` (``timm_gradattn.settings.resolve_train_settings``); returns results.json's
    content.

    ``on_epoch_end``, if given, is called on every process once each epoch's checkpoint is taken, with the epoch's
    summary.csv row plus the training images and the seconds its training loop, validation pass, test pass
    (``--test-every-epoch``), checkpoint (taking it; a single process writes it on a thread of its own, beside the
    next epoch) and the whole epoch took (``train_images``, ``train_loop_s``, ``validate_s``, ``test_s``,
    ``checkpoint_s``, ``epoch_wall_s``; 0 for a pass not run), and
    ``wait_for_checkpoint``, which blocks until the files are written; the benchmarks time it so.

    Raises:
        UserError: a problem with the settings or the data, explained (most are found before training starts);
            ``TrainingInterrupted`` on Ctrl-C.
    """
    with _sigterm_as_interrupt():
        run = setup(args)
        epoch, trained = run.state['epochs_done'], False
        try:
            for epoch in range(run.state['epochs_done'], run.args.epochs):
                if run.state['stopped_early'] or reached_max_updates(run.args, run.state['num_updates']):
                    break
                run_epoch(run, epoch, on_epoch_end)
            trained = True
            results = finish(run)
            run.writer.wait()  # the last checkpoint, written beside the test passes
            return results
        except KeyboardInterrupt as stop:
            run.writer.wait(raise_errors=False)  # the checkpoint being written completes: the message names it
            how = 'Stopped by SIGTERM' if isinstance(stop, Terminated) else 'Interrupted'
            where = 'after training' if trained else f'in epoch {epoch + 1}'
            raise TrainingInterrupted(f'{how} {where}; {_intact_state(run.run_dir)}. Continue with: python train.py '
                                      f'--resume {run.run_dir}', getattr(stop, 'exit_code', 130)) from None
        except WriteError as error:
            run.writer.wait(raise_errors=False)
            where = 'training is done' if trained else f'training stopped in epoch {epoch + 1}'
            raise RunStopped(f'{error}; {where} and {_intact_state(run.run_dir)}. Free space or fix the permissions, '
                             f'then continue with: python train.py --resume {run.run_dir}') from error
        finally:
            run.writer.close(raise_errors=False)  # whatever ended the run, the checkpoint being written completes


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises ``Terminated`` in the main thread while the block runs (elsewhere it keeps its handler)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _intact_state(run_dir: Path) -> str:
    """What a resume would start from, read from disk: the newest complete checkpoint."""
    folder = find_last_checkpoint(run_dir)
    if folder is None:
        return 'no epoch had been saved'
    epochs = json.loads((folder / STATE_FILE).read_text())['epochs_done']
    return f'the state after epoch {epochs} is intact in {folder}'


def setup(args: argparse.Namespace) -> Run:
    """Build every part of the run, resume its state if asked, write config.yaml; fail before the first step."""
    accelerator = factory.create_accelerator(args)
    if args.keep_freed_memory and accelerator.device.type == 'cpu':
        keep_freed_memory()
    set_seed(args.seed, device_specific=True)  # process 0 draws exactly what a single-process run draws
    run_dir = factory.resolve_run_dir(args, accelerator)
    try:
        return _build(args, accelerator, run_dir)
    except BaseException:
        if accelerator.is_main_process and not args.resume:
            factory.release_run_dir(run_dir)  # nothing was trained: the name stays free for the next try
        raise


def _build(args: argparse.Namespace, accelerator: Accelerator, run_dir: Path) -> Run:
    resume_from = find_last_checkpoint(run_dir) if args.resume else None
    if args.resume and resume_from is None and (run_dir / 'summary.csv').exists():
        raise UserError(f'--resume {run_dir}: the run has no complete checkpoint in last/. Start a new run instead.')

    data = factory.load_data(args)
    for note in data.notes:
        accelerator.print(note)
    info = data.info
    per_process_batch = factory.check_batch_size(args, accelerator, len(data.train))
    model = factory.create_model(args, info)
    factory.check_model_computes(model, args, info, len(data.train), per_process_batch, accelerator.num_processes)
    if args.sync_bn and accelerator.num_processes > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    accelerator.print(f"Mixed precision {accelerator.mixed_precision}: "
                      f"{getattr(args, 'mixed_precision_source', 'as given')}.")
    if accelerator.mixed_precision == 'bf16' and accelerator.device.type == 'cpu':
        precision.guard_one_pixel_convolutions(model)  # a PyTorch bf16 bug on 1x1 maps: those run in fp32
    if args.channels_last is None:  # settings is args: config.yaml records the choice, and a resume keeps it
        args.channels_last, why = precision.default_channels_last(accelerator.device.type, info.img_size)
        accelerator.print(f"Channels-last {'on' if args.channels_last else 'off'}: {why}.")
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = factory.create_optimizer(args, model, accelerator.device)
    loaders = factory.create_loaders(args, data)
    # Accelerate's accumulation also steps at the end of the loader, as timm's train.py counts.
    updates_per_epoch = math.ceil(len(loaders[0]) / args.grad_accum_steps)
    settings = args
    args = argparse.Namespace(**dict(vars(args), epochs=epochs_for(args, updates_per_epoch)))
    scheduler, epochs = factory.create_scheduler(args, optimizer, updates_per_epoch)
    args = argparse.Namespace(**dict(vars(args), epochs=epochs))
    mixup_fn, loss_fn = factory.create_losses(args, model.num_classes)
    model, optimizer, *loaders = accelerator.prepare(model, optimizer, *loaders)
    ema = factory.create_ema(args, bare(accelerator, model))
    run = Run(args, settings, accelerator, run_dir, data, model, optimizer, scheduler, loss_fn, mixup_fn, ema,
              tuple(loaders), writer=BackgroundWriter(enabled=accelerator.num_processes == 1))

    run.state = dict(model=args.model, epochs_done=0, num_updates=0, best_top1=-1.0, best_epoch=0, bad_epochs=0,
                     stopped_early=False, summary_rows=[])
    if resume_from is not None:
        run.state = _resume(resume_from, run)
    if accelerator.is_main_process:  # on resume too: flags such as --epochs may have changed
        with writing(run_dir / 'config.yaml'):
            atomic_write_text(run_dir / 'config.yaml', settings.to_yaml())
    accelerator.wait_for_everyone()
    accelerator.print(
        f'{args.model} on {info.name} ({len(data.train)}/{len(data.val)}/{len(data.test)} train/val/test images, '
        f'{info.num_classes} classes, {info.input_size[0]}x{info.img_size}x{info.img_size}), '
        f'{accelerator.num_processes} process(es) on {accelerator.device}, batch {args.batch_size} '
        f'({per_process_batch} per process), mixed precision {accelerator.mixed_precision}, run folder {run_dir}')
    if not run.validates:
        ema_weights = ' EMA weights' if ema is not None else ''
        accelerator.print(
            "No validation split (--protocol official --val-fraction 0): no validation pass, no early stopping; the "
            f"run's weights are the last epoch's{ema_weights} (model_best.safetensors), and results.json's test "
            "figures are theirs.")
    if args.test_every_epoch:
        accelerator.print('Test split evaluated after every epoch (--test-every-epoch): test_loss and test_top1 in '
                          'summary.csv, for the curve only; never used for selection, stopping or the schedule.')
    return run


def epochs_for(args: argparse.Namespace, updates_per_epoch: int) -> int:
    """--epochs, or where only --max-updates bounds the run, as many epochs as the updates take."""
    return args.epochs if args.epochs is not None else math.ceil(args.max_updates / updates_per_epoch)


def run_epoch(run: Run, epoch: int, on_epoch_end: Optional[Callable[[Dict[str, Any]], None]] = None) -> None:
    """Train one epoch, validate, keep the best weights (the last epoch's without a validation split), test if
    asked (for the curve only) and write the resumable state."""
    args, accelerator, state = run.args, run.accelerator, run.state
    train_loader, val_loader, test_loader = run.loaders
    num_classes = run.data.info.num_classes
    start = time.perf_counter()
    lr = run.optimizer.param_groups[0]['lr']
    train_loader.set_epoch(epoch)  # data order depends on (seed, epoch) only, so a resumed run sees the same
    train_stats, state['num_updates'] = train_one_epoch(
        epoch, run.model, train_loader, run.optimizer, run.scheduler, run.loss_fn, accelerator, args,
        state['num_updates'], run.mixup_fn, run.ema, between_steps=run.writer.raise_failure)
    trained = time.perf_counter()
    # Throughput of the training loops alone, over the whole run (a resumed run adds to the saved counts).
    state['train_loop_s'] = state.get('train_loop_s', 0.0) + trained - start
    state['train_images'] = state.get('train_images', 0) + len(run.data.train)
    stop_unless_finite(epoch, run.model, run.ema, accelerator)
    val = None
    if run.validates:
        val = evaluate_logits(*predict(run.eval_model, val_loader, accelerator), num_classes).metrics
    validated = time.perf_counter()
    test = None
    if args.test_every_epoch:
        with preserved_state():  # the test loader's iteration draws a seed: the training's random stream is kept
            test = evaluate_logits(*predict(run.eval_model, test_loader, accelerator), num_classes).metrics
    tested = time.perf_counter()
    row = dict(epoch=epoch + 1, **train_stats)
    if val is not None:
        row.update(val_loss=val['nll'], val_top1=val['top1'], val_top5=val['top5'], val_f1_macro=val['f1_macro'])
    if test is not None:
        row.update(test_loss=test['nll'], test_top1=test['top1'])
    row.update(lr=lr, epoch_time_s=time.perf_counter() - start)
    state['summary_rows'].append(row)
    # The test figures above never reach this: selection is on validation top-1, or, without a validation split,
    # each epoch's weights replace the previous epoch's (the run keeps the last epoch's).
    new_best = None  # the new best weights and their metadata, saved with this epoch's checkpoint
    if val is None or val['top1'] > state['best_top1']:
        state.update(best_epoch=epoch + 1, bad_epochs=0)
        if val is not None:
            state['best_top1'] = val['top1']
        if accelerator.is_main_process:
            why = dict(val_top1=str(val['top1'])) if val is not None else dict(selection=LAST_EPOCH_WITHOUT_VALIDATION)
            run.best_weights = cpu_copy(bare(accelerator, run.eval_model))
            new_best = run.best_weights, dict(model=args.model, epoch=str(epoch + 1), **why)
    else:
        state['bad_epochs'] += 1
    if run.scheduler is not None:
        run.scheduler.step(epoch + 1, val['top1'] if val is not None else None)
    state['stopped_early'] = bool(args.patience) and state['bad_epochs'] >= args.patience
    state['scheduler'] = scheduler_state_dict(run.scheduler)
    if accelerator.is_main_process:
        with writing(run.run_dir / 'summary.csv'):
            atomic_write_csv(run.run_dir / 'summary.csv', state['summary_rows'])
    passes = ''.join(f"{split} loss {row[f'{split}_loss']:.4f} top1 {row[f'{split}_top1']:.2f}  "
                     for split in ('val', 'test') if f'{split}_loss' in row)
    best = val is not None and state['best_epoch'] == epoch + 1
    accelerator.print(
        f"epoch {epoch + 1}/{args.epochs}  train loss {row['train_loss']:.4f} top1 {row['train_top1']:.2f}  "
        f"{passes}lr {lr:.2e}  {row['epoch_time_s']:.1f}s{'  *best' if best else ''}")
    if args.grad_stats_every and (epoch + 1) % args.grad_stats_every == 0:
        _record_grad_norms(epoch, run)
    saved = time.perf_counter()
    save_training_state(run.run_dir, accelerator, bare(accelerator, run.model), run.optimizer,
                        dict(state, epochs_done=epoch + 1), ema=run.ema.module if run.ema is not None else None,
                        writer=run.writer, best=new_best)
    state['epochs_done'] = epoch + 1  # its checkpoint is complete once the writer has finished (Ctrl-C waits)
    if on_epoch_end is not None:
        now = time.perf_counter()
        on_epoch_end(dict(row, train_images=len(run.data.train), train_loop_s=trained - start,
                          validate_s=validated - trained, test_s=tested - validated, checkpoint_s=now - saved,
                          epoch_wall_s=now - start, wait_for_checkpoint=run.writer.wait))
    if state['stopped_early']:
        accelerator.print(f"Early stopping: no better val top-1 for {args.patience} epochs "
                          f"(best {state['best_top1']:.2f} at epoch {state['best_epoch']}).")
    elif reached_max_updates(args, state['num_updates']):
        accelerator.print(f"Stopped after {state['num_updates']} updates (--max-updates), in epoch {epoch + 1}.")


def finish(run: Run) -> Dict[str, Any]:
    """Test the last epoch's and the best epoch's weights (one and the same without a validation split), export,
    write results.json and the plots.

    The plots are drawn on a thread of their own beside the export, once the test passes are done: drawn beside
    them, matplotlib held the interpreter lock for most of each pass's many short waits, and a 0.15 s test pass
    took over 1 s."""
    args, accelerator, state, info = run.args, run.accelerator, run.state, run.data.info
    test_loader = run.loaders[2]
    plots = ThreadPoolExecutor(1, thread_name_prefix='plots') if accelerator.is_main_process else None
    try:
        # The test split sees the last epoch's weights (what both CNNtention and Attention Shortcuts report), then
        # the best validation epoch's: the run's headline figures.
        accelerator.wait_for_everyone()
        last_epoch = len(state['summary_rows'])
        test_last = None
        if state['best_epoch'] != last_epoch:
            test_last = evaluate_logits(*predict(run.eval_model, test_loader, accelerator), info.num_classes).metrics
        _load_best_weights(run)
        test = evaluate_logits(*predict(run.model, test_loader, accelerator), info.num_classes)
        results = run_files.results_record(
            run.args, state, run.data, accelerator, bare(accelerator, run.model), run.validates, test.metrics,
            stopped_at_max_updates=reached_max_updates(args, state['num_updates']))
        results['test_last_epoch'] = dict(test_last or test.metrics, epoch=last_epoch)
        if plots is not None:
            _write_outputs(run, results, test, plots)
    finally:
        if plots is not None:
            plots.shutdown()
    accelerator.wait_for_everyone()
    accelerator.print(run_files.closing_message(results, state, run.run_dir, run.validates))
    accelerator.end_training()
    return results


def _write_outputs(run: Run, results: Dict[str, Any], test, plots: ThreadPoolExecutor) -> None:
    """The finished run's plots (on ``plots``' thread), Hub export and results.json; main process only."""
    args, state, info = run.args, run.state, run.data.info
    last_epoch = len(state['summary_rows'])
    label_names = info.head_label_names(len(test.confusion))
    with writing(run.run_dir):
        curves = plots.submit(run_files.plot_curves, run.run_dir, state['summary_rows'])
        test_plots = plots.submit(run_files.plot_test, run.run_dir, test, label_names)
        export_hub_folder(
            bare(run.accelerator, run.model), run.run_dir / 'hub', label_names=label_names,
            input_size=info.input_size, mean=info.mean, std=info.std,
            pretrained_cfg=dict(tag=info.name, license=info.license, notes=(
                f'Trained on {info.title} with timm-gradattn train.py (recipe {args.recipe}); '
                + (f'best validation top-1 {state["best_top1"]:.2f} at epoch {state["best_epoch"]}.'
                   if run.validates else f'no validation split: the weights of the last epoch, {last_epoch}.'),)))
        atomic_write_text(run.run_dir / 'results.json', json.dumps(results, indent=2))
        curves.result(), test_plots.result()  # a failed plot is raised here


def _resume(folder: Path, run: Run) -> Dict[str, Any]:
    args, accelerator, scheduler = run.args, run.accelerator, run.scheduler
    try:
        state = load_training_state(folder, accelerator, bare(accelerator, run.model), run.optimizer,
                                    ema=run.ema.module if run.ema is not None else None)
    except OptimizerStateError as error:
        raise UserError(f'--resume {folder.parent}: {error}') from error
    except ValueError as error:
        raise UserError(f'--resume {folder.parent}: {error} Resume with the --model the run was trained with.') \
            from error
    if accelerator.is_main_process:
        with writing(folder.parent / MODEL_BEST):
            publish_best(folder)  # the best weights this state knows, whatever a kill left in model_best
    load_scheduler_state_dict(scheduler, state.get('scheduler'))
    if scheduler is not None:  # the learning rate of the next epoch (update), also when --epochs was raised
        scheduler.step(state['epochs_done'])
        scheduler.step_update(state['num_updates'])  # each call is a no-op unless the scheduler counts its unit
    if state.pop('rng_restored', True) is False:
        print(f'Process {accelerator.process_index}: no saved random state (the run had fewer processes); '
              f'the resumed run will not repeat an uninterrupted one exactly.')
    if (folder.parent / 'results.json').is_file():
        if reached_max_updates(args, state['num_updates']):
            raise UserError(f'--resume {folder.parent}: the run already made {state["num_updates"]} of '
                            f'{args.max_updates} updates and has results.json. Pass a larger --max-updates to '
                            f'train on.')
        if state['epochs_done'] >= args.epochs:
            raise UserError(f'--resume {folder.parent}: the run already finished {state["epochs_done"]} of '
                            f'{args.epochs} epochs and has results.json. Pass a larger --epochs to train on.')
    accelerator.print(f'Resuming {folder.parent} after epoch {state["epochs_done"]}.')
    return state


def _record_grad_norms(epoch: int, run: Run) -> None:
    accelerator = run.accelerator
    if not accelerator.is_main_process:
        return
    with preserved_state():  # drawing augmented batches must not shift the training's random stream
        loader = DataLoader(run.data.train, batch_size=run.args.batch_size // accelerator.num_processes,
                            shuffle=False)
        batches = [(x.to(accelerator.device), y.to(accelerator.device))
                   for x, y in islice(loader, GRAD_STATS_BATCHES)]
    norms = gradient_norms(bare(accelerator, run.model), batches, max_batches=GRAD_STATS_BATCHES)
    with writing(run.run_dir / 'grad_norms.jsonl'), open(run.run_dir / 'grad_norms.jsonl', 'a') as f:
        f.write(json.dumps({'epoch': epoch + 1, 'norms': norms}) + '\n')


def _load_best_weights(run: Run) -> None:
    """The best validation epoch's weights into the model: those kept this session, else (a resumed run whose best
    epoch came before it, or another process) from model_best.safetensors."""
    model = bare(run.accelerator, run.model)
    if run.best_weights is not None:
        model.load_state_dict(run.best_weights)
    else:
        load_weights(model, run.run_dir / MODEL_BEST, what='Best weights')
