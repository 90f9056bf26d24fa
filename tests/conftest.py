"""Fixtures shared by the test suite. Keep each one small, generic and named for what it gives."""
import json
import os
import subprocess
import sys
from typing import Callable, Dict, Optional

import pytest
import torch


@pytest.fixture
def make_images() -> Callable[..., torch.Tensor]:
    """``make_images(batch=2, chans=3, size=32, seed=0)``: a reproducible batch of normal-noise images."""
    def make(batch: int = 2, chans: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return torch.randn(batch, chans, size, size, generator=generator)
    return make


@pytest.fixture(scope='session')
def run_python_json() -> Callable[..., Dict]:
    """``run_python_json(code, env=None, cwd=None)``: run ``code`` in a fresh interpreter and return its JSON.

    For checks that need environment variables read at import time (``HF_HUB_OFFLINE``, ``HF_HUB_CACHE``,
    ``TIMM_GRADATTN_HUB_NAMESPACE``); an ``env`` value of None removes that variable. The code must print
    one JSON object as its last line of stdout.
    """
    def run(code: str, env: Optional[Dict[str, Optional[str]]] = None, cwd: Optional[str] = None) -> Dict:
        full_env = dict(os.environ)
        for key, value in (env or {}).items():
            if value is None:
                full_env.pop(key, None)
            else:
                full_env[key] = value
        done = subprocess.run(
            [sys.executable, '-c', code], env=full_env, cwd=cwd, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f'subprocess failed ({done.returncode}):\n{done.stdout}\n{done.stderr}'
        return json.loads(done.stdout.strip().splitlines()[-1])
    return run
