"""The parts of a training run, built from its settings before the first step: the accelerator, the run folder,
the data, the model, the optimizer, the scheduler, the losses and the loaders. Everything that can fail on what the
user asked for fails here, in one line, before any training.

timm builds the model, optimizer, scheduler, mixing and losses from its own factories with timm's keywords;
Accelerate owns devices, precision and processes.
"""
import argparse
import inspect
import os
import time
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn
from PIL import Image
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import TorchDynamoPlugin, broadcast_object_list
from torch.utils.data import DataLoader, Subset

from timm.data import Mixup
from timm.layers import set_fast_norm
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models import parse_model_name, safe_model_name
from timm.optim import create_optimizer_v2, get_optimizer_class, param_groups_layer_decay, param_groups_weight_decay
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3

from .checkpoint import load_weights
from .data import DataSplits, build_datasets, held_in_memory, loader_workers
from .errors import UserError
from .files import writing
from .preserve import preserved_state
from .starting_weights import create_for_input, first_conv_adapted, say

__all__ = ['bare', 'create_accelerator', 'resolve_run_dir', 'claim_run_dir', 'release_run_dir', 'load_data',
           'check_batch_size', 'fit_batch_size', 'create_model',
           'check_model_computes', 'keep_frozen_layers_in_eval', 'create_optimizer', 'create_scheduler', 'create_ema',
           'create_losses', 'create_loaders']


def bare(accelerator: Accelerator, model: nn.Module) -> nn.Module:
    """The model without Accelerate's wrappers (DDP, autocast) or torch.compile's: what weights are saved from
    and loaded into, under the parameter names of the model's own ``state_dict``."""
    return accelerator.unwrap_model(model, keep_torch_compile=False)


def create_accelerator(args: argparse.Namespace) -> Accelerator:
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
    if _one_of_several_expected(accelerator):
        accelerator.print(
            'accelerate launch was asked for several processes but started this one alone (its --cpu starts one '
            'process unless given an mpirun hostfile). On a CPU machine launch with `accelerate launch --multi_gpu '
            '--num_processes N train.py ...`: the processes then use the CPU.')
    return accelerator


def _one_of_several_expected(accelerator: Accelerator) -> bool:
    """accelerate launch sets MASTER_ADDR only for several processes (or machines); a process that finds it, but no
    WORLD_SIZE and no process group, was started alone by its simple launcher (``--cpu`` without a hostfile)."""
    return (accelerator.num_processes == 1 and 'MASTER_ADDR' in os.environ and 'WORLD_SIZE' not in os.environ
            and 'ACCELERATE_MIXED_PRECISION' in os.environ)


def _dynamo_plugin(args: argparse.Namespace) -> Optional[TorchDynamoPlugin]:
    """torch.compile settings for Accelerate's prepare(); None leaves them to ``accelerate launch`` / its config."""
    if not args.torchcompile:
        return None  # the backend name was checked with the settings
    return TorchDynamoPlugin(backend=args.torchcompile.upper(), mode=args.torchcompile_mode)


def resolve_run_dir(args: argparse.Namespace, accelerator: Accelerator) -> Path:
    """The run folder, claimed: process 0 decides, creates it with its ``config.yaml`` and tells the others."""
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
        if not claim_run_dir(run_dir, args.to_yaml()):
            return str(run_dir), (
                f'Run folder {run_dir} already holds a run; it is never overwritten. Continue it with '
                f'--resume {run_dir}, or choose another --experiment name.')
        return str(run_dir), None
    _, model_name = parse_model_name(args.model)
    name = '-'.join([safe_model_name(Path(model_name).name), args.dataset, time.strftime('%Y%m%d-%H%M%S')])
    run_dir, count = Path(args.output) / name, 1
    while not claim_run_dir(run_dir, args.to_yaml()):  # two runs started in the same second get their own folders
        run_dir, count = Path(args.output) / f'{name}-{count}', count + 1
    return str(run_dir), None


# The outermost folder each claim created, by run folder: what releasing the claim removes.
_CLAIMED: Dict[Path, Path] = {}


def claim_run_dir(run_dir: Path, config: str) -> bool:
    """Make ``run_dir`` this run's, atomically: True once it exists, was empty, and this process created its
    ``config.yaml`` (exclusively, so of two runs started together one wins); False if another run has it."""
    created = next((folder for folder in reversed((run_dir, *run_dir.parents)) if not folder.exists()), None)
    with writing(run_dir):
        run_dir.mkdir(parents=True, exist_ok=True)
        if any(run_dir.iterdir()):
            return False
        try:
            with open(run_dir / 'config.yaml', 'x', encoding='utf-8') as f:
                f.write(config)
        except FileExistsError:
            return False
    _CLAIMED[run_dir] = created
    return True


