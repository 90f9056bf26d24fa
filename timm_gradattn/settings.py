"""Settings, resolved once at the door: a command line becomes one ``Settings`` object before any work starts.

Where a training value comes from, lowest to highest priority (as in timm's train.py, a config file sets the
defaults and the command line is parsed over them):

    built-in defaults < ``--recipe`` (with its entries for the dataset and the model) < ``--config`` YAML
    (or the run's ``config.yaml`` with ``--resume``) < flags given on the command line

Mixed precision follows the same order; where none of those states it, ``accelerate launch``'s bf16 or fp16, else
the machine's default (``mixed_precision.py``). Then the values that depend on the dataset (batch size, loader
workers) are filled in, and every rule that can be checked without data is checked: a problem is one ``UserError``
line. A run writes the resolved settings to ``<run>/config.yaml`` (``Settings.to_yaml``), which ``--config``
accepts again. The engine and the evaluation read a ``Settings``; they never come back here.
"""
import argparse
import copy
import difflib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import timm
import torch
import yaml
from accelerate.utils import DynamoBackend
from timm.models import parse_model_name, split_model_name_tag

from . import cli
from .data.info import DATASETS, DatasetInfo
from .errors import UserError
from .families import RECIPES
from .mixed_precision import resolve_mixed_precision, stated_precision
from .models import model_tags, pretrained_name  # importing the zoo registers its models with timm

__all__ = ['Settings', 'IDENTITY_KEYS', 'NOT_SAVED_KEYS', 'SCHEDULERS', 'recipe_values', 'resolve_train_settings',
           'resolve_evaluate_settings', 'recipe_settings', 'load_yaml', 'expand_input_size', 'dataset_defaults',
           'check_model_name', 'check_output_folder']

_logger = logging.getLogger(__name__)

# Settings that define what is trained on what; a resumed run must keep them.
IDENTITY_KEYS = ('model', 'model_kwargs', 'dataset', 'data_dir', 'protocol', 'seed', 'num_classes', 'in_chans',
                 'img_size', 'train_subset', 'val_fraction')
# Settings that name this invocation rather than the training; kept out of config.yaml.
NOT_SAVED_KEYS = ('config', 'resume', 'experiment', 'output', 'mixed_precision_source')
SCHEDULERS = ('cosine', 'tanh', 'step', 'multistep', 'plateau', 'poly', 'wsd', 'rsqrt', 'constant', 'none')
# Flags that only say how this invocation was typed: folded into other settings, not kept.
_FOLDED_KEYS = ('input_size', 'amp', 'amp_dtype', 'no_aug', 'lr_base', 'lr_base_size', 'lr_base_scale')


class Settings(argparse.Namespace):
    """The resolved settings of one job: what the engine and the evaluation read."""

    def replace(self, **changes: Any) -> 'Settings':
        return Settings(**dict(vars(self), **changes))

    def to_yaml(self) -> str:
        """config.yaml: the settings that shape the run, which ``--config`` reads back."""
        return yaml.safe_dump({k: v for k, v in sorted(vars(self).items()) if k not in NOT_SAVED_KEYS},
                              sort_keys=True)


