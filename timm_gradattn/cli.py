"""The command-line layer of train.py, ``python -m timm_gradattn.evaluate`` and the benchmarks: the parsers, the
argument types that check each value, the answers to timm flags that cannot apply, and the entry-point wrapper
that turns a ``UserError`` into one line.

Flag names are timm's ``train.py`` / ``validate.py`` names wherever timm has one, and timm's optimizer,
scheduler and regularisation flags are passed to timm's own factories. A flag of timm's that cannot apply here is
refused in one line saying why and what to do instead; a mistyped flag gets the nearest names. Nothing here
reads data or builds a model: resolving the settings is ``timm_gradattn.settings``.
"""
import argparse
import difflib
import re
import sys
from typing import Callable, Dict, List, Optional, Sequence

from timm.utils import ParseKwargs as _TimmParseKwargs

from .errors import UserError
from .families import DEFAULT_MODEL, FAMILIES, RECIPES

__all__ = ['CommandLineParser', 'TIMM_FLAG_HINTS', 'TRAIN_FLAG_HINTS', 'EVALUATE_FLAG_HINTS', 'build_train_parser',
           'build_evaluate_parser', 'add_shared_arguments', 'at_least', 'in_range', 'run_entry_point',
           'MIXED_PRECISIONS', 'AMP_DTYPES', 'IN_CHANS']

MIXED_PRECISIONS = ('no', 'bf16', 'fp16')
AMP_DTYPES = {'bfloat16': 'bf16', 'float16': 'fp16'}  # timm's --amp-dtype -> Accelerate's --mixed-precision
IN_CHANS = (1, 3)  # images are read as greyscale or RGB

# --- answers to the timm flags that cannot apply -----------------------------------------------------------------
_LAUNCHER = 'devices and processes are Accelerate\'s: `accelerate launch [--cpu | --multi_gpu --num_processes N] ...`'
TIMM_FLAG_HINTS: Dict[str, str] = {
    '--amp-impl': "mixed precision is Accelerate's (native torch autocast); drop the flag",
    '--model-dtype': 'weights stay float32 here; train in bf16 with --amp --amp-dtype bfloat16 (autocast)',
    **dict.fromkeys(('--device', '--num-gpu', '--local_rank', '--local-rank', '--no-ddp-bb', '--dist-bn',
                     '--split-bn'), _LAUNCHER),
    **dict.fromkeys(('--crop-pct', '--crop-mode', '--interpolation', '--train-interpolation'),
                    "images are resized to --img-size without a centre crop, by the dataset's pipeline; "
                    'drop the flag'),
    '--class-map': 'class indices follow the sorted class folder names; rename the folders to reorder them',
    '--fuser': 'TorchScript fusers do not apply (models run eagerly or under --torchcompile); drop the flag',
}
_AUGMENT = ("training augmentation is the dataset's own pipeline (1- or 3-channel, 28-64 px), chosen by name with "
            '--train-augment (none, digits, cifar, ...); --no-aug turns it off')
