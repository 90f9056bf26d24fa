"""Training settings: the command line, the recipes and YAML configs, resolved into one namespace.

Where a value comes from, lowest to highest priority (as in timm's train.py, a config file sets the
defaults and the command line is parsed over them):

    built-in defaults < ``--recipe`` (with its entries for the dataset and the model) < ``--config`` YAML
    (or the run's ``config.yaml`` with ``--resume``) < flags given on the command line

Flag names follow timm's train.py wherever it has one. A run writes its fully resolved settings to
``<run>/config.yaml``, which ``--config`` accepts again.
"""
import argparse
import copy
import difflib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

import yaml
from timm.models import parse_model_name, split_model_name_tag
from timm.utils import ParseKwargs

__all__ = ['UserError', 'RECIPES', 'recipe_settings', 'paper_recipe', 'IDENTITY_KEYS', 'NOT_SAVED_KEYS', 'build_parser',
           'parse_args', 'load_yaml', 'settings_to_yaml', 'with_dataset_defaults', 'CommandLineParser',
           'TIMM_FLAG_HINTS', 'expand_input_size', 'check_model_name', 'check_output_folder']

_logger = logging.getLogger(__name__)


class UserError(Exception):
    """A problem with what the user asked for: shown as one message (no traceback), exit code 2."""


# Flags of timm's train.py / validate.py that these command lines do not have, and what to do instead
# (train.py adds its own). An unknown flag gets this answer, or the nearest flag name, never a usage dump.
_MIXED_PRECISION = 'use --mixed-precision bf16 (or fp16 on a CUDA GPU)'
_LAUNCHER = 'devices and processes are Accelerate\'s: `accelerate launch [--cpu | --multi_gpu --num_processes N] ...`'
TIMM_FLAG_HINTS: Dict[str, str] = {
    **dict.fromkeys(('--amp', '--amp-dtype', '--amp-impl', '--model-dtype'), _MIXED_PRECISION),
    **dict.fromkeys(('--device', '--num-gpu', '--local_rank', '--local-rank', '--no-ddp-bb', '--sync-bn',
                     '--dist-bn', '--split-bn'), _LAUNCHER),
    **dict.fromkeys(('--pin-mem', '--no-prefetcher', '--use-multi-epochs-loader'),
                    'data loading needs no setting here (memory is pinned on CUDA); drop the flag'),
    **dict.fromkeys(('--crop-pct', '--crop-mode', '--interpolation', '--train-interpolation'),
                    "images are resized to --img-size without a centre crop, by the dataset's pipeline; "
                    'drop the flag'),
    '--channels-last': 'models run in the default memory format; drop the flag',
    '--gp': 'pass it to the model: --model-kwargs global_pool=avg',
    '--class-map': 'class indices follow the sorted class folder names; rename the folders to reorder them',
    '--fuser': 'drop the flag',
    '--fast-norm': 'drop the flag',
}
_AUGMENT = 'training augmentation is chosen by name with --train-augment (none, digits, cifar, ...); drop the flag'
_TIMM_DEFAULT = "timm's default value is used and cannot be changed here; drop the flag"
_KEPT = 'a run keeps model_best.safetensors and a resumable last/ folder; drop the flag'
_TRAIN_FLAG_HINTS: Dict[str, str] = {
    **TIMM_FLAG_HINTS,
    **dict.fromkeys(('--aa', '--reprob', '--remode', '--recount', '--resplit', '--color-jitter', '--scale', '--ratio',
                     '--hflip', '--vflip', '--jsd-loss', '--aug-repeats', '--aug-splits', '--no-aug'), _AUGMENT),
    **dict.fromkeys(('--cutmix', '--cutmix-minmax', '--mixup-prob', '--mixup-switch-prob', '--mixup-mode',
                     '--mixup-off-epoch'), 'only mixup is available: --mixup ALPHA'),
    **dict.fromkeys(('--bce-loss', '--bce-sum', '--bce-target-thresh', '--bce-pos-weight'),
                    'training uses cross-entropy (--smoothing for label smoothing); drop the flag'),
    **dict.fromkeys(('--drop-path', '--drop-block', '--drop-connect'),
                    'pass it to the model: --model-kwargs drop_path_rate=RATE (for models that take it)'),
    **dict.fromkeys(('--opt-eps', '--opt-betas', '--opt-kwargs', '--warmup-lr', '--warmup-prefix', '--lr-noise',
                     '--lr-noise-pct', '--lr-noise-std', '--lr-cycle-mul', '--lr-cycle-decay', '--lr-cycle-limit',
                     '--lr-k-decay', '--bn-momentum', '--bn-eps', '--model-ema-force-cpu',
                     '--clip-mode'), _TIMM_DEFAULT),
    **dict.fromkeys(('--lr-base', '--lr-base-size', '--lr-base-scale'),
                    'give the learning rate itself with --lr (it is not scaled by the batch size)'),
    '--cooldown-epochs': 'there is no cool-down phase: add the epochs to --epochs and set the final rate with --min-lr',
    **dict.fromkeys(('--start-epoch', '--no-resume-opt'),
                    '--resume RUN_DIR continues a run after its last finished epoch, optimizer state included'),
    **dict.fromkeys(('--pretrained-path', '--checkpoint'), 'start from a weights file with --initial-checkpoint FILE'),
    **dict.fromkeys(('--checkpoint-hist', '--recovery-interval'), _KEPT),
    '--eval-metric': 'the best epoch is the one with the best validation top-1; drop the flag',
    '--log-wandb': 'a run writes summary.csv, results.json and plots into its folder; drop the flag',
    **dict.fromkeys(('--train-split', '--val-split'), 'splits are chosen with --protocol (paper or official) and '
                                                      '--val-fraction'),
    '--train-num-samples': 'train on the first N images with --train-subset N',
    **dict.fromkeys(('-vb', '--validation-batch-size'), 'validation uses --batch-size'),
    **dict.fromkeys(('--grad-checkpointing', '--epoch-repeats', '--save-images', '--worker-seeding',
                     '--synchronize-step', '--head-init-scale', '--head-init-bias', '--torchscript'),
                    'not available in this train.py; drop the flag'),
}


class CommandLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one ``UserError`` line with the fix, never a usage dump: a flag of
    timm's scripts that this command line lacks gets ``flag_hints[flag]``, a mistyped one the nearest names."""

    def __init__(self, *args, flag_hints: Optional[Dict[str, str]] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.flag_hints = flag_hints or {}

    def error(self, message: str):
        unrecognized = 'unrecognized arguments: '
        if message.startswith(unrecognized):
            words = message[len(unrecognized):].split()
            flags = [word.split('=', 1)[0] for word in words if word.startswith('-')]
            if flags:
                answers: Dict[str, List[str]] = {}  # one answer for the flags that share it
                for flag in dict.fromkeys(flags):
                    answers.setdefault(self._answer(flag), []).append(flag)
                message = '; '.join(f'{" ".join(group)} {"is not a flag" if len(group) == 1 else "are not flags"} of '
                                    f'{self.prog}{answer}' for answer, group in answers.items())
            else:
                message = (f'unrecognized arguments {" ".join(words)}: {self.prog} takes no positional arguments '
                           f'(a data folder is --data-dir {words[0]})')
        raise UserError(f'{message}. `{self.prog} --help` lists every flag.')

    def _answer(self, flag: str) -> str:
        if flag in self.flag_hints:
            return f': {self.flag_hints[flag]}'
        close = difflib.get_close_matches(flag, [o for o in self._option_string_actions if o.startswith('--')], n=3)
        return f' (did you mean {" or ".join(close)}?)' if close else ''


# Every value a recipe sets; a flag given on the command line or in a YAML config overrides it.
RECIPES: Dict[str, Dict[str, Any]] = {
    # Quick training: cosine decay, no early stopping. Epoch count chosen so the digits job ends in a few CPU minutes.
    'default': dict(
        opt='adam', lr=1e-3, weight_decay=1e-4, sched='cosine', epochs=15, min_lr=1e-6, warmup_epochs=0,
        decay_rate=0.1, patience_epochs=10, patience=0, smoothing=0.0, decay_norm_and_bias=False, seed=42),
    # GradAttn paper, Table 1: Adam (coupled L2 weight decay), plain cross-entropy, ReduceLROnPlateau on
    # validation accuracy (factor 0.2, patience 3, min lr 1e-7), early stopping on it (patience 7), <= 100 epochs.
    'paper': dict(
        opt='adam', lr=1e-3, weight_decay=1e-4, sched='plateau', epochs=100, min_lr=1e-7, warmup_epochs=0,
        decay_rate=0.2, patience_epochs=3, patience=7, smoothing=0.0, decay_norm_and_bias=True, seed=42),
}

# The recipes of the other papers in the zoo. Besides the values every run gets, a recipe may hold
# ``per_dataset`` (data settings by dataset name) and ``per_model`` (the models it is for, each with what it sets
# differently); ``recipe_settings`` merges them for one run, and refuses a model outside ``per_model``.
# They train on the official training set less a validation carve-out of 10 % (--protocol official
# --val-fraction 0.1): He et al.'s 45k / 5k CIFAR split, from which both papers' 64k-update budgets come.
# Selection is on that split, never on the test set, and results.json gives the last epoch's test figures too,
# the measure both papers report.
# timm's multistep milestone m is the first epoch (or update) at the lower rate, counted from 1; torch's
# MultiStepLR and the papers' "divided at m" train m epochs (updates) at the old rate, so milestones here are
# the papers' + 1.
CNNTENTION_MODELS = ('resnet20', 'resnet20_selfatt', 'resnet20_mha', 'resnet20_cbam')
ATTENTION_SHORTCUTS_MODELS = ('asnet50_out', 'asnet50_kv', 'as_resnet50_stages', 'resnet50_cifar',
                              'resnet50_cifar_050', 'resnet50_cifar_plain')
_OFFICIAL_SPLIT = dict(protocol='official', val_fraction=0.1)
_NO_EXTRAS = dict(warmup_epochs=0, min_lr=0.0, smoothing=0.0, patience=0, patience_epochs=10, seed=42)
# CNNtention (arXiv 2412.11657) as the authors' code ran it (SEED_SYSTEMS.md A.6): 182 epochs of batch 128,
# x0.1 steps per epoch, coupled L2 on every parameter. The baseline's optimiser is SGD with classical momentum
# (timm's 'momentum'; timm's 'sgd' is Nesterov).
_CNNTENTION_SGD = dict(opt='momentum', momentum=0.9, lr=0.1, weight_decay=1e-4, decay_milestones=[92, 137])
_CNNTENTION = dict(
    _OFFICIAL_SPLIT, **_NO_EXTRAS, sched='multistep', decay_rate=0.1, epochs=182, batch_size=128,
    decay_norm_and_bias=True,
    per_dataset={
        # The authors' CIFAR-10 constants (nearly grey; not the per-channel statistics) with pad-4 crop + flip.
        'cifar10': dict(mean=[0.4918688, 0.4918598, 0.4918584], std=[0.2469712, 0.2469677, 0.2469720]),
        # Unnormalised; flipped 32 px crops of the 4-px-padded 28 px digits for training, 28 px for testing.
        'mnist': dict(mean=[0.0], std=[1.0], train_augment='cnntention_mnist'),
    })
RECIPES.update({
    # The authors' per-model recipe: SGD for the baseline, Adam for the attention models (their logged runs).
    'cnntention': dict(_CNNTENTION, per_model={
        'resnet20': _CNNTENTION_SGD,
        'resnet20_selfatt': dict(opt='adam', lr=5e-4, weight_decay=1e-3, decay_milestones=[92, 116]),
        'resnet20_mha': dict(opt='adam', lr=5e-4, weight_decay=1e-3, decay_milestones=[92, 116]),
        'resnet20_cbam': dict(opt='adam', lr=5e-3, weight_decay=1e-4, decay_milestones=[46, 92, 137]),
    }),
    # The baseline's SGD recipe for all four: a like-for-like comparison.
    'cnntention-sgd': dict(_CNNTENTION, **_CNNTENTION_SGD, per_model={name: {} for name in CNNTENTION_MODELS}),
    # Attention Shortcuts (Erroz & Galar 2025, Sec. 4.2; He et al.'s CIFAR schedule): SGD 0.1, momentum 0.9,
    # coupled L2 1e-4, batch 128, 64k updates divided by 10 at 32k and 48k. The schedule counts updates and stops
    # at 64k, mid-epoch if need be; the epoch count follows from it. Normalised by the training set's per-channel
    # statistics (the cifar100 tag already has them).
    'attention-shortcuts': dict(
        _OFFICIAL_SPLIT, **_NO_EXTRAS, opt='momentum', momentum=0.9, lr=0.1, weight_decay=1e-4,
        decay_norm_and_bias=True, batch_size=128, sched='multistep', sched_on_updates=True,
        decay_milestones=[32001, 48001], decay_rate=0.1, max_updates=64000, epochs=None,
        per_dataset={'cifar10': dict(mean=[0.4914, 0.4822, 0.4465], std=[0.2470, 0.2435, 0.2616])},
        per_model={name: {} for name in ATTENTION_SHORTCUTS_MODELS}),
})

# Settings that define what is trained on what; a resumed run must keep them.
IDENTITY_KEYS = ('model', 'model_kwargs', 'dataset', 'data_dir', 'protocol', 'seed', 'num_classes', 'in_chans', 'img_size',
                 'train_subset', 'val_fraction')
# Settings that name this invocation rather than the training; kept out of config.yaml.
NOT_SAVED_KEYS = ('config', 'resume', 'experiment', 'output')


def build_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = CommandLineParser(
        prog='train.py',
        add_help=add_help,
        flag_hints=_TRAIN_FLAG_HINTS,
        description='Train a timm classifier (GradAttn, its baselines or any timm model) with Accelerate. '
                    'With no arguments: gradattn_resnet18_rope on digits, a few minutes on a laptop CPU.')
    parser.add_argument('-c', '--config', default=None, metavar='YAML',
                        help='YAML file of settings (keys are the flag names with underscores); flags override it.')
    parser.add_argument('--recipe', default=None, choices=sorted(RECIPES),
                        help="Named set of defaults: 'default' (quick, cosine), 'paper' (the GradAttn paper's "
                             "Table 1), 'cnntention' (the CNNtention authors' recipe, per model), 'cnntention-sgd' "
                             "(its baseline's SGD recipe for all four models) or 'attention-shortcuts' (64k updates "
                             "of SGD). Default: default.")

    group = parser.add_argument_group('Model')
    group.add_argument('--model', default='gradattn_resnet18_rope',
                       help='Any timm model name, hf-hub:<repo id> or local-dir:<folder> (default: %(default)s).')
    group.add_argument('--pretrained', action='store_true',
                       help='Start from published weights (registry name with a tag, hf-hub: or local-dir:).')
    group.add_argument('--initial-checkpoint', default=None, metavar='PATH',
                       help='Start from these weights: a .safetensors file, or a .pth/.pt state dict read as '
                            'tensors only (weights_only=True). Older and reference names are mapped. A classifier '
                            'of another size is replaced.')
    group.add_argument('--num-classes', type=int, default=None,
                       help="Classifier outputs (default: the dataset's; more keeps extra outputs, named by their "
                            'index).')
    group.add_argument('--in-chans', type=int, default=None, help="Image channels, 1 or 3 (default: the dataset's).")
    group.add_argument('--img-size', type=int, default=None, help="Input side in pixels (default: the dataset's).")
    group.add_argument('--input-size', type=int, nargs=3, default=None, metavar=('C', 'H', 'W'),
                       help='timm\'s form of --in-chans C --img-size H; images are square, so H = W.')
    group.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs, metavar='KEY=VALUE',
                       help='Extra arguments for timm.create_model, e.g. embed_dim=128 channels="(32,64,128,256)"; '
                            'recorded in the hub export so the architecture can be rebuilt.')
    group.add_argument('--drop', type=float, default=None, metavar='RATE',
                       help="The model's drop_rate (GradAttn: encoder dropout; default: the model's own).")
    group.add_argument('--freeze-backbone', action='store_true',
                       help='Train only the classifier (get_classifier()); the rest keeps its weights and '
                            'normalisation statistics.')

    group = parser.add_argument_group('Data')
    group.add_argument('--dataset', default='digits', help="Dataset name, or 'folder' for your own images "
                                                           '(default: %(default)s).')
    group.add_argument('--data-dir', default=None, metavar='DIR',
                       help="Where the dataset files are. Without --dataset, a folder of your own images (as in timm).")
    group.add_argument('--download', '--dataset-download', action='store_true',
                       help='Let the dataset loader download missing files.')
    group.add_argument('--protocol', default='paper', choices=('paper', 'official'),
                       help="'paper': the paper's splits (official splits pooled and re-split 70/15/15, seeded, "
                            "where the paper did so); 'official': the dataset's own splits (default: %(default)s).")
    group.add_argument('-j', '--workers', type=int, default=None,
                       help='Data-loading processes per device (default: 0 for digits, which is in memory, else 2).')
    group.add_argument('--train-subset', type=int, default=None, metavar='N',
                       help='Debugging aid: train on the first N training images only.')
    group.add_argument('--val-fraction', type=float, default=None, metavar='FRACTION',
                       help="Share of the official training images held out for validation when the dataset has no "
                            "validation split (--protocol official; default: the dataset's validation share, 0.15 "
                            "for most).")
    group.add_argument('--mean', type=float, nargs='+', default=None, metavar='MEAN',
                       help="Normalisation mean, one value per channel (default: the dataset's).")
    group.add_argument('--std', type=float, nargs='+', default=None, metavar='STD',
                       help="Normalisation std, one value per channel (default: the dataset's).")
    group.add_argument('--train-augment', default=None, metavar='NAME',
                       help="Training augmentation: none, digits, cifar (pad-4 crop + flip), fashion, medmnist, "
                            "pad_ufes, folder or cnntention_mnist (default: the dataset's).")

    group = parser.add_argument_group('Optimisation (timm optimizer and scheduler factories)')
    group.add_argument('--epochs', type=int, default=None,
                       help='Epochs to train (recipe; attention-shortcuts: as many as --max-updates needs).')
    group.add_argument('-b', '--batch-size', type=int, default=None,
                       help="Global batch size, split across processes (default: the dataset's paper batch size).")
    group.add_argument('--grad-accum-steps', type=int, default=1, metavar='N',
                       help='Accumulate gradients over N batches per optimizer step.')
    group.add_argument('--opt', default=None, help="timm optimizer name (recipe: 'adam', coupled L2 weight decay).")
    group.add_argument('--lr', type=float, default=None, help='Learning rate (recipe).')
    group.add_argument('--weight-decay', type=float, default=None, help='Weight decay (recipe).')
    group.add_argument('--decay-norm-and-bias', action=argparse.BooleanOptionalAction, default=None,
                       help="Apply weight decay to every parameter: norms, biases and the model's no_weight_decay() "
                            "ones such as pos_embed (recipe: paper, as its reference; default decays weights only).")
    group.add_argument('--momentum', type=float, default=0.9, help='SGD momentum.')
    group.add_argument('--layer-decay', type=float, default=None,
                       help='Layer-wise learning-rate decay (fine-tuning), through the model\'s group_matcher.')
    group.add_argument('--clip-grad', type=float, default=None, metavar='NORM', help='Clip the gradient norm.')
    group.add_argument('--sched', default=None,
                       help="timm scheduler name: cosine, step, plateau, ... (recipe). 'plateau' follows the "
                            "validation top-1.")
    group.add_argument('--min-lr', type=float, default=None, help='Lower bound of the learning rate (recipe).')
    group.add_argument('--warmup-epochs', type=int, default=None, help='Linear warm-up epochs (recipe).')
    group.add_argument('--decay-epochs', type=float, default=None, help="Epochs between decays ('step').")
    group.add_argument('--decay-milestones', type=int, nargs='+', default=None, metavar='MILESTONE',
                       help="Epochs (updates with --sched-on-updates) at which 'multistep' multiplies the rate by "
                            "--decay-rate; milestone m is the first epoch at the lower rate, counted from 1.")
    group.add_argument('--sched-on-updates', action=argparse.BooleanOptionalAction, default=False,
                       help='Step the schedule after every optimizer update instead of every epoch; its epoch '
                            'counts (warm-up, decay) become updates, --decay-milestones are given in updates.')
    group.add_argument('--max-updates', type=int, default=None, metavar='N',
                       help='Stop after N optimizer updates, mid-epoch if need be; the last, partial epoch is '
                            'validated and saved like the others. Without --epochs: as many epochs as that takes.')
    group.add_argument('--decay-rate', type=float, default=None,
                       help="Decay factor ('step', 'plateau') (recipe).")
    group.add_argument('--patience-epochs', type=int, default=None,
                       help="Epochs without improvement before 'plateau' decays the rate (recipe).")
    group.add_argument('--patience', type=int, default=None,
                       help='Early stopping: stop after this many epochs without a better validation top-1; '
                            '0 = off (recipe). The best weights are always restored before the test.')
    group.add_argument('--smoothing', type=float, default=None, help='Label smoothing (recipe).')
    group.add_argument('--mixup', type=float, default=0.0, metavar='ALPHA', help='Mixup alpha; 0 = off.')
    group.add_argument('--model-ema', action='store_true',
                       help='Keep an exponential moving average of the weights (timm ModelEmaV3); it is the model '
                            'validated, kept as best and tested.')
    group.add_argument('--model-ema-decay', type=float, default=0.998, help='EMA decay.')
    group.add_argument('--model-ema-warmup', action='store_true',
                       help="Warm the EMA decay up from 0 (timm's 1 - (1 + update)^(-2/3), capped at "
                            '--model-ema-decay), so the average follows the early weights on short runs.')
    group.add_argument('--seed', type=int, default=None, help='Seed of the split, the data order and the init (recipe).')

    group = parser.add_argument_group('Devices (Hugging Face Accelerate)')
    group.add_argument('--mixed-precision', default='no', choices=('no', 'bf16', 'fp16'),
                       help='Autocast precision passed to Accelerate (fp16 needs a GPU).')
    group.add_argument('--torchcompile', nargs='?', const='inductor', default=None, metavar='BACKEND',
                       help="torch.compile the model through Accelerate (BACKEND default: inductor). Off by default; "
                            "`accelerate launch --dynamo_backend` sets it too.")
    group.add_argument('--torchcompile-mode', default=None,
                       choices=('default', 'reduce-overhead', 'max-autotune', 'max-autotune-no-cudagraphs'),
                       help='torch.compile mode (with --torchcompile).')
    group.add_argument('--fused-opt', action=argparse.BooleanOptionalAction, default=True,
                       help="Use the fused kernel of torch's Adam, AdamW, SGD and Adagrad on CPU and CUDA: one "
                            "update for all parameters instead of a Python loop over them, same arithmetic "
                            "(--no-fused-opt: the loop).")
    group.add_argument('--keep-freed-memory', action=argparse.BooleanOptionalAction, default=True,
                       help="On CPU, let glibc's malloc keep freed memory for reuse instead of returning it to the "
                            "system after every step (--no-keep-freed-memory: glibc's default).")

    group = parser.add_argument_group('Output')
    group.add_argument('--output', default='output/train', metavar='DIR', help='Parent of run folders.')
    group.add_argument('--experiment', default=None,
                       help='Run folder name (default: <model>-<dataset>-<timestamp>).')
    group.add_argument('--resume', default=None, metavar='RUN_DIR',
                       help='Continue the run in this folder from its last finished epoch, with its settings.')
    group.add_argument('--log-interval', type=int, default=20, metavar='N',
                       help='Update the progress bar (one device sync) every N steps.')
    group.add_argument('--grad-stats-every', type=int, default=0, metavar='N',
                       help='Every N epochs, append per-layer gradient norms to grad_norms.jsonl; 0 = off.')
    return parser