# --- train.py -----------------------------------------------------------------------------------------------
def resolve_train_settings(argv: Optional[Sequence[str]] = None) -> Settings:
    """The settings of a training run from ``argv`` (default: ``sys.argv[1:]``), checked."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = cli.build_train_parser()
    given = expand_input_size(_explicit_settings(argv))
    from_yaml = expand_input_size(load_yaml(given['config']), 'input_size in --config') if given.get('config') else {}
    saved: Dict[str, Any] = {}
    if given.get('resume'):
        saved = _saved_settings(Path(given['resume']))
        _check_same_identity(saved, {**from_yaml, **given}, Path(given['resume']))
    if given.get('data_dir', from_yaml.get('data_dir')) and not any('dataset' in s for s in (given, from_yaml, saved)):
        given['dataset'] = 'folder'
        argv += ['--dataset', 'folder']
        _folder_notice(given.get('data_dir', from_yaml.get('data_dir')), 'training')
    recipe = given.get('recipe') or from_yaml.get('recipe') or saved.get('recipe') or 'default'
    # A recipe may depend on the model and the dataset, which any later source can set.
    model, dataset = (next((source[key] for source in (given, from_yaml, saved) if source.get(key) is not None),
                           parser.get_default(key)) for key in ('model', 'dataset'))
    from_recipe = recipe_settings(recipe, model, dataset)
    parser.set_defaults(**from_recipe)
    parser.set_defaults(**saved)
    parser.set_defaults(**from_yaml)
    args = Settings(**vars(parser.parse_args(argv)))
    args.recipe = recipe
    args.in_chans, args.img_size = given.get('in_chans', args.in_chans), given.get('img_size', args.img_size)
    explicit = {**from_yaml, **given}
    if args.no_aug:
        args.train_augment = 'none'
    args.mixed_precision, args.mixed_precision_source = resolve_mixed_precision(given, from_yaml, saved)
    args = args.replace(**dataset_defaults(args))
    if args.lr_base is not None and 'lr' not in explicit:
        args.lr = _scaled_lr(args)
    for key in _FOLDED_KEYS:
        delattr(args, key)
    _check_rules(args)
    if args.val_fraction == 0:
        _check_no_validation(args, {key: value for key, value in from_recipe.items()
                                     if key not in explicit and key not in saved})
    _check_paths(args)
    check_model_name(args.model)
    if args.pretrained:  # the weights' exact <model>.<tag>: what config.yaml, results.json and errors name
        args.model = pretrained_name(args.model, args.dataset)
    return args


def _explicit_settings(argv: Sequence[str]) -> Dict[str, Any]:
    """Only the settings given on the command line (argparse cannot tell a default from an explicit value)."""
    probe = cli.build_train_parser(add_help=False)  # --help is the full parser's: it shows the defaults
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    known, _ = probe.parse_known_args(argv)
    return vars(known)


def _saved_settings(run_dir: Path) -> Dict[str, Any]:
    if run_dir.is_file():
        raise UserError(f'--resume {run_dir} is a file; --resume takes a run folder (the one train.py printed). '
                        f'To start a new run from a weights file, pass --initial-checkpoint {run_dir}.')
    if not (run_dir / 'config.yaml').is_file():
        raise UserError(
            f'--resume {run_dir}: no config.yaml there, so it is not a training run folder. Pass the folder '
            f'train.py printed (e.g. output/train/<experiment>), or start a new run without --resume.')
    return load_yaml(str(run_dir / 'config.yaml'), what='config.yaml of the resumed run')


def _folder_notice(data_dir: str, job: str) -> None:
    # timm's habit: a data folder without a dataset name is a folder of images, one sub-folder per class.
    _logger.warning(f'--data-dir {data_dir} without --dataset: {job} on it as an image folder (--dataset folder), '
                    f'as timm does; pass --dataset NAME if it holds a named dataset such as cifar10.')


def _scaled_lr(args: Settings) -> float:
    """timm's ``--lr-base``: the rate for a batch of ``--lr-base-size``, scaled to the global batch."""
    scale = args.lr_base_scale or ('sqrt' if any(o in (args.opt or '').lower() for o in ('ada', 'lamb')) else 'linear')
    ratio = args.batch_size * args.grad_accum_steps / args.lr_base_size
    lr = args.lr_base * (ratio ** 0.5 if scale == 'sqrt' else ratio)
    _logger.info(f'Learning rate {lr:.3g}: --lr-base {args.lr_base} scaled ({scale}) from batch {args.lr_base_size} '
                 f'to {args.batch_size * args.grad_accum_steps}.')
    return lr