def release_run_dir(run_dir: Path) -> None:
    """Undo ``claim_run_dir`` for a run that failed before writing anything else, so its name can be used again and
    no empty folder is left behind."""
    created = _CLAIMED.pop(run_dir, None)
    if not (run_dir.is_dir() and [p.name for p in run_dir.iterdir()] == ['config.yaml']):
        return
    (run_dir / 'config.yaml').unlink()
    if created is None:
        return
    for folder in (run_dir, *run_dir.parents):
        if any(folder.iterdir()):
            return
        folder.rmdir()
        if folder == created:
            return


def load_data(args: argparse.Namespace) -> DataSplits:
    """The run's splits. An image folder's input size and channels come from the flags, else from its images, whatever
    weights the run starts from (``create_model`` adapts those); its loader workers (unless given) are 0 once its
    images are in memory."""
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
    for split in ('train', 'val', 'test') if data.has_validation else ('train', 'test'):
        try:  # decode one image per split now rather than fail mid-epoch
            getattr(data, split)[0]
        except OSError as error:
            raise UserError(f'Dataset {args.dataset!r}, {split} split: {error}') from error
    if args.train_subset:
        data.train = Subset(data.train, range(min(args.train_subset, len(data.train))))
    args.workers = loader_workers(args.workers, data.val, data.test)
    return data


