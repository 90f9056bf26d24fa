"""Run a side job on a model and leave everything as it was found: each module's train/eval mode, the buffers
(BatchNorm statistics a train-mode pass updates) and the random generators (python, numpy, torch on CPU and
CUDA), so that a check before training, a gradient measurement or an attention picture changes nothing of the
training run around it."""
import json
import random
from contextlib import contextmanager
from typing import Any, Dict, Iterator, Optional

import numpy as np
import torch
import torch.nn as nn

__all__ = ['preserved_state', 'capture_rng_state', 'restore_rng_state']


def capture_rng_state() -> Dict[str, Any]:
    """This process's python, numpy and torch (CPU and CUDA) generator states, JSON and tensors only."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {'torch_cpu': torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f'torch_cuda_{i}': s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return dict(
        tensors=tensors,
        python=json.dumps(random.getstate()),
        numpy=json.dumps([keys.tolist(), int(pos), int(has_gauss), float(cached)]),
    )


def restore_rng_state(tensors: Dict[str, torch.Tensor], python_state: str, numpy_state: str) -> None:
    version, internal, gauss = json.loads(python_state)
    random.setstate((version, tuple(internal), gauss))
    keys, pos, has_gauss, cached = json.loads(numpy_state)
    np.random.set_state(('MT19937', np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors['torch_cpu'])
    cuda_states = [tensors[k] for k in sorted(k for k in tensors if k.startswith('torch_cuda_'))]
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)


@contextmanager
def preserved_state(model: Optional[nn.Module] = None, buffers: bool = True, rng: bool = True) -> Iterator[None]:
    """Inside the block anything goes; after it, ``model``'s per-module train/eval modes (a trainer may keep frozen
    layers in eval mode while training), its buffers (with ``buffers``) and the random state (with ``rng``) are
    what they were before."""
    modes = [(module, module.training) for module in model.modules()] if model is not None else []
    saved_buffers = ([(buffer, buffer.detach().clone()) for buffer in model.buffers()]
                     if model is not None and buffers else [])
    saved_rng = capture_rng_state() if rng else None
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
        with torch.no_grad():
            for buffer, saved in saved_buffers:
                buffer.copy_(saved)
        if saved_rng is not None:
            restore_rng_state(saved_rng['tensors'], saved_rng['python'], saved_rng['numpy'])
