"""Training settings: the command line, the recipes and YAML configs, resolved into one namespace.

Where a value comes from, lowest to highest priority (as in timm's train.py, a config file sets the
defaults and the command line is parsed over them):

    built-in defaults < ``--recipe`` < ``--config`` YAML (or the run's ``config.yaml`` with ``--resume``)
    < flags given on the command line

Flag names follow timm's train.py wherever it has one. A run writes its fully resolved settings to
``<run>/config.yaml``, which ``--config`` accepts again.
"""
import argparse
import sys
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Sequence

import yaml
from timm.utils import ParseKwargs

__all__ = ['UserError', 'RECIPES', 'IDENTITY_KEYS', 'NOT_SAVED_KEYS', 'build_parser', 'parse_args', 'load_yaml',
           'settings_to_yaml']


class UserError(Exception):
    """A problem with what the user asked for: shown as one message (no traceback), exit code 2."""


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

# Settings that define what is trained on what; a resumed run must keep them.
IDENTITY_KEYS = ('model', 'model_kwargs', 'dataset', 'data_dir', 'protocol', 'seed', 'num_classes', 'in_chans', 'img_size',
                 'train_subset')
# Settings that name this invocation rather than the training; kept out of config.yaml.
NOT_SAVED_KEYS = ('config', 'resume', 'experiment', 'output')


def build_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='train.py',
        add_help=add_help,
        description='Train a timm classifier (GradAttn, its baselines or any timm model) with Accelerate. '
                    'With no arguments: gradattn_resnet18_rope on digits, a few minutes on a laptop CPU.')
    parser.add_argument('-c', '--config', default=None, metavar='YAML',
                        help='YAML file of settings (keys are the flag names with underscores); flags override it.')
    parser.add_argument('--recipe', default=None, choices=sorted(RECIPES),
                        help="Named set of defaults: 'default' (quick, cosine) or 'paper' (the GradAttn paper's "
                             "Table 1). Default: default.")

    group = parser.add_argument_group('Model')
    group.add_argument('--model', default='gradattn_resnet18_rope',
                       help='Any timm model name, hf-hub:<repo id> or local-dir:<folder> (default: %(default)s).')
    group.add_argument('--pretrained', action='store_true',
                       help='Start from published weights (registry name with a tag, hf-hub: or local-dir:).')
    group.add_argument('--initial-checkpoint', default=None, metavar='PATH',
                       help='Start from these weights: a .safetensors file (.pth/.pt are read with '
                            'weights_only=True). A classifier of another size is replaced.')
    group.add_argument('--num-classes', type=int, default=None, help="Classifier outputs (default: the dataset's).")
    group.add_argument('--in-chans', type=int, default=None, help="Image channels, 1 or 3 (default: the dataset's).")
    group.add_argument('--img-size', type=int, default=None, help="Input side in pixels (default: the dataset's).")
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
    group.add_argument('--data-dir', default=None, metavar='DIR', help='Where the dataset files are.')
    group.add_argument('--download', action='store_true', help='Let the dataset loader download missing files.')
    group.add_argument('--protocol', default='paper', choices=('paper', 'official'),
                       help="'paper': the paper's splits (official splits pooled and re-split 70/15/15, seeded, "
                            "where the paper did so); 'official': the dataset's own splits (default: %(default)s).")
    group.add_argument('-j', '--workers', type=int, default=None,
                       help='Data-loading processes per device (default: 0 for digits, which is in memory, else 2).')
    group.add_argument('--train-subset', type=int, default=None, metavar='N',
                       help='Debugging aid: train on the first N training images only.')

    group = parser.add_argument_group('Optimisation (timm optimizer and scheduler factories)')
    group.add_argument('--epochs', type=int, default=None, help='Epochs to train (recipe).')
    group.add_argument('-b', '--batch-size', type=int, default=None,
                       help="Global batch size, split across processes (default: the dataset's paper batch size).")
    group.add_argument('--grad-accum-steps', type=int, default=1, metavar='N',
                       help='Accumulate gradients over N batches per optimizer step.')
    group.add_argument('--opt', default=None, help="timm optimizer name (recipe: 'adam', coupled L2 weight decay).")
    group.add_argument('--lr', type=float, default=None, help='Learning rate (recipe).')
    group.add_argument('--weight-decay', type=float, default=None, help='Weight decay (recipe).')
    group.add_argument('--decay-norm-and-bias', action=argparse.BooleanOptionalAction, default=None,
                       help='Apply weight decay to norm and bias parameters too (recipe: paper decays all '
                            'parameters, as its reference; default decays weights only).')
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
        raise UserError(f'{what} {path} does not exist. Pass a YAML file of settings, e.g. the config.yaml of a run.')
    try:
        settings = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as error:
        raise UserError(f'{what} {path} is not valid YAML: {error}') from error
    if not isinstance(settings, dict):
        raise UserError(f'{what} {path} must hold a mapping of setting: value, not {type(settings).__name__}.')
    settings = {str(k).replace('-', '_'): v for k, v in settings.items()}
    known = {action.dest for action in build_parser()._actions}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise UserError(f'{what} {path} has unknown settings {unknown}. Valid names are the flags of '
                        f'train.py with underscores, e.g. batch_size, weight_decay.')
    return settings


def explicit_settings(parser: argparse.ArgumentParser, argv: Sequence[str]) -> Dict[str, Any]:
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
    given = explicit_settings(parser, argv)
    from_yaml = load_yaml(given['config']) if given.get('config') else {}
    saved: Dict[str, Any] = {}
    if given.get('resume'):
        run_dir = Path(given['resume'])
        if not (run_dir / 'config.yaml').is_file():
            raise UserError(
                f'--resume {run_dir}: no config.yaml there, so it is not a training run folder. Pass the folder '
                f'train.py printed (e.g. output/train/<experiment>), or start a new run without --resume.')
        saved = load_yaml(str(run_dir / 'config.yaml'), what='config.yaml of the resumed run')
        _check_same_identity(saved, {**from_yaml, **given}, run_dir)
    recipe = given.get('recipe') or from_yaml.get('recipe') or saved.get('recipe') or 'default'
    parser.set_defaults(**RECIPES[recipe])
    parser.set_defaults(**saved)
    parser.set_defaults(**from_yaml)
    args = parser.parse_args(argv)
    args.recipe = recipe
    _check_values(args)
    return args


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
                'train_subset')
    for key in positive:
        value = getattr(args, key)
        if value is not None and value < 1:
            raise UserError(f'--{key.replace("_", "-")} must be at least 1, got {value}.')
    for key in ('workers', 'patience', 'grad_stats_every', 'mixup', 'smoothing', 'lr', 'weight_decay'):
        value = getattr(args, key)
        if value is not None and value < 0:
            raise UserError(f'--{key.replace("_", "-")} must not be negative, got {value}.')
    if args.in_chans is not None and args.in_chans not in (1, 3):
        raise UserError(f'--in-chans {args.in_chans} is not supported: images are read as 1 (greyscale) or '
                        f'3 (RGB) channels. Pass --in-chans 1 or 3.')
    if args.pretrained and args.initial_checkpoint:
        raise UserError('--pretrained and --initial-checkpoint both set the starting weights; pass only one.')


def settings_to_yaml(args: argparse.Namespace, exclude: Iterable[str] = NOT_SAVED_KEYS) -> str:
    """The resolved settings as YAML that ``--config`` reads back."""
    settings = {k: v for k, v in sorted(vars(args).items()) if k not in set(exclude)}
    return yaml.safe_dump(settings, sort_keys=True)