def dataset_defaults(args: argparse.Namespace) -> Dict[str, Any]:
    """The settings whose default depends on the dataset: the batch size (the dataset's paper batch size) and
    loader workers (0 for digits, which is held in memory; for an image folder, decided once it is read; else 2)."""
    key = args.dataset.strip().lower().replace('-', '_')
    info = DATASETS.get(key)
    batch_size = info.batch_size if info else DatasetInfo.__dataclass_fields__['batch_size'].default
    workers = {'digits': 0, 'folder': None}.get(key, 2)
    return dict(batch_size=args.batch_size or batch_size, workers=workers if args.workers is None else args.workers)


def recipe_settings(recipe: str, model: str, dataset: str) -> Dict[str, Any]:
    """The settings ``recipe`` gives a run of ``model`` on ``dataset``: its shared values, then its ``per_dataset``
    entry for the dataset, then its ``per_model`` entry for the model's architecture.

    Raises:
        UserError: the recipe has a ``per_model`` table and the model is not in it.
    """
    if recipe not in RECIPES:
        raise UserError(f'Unknown recipe {recipe!r}; choose one of {", ".join(RECIPES)}.')
    settings = copy.deepcopy(RECIPES[recipe])
    per_model = settings.pop('per_model', None)
    per_dataset = settings.pop('per_dataset', {})
    settings.update(per_dataset.get(dataset.strip().lower().replace('-', '_'), {}))
    if per_model is not None:
        architecture = _architecture(model)
        if architecture not in per_model:
            raise UserError(
                f'--recipe {recipe} is the recipe of {", ".join(per_model)}; --model {model} is not one of them. '
                f'Pass one of those registry names (add --pretrained for published weights), or train {model} '
                f'with --recipe default or --recipe paper.')
        settings.update(per_model[architecture])
    return settings


def recipe_values(argv: Sequence[str]) -> Dict[str, Any]:
    """Every setting that the recipe of the run ``argv`` describes sets, as ``argv`` leaves it: what a saved run's
    config.yaml must hold to pass for that run today, after a recipe has changed too."""
    settings = resolve_train_settings(argv)
    return {key: getattr(settings, key) for key in recipe_settings(settings.recipe, settings.model, settings.dataset)}


def _architecture(model: str) -> Optional[str]:
    """The registry name behind ``--model`` (tag dropped; a local-dir: export's config.json architecture);
    None for hf-hub:, whose architecture is only known once its config is downloaded."""
    source, name = parse_model_name(model)
    if source == 'local-dir':
        try:
            return json.loads((Path(name) / 'config.json').read_text()).get('architecture')
        except (OSError, ValueError):
            return None  # check_model_name reports a missing export; a broken one fails to load
    return None if source == 'hf-hub' else split_model_name_tag(name)[0]


def _check_same_identity(saved: Dict[str, Any], requested: Dict[str, Any], run_dir: Path) -> None:
    def as_saved(value):  # YAML turns tuples into lists
        return yaml.safe_load(yaml.safe_dump(value))
    changed = [f'{key}: {saved.get(key)!r} -> {requested[key]!r}' for key in IDENTITY_KEYS
               if key in requested and as_saved(requested[key]) != saved.get(key)]
    if changed:
        raise UserError(
            f'--resume {run_dir} was trained with other settings ({"; ".join(changed)}). A run can only be '
            f'continued as it started: drop these flags, or start a new run (without --resume) to change them.')