def load_yaml(path: str, what: str = '--config') -> Dict[str, Any]:
    """Settings from a YAML file, with keys checked against the parser."""
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
    known = {action.dest for action in build_parser()._actions}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise UserError(f'{what} {path} has unknown settings {unknown}. Valid names are the flags of '
                        f'train.py with underscores, e.g. batch_size, weight_decay.')
    for action in build_parser()._actions:
        if settings.get(action.dest) is not None:
            _check_yaml_value(action, settings[action.dest], f'{what} {path}')
    return settings


def _check_yaml_value(action: argparse.Action, value: Any, where: str) -> None:
    """A YAML value of the type its flag takes (argparse converts only strings given on the command line)."""
    many = action.nargs in ('+', '*') or isinstance(action.nargs, int)
    if action.type in (int, float) and many != isinstance(value, list):
        wanted = 'a list' if many else 'a single value'
        raise UserError(f'{where}: {action.dest} must be {wanted}, got {value!r}.')
    for item in (value if many and action.type in (int, float) else [value]):
        if action.type is int and (isinstance(item, bool) or not isinstance(item, int)):
            raise UserError(f'{where}: {action.dest} must be a whole number, got {item!r}.')
        if action.type is float and (isinstance(item, bool) or not isinstance(item, (int, float))):
            raise UserError(f'{where}: {action.dest} must be a number, got {item!r}.')
    if isinstance(action, (argparse._StoreTrueAction, argparse.BooleanOptionalAction)) and not isinstance(value, bool):
        raise UserError(f'{where}: {action.dest} must be true or false, got {value!r}.')
    if action.choices is not None and value not in action.choices:
        raise UserError(f'{where}: {action.dest} must be one of {", ".join(map(str, action.choices))}, got {value!r}.')


