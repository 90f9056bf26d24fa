"""One epoch of training: the steps under Accelerate (accumulation, clipping, EMA, the scheduler's per-update step),
the running loss and top-1 summed over processes, and the checks that stop a run whose loss or weights are no longer
finite. ``timm_gradattn.engine`` runs the epochs around it.
"""
import argparse
import math
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
from accelerate import Accelerator
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from timm.data import Mixup
from timm.utils import ModelEmaV3, dispatch_clip_grad

from . import factory
from .errors import UserError

__all__ = ['train_one_epoch', 'reached_max_updates', 'stop_unless_finite', 'NonFiniteLossError']

bare = factory.bare


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
        between_steps: Optional[Callable[[], None]] = None,
) -> Tuple[Dict[str, float], int]:
    """Returns ({'train_loss', 'train_top1'}, updated optimizer-step count). Stops early, after the update
    that reaches ``args.max_updates``. ``between_steps`` is called after every step (the engine raises a failed
    checkpoint write there)."""
    model.train()
    if args.freeze_backbone:
        factory.keep_frozen_layers_in_eval(bare(accelerator, model))
    if mixup_fn is not None and args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
        mixup_fn.mixup_enabled = False
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    # Running sums stay on the device; the host reads them only at log intervals.
    totals = torch.zeros(2, device=accelerator.device)  # sum of losses, correct predictions
    seen = 0
    # disable=None: tqdm draws only on a terminal, so logs and pipes get just the one-line epoch summaries.
    progress = tqdm(total=len(loader), desc=f'epoch {epoch + 1}/{args.epochs}', leave=False, dynamic_ncols=True,
                    disable=None if accelerator.is_local_main_process else True)
    try:
        for step, (images, targets) in enumerate(loader):
            with accelerator.accumulate(model):
                inputs, loss_targets = mixup_fn(images, targets) if mixup_fn is not None else (images, targets)
                logits = model(inputs.contiguous(memory_format=memory_format))
                loss = loss_fn(logits, loss_targets)
                accelerator.backward(loss)
                if args.clip_grad and accelerator.sync_gradients:
                    _clip_gradients(model, accelerator, args)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            last_update = False
            if accelerator.sync_gradients:
                num_updates += 1
                if ema is not None:
                    ema.update(bare(accelerator, model), step=num_updates)
                if scheduler is not None:
                    scheduler.step_update(num_updates=num_updates)
                last_update = reached_max_updates(args, num_updates)
                if args.synchronize_step and torch.cuda.is_available():
                    torch.cuda.synchronize()
            totals += torch.stack([loss.detach().float() * len(targets), (logits.argmax(1) == targets).sum().float()])
            seen += len(targets)
            progress.update(1)
            if between_steps is not None:
                between_steps()
            if (step + 1) % args.log_interval == 0 or step + 1 == len(loader) or last_update:
                loss_sum, correct, total = _sum_over_processes(accelerator, totals, seen)
                if not math.isfinite(loss_sum):
                    kept = f'the state after epoch {epoch} is kept' if epoch else 'no epoch had finished'
                    raise NonFiniteLossError(
                        f'The training loss became {loss_sum / total} at epoch {epoch + 1}, step {step + 1}; training '
                        f'stopped and {kept}. Lower --lr, add --clip-grad or train in fp32 with --mixed-precision no, '
                        f'then continue with --resume or start again.')
                progress.set_postfix(loss=f'{loss_sum / total:.4f}', top1=f'{100 * correct / total:.2f}',
                                     lr=f'{optimizer.param_groups[0]["lr"]:.2e}')
            if last_update:
                if hasattr(loader, 'end'):
                    loader.end()  # what Accelerate's loader does when exhausted: it is no longer the active one
                break
    finally:
        progress.close()
    loss_sum, correct, total = _sum_over_processes(accelerator, totals, seen)
    return {'train_loss': loss_sum / total, 'train_top1': 100 * correct / total}, num_updates


def _clip_gradients(model: nn.Module, accelerator: Accelerator, args: argparse.Namespace) -> None:
    if args.clip_mode == 'norm':
        accelerator.clip_grad_norm_(model.parameters(), args.clip_grad)
    elif args.clip_mode == 'value':
        accelerator.clip_grad_value_(model.parameters(), args.clip_grad)
    else:  # timm's adaptive clipping, on gradients unscaled from fp16's loss scale
        accelerator.unscale_gradients()
        dispatch_clip_grad(model.parameters(), args.clip_grad, mode=args.clip_mode)


def _sum_over_processes(accelerator: Accelerator, totals: torch.Tensor, seen: int):
    counts = torch.cat([totals, torch.tensor([float(seen)], device=totals.device)])
    return accelerator.reduce(counts, reduction='sum').tolist()


def reached_max_updates(args: argparse.Namespace, num_updates: int) -> bool:
    return args.max_updates is not None and num_updates >= args.max_updates



def stop_unless_finite(epoch: int, model: nn.Module, ema: Optional[ModelEmaV3], accelerator: Accelerator) -> None:
    """Stop before an epoch whose weights are NaN or infinite is validated or saved.

    The loss check inside the epoch sees the loss before each step; a non-finite gradient in the epoch's
    last step would otherwise reach the saved state, and NaN logits would score as correct.
    """
    modules = [bare(accelerator, model)] + ([ema.module] if ema is not None else [])
    finite = torch.stack([p.isfinite().all() for module in modules for p in module.parameters()]).all()
    if finite:
        return
    kept = f'the state after epoch {epoch} is kept' if epoch else 'no epoch had finished'
    raise NonFiniteLossError(
        f'The weights became NaN or infinite during epoch {epoch + 1}: a non-finite gradient reached the optimizer. '
        f'Training stopped and {kept}. Lower --lr or train in fp32 with --mixed-precision no, then continue with '
        f'--resume or start again.')