def _check_rules(args: Settings) -> None:
    """The rules between settings (each value alone was checked by its flag's type)."""
    if args.model_ema_warmup and not args.model_ema:
        raise UserError('--model-ema-warmup warms up the weight average of --model-ema; add --model-ema or drop it.')
    if args.pretrained and args.initial_checkpoint:
        raise UserError('--pretrained and --initial-checkpoint both set the starting weights; pass only one.')
    if args.epochs is None and args.max_updates is None:
        raise UserError('Neither --epochs nor --max-updates is set, so the run has no length; pass one of them.')
    if args.mixed_precision not in cli.MIXED_PRECISIONS:
        raise UserError(f'Mixed precision {args.mixed_precision!r} (from ACCELERATE_MIXED_PRECISION) is not one of '
                        f'{", ".join(cli.MIXED_PRECISIONS)}.')
    _check_fp16(args.mixed_precision)
    if args.opt_betas is not None and not 1 <= len(args.opt_betas) <= 3:
        raise UserError(f'--opt-betas takes one to three values, got {len(args.opt_betas)}.')
    if args.lr_noise is not None and len(args.lr_noise) > 2:
        raise UserError(f'--lr-noise takes one fraction of the schedule, or a start and an end, got '
                        f'{len(args.lr_noise)} values.')
    if args.cutmix_minmax is not None and not 0 < args.cutmix_minmax[0] < args.cutmix_minmax[1] <= 1:
        raise UserError(f'--cutmix-minmax {" ".join(map(str, args.cutmix_minmax))}: pass MIN MAX with '
                        f'0 < MIN < MAX <= 1 (box side ratios).')
    _check_schedule(args)
    if args.torchcompile:
        backends = [b.value.lower() for b in DynamoBackend if b is not DynamoBackend.NO]
        if args.torchcompile.lower() not in backends:
            raise UserError(f'--torchcompile {args.torchcompile!r} is not a torch.compile backend Accelerate knows; '
                            f'use one of {backends} (inductor is torch\'s default).')


def _check_no_validation(args: Settings, from_recipe: Dict[str, Any]) -> None:
    """``--val-fraction 0`` (no validation split): refuse, in one line, the protocol and the settings that need one.
    ``from_recipe`` holds the values the recipe set and nothing later overrode, so that the message names their
    source. The model EMA needs none: without validation the last epoch's EMA weights are kept."""
    if args.protocol != 'official':
        raise UserError(f'--val-fraction 0 (no validation split) trains on the whole official training split, which '
                        f'only --protocol official keeps; --protocol {args.protocol} pools the official splits and '
                        f're-splits them with a validation part. Add --protocol official, or pass a --val-fraction '
                        f'above 0.')
    def origin(key: str) -> str:
        return f' (from --recipe {args.recipe})' if key in from_recipe else ''
    needs = []
    if args.sched == 'plateau':
        needs.append((f'--sched plateau{origin("sched")} lowers the rate when validation top-1 stops improving',
                      'choose a schedule that needs no validation, e.g. --sched cosine, or --sched multistep '
                      '--decay-milestones ...'))
    if args.patience:
        needs.append((f'--patience {args.patience}{origin("patience")} stops early when validation top-1 stops '
                      f'improving', 'pass --patience 0 (the run then keeps the last epoch\'s weights)'))
    if needs:
        raise UserError(f'--val-fraction 0 leaves no validation split, but {" and ".join(n for n, _ in needs)}: '
                        f'{"; ".join(fix for _, fix in needs)}; or pass a --val-fraction above 0.')


def _check_schedule(args: Settings) -> None:
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


def _check_fp16(mixed_precision: Optional[str]) -> None:
    if mixed_precision == 'fp16' and not torch.cuda.is_available():
        raise UserError('--mixed-precision fp16 (or --amp --amp-dtype float16) needs a CUDA GPU; on CPU use bf16.')


def _check_paths(args: argparse.Namespace) -> None:
    """The files and folders named on the command line, checked before any data is read."""
    _check_data_dir(args.data_dir)
    if args.initial_checkpoint:
        _check_weights_file(args.initial_checkpoint, '--initial-checkpoint')
    check_output_folder(args.resume or args.output, '--resume' if args.resume else '--output')
    experiment = args.experiment
    if experiment is not None and (Path(experiment).name != experiment or experiment in ('', '.', '..')):
        raise UserError(f'--experiment {args.experiment!r} must be one folder name (no "/" and not ".."): the run is '
                        f'written to --output/<experiment>. Pass --output for the parent folder.')


def _check_data_dir(data_dir: Optional[str]) -> None:
    if data_dir and Path(data_dir).expanduser().is_file():
        raise UserError(f'--data-dir {data_dir} is a file; pass the folder that holds the dataset '
                        f'(for your own images: a folder with one sub-folder of images per class).')