TRAIN_FLAG_HINTS: Dict[str, str] = {
    **TIMM_FLAG_HINTS,
    **dict.fromkeys(('--aa', '--reprob', '--remode', '--recount', '--resplit', '--color-jitter', '--scale', '--ratio',
                     '--hflip', '--vflip', '--aug-repeats', '--aug-splits'), _AUGMENT),
    '--jsd-loss': 'the JSD loss needs timm\'s augmentation splits (--aug-splits), which do not apply here',
    **dict.fromkeys(('--bn-momentum', '--bn-eps'),
                    "the zoo's models take no BatchNorm arguments; pass them to a timm model that does with "
                    '--model-kwargs'),
    **dict.fromkeys(('--start-epoch', '--no-resume-opt'),
                    '--resume RUN_DIR continues a run after its last finished epoch, optimizer state included'),
    '--checkpoint': 'start from a weights file with --initial-checkpoint FILE',
    **dict.fromkeys(('--checkpoint-hist', '--recovery-interval'),
                    'a run keeps model_best.safetensors and a resumable last/ folder written every epoch'),
    '--eval-metric': 'the best epoch is the one with the best validation top-1 (what the papers select on)',
    '--log-wandb': 'a run writes summary.csv, results.json and plots into its folder; drop the flag',
    **dict.fromkeys(('--train-split', '--val-split'), 'splits are chosen with --protocol (paper or official) and '
                                                      '--val-fraction'),
    '--train-num-samples': 'train on the first N images with --train-subset N',
    **dict.fromkeys(('--epoch-repeats', '--save-images', '--worker-seeding', '--torchscript'),
                    'not available in this train.py (Accelerate seeds the workers; models run eagerly or under '
                    '--torchcompile); drop the flag'),
}
EVALUATE_FLAG_HINTS: Dict[str, str] = {
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
        else:
            message = _flag_first(message)
        raise UserError(f'{message}. `{self.prog} --help` lists every flag.')

    def _answer(self, flag: str) -> str:
        if flag in self.flag_hints:
            return f': {self.flag_hints[flag]}'
        close = difflib.get_close_matches(flag, [o for o in self._option_string_actions if o.startswith('--')], n=3)
        return f' (did you mean {" or ".join(close)}?)' if close else ''


def _flag_first(message: str) -> str:
    """argparse's 'argument -b/--batch-size: must be ...' as '--batch-size must be ...', and a choice outside the
    choices as the choices to pass."""
    match = re.match(r'argument (\S+): (.*)$', message)
    if not match:
        return message
    flag, problem = match.group(1).split('/')[-1], match.group(2)
    choice = re.match(r"invalid choice: '?(.*?)'? \(choose from (.*)\)$", problem)
    if choice:
        options = [option.strip().strip("'") for option in choice.group(2).split(',')]
        return (f'{flag} {choice.group(1)} is not one of the choices; pass {flag} '
                f'{", ".join(options[:-1]) + " or " if len(options) > 1 else ""}{options[-1]}')
    return f'{flag} {problem}'


class ParseKwargs(_TimmParseKwargs):
    """timm's KEY=VALUE parser, with a word that has no '=' refused in one line instead of a traceback."""

    def __call__(self, parser, namespace, values, option_string=None):
        bare = [value for value in values if '=' not in value]
        if bare:
            parser.error(f'argument {option_string}: takes KEY=VALUE pairs, got {" ".join(bare)!r} '
                         f'(e.g. {option_string} drop_rate=0.1)')
        super().__call__(parser, namespace, values, option_string)


# --- argument types: each rule on a value, once ------------------------------------------------------------------
def at_least(minimum: float, kind: Callable = int) -> Callable[[str], float]:
    """An argparse type: a ``kind`` (int or float) of at least ``minimum``. YAML settings are checked with it too."""
    def parse(text):
        value = _number(text, kind)
        if value < minimum:
            bound = 'not be negative' if minimum == 0 else f'be at least {minimum}'
            raise argparse.ArgumentTypeError(f'must {bound}, got {text}')
        return value
    parse.__name__ = 'whole number' if kind is int else 'number'  # what argparse names in 'invalid <type> value'
    return parse


def in_range(low: float, high: float, closed: bool = False) -> Callable[[str], float]:
    """An argparse type: a number in [low, high) (or [low, high] when ``closed``)."""
    def parse(text):
        value = _number(text, float)
        if not (low <= value <= high if closed else low <= value < high):
            raise argparse.ArgumentTypeError(f'must be in [{low:g}, {high:g}{"]" if closed else ")"}, got {text}')
        return value
    parse.__name__ = 'number'
    return parse


def positive(text) -> float:
    value = _number(text, float)
    if value <= 0:
        raise argparse.ArgumentTypeError(f'must be positive, got {text}')
    return value


positive.__name__ = 'number'


def seed(text) -> int:
    value = at_least(0)(text)
    if value >= 2 ** 32:
        raise argparse.ArgumentTypeError(f"must be below 2**32 (numpy's limit), got {text}")
    return value


seed.__name__ = 'whole number'


def _number(text, kind: Callable):
    if isinstance(text, bool):
        raise argparse.ArgumentTypeError(f'must be a {"whole " if kind is int else ""}number, got {text!r}')
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if kind is int and not isinstance(text, int):
            raise argparse.ArgumentTypeError(f'must be a whole number, got {text!r}')
        return kind(text)
    try:
        return kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f'must be a {"whole " if kind is int else ""}number, got {text!r}') from None


