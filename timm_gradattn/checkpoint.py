"""Resumable training state and crash-safe writes into a run folder.

``<run>/last/`` holds everything needed to continue a run exactly where its last finished epoch left it:

    model.safetensors          weights of the unwrapped model (safetensors)
    ema.safetensors            EMA weights, when --model-ema
    optimizer.pt               optimizer.state_dict() (torch.save; read back with weights_only=True)
    rng_state_<rank>.safetensors   torch CPU / CUDA generator states of every process, with python's and
                               numpy's generator states as JSON in the file's metadata
    best.safetensors           the best validation epoch's weights so far (a hard link to the previous
                               checkpoint's file when the best did not change this epoch)
    state.json                 epoch, update count, scheduler and early-stopping state, the summary rows so far;
                               written last, so its presence marks a complete checkpoint

``<run>/model_best.safetensors`` is published from ``last/best.safetensors`` once the checkpoint is complete, and
again on resume: the best weights and the state that names their epoch are committed together, so a kill between
two writes never leaves best weights from an epoch the resumed state does not know.

Every file is written to a temporary name in the same folder, fsynced and renamed over the old one
(``os.replace`` is atomic on POSIX and Windows). A checkpoint is written whole into ``last.tmp/`` and then
swapped in with two renames (``last`` -> ``last.prev``, ``last.tmp`` -> ``last``), so at every instant one
complete checkpoint exists; ``find_last_checkpoint`` falls back to ``last.prev/`` if a crash hit between them.

Accelerate's ``save_state`` / ``load_state`` are not used: they unpickle registered custom objects with
``weights_only=False`` (and early-stopping or scheduler state would be such objects), skip a failed
random-state restore with only an info log, and do not write atomically. Nothing here is unpickled:
tensors are safetensors, the rest JSON, and the optimizer state (tensors, numbers and lists only) is
loaded with ``torch.load(weights_only=True)``, as are foreign ``.pth`` state dicts given to ``load_weights``.
Multi-process runs assume a file system shared by all processes, as for any DDP checkpoint.

What a resume repeats exactly: the model, EMA, optimizer, scheduler, the data order (a function of seed and epoch)
and the main process's random generators, so with the data decoded in the main process (``--workers 0``, the default
for digits and for image folders held in memory) a resumed run continues as the uninterrupted one would. With loader
workers the workers' own generators (the random augmentation) are not saved: a resumed run draws other crops and
flips from its first resumed epoch on, while dropout and drop-path masks, drawn in the main process, still match.
"""
import argparse
import io
import json
import pickle
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from timm.models import adapt_input_conv, clean_state_dict

from .errors import UserError
from .files import PathLike, atomic_link, atomic_write_bytes, atomic_write_text, replace_folder, replace_synced, writing
from .models import checkpoint_filter_fn
from .preserve import capture_rng_state, restore_rng_state

__all__ = ['LAST', 'STATE_FILE', 'BEST_FILE', 'MODEL_BEST', 'publish_best', 'atomic_save_weights', 'WeightsError',
           'OptimizerStateError', 'load_weights',
           'find_last_checkpoint', 'BackgroundWriter', 'cpu_copy', 'save_training_state', 'load_training_state',
           'scheduler_state_dict', 'load_scheduler_state_dict']

LAST = 'last'
STATE_FILE = 'state.json'
BEST_FILE = 'best.safetensors'          # inside a checkpoint folder
MODEL_BEST = 'model_best.safetensors'   # in the run folder, published from the newest checkpoint's BEST_FILE
FORMAT_VERSION = 1


def atomic_save_weights(model_or_state: Union[nn.Module, Dict[str, torch.Tensor]], path: PathLike,
                        metadata: Optional[Dict[str, str]] = None) -> None:
    """A state dict (or a module's) as safetensors, atomically. ``metadata`` values must be strings."""
    path = Path(path)
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    tmp = path.with_name(f'.{path.name}.tmp')
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(tmp), metadata=metadata)
    replace_synced(tmp, path)


class WeightsError(UserError, ValueError):
    """A weights file that is missing, unreadable or does not fit the model (one line for the command line)."""