def _check_weights_file(path: str, flag: str) -> None:
    file = Path(path).expanduser()
    if file.is_dir():
        inside = sorted(p.name for p in file.iterdir() if p.suffix in ('.safetensors', '.pth', '.pt', '.bin'))[:3]
        raise UserError(f'{flag} {path} is a folder; pass the weights file itself'
                        + (f', e.g. {file / inside[0]} (it holds {", ".join(inside)}).' if inside else '.'))
    if not file.is_file():
        raise UserError(f'{flag} {path} does not exist. Pass a .safetensors file, or a .pth/.pt state dict.')
    if not os.access(file, os.R_OK):
        raise UserError(f'{flag} {path} is not readable (permissions); make it readable or copy it.')


def check_output_folder(path: str, flag: str = '--output') -> None:
    """Refuse, before any work, a folder that cannot be created or written: a file, or no write permission."""
    folder = Path(path).expanduser().absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        where = f'{path} is a file' if existing == folder else f'{existing} is a file, so {path} cannot be made there'
        raise UserError(f'{flag} {where}; pass a folder (created if missing).')
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f'{flag} {path}: {existing} is not writable (permissions); pass {flag} a folder you can '
                        f'write to.')


def check_model_name(model: str) -> None:
    """Refuse, in one line, a ``--model`` that timm cannot create: an unknown name, an unknown pretrained tag
    (listing the known ones) or a ``local-dir:`` without an export. ``hf-hub:`` names are checked by the Hub."""
    source, name = parse_model_name(model)
    if source == 'local-dir' and not (Path(name).expanduser() / 'config.json').is_file():
        raise UserError(f'--model {model}: {Path(name) / "config.json"} does not exist. Point local-dir: at a '
                        f'folder exported by timm.models.save_for_hf, e.g. a run\'s hub/ folder.')
    if source is not None:
        return
    architecture, tag = split_model_name_tag(name)
    if not timm.is_model(architecture):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        raise UserError(f'Unknown model {model!r}.' + (f' Did you mean {", ".join(close)}?' if close else '')
                        + ' See timm.list_models() for names, or pass hf-hub:<repo id> / local-dir:<folder>.')
    known = model_tags(architecture)
    if tag and tag not in known:
        raise UserError(f'--model {model}: {architecture} has no pretrained tag {tag!r}. Known tags: '
                        f'{", ".join(known) or "none"}'
                        + (f' (e.g. --model {architecture}.{known[0]}).' if known else '.'))


# --- YAML ------------------------------------------------------------------------------------------------------
def load_yaml(path: str, what: str = '--config') -> Dict[str, Any]:
    """Settings from a YAML file, with keys and values checked against train.py's flags."""
    file = Path(path)
    if not file.is_file():
        problem = 'is a folder' if file.is_dir() else 'does not exist'
        raise UserError(f'{what} {path} {problem}. Pass a YAML file of settings, e.g. the config.yaml of a run.')
    try:
        settings = yaml.safe_load(file.read_text()) or {}
    except (yaml.YAMLError, OSError, UnicodeDecodeError) as error:
        raise UserError(f'{what} {path} cannot be read as YAML: {" ".join(str(error).split())}') from error
    if not isinstance(settings, dict):
        raise UserError(f'{what} {path} must hold a mapping of setting: value, not {type(settings).__name__}.')
    settings = {str(k).replace('-', '_'): v for k, v in settings.items()}
    actions = cli.build_train_parser()._actions
    unknown = sorted(set(settings) - {action.dest for action in actions} - {'recipe'})
    if unknown:
        raise UserError(f'{what} {path} has unknown settings {unknown}. Valid names are the flags of '
                        f'train.py with underscores, e.g. batch_size, weight_decay.')
    for action in actions:
        if settings.get(action.dest) is not None:
            _check_yaml_value(action, settings[action.dest], f'{what} {path}')
    return settings