# --- the flags both command lines share --------------------------------------------------------------------------
def add_shared_arguments(parser: argparse.ArgumentParser, group: Optional[argparse._ArgumentGroup] = None) -> None:
    """Model name, data and device flags that train.py and evaluate spell and check the same way."""
    group = group or parser
    group.add_argument('--pretrained', action='store_true',
                       help="Start from published weights: a registry name's tag (without one, the dataset's tag "
                            "where the model has it, else the model's default tag), hf-hub: or local-dir:.")
    group.add_argument('--in-chans', type=int, default=None, choices=IN_CHANS,
                       help="Image channels, 1 or 3 (default: the dataset's).")
    group.add_argument('--img-size', type=at_least(1), default=None, help="Input side in pixels (default: the "
                                                                          "dataset's).")
    group.add_argument('--input-size', type=int, nargs=3, default=None, metavar=('C', 'H', 'W'),
                       help='timm\'s form of --in-chans C --img-size H; images are square, so H = W.')
    group.add_argument('--data-dir', default=None, metavar='DIR',
                       help="Where the dataset files are. Without --dataset, a folder of your own images (as in timm).")
    group.add_argument('--download', '--dataset-download', action='store_true',
                       help='Let the dataset loader download missing files.')
    group.add_argument('--protocol', default='paper', choices=('paper', 'official'),
                       help="'paper': the paper's splits (official splits pooled and re-split 70/15/15, seeded, "
                            "where the paper did so); 'official': the dataset's own splits (default: %(default)s).")
    group.add_argument('-j', '--workers', type=at_least(0), default=None,
                       help='Data-loading processes per device (default: 0 for images held in memory: digits, an '
                            'image folder decoded once; else 2). Evaluation of images held in memory runs '
                            'without them.')
    group.add_argument('-b', '--batch-size', type=at_least(1), default=None,
                       help="Global batch size, split across processes (default: the dataset's paper batch size).")
    group.add_argument('--amp', action='store_true',
                       help="timm's switch for mixed precision: --amp-dtype's autocast (same as --mixed-precision).")
    group.add_argument('--amp-dtype', default=None, choices=tuple(AMP_DTYPES),
                       help='Autocast dtype of --amp (default: bfloat16 on CPU, float16 on CUDA).')