def explicit_settings(argv: Sequence[str]) -> Dict[str, Any]:
    """Only the settings given on the command line (argparse cannot tell a default from an explicit value)."""
    probe = build_parser(add_help=False)  # --help is the full parser's: it shows the defaults this one hides
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    known, _ = probe.parse_known_args(argv)
    return vars(known)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Resolve the settings of a run from ``argv`` (default: ``sys.argv[1:]``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    given = expand_input_size(explicit_settings(argv))
    from_yaml = expand_input_size(load_yaml(given['config']), 'input_size in --config') if given.get('config') else {}
    saved: Dict[str, Any] = {}
    if given.get('resume'):
        run_dir = Path(given['resume'])
        if run_dir.is_file():
            raise UserError(f'--resume {run_dir} is a file; --resume takes a run folder (the one train.py printed). '
                            f'To start a new run from a weights file, pass --initial-checkpoint {run_dir}.')
        if not (run_dir / 'config.yaml').is_file():
            raise UserError(
                f'--resume {run_dir}: no config.yaml there, so it is not a training run folder. Pass the folder '
                f'train.py printed (e.g. output/train/<experiment>), or start a new run without --resume.')
        saved = load_yaml(str(run_dir / 'config.yaml'), what='config.yaml of the resumed run')
        _check_same_identity(saved, {**from_yaml, **given}, run_dir)
    if given.get('data_dir', from_yaml.get('data_dir')) and not any('dataset' in s for s in (given, from_yaml, saved)):
        # timm's habit: a data folder without a dataset name is a folder of images, one sub-folder per class.
        given['dataset'] = 'folder'
        argv += ['--dataset', 'folder']
        _logger.warning(f'--data-dir {given.get("data_dir", from_yaml.get("data_dir"))} without --dataset: training on '
                        f'it as an image folder (--dataset folder), as timm does; pass --dataset NAME if it holds a '
                        f'named dataset such as cifar10.')
    recipe = given.get('recipe') or from_yaml.get('recipe') or saved.get('recipe') or 'default'
    # A recipe may depend on the model and the dataset, which any later source can set.
    model, dataset = (next((source[key] for source in (given, from_yaml, saved) if source.get(key) is not None),
                           parser.get_default(key)) for key in ('model', 'dataset'))
    parser.set_defaults(**recipe_settings(recipe, model, dataset))
    parser.set_defaults(**saved)
    parser.set_defaults(**from_yaml)
    args = parser.parse_args(argv)
    args.recipe = recipe
    args.in_chans, args.img_size = given.get('in_chans', args.in_chans), given.get('img_size', args.img_size)
    del args.input_size  # stated as in_chans and img_size, the names config.yaml keeps
    _check_values(args)
    return args


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
    for key, value in (('in_chans', chans), ('img_size', height)):
        if settings.get(key) is not None and settings[key] != value:
            raise UserError(f'{shown} and --{key.replace("_", "-")} {settings[key]} disagree; pass only one of them.')
    return dict(settings, in_chans=chans, img_size=height)


def paper_recipe(model: str) -> str:
    """The recipe of the paper ``model`` comes from: 'cnntention', 'attention-shortcuts', or GradAttn's 'paper'
    (which also trains any other timm model)."""
    architecture = _architecture(model)
    if architecture in CNNTENTION_MODELS:
        return 'cnntention'
    if architecture in ATTENTION_SHORTCUTS_MODELS:
        return 'attention-shortcuts'
    return 'paper'


def recipe_settings(recipe: str, model: str, dataset: str) -> Dict[str, Any]:
    """The settings ``recipe`` gives a run of ``model`` on ``dataset``: its shared values, then its ``per_dataset``
    entry for the dataset, then its ``per_model`` entry for the model's architecture.

    Raises:
        UserError: the recipe has a ``per_model`` table and the model is not in it.
    """
    if recipe not in RECIPES:
        raise UserError(f'Unknown recipe {recipe!r}; choose one of {", ".join(sorted(RECIPES))}.')
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


def _architecture(model: str) -> Optional[str]:
    """The registry name behind ``--model`` (tag dropped; a local-dir: export's config.json architecture);
    None for hf-hub:, whose architecture is only known once its config is downloaded."""
    source, name = parse_model_name(model)
    if source == 'local-dir':
        try:
            return json.loads((Path(name) / 'config.json').read_text()).get('architecture')
        except (OSError, ValueError):
            return None  # the engine reports a missing or broken export
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


def _check_values(args: argparse.Namespace) -> None:
    positive = ('epochs', 'batch_size', 'grad_accum_steps', 'log_interval', 'num_classes', 'img_size',
                'train_subset', 'max_updates')
    for key in positive:
        value = getattr(args, key, None)
        if value is not None and value < 1:
            raise UserError(f'--{key.replace("_", "-")} must be at least 1, got {value}.')
    for key in ('workers', 'patience', 'grad_stats_every', 'mixup', 'smoothing', 'lr', 'weight_decay', 'momentum',
                'min_lr', 'warmup_epochs', 'patience_epochs', 'seed'):
        value = getattr(args, key, None)
        if value is not None and value < 0:
            raise UserError(f'--{key.replace("_", "-")} must not be negative, got {value}.')
    for key in ('clip_grad', 'layer_decay', 'decay_epochs', 'decay_rate'):
        value = getattr(args, key, None)
        if value is not None and value <= 0:
            raise UserError(f'--{key.replace("_", "-")} must be positive, got {value}.')
    # Rates and fractions: a smoothing or dropout of 1 leaves nothing to learn, an EMA decay above 1 diverges.
    for key, upper, closed in (('smoothing', 1, False), ('drop', 1, False), ('model_ema_decay', 1, True),
                               ('val_fraction', 1, False)):
        value = getattr(args, key, None)
        if value is not None and not (0 <= value <= upper if closed else 0 <= value < upper):
            raise UserError(f'--{key.replace("_", "-")} must be in [0, {upper}{"]" if closed else ")"}, got {value}.')
    if args.seed is not None and args.seed >= 2 ** 32:
        raise UserError(f'--seed must be below 2**32 (numpy\'s limit), got {args.seed}.')
    if args.in_chans is not None and args.in_chans not in (1, 3):
        raise UserError(f'--in-chans {args.in_chans} is not supported: images are read as 1 (greyscale) or '
                        f'3 (RGB) channels. Pass --in-chans 1 or 3.')
    if getattr(args, 'model_ema_warmup', False) and not args.model_ema:
        raise UserError('--model-ema-warmup warms up the weight average of --model-ema; add --model-ema or drop it.')
    if args.pretrained and args.initial_checkpoint:
        raise UserError('--pretrained and --initial-checkpoint both set the starting weights; pass only one.')
    _check_paths(args)


def _check_paths(args: argparse.Namespace) -> None:
    """The files and folders named on the command line, checked before any data is read."""
    if args.data_dir and Path(args.data_dir).expanduser().is_file():
        raise UserError(f'--data-dir {args.data_dir} is a file; pass the folder that holds the dataset '
                        f'(for your own images: a folder with one sub-folder of images per class).')
    if args.initial_checkpoint:
        _check_weights_file(args.initial_checkpoint, '--initial-checkpoint')
    check_output_folder(args.resume or args.output, '--resume' if args.resume else '--output')


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
    from .models import model_tags  # the zoo registers its models on import
    import timm
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


def with_dataset_defaults(args: argparse.Namespace, info) -> argparse.Namespace:
    """A copy of ``args`` with the settings whose default depends on the dataset ``info`` filled in: the batch
    size (the dataset's paper batch size) and loader workers (0 for digits, which is held in memory, else 2)."""
    workers = (0 if info.name == 'digits' else 2) if args.workers is None else args.workers
    return argparse.Namespace(**dict(vars(args), batch_size=args.batch_size or info.batch_size, workers=workers))


def settings_to_yaml(args: argparse.Namespace, exclude: Iterable[str] = NOT_SAVED_KEYS) -> str:
    """The resolved settings as YAML that ``--config`` reads back."""
    settings = {k: v for k, v in sorted(vars(args).items()) if k not in set(exclude)}
    return yaml.safe_dump(settings, sort_keys=True)