def _check_yaml_value(action: argparse.Action, value: Any, where: str) -> None:
    """A YAML value as its flag would take it (argparse converts and checks only strings of the command line)."""
    many = action.nargs in ('+', '*') or isinstance(action.nargs, int)
    numeric = action.type is not None and action.type not in (str,)
    if numeric and many != isinstance(value, list):
        raise UserError(f'{where}: {action.dest} must be {"a list" if many else "a single value"}, got {value!r}.')
    if numeric:
        for item in (value if many else [value]):
            try:
                action.type(item)
            except argparse.ArgumentTypeError as error:
                raise UserError(f'{where}: {action.dest} {error}.') from None
            except (TypeError, ValueError):
                raise UserError(f'{where}: {action.dest} must be a number, got {item!r}.') from None
            if action.type in (int, float) and isinstance(item, bool) or action.type is int and isinstance(item, float):
                raise UserError(f'{where}: {action.dest} must be a {"whole " if action.type is int else ""}number, '
                                f'got {item!r}.')
    if isinstance(action, (argparse._StoreTrueAction, argparse.BooleanOptionalAction)) and not isinstance(value, bool):
        raise UserError(f'{where}: {action.dest} must be true or false, got {value!r}.')
    if action.choices is not None and value not in action.choices:
        raise UserError(f'{where}: {action.dest} must be one of {", ".join(map(str, action.choices))}, got {value!r}.')


def expand_input_size(settings: Dict[str, Any], what: str = '--input-size') -> Dict[str, Any]:
    """``settings`` with timm's ``input_size`` (C, H, W) stated as ``in_chans`` and ``img_size``."""
    input_size = settings.get('input_size')
    settings = {k: v for k, v in settings.items() if k != 'input_size'}
    if input_size is None:
        return settings
    if not (isinstance(input_size, (list, tuple)) and len(input_size) == 3):
        raise UserError(f'{what} takes three whole numbers C H W (e.g. 3 32 32), got {input_size!r}.')
    chans, height, width = input_size
    shown = f'{what} {chans} {height} {width}'
    if height != width:
        raise UserError(f'{shown}: images are resized to squares here, so H must equal W. Pass {what} {chans} '
                        f'{max(height, width)} {max(height, width)} (or --img-size {max(height, width)}).')
    if chans not in cli.IN_CHANS:
        raise UserError(f'{shown}: images are read as 1 (greyscale) or 3 (RGB) channels; pass C = 1 or 3.')
    for key, value in (('in_chans', chans), ('img_size', height)):
        if settings.get(key) is not None and settings[key] != value:
            raise UserError(f'{shown} and --{key.replace("_", "-")} {settings[key]} disagree; pass only one of them.')
    return dict(settings, in_chans=chans, img_size=height)


# --- evaluate ------------------------------------------------------------------------------------------------
def resolve_evaluate_settings(argv: Optional[Sequence[str]] = None, gradient_modes: Sequence[str] = ()) -> Settings:
    """The settings of an evaluation, checked before any model or data is loaded."""
    parser = cli.build_evaluate_parser(*([gradient_modes] if gradient_modes else []))
    args = Settings(**expand_input_size(vars(parser.parse_args(argv))))
    if args.dataset is None:
        if not args.data_dir:
            raise UserError('--dataset is required (digits, cifar10, ...), or --data-dir with a folder of your '
                            'own images (one sub-folder per class).')
        _folder_notice(args.data_dir, 'evaluating')
        args.dataset = 'folder'
    stated = stated_precision(vars(args))
    args.mixed_precision = stated[0] if stated else None
    del args.amp, args.amp_dtype
    _check_fp16(args.mixed_precision)
    _check_data_dir(args.data_dir)
    if args.checkpoint:
        _check_weights_file(args.checkpoint, '--checkpoint')
    if args.output:
        check_output_folder(args.output)
    check_model_name(args.model)
    if args.pretrained:  # the same rule as train.py's
        args.model = pretrained_name(args.model, args.dataset)
    return args.replace(**dataset_defaults(args))