def build_train_parser(add_help: bool = True) -> CommandLineParser:
    """train.py's command line. Defaults of None are filled by the recipe, the dataset or the model."""
    parser = CommandLineParser(
        prog='train.py', add_help=add_help, flag_hints=TRAIN_FLAG_HINTS,
        description='Train a timm classifier (the zoo\'s models or any timm model) with Accelerate. '
                    f'With no arguments: {DEFAULT_MODEL} on digits, a few minutes on a laptop CPU.')
    parser.add_argument('-c', '--config', default=None, metavar='YAML',
                        help='YAML file of settings (keys are the flag names with underscores); flags override it.')
    family_recipes = '; '.join(f"{family.title}: {', '.join(family.recipes)}" for family in FAMILIES.values())
    parser.add_argument('--recipe', default=None, choices=tuple(RECIPES),
                        help=f"Named set of defaults: 'default' (quick, cosine) or a paper's ({family_recipes}). "
                             f"Default: default.")

    group = parser.add_argument_group('Model')
    group.add_argument('--model', default=DEFAULT_MODEL,
                       help='Any timm model name, hf-hub:<repo id> or local-dir:<folder> (default: %(default)s).')
    group.add_argument('--initial-checkpoint', '--pretrained-path', default=None, metavar='PATH',
                       help='Start from these weights: a .safetensors file, or a .pth/.pt state dict read as '
                            'tensors only (weights_only=True). Older and reference names are mapped. A classifier '
                            'of another size is replaced.')
    group.add_argument('--num-classes', type=at_least(1), default=None,
                       help="Classifier outputs (default: the dataset's; more keeps extra outputs, named by their "
                            'index).')
    group.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs, metavar='KEY=VALUE',
                       help='Extra arguments for timm.create_model, e.g. embed_dim=128 channels="(32,64,128,256)"; '
                            'recorded in the hub export so the architecture can be rebuilt.')
    group.add_argument('--drop', type=in_range(0, 1), default=None, metavar='RATE',
                       help="The model's drop_rate (GradAttn: encoder dropout; default: the model's own).")
    group.add_argument('--drop-path', type=in_range(0, 1), default=None, metavar='RATE',
                       help="The model's drop_path_rate (stochastic depth), for models that take it.")
    group.add_argument('--drop-block', type=in_range(0, 1), default=None, metavar='RATE',
                       help="The model's drop_block_rate, for models that take it.")
    group.add_argument('--gp', default=None, metavar='POOL',
                       help="The model's global_pool (e.g. avg, max, avgmax), for models that take it.")
    group.add_argument('--head-init-scale', type=float, default=None, help='Multiply the new head\'s weights by this.')
    group.add_argument('--head-init-bias', type=float, default=None, help="Set the new head's biases to this.")
    group.add_argument('--freeze-backbone', action='store_true',
                       help='Train only the classifier (get_classifier()); the rest keeps its weights and '
                            'normalisation statistics.')
    group.add_argument('--grad-checkpointing', action='store_true',
                       help="Recompute activations in backward (the model's set_grad_checkpointing): less memory.")
    group.add_argument('--fast-norm', action='store_true', help="timm's fast (low-precision) norm layers.")

    group = parser.add_argument_group('Data')
    group.add_argument('--dataset', default='digits', help="Dataset name, or 'folder' for your own images "
                                                           '(default: %(default)s).')
    add_shared_arguments(parser, group)
    group.add_argument('--train-subset', type=at_least(1), default=None, metavar='N',
                       help='Debugging aid: train on the first N training images only.')
    group.add_argument('--val-fraction', type=in_range(0, 1), default=None, metavar='FRACTION',
                       help="Share of the official training images held out for validation when the dataset has no "
                            "validation split (--protocol official; default: the dataset's validation share, 0.15 "
                            "for most). 0: no validation split, as the CNNtention and Attention Shortcuts papers "
                            "trained: the whole official training split, no validation pass, no early stopping, and "
                            "the last epoch's weights are the run's (datasets with official train and test splits "
                            "only).")
    group.add_argument('--mean', type=float, nargs='+', default=None, metavar='MEAN',
                       help="Normalisation mean, one value per channel (default: the dataset's).")
    group.add_argument('--std', type=float, nargs='+', default=None, metavar='STD',
                       help="Normalisation std, one value per channel (default: the dataset's).")
    group.add_argument('--train-augment', default=None, metavar='NAME',
                       help="Training augmentation: none, digits, cifar (pad-4 crop + flip), fashion, medmnist, "
                            "pad_ufes, folder or cnntention_mnist (default: the dataset's).")
    group.add_argument('--no-aug', action='store_true', help='No training augmentation (same as --train-augment none).')
    group.add_argument('-vb', '--validation-batch-size', type=at_least(1), default=None,
                       help='Batch size of the validation and test passes (default: --batch-size).')
    group.add_argument('--pin-mem', action=argparse.BooleanOptionalAction, default=None,
                       help='Pin loader memory for faster host-to-GPU copies (default: on with CUDA).')
    group.add_argument('--no-prefetcher', action='store_true',
                       help="Accepted for timm's command lines: batches go to the device through Accelerate's "
                            'loader, there is no separate prefetcher to turn off.')

    group = parser.add_argument_group('Optimizer (timm.optim: create_optimizer_v2)')
    group.add_argument('--opt', default=None, help="timm optimizer name (recipe: 'adam', coupled L2 weight decay).")
    group.add_argument('--opt-eps', type=positive, default=None, metavar='EPSILON', help="The optimizer's epsilon.")
    group.add_argument('--opt-betas', type=float, nargs='+', default=None, metavar='BETA',
                       help="The optimizer's betas.")
    group.add_argument('--opt-kwargs', nargs='*', default={}, action=ParseKwargs, metavar='KEY=VALUE',
                       help='Further keyword arguments of the optimizer.')
    group.add_argument('--lr', type=at_least(0, float), default=None, help='Learning rate (recipe).')
    group.add_argument('--lr-base', type=at_least(0, float), default=None,
                       help='With no --lr: the rate for a batch of --lr-base-size, scaled to --batch-size (timm).')
    group.add_argument('--lr-base-size', type=at_least(1), default=256, help='Batch size --lr-base is given for.')
    group.add_argument('--lr-base-scale', default='', choices=('', 'linear', 'sqrt'),
                       help="How --lr-base scales with the batch: linear, or sqrt (default: sqrt for Ada*/LAMB "
                            "optimizers, else linear, as timm).")
    group.add_argument('--weight-decay', type=at_least(0, float), default=None, help='Weight decay (recipe).')
    group.add_argument('--decay-norm-and-bias', action=argparse.BooleanOptionalAction, default=None,
                       help="Apply weight decay to every parameter: norms, biases and the model's no_weight_decay() "
                            "ones such as pos_embed (recipe: paper, as its reference; default decays weights only).")
    group.add_argument('--momentum', type=at_least(0, float), default=0.9, help='SGD momentum.')
    group.add_argument('--layer-decay', type=positive, default=None,
                       help='Layer-wise learning-rate decay (fine-tuning), through the model\'s group_matcher.')
    group.add_argument('--clip-grad', type=positive, default=None, metavar='VALUE', help='Clip gradients.')
    group.add_argument('--clip-mode', default='norm', choices=('norm', 'value', 'agc'),
                       help="How --clip-grad clips: the norm, each value, or timm's adaptive clipping.")
    group.add_argument('--grad-accum-steps', type=at_least(1), default=1, metavar='N',
                       help='Accumulate gradients over N batches per optimizer step.')

    group = parser.add_argument_group('Schedule (timm.scheduler: create_scheduler_v2)')
    group.add_argument('--epochs', type=at_least(1), default=None,
                       help='Epochs to train, cool-down excluded (recipe; attention-shortcuts: as many as '
                            '--max-updates needs).')
    group.add_argument('--sched', default=None,
                       help="timm scheduler name: cosine, step, plateau, ... (recipe). 'plateau' follows the "
                            "validation top-1.")
    group.add_argument('--min-lr', type=at_least(0, float), default=None, help='Lower bound of the learning rate '
                                                                               '(recipe).')
    group.add_argument('--warmup-epochs', type=at_least(0), default=None, help='Linear warm-up epochs (recipe).')
    group.add_argument('--warmup-lr', type=at_least(0, float), default=1e-5,
                       help='Learning rate the warm-up starts at.')
    group.add_argument('--warmup-prefix', action='store_true',
                       help='Count the warm-up before the schedule instead of inside it.')
    group.add_argument('--cooldown-epochs', type=at_least(0), default=0,
                       help='Epochs at --min-lr after the schedule ends (added to --epochs, as timm does).')
    group.add_argument('--decay-epochs', type=positive, default=None, help="Epochs between decays ('step').")
    group.add_argument('--decay-milestones', type=int, nargs='+', default=None, metavar='MILESTONE',
                       help="Epochs (updates with --sched-on-updates) at which 'multistep' multiplies the rate by "
                            "--decay-rate; milestone m is the first epoch at the lower rate, counted from 1.")
    group.add_argument('--decay-rate', type=positive, default=None, help="Decay factor ('step', 'plateau') (recipe).")
    group.add_argument('--patience-epochs', type=at_least(0), default=None,
                       help="Epochs without improvement before 'plateau' decays the rate (recipe).")
    group.add_argument('--lr-noise', type=float, nargs='+', default=None, metavar='FRACTION',
                       help='Add noise to the rate over this fraction (or start end fractions) of the schedule.')
    group.add_argument('--lr-noise-pct', type=float, default=0.67, help='Range of the rate noise.')
    group.add_argument('--lr-noise-std', type=float, default=1.0, help='Standard deviation of the rate noise.')
    group.add_argument('--lr-cycle-mul', type=positive, default=1.0, help='Cycle length multiplier (cosine, tanh).')
    group.add_argument('--lr-cycle-decay', type=positive, default=0.5, help='Rate decay per cycle (cosine, tanh).')
    group.add_argument('--lr-cycle-limit', type=at_least(1), default=1, help='Number of cycles (cosine, tanh).')
    group.add_argument('--lr-k-decay', type=positive, default=1.0, help="The k of timm's cosine / poly k-decay.")
    group.add_argument('--sched-on-updates', action=argparse.BooleanOptionalAction, default=False,
                       help='Step the schedule after every optimizer update instead of every epoch; its epoch '
                            'counts (warm-up, decay) become updates, --decay-milestones are given in updates.')
    group.add_argument('--max-updates', type=at_least(1), default=None, metavar='N',
                       help='Stop after N optimizer updates, mid-epoch if need be; the last, partial epoch is '
                            'validated and saved like the others. Without --epochs: as many epochs as that takes.')
    group.add_argument('--patience', type=at_least(0), default=None,
                       help='Early stopping: stop after this many epochs without a better validation top-1; '
                            '0 = off (recipe). The best weights are always restored before the test.')

    group = parser.add_argument_group('Regularisation (timm.data.Mixup, timm.loss, timm.utils.ModelEmaV3)')
    group.add_argument('--smoothing', type=in_range(0, 1), default=None, help='Label smoothing (recipe).')
    group.add_argument('--mixup', type=at_least(0, float), default=0.0, metavar='ALPHA', help='Mixup alpha; 0 = off.')
    group.add_argument('--cutmix', type=at_least(0, float), default=0.0, metavar='ALPHA', help='CutMix alpha; 0 = off.')
    group.add_argument('--cutmix-minmax', type=float, nargs=2, default=None, metavar=('MIN', 'MAX'),
                       help='CutMix box ratio bounds (overrides --cutmix alpha).')
    group.add_argument('--mixup-prob', type=in_range(0, 1, closed=True), default=1.0,
                       help='Probability of mixing a batch.')
    group.add_argument('--mixup-switch-prob', type=in_range(0, 1, closed=True), default=0.5,
                       help='Probability of CutMix instead of mixup when both are on.')
    group.add_argument('--mixup-mode', default='batch', choices=('batch', 'pair', 'elem'), help='How mixing is drawn.')
    group.add_argument('--mixup-off-epoch', type=at_least(0), default=0,
                       help='Turn mixing off from this epoch on (0 = never).')
    group.add_argument('--bce-loss', action='store_true', help="timm's binary cross-entropy instead of softmax's.")
    group.add_argument('--bce-sum', action='store_true', help='Sum the BCE loss over classes.')
    group.add_argument('--bce-target-thresh', type=float, default=None, help='Binarise BCE targets at this value.')
    group.add_argument('--bce-pos-weight', type=float, default=None, help='Positive weight of the BCE loss.')
    group.add_argument('--model-ema', action='store_true',
                       help='Keep an exponential moving average of the weights (timm ModelEmaV3); it is the model '
                            'validated, kept as best and tested.')
    group.add_argument('--model-ema-decay', type=in_range(0, 1, closed=True), default=0.998, help='EMA decay.')
    group.add_argument('--model-ema-warmup', action='store_true',
                       help="Warm the EMA decay up from 0 (timm's 1 - (1 + update)^(-2/3), capped at "
                            '--model-ema-decay), so the average follows the early weights on short runs.')
    group.add_argument('--model-ema-force-cpu', action='store_true', help='Keep the EMA weights on the CPU.')
    group.add_argument('--seed', type=seed, default=None, help='Seed of the split, the data order and the init '
                                                               '(recipe).')

    group = parser.add_argument_group('Devices (Hugging Face Accelerate)')
    group.add_argument('--mixed-precision', default=None, choices=MIXED_PRECISIONS,
                       help="Autocast precision passed to Accelerate (fp16 needs a GPU; default: no, or "
                            "`accelerate launch --mixed_precision`'s).")
    group.add_argument('--channels-last', action=argparse.BooleanOptionalAction, default=None,
                       help='Run the model in channels-last memory format (default: off).')
    group.add_argument('--sync-bn', action='store_true',
                       help='Synchronise BatchNorm statistics across processes (torch SyncBatchNorm).')
    group.add_argument('--synchronize-step', action='store_true',
                       help='Wait for the GPU after every step (for timing; no effect on CPU).')
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
    group.add_argument('--test-every-epoch', action=argparse.BooleanOptionalAction, default=False,
                       help='Also evaluate the test split after every epoch: test_loss and test_top1 columns in '
                            'summary.csv and a test curve in training_curves.png (e.g. the per-epoch test error of '
                            "Attention Shortcuts' Figure 2). Reporting only: never used to select weights, stop early "
                            'or step the schedule, and it leaves the training itself unchanged.')
    group.add_argument('--log-interval', type=at_least(1), default=20, metavar='N',
                       help='Update the progress bar (one device sync) every N steps.')
    group.add_argument('--grad-stats-every', type=at_least(0), default=0, metavar='N',
                       help='Every N epochs, append per-layer gradient norms to grad_norms.jsonl; 0 = off.')
    return parser