# How torch.save files begin: its zip format, and its legacy format (a pickle, protocol 2 and up).
_TORCH_FILE_STARTS = (b'PK\x03\x04', b'\x80')
# The wrappers training scripts save a state dict in (timm's and torchvision's, Lightning's, PyTorch's tutorials').
_STATE_DICT_KEYS = ('state_dict', 'model', 'model_state_dict')


def _read_torch_state_dict(path: PathLike, what: str) -> Dict[str, torch.Tensor]:
    """A state dict from a ``torch.save`` file, such as the GradAttn reference notebooks' ``.pth``, read with
    ``weights_only=True`` only: tensors and plain containers, no object is built and no code runs. timm's
    training checkpoints keep their settings as an ``argparse.Namespace``, which timm's own loader allows too."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as error:
        try:
            found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception:  # noqa: BLE001 - only an example for the message; legacy files cannot be listed
            found = []
        example = f' (e.g. {", ".join(found[:3])})' if found else ''
        raise WeightsError(
            f'{what} {path} contains non-tensor objects{example}, and files are only unpickled as tensors '
            f'(weights_only=True), never as code. If you trust it, load it yourself and save its state dict: '
            f'safetensors.torch.save_file(state_dict, "model.safetensors").') from error
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise WeightsError(f'{what} {path} cannot be read as a PyTorch file (damaged or truncated?): '
                           f'{" ".join(str(error).split()).split(". ")[0] or type(error).__name__}.') from error
    state = checkpoint
    if isinstance(checkpoint, dict):
        state = next((checkpoint[k] for k in _STATE_DICT_KEYS if isinstance(checkpoint.get(k), dict)), checkpoint)
    if not (isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values())):
        found = f'a dict with keys {sorted(map(str, state))[:5]}' if isinstance(state, dict) else type(state).__name__
        raise WeightsError(f'{what} {path} holds no state dict (parameter names to tensors) but {found}. Save '
                           f'model.state_dict(), alone or as {{"state_dict": ...}}.')
    return state


def load_weights(model: nn.Module, path: PathLike, what: str = 'checkpoint', new_head: bool = False,
                 on_first_conv_adapted: Optional[Callable[[int, int], None]] = None) -> Dict[str, str]:
    """The one way weights are read: a safetensors file, or a ``torch.save`` state dict (``.pth``/``.pt``, read
    with ``weights_only=True`` only; a ``{'state_dict': ...}`` or ``{'model': ...}`` wrapper is unwrapped), into
    ``model``; returns the safetensors metadata (empty for a ``torch.save`` file).

    DDP / torch.compile prefixes are stripped and ``timm_gradattn.models.checkpoint_filter_fn`` maps older names
    to the model's. Every key must fit, except that with ``new_head`` a classifier of another shape (or none)
    stays as initialised (fine-tuning). A first convolution (the pretrained cfg's ``first_conv``) saved for another
    channel count is refused, naming the ``--in-chans`` it fits; given ``on_first_conv_adapted`` (fine-tuning), it is
    adapted instead by timm's ``adapt_input_conv``, as timm's own pretrained loading adapts it, and
    ``on_first_conv_adapted(saved, taken)`` is told the two channel counts. Raises WeightsError naming ``what`` (the
    flag or role) and ``path``.
    """
    if Path(path).is_dir():
        raise WeightsError(f'{what} {path} is a folder; pass the weights file in it (e.g. model.safetensors).')
    if not Path(path).is_file():
        raise WeightsError(f'{what} {path} does not exist.')
    with open(path, 'rb') as f:
        head = f.read(4)
    if Path(path).suffix != '.safetensors' and head.startswith(_TORCH_FILE_STARTS):
        state, metadata = _read_torch_state_dict(path, what), {}
    else:
        try:
            with safe_open(str(path), framework='pt', device='cpu') as f:
                metadata = f.metadata() or {}
                state = {key: f.get_tensor(key) for key in f.keys()}
        except (SafetensorError, OSError) as error:
            kind = '' if Path(path).suffix == '.safetensors' else ' neither a PyTorch file nor safetensors, or'
            raise WeightsError(f'{what} {path} cannot be read as weights ({kind} damaged or truncated?): '
                               f'{" ".join(str(error).split())}'.replace('( ', '(')) from error
    state = checkpoint_filter_fn(clean_state_dict(state), model)
    expected = model.state_dict()
    resized = {k for k in set(state) & set(expected) if state[k].shape != expected[k].shape}
    first_conv = f"{(getattr(model, 'pretrained_cfg', None) or {}).get('first_conv')}.weight"
    adapted = None
    if first_conv in resized and state[first_conv].ndim == 4 and all(
            state[first_conv].shape[d] == expected[first_conv].shape[d] for d in (0, 2, 3)):  # only the channels
        adapted = saved, taken = state[first_conv].shape[1], expected[first_conv].shape[1]
        if on_first_conv_adapted is None:
            raise WeightsError(f'{what} {path} was trained on {saved}-channel images but the model takes {taken}. '
                               f'Pass --in-chans {saved} (images are converted).')
        state[first_conv] = adapt_input_conv(taken, state[first_conv], base_chans=saved)
        resized.discard(first_conv)
    head = set()
    if new_head:  # the classifier's keys: replaced when another size, optional in the file
        classifier = model.get_classifier()
        prefixes = tuple(f'{name}.' for name, module in model.named_modules() if module is classifier)
        head = {k for k in expected if k.startswith(prefixes)}
        state = {k: v for k, v in state.items() if k not in resized & head}
    problems = []
    for label, keys in (('missing', set(expected) - set(state) - head), ('unexpected', set(state) - set(expected)),
                        ('of another shape', resized - head)):
        if keys:
            problems.append(f'{len(keys)} {label} (e.g. {sorted(keys)[:3]})')
    if problems:
        source = f" (saved from {metadata['model']})" if 'model' in metadata else ''
        raise WeightsError(f'{what} {path}{source} does not fit this model: keys {"; ".join(problems)}.')
    model.load_state_dict(state, strict=not head)
    if adapted is not None:
        on_first_conv_adapted(*adapted)
    return metadata


# --- random number generators ------------------------------------------------------------------------------
# --- schedulers --------------------------------------------------------------------------------------------
def scheduler_state_dict(scheduler) -> Optional[Dict[str, Any]]:
    """The state of a timm scheduler that settings alone cannot rebuild, JSON-ready; None if there is none.

    timm's schedulers are functions of the epoch, rebuilt from the settings on resume, except 'plateau',
    whose torch ReduceLROnPlateau counts epochs without improvement. timm's own PlateauLRScheduler.state_dict()
    keeps only the best metric, so a resumed run would restart the patience count; the torch state has it all.
    """
    plateau = getattr(scheduler, 'lr_scheduler', None)
    if isinstance(plateau, torch.optim.lr_scheduler.ReduceLROnPlateau):
        return plateau.state_dict()
    return None


def load_scheduler_state_dict(scheduler, state: Optional[Dict[str, Any]]) -> None:
    if state is not None:
        scheduler.lr_scheduler.load_state_dict(state)


# --- the resumable state of a run --------------------------------------------------------------------------
def _is_complete(folder: Path) -> bool:
    return (folder / STATE_FILE).is_file()


def find_last_checkpoint(run_dir: PathLike) -> Optional[Path]:
    """The newest complete checkpoint folder of a run, or None."""
    run_dir = Path(run_dir)
    for name in (LAST, f'{LAST}.prev'):
        if _is_complete(run_dir / name):
            return run_dir / name
    return None


class BackgroundWriter:
    """Checkpoint writes on one thread of their own, in the order they were submitted, while training goes on.

    ``submit`` returns at once (with ``enabled=False`` it writes in the caller's thread). A write that failed is
    raised by the next ``submit`` or ``raise_failure`` (the engine asks between training steps), so a disk that fills
    stops the run in the epoch it filled, not at the end. At most ``max_pending`` writes wait at once (each holds CPU
    copies of the weights and the optimizer state); a further ``submit`` waits for the oldest. ``wait`` blocks until
    every submitted write has finished and re-raises the first failure. Each write is atomic as ever, so a crash or
    SIGKILL during one leaves the previous complete checkpoint.
    """

    def __init__(self, enabled: bool = True, max_pending: int = 1):
        self._pool = ThreadPoolExecutor(1, thread_name_prefix='checkpoint-writer') if enabled else None
        self._pending: List[Future] = []
        self._max_pending = max_pending

    def submit(self, write: Callable[..., Any], *args, **kwargs) -> None:
        self.raise_failure()
        if self._pool is None:
            write(*args, **kwargs)
            return
        while len(self._pending) >= self._max_pending:
            self._pending.pop(0).result()
        self._pending.append(self._pool.submit(write, *args, **kwargs))

    def raise_failure(self) -> None:
        """Raise the error of a finished write that failed (cheap: it looks, it does not wait)."""
        finished = [future for future in self._pending if future.done()]
        self._pending = [future for future in self._pending if not future.done()]
        for future in finished:
            future.result()

    def wait(self, raise_errors: bool = True) -> None:
        pending, self._pending = self._pending, []
        errors = [future.exception() for future in pending]
        failed = next((error for error in errors if error is not None), None)
        if failed is not None and raise_errors:
            raise failed

    def close(self, raise_errors: bool = True) -> None:
        try:
            self.wait(raise_errors)
        finally:
            if self._pool is not None:
                self._pool.shutdown()


def cpu_copy(model_or_state: Union[nn.Module, Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """A state dict whose tensors are CPU copies: what a background write may read while training changes the
    originals."""
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    return {k: v.detach().to('cpu', copy=True) for k, v in state.items()}


def save_training_state(
        run_dir: PathLike,
        accelerator,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        state: Dict[str, Any],
        ema: Optional[nn.Module] = None,
        writer: Optional[BackgroundWriter] = None,
        best: Optional[Tuple[Dict[str, torch.Tensor], Dict[str, str]]] = None,
) -> None:
    """Write ``<run>/last/`` as a whole, then publish its best weights as ``<run>/model_best.safetensors``: every
    process calls this (each saves its own random state).

    ``model`` is the unwrapped model, ``ema`` the EMA module (or None), ``state`` the JSON-ready rest, ``best`` the
    new best weights (CPU tensors, not changed afterwards) and their metadata when this epoch is the best so far,
    else None (the previous checkpoint's are kept). What is saved is taken now; with a ``writer`` and a single
    process, the files are written on the writer's thread. A write that fails raises ``WriteError``.
    """
    run_dir = Path(run_dir)
    rng = capture_rng_state()
    snapshot = dict(rng=rng, state_json=json.dumps(dict(state, format=FORMAT_VERSION), indent=1))
    if accelerator.is_main_process:
        buffer = io.BytesIO()
        torch.save(optimizer.state_dict(), buffer)  # serialised now: the optimizer steps on meanwhile
        metadata = {'model': str(state.get('model', '')), 'epochs_done': str(state['epochs_done'])}
        snapshot.update(model=cpu_copy(model), ema=cpu_copy(ema) if ema is not None else None,
                        optimizer=buffer.getvalue(), metadata=metadata, best=best)
    if writer is not None and accelerator.num_processes == 1:
        writer.submit(_write_checkpoint, run_dir, snapshot, accelerator.process_index, True)
        return
    # Several processes: written here, in step with the others.
    with writing(run_dir / f'{LAST}.tmp'):
        if accelerator.is_main_process:
            _start_checkpoint(run_dir)
        accelerator.wait_for_everyone()
        _write_checkpoint_files(run_dir, snapshot, accelerator.process_index, accelerator.is_main_process)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            _complete_checkpoint(run_dir, snapshot)
    accelerator.wait_for_everyone()


def _write_checkpoint(run_dir: Path, snapshot: Dict[str, Any], process_index: int, main: bool) -> None:
    with writing(run_dir / f'{LAST}.tmp'):
        _start_checkpoint(run_dir)
        _write_checkpoint_files(run_dir, snapshot, process_index, main)
        _complete_checkpoint(run_dir, snapshot)


def _start_checkpoint(run_dir: Path) -> None:
    tmp = run_dir / f'{LAST}.tmp'
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)


def _write_checkpoint_files(run_dir: Path, snapshot: Dict[str, Any], process_index: int, main: bool) -> None:
    tmp, rng = run_dir / f'{LAST}.tmp', snapshot['rng']
    atomic_save_weights(rng['tensors'], tmp / f'rng_state_{process_index}.safetensors',
                        metadata=dict(python=rng['python'], numpy=rng['numpy']))
    if main:
        atomic_save_weights(snapshot['model'], tmp / 'model.safetensors', metadata=snapshot['metadata'])
        if snapshot['ema'] is not None:
            atomic_save_weights(snapshot['ema'], tmp / 'ema.safetensors', metadata=snapshot['metadata'])
        atomic_write_bytes(tmp / 'optimizer.pt', snapshot['optimizer'])
        if snapshot['best'] is not None:
            atomic_save_weights(snapshot['best'][0], tmp / BEST_FILE, metadata=snapshot['best'][1])
        else:  # unchanged: the previous checkpoint's file (or, resuming an older run, the run's model_best)
            previous = next((path for path in (run_dir / LAST / BEST_FILE, run_dir / MODEL_BEST) if path.is_file()),
                            None)
            if previous is not None:
                atomic_link(previous, tmp / BEST_FILE)


def _complete_checkpoint(run_dir: Path, snapshot: Dict[str, Any]) -> None:
    tmp = run_dir / f'{LAST}.tmp'
    atomic_write_text(tmp / STATE_FILE, snapshot['state_json'])  # last: its presence marks a complete checkpoint
    replace_folder(tmp, run_dir / LAST)
    publish_best(run_dir / LAST)


def publish_best(checkpoint: PathLike) -> None:
    """``<run>/model_best.safetensors`` becomes the best weights that the complete checkpoint folder holds."""
    checkpoint = Path(checkpoint)
    if (checkpoint / BEST_FILE).is_file():
        atomic_link(checkpoint / BEST_FILE, checkpoint.parent / MODEL_BEST)


class OptimizerStateError(ValueError):
    """A saved optimizer state whose parameter groups differ from the optimizer's."""


def load_training_state(
        folder: PathLike,
        accelerator,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        ema: Optional[nn.Module] = None,
) -> Dict[str, Any]:
    """Restore what ``save_training_state`` wrote (model, EMA, optimizer, this process's generators).

    Returns the JSON part of the state. Raises WeightsError (a ValueError) when the weights do not fit the model,
    OptimizerStateError (a ValueError) when the optimizer state does not fit the optimizer.
    """
    folder = Path(folder)
    state = json.loads((folder / STATE_FILE).read_text())
    load_weights(model, folder / 'model.safetensors', what='Checkpoint')
    if ema is not None:
        ema_file = folder / 'ema.safetensors'
        load_weights(ema, ema_file if ema_file.is_file() else folder / 'model.safetensors', what='EMA checkpoint')
    try:
        optimizer.load_state_dict(torch.load(folder / 'optimizer.pt', map_location='cpu', weights_only=True))
    except ValueError as error:  # torch: "... a different number of parameter groups" / "... size of optimizer's group"
        raise OptimizerStateError(
            f'The saved optimizer state does not fit this optimizer ({error}): its parameter groups come from '
            f'--opt, --weight-decay, --decay-norm-and-bias, --layer-decay and --freeze-backbone. Resume with the '
            f"values in the run's config.yaml (drop those flags).") from error
    rng_file = folder / f'rng_state_{accelerator.process_index}.safetensors'
    if rng_file.is_file():
        with safe_open(str(rng_file), framework='pt') as f:
            metadata = f.metadata()
        restore_rng_state(load_file(str(rng_file)), metadata['python'], metadata['numpy'])
    else:
        state['rng_restored'] = False  # launched with more processes than saved: this one keeps its fresh seed
    return state