def _check_image_files(data: DataSplits) -> None:
    """Image files (folder datasets): check every header now rather than fail when an epoch reaches the file
    (images already decoded into memory were checked by decoding them)."""
    files = {path for split in (data.train, data.val, data.test) if not held_in_memory(split)
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


def check_batch_size(args: argparse.Namespace, accelerator: Accelerator, train_images: int) -> int:
    """The per-process batch. ``--batch-size`` is the global batch: it must split evenly over the processes (into even
    halves where Mixup pairs images), and one larger than the ``train_images`` is lowered to fit them
    (``fit_batch_size``), in one line. ``args`` is the run's settings: config.yaml records the batch used, and a resume
    keeps it."""
    processes = accelerator.num_processes
    if args.batch_size % processes:
        raise UserError(f'--batch-size {args.batch_size} is the global batch and must split evenly over '
                        f'{processes} processes; pass a multiple of {processes}.')
    multiple = processes * (2 if _mixes(args) else 1)
    batch = fit_batch_size(args.batch_size, train_images, multiple)
    if batch != args.batch_size:
        smaller = max(multiple, train_images // 4 // multiple * multiple)
        accelerator.print(f'--batch-size {args.batch_size} is more than the {train_images} training images: batch '
                          f'{batch} (pass a smaller --batch-size, e.g. {smaller}, for more than one update an epoch).')
        args.batch_size = batch
    per_process = args.batch_size // processes
    if _mixes(args) and per_process % 2:
        raise UserError(f'Mixup and CutMix pair images within a batch: the per-process batch {per_process} must be '
                        f'even.')
    return per_process


def fit_batch_size(batch_size: int, train_images: int, multiple: int) -> int:
    """``batch_size`` capped at ``train_images``: where it is more, the largest multiple of ``multiple`` (the
    processes; twice as many under Mixup) that fits, and at least ``multiple``."""
    if batch_size <= train_images:
        return batch_size
    return max(multiple, train_images // multiple * multiple)


def create_model(args: argparse.Namespace, info) -> nn.Module:
    """The model for the run's input (``info.input_size``): starting weights (``--pretrained``,
    ``--initial-checkpoint``) of other channels or size are adapted to it, with one line saying how
    (``starting_weights``)."""
    num_classes = args.num_classes or info.num_classes
    if num_classes < info.num_classes:
        raise UserError(f'--num-classes {num_classes} is fewer than the {info.num_classes} classes of {info.name}.')
    kwargs: Dict[str, Any] = dict(args.model_kwargs or {}, num_classes=num_classes)
    # timm's train.py flags for model arguments; a model that does not take one says so in create_model's error.
    for flag, keyword in (('drop', 'drop_rate'), ('drop_path', 'drop_path_rate'), ('drop_block', 'drop_block_rate'),
                          ('gp', 'global_pool')):
        if getattr(args, flag, None) is not None:
            kwargs[keyword] = getattr(args, flag)
    if args.fast_norm:
        set_fast_norm()
    model = create_for_input(args.model, args.pretrained, info.input_size, **kwargs)
    if args.initial_checkpoint:  # a classifier of another size stays freshly initialised (fine-tuning)
        load_weights(model, args.initial_checkpoint, what='--initial-checkpoint', new_head=True,
                     on_first_conv_adapted=lambda saved, taken: say(
                         f'--initial-checkpoint {args.initial_checkpoint}: {first_conv_adapted(saved, taken)}.'))
    _init_head(model, args)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if args.freeze_backbone:
        model.requires_grad_(False)
        model.get_classifier().requires_grad_(True)
    return model


def _init_head(model: nn.Module, args: argparse.Namespace) -> None:
    """timm's --head-init-scale / --head-init-bias on the classifier's weight and bias."""
    if args.head_init_scale is None and args.head_init_bias is None:
        return
    head = model.get_classifier()
    weight, bias = getattr(head, 'weight', None), getattr(head, 'bias', None)
    with torch.no_grad():
        if args.head_init_scale is not None and weight is not None:
            weight.mul_(args.head_init_scale)
        if args.head_init_bias is not None and bias is not None:
            bias.fill_(args.head_init_bias)


def check_model_computes(model: nn.Module, args: argparse.Namespace, info, train_images: int, per_process_batch: int,
                          processes: int) -> None:
    """One forward pass in training mode, on CPU, on blank images of the run's size and smallest training batch,
    so that what the model cannot compute (a kernel larger than its input, a BatchNorm that would see one value
    per channel) is refused in one line now, not mid-epoch. Any model, no size rule: it computes or it does not.
    Weights, normalisation statistics and random state are left as they were."""
    # One process gets the epoch's last, partial batch as it is; several get full ones (Accelerate's even_batches).
    last = train_images % per_process_batch if processes == 1 and not _mixes(args) else 0
    smallest = min(per_process_batch, last or per_process_batch)

    def fails(batch: int) -> Optional[str]:
        with preserved_state(model):
            model.train()
            if args.freeze_backbone:
                keep_frozen_layers_in_eval(model)
            try:
                with torch.no_grad():
                    model(torch.zeros(batch, *info.input_size))
            except (RuntimeError, ValueError, AssertionError, IndexError) as error:
                return ' '.join(str(error).split())[:300] or type(error).__name__
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


def keep_frozen_layers_in_eval(model: nn.Module) -> None:
    # A frozen backbone keeps its BatchNorm statistics and runs without dropout, as at inference.
    for module in model.modules():
        if not any(p.requires_grad for p in module.parameters()):
            module.eval()


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
        return create_optimizer_v2(params, **_optimizer_kwargs(args), **fused)
    except (ValueError, AssertionError) as error:
        raise UserError(f'Cannot create optimizer --opt {args.opt!r}: {error}. See timm.optim.list_optimizers().') \
            from error
    except TypeError as error:  # a keyword of --opt-kwargs the optimizer does not take, or of the wrong type
        raise UserError(f'Cannot create optimizer --opt {args.opt!r} with --opt-kwargs '
                        f'{args.opt_kwargs or {}}: {error}.') from error


def _optimizer_kwargs(args: argparse.Namespace) -> Dict[str, Any]:
    """timm's optimizer keywords from timm's flags (as ``timm.optim.optimizer_kwargs`` reads them; the groups and
    their weight decay are built above)."""
    kwargs: Dict[str, Any] = dict(opt=args.opt, lr=args.lr, momentum=args.momentum)
    if args.opt_eps is not None:
        kwargs['eps'] = args.opt_eps
    if args.opt_betas is not None:
        kwargs['betas'] = tuple(args.opt_betas)
    return dict(kwargs, **(args.opt_kwargs or {}))


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


def create_scheduler(args: argparse.Namespace, optimizer: torch.optim.Optimizer, updates_per_epoch: int):
    """timm's scheduler for ``args`` and the epochs the run lasts (``--epochs``, with timm's cycles, warm-up prefix and
    cool-down). With ``--sched-on-updates`` it steps per update and its epoch counts are scaled by
    ``updates_per_epoch`` by timm, except ``--decay-milestones``, which are given in updates."""
    milestones = args.decay_milestones
    with warnings.catch_warnings():
        # timm deprecates its plateau scheduler because timm's own checkpoints drop its counters;
        # timm_gradattn.checkpoint saves the complete state, so resumed runs continue it exactly.
        warnings.filterwarnings('ignore', message='PlateauLRScheduler is deprecated', category=FutureWarning)
        scheduler, epochs = create_scheduler_v2(
            optimizer, sched=args.sched, num_epochs=args.epochs, decay_epochs=args.decay_epochs,
            decay_milestones=list(milestones or ()), cooldown_epochs=args.cooldown_epochs,
            patience_epochs=args.patience_epochs, decay_rate=args.decay_rate, min_lr=args.min_lr,
            warmup_lr=args.warmup_lr, warmup_epochs=args.warmup_epochs, warmup_prefix=args.warmup_prefix,
            noise=args.lr_noise, noise_pct=args.lr_noise_pct, noise_std=args.lr_noise_std, noise_seed=args.seed,
            cycle_mul=args.lr_cycle_mul, cycle_decay=args.lr_cycle_decay, cycle_limit=args.lr_cycle_limit,
            k_decay=args.lr_k_decay, plateau_mode='max', step_on_epochs=not args.sched_on_updates,
            updates_per_epoch=updates_per_epoch)
    if scheduler is not None and args.sched_on_updates and milestones:
        scheduler.decay_t = list(milestones)  # timm scaled them by updates_per_epoch; these are updates already
    return scheduler, (epochs if scheduler is not None else args.epochs)


def create_ema(args: argparse.Namespace, model: nn.Module) -> Optional[ModelEmaV3]:
    """timm's weight average for ``--model-ema`` (``--model-ema-warmup``: its decay rises from 0 to the cap)."""
    if not args.model_ema:
        return None
    return ModelEmaV3(model, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup,
                      device='cpu' if args.model_ema_force_cpu else None)


def _mixes(args: argparse.Namespace) -> bool:
    return (args.mixup > 0 or getattr(args, 'cutmix', 0) > 0
            or getattr(args, 'cutmix_minmax', None) is not None)


def create_losses(args: argparse.Namespace, num_classes: int) -> Tuple[Optional[Mixup], nn.Module]:
    """timm's Mixup / CutMix (None when off) and the training loss: cross-entropy (label smoothing, or soft
    targets when mixing) or, with ``--bce-loss``, timm's binary cross-entropy."""
    mixup_fn = None
    if _mixes(args):
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                         prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                         label_smoothing=args.smoothing, num_classes=num_classes)
    if args.bce_loss:
        loss_fn = BinaryCrossEntropy(smoothing=0.0 if mixup_fn else args.smoothing, target_threshold=args.bce_target_thresh,
                                     sum_classes=args.bce_sum, pos_weight=args.bce_pos_weight)
    elif mixup_fn is not None:
        loss_fn = SoftTargetCrossEntropy()
    elif args.smoothing > 0:
        loss_fn = LabelSmoothingCrossEntropy(args.smoothing)
    else:
        loss_fn = nn.CrossEntropyLoss()
    return mixup_fn, loss_fn


def create_loaders(args: argparse.Namespace, data: DataSplits) -> Tuple[DataLoader, DataLoader, DataLoader]:
    """The training, validation and test loaders. ``--workers`` serves training; the evaluation passes of images
    held decoded in memory run without workers, whose start (about 0.25 s a loader on 2 cores, at the first
    validation and again at the test pass) would cost more than the pass they serve.

    A loader with persistent workers draws their seed from a generator of its own, not from torch's global one:
    it draws once, at its first pass, so a resumed run would take one more number from the global stream than the
    uninterrupted run took at that point, and every dropout and drop-path mask after it would differ. (Without
    workers a loader draws at every pass, resumed or not, and keeps doing so from the global stream, so runs from
    before are repeated exactly.)"""
    pin_memory = torch.cuda.is_available() if args.pin_mem is None else args.pin_mem
    common = dict(num_workers=args.workers, persistent_workers=args.workers > 0, pin_memory=pin_memory)
    eval_workers = 0 if held_in_memory(data.val, data.test) else args.workers
    evaluation = dict(num_workers=eval_workers, persistent_workers=eval_workers > 0, pin_memory=pin_memory,
                      batch_size=args.validation_batch_size or args.batch_size)

    def own_generator(offset: int, workers: int) -> Optional[torch.Generator]:
        return torch.Generator().manual_seed(args.seed + offset) if workers > 0 else None
    # Mixing needs an even batch; shuffling is seeded per epoch by Accelerate's seedable sampler.
    train = DataLoader(data.train, shuffle=True, drop_last=_mixes(args), batch_size=args.batch_size,
                       generator=own_generator(0, args.workers), **common)
    return (train, DataLoader(data.val, generator=own_generator(1, eval_workers), **evaluation),
            DataLoader(data.test, generator=own_generator(2, eval_workers), **evaluation))