def build_evaluate_parser(gradient_modes: Sequence[str] = ('parameters', 'outputs')) -> CommandLineParser:
    """``python -m timm_gradattn.evaluate``'s command line."""
    parser = CommandLineParser(
        flag_hints=EVALUATE_FLAG_HINTS, prog='python -m timm_gradattn.evaluate',
        description='Top-1/3/5, precision/recall/F1 (macro, weighted), ECE, NLL and a confusion matrix '
                    'for a model on one split of a dataset, with plots.')
    parser.add_argument('--model', required=True,
                        help='timm model name, hf-hub:<repo id> or local-dir:<folder with config.json>.')
    parser.add_argument('--checkpoint', default=None,
                        help='Weights to load: a .safetensors file, or a .pth/.pt state dict (read as tensors only).')
    parser.add_argument('--dataset', default=None,
                        help="Dataset name (digits, cifar10, tiny_imagenet, ...; 'folder' for your own images).")
    add_shared_arguments(parser)
    parser.add_argument('--split', default='test', choices=('test', 'val', 'train'))
    parser.add_argument('--seed', type=seed, default=42, help='Seed of the split; must be the one used in training.')
    parser.add_argument('--ece-bins', type=at_least(1), default=10)
    parser.add_argument('--mixed-precision', default=None, choices=MIXED_PRECISIONS,
                        help="Autocast for the forward pass; default: Accelerate's configuration.")
    parser.add_argument('--routing', action='store_true',
                        help='The attention analysis the model exposes: GradAttn, share of each extraction point '
                             'in the predictions; Attention Shortcuts, which earlier outputs each block reads; '
                             'CNNtention SelfAtt/MHA, spatial attention drawn over a few images per class.')
    parser.add_argument('--gradient-health', action='store_true',
                        help='Per-layer gradient norms on the first batches of the split (train mode) and the '
                             'Gradient Health Score in the paper\'s and the reference\'s bands.')
    parser.add_argument('--gradient-mode', default='outputs', choices=tuple(gradient_modes),
                        help="'outputs' is the paper's measurement (gradient w.r.t. each layer output).")
    parser.add_argument('--gradient-batches', type=at_least(1), default=20)
    parser.add_argument('--cam', type=at_least(1), default=None, metavar='N',
                        help='Grad-CAM maps over the first N images of the split, drawn in cam.png (needs the '
                             'grad-cam package: pip install "timm-gradattn[cam]").')
    parser.add_argument('--output', default=None,
                        help='Folder for metrics.json and the plots; default output/eval/<model>-<dataset>-<split>.')
    return parser


def run_entry_point(prog: str, main: Callable[[Optional[Sequence[str]]], object],
                    argv: Optional[Sequence[str]] = None) -> int:
    """``main(argv)`` for the shell: a ``UserError`` (something the user asked for, or a file that could not be
    written) is one line on stderr and exit code 2; a stop (Ctrl-C, or SIGTERM where ``main`` handles it) is one line
    (the error's, when ``main`` turned it into one) and exit code 130 (143 for SIGTERM)."""
    try:
        main(argv)
    except UserError as error:
        if getattr(error, 'interrupted', False):
            print(f'{prog}: {error}', file=sys.stderr)
            return getattr(error, 'exit_code', 130)
        print(f'{prog}: error: {error}', file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:
        print(f'{prog}: stopped.', file=sys.stderr)
        return getattr(stop, 'exit_code', 130)
    return 0
