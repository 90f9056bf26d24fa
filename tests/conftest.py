"""Fixtures shared by the test suite. Keep each one small, generic and named for what it gives."""
import copy
import json
import os
import subprocess
import sys
from typing import Callable, Dict, Optional

import pytest
import torch

import timm


def pytest_configure(config):
    # Under pytest-xdist every worker is a process of its own: share the cores among them rather than let each
    # worker's torch start a thread per core. Interpreters the tests start get the same count, so that logits
    # compared bit for bit across processes are computed alike.
    workers = os.environ.get('PYTEST_XDIST_WORKER_COUNT')
    if workers:
        threads = max(1, (os.cpu_count() or 1) // int(workers))
        torch.set_num_threads(threads)
        os.environ['OMP_NUM_THREADS'] = str(threads)


@pytest.fixture
def make_images() -> Callable[..., torch.Tensor]:
    """``make_images(batch=2, chans=3, size=32, seed=0)``: a reproducible batch of normal-noise images."""
    def make(batch: int = 2, chans: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return torch.randn(batch, chans, size, size, generator=generator)
    return make


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Every test starts and ends without Accelerate's process-wide state: each in-process train.py or evaluate run
    builds its own Accelerator, and a state left by an earlier test on the same worker (its precision, say 'no')
    refuses the next one's (say bf16, the default on a CPU with native bf16)."""
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


@pytest.fixture
def no_plots(monkeypatch):
    """In-process train() runs without drawing their PNGs (matplotlib's share of a short run's time)."""
    from timm_gradattn import run_files
    monkeypatch.setattr(run_files, 'plot_curves', lambda *args, **kwargs: None)
    monkeypatch.setattr(run_files, 'plot_test', lambda *args, **kwargs: None)


@pytest.fixture(scope='session')
def zoo_model() -> Callable[..., torch.nn.Module]:
    """``zoo_model(name, **kwargs)``: ``timm.create_model(name, num_classes=10, in_chans=3, **kwargs)``, seeded with 0.

    Each model is built once per session (per worker under pytest-xdist); every call returns its own deep copy, so a
    test may train, prune or re-head it.
    """
    built = {}

    def get(name: str, **kwargs) -> torch.nn.Module:
        kwargs.setdefault('num_classes', 10)
        kwargs.setdefault('in_chans', 3)
        key = (name, tuple(sorted(kwargs.items())))
        if key not in built:
            torch.manual_seed(0)
            built[key] = timm.create_model(name, **kwargs)
        return copy.deepcopy(built[key])
    return get


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


# Tests of other files that belong in the slow tier (pyproject's markers), marked here by file and test name so
# that those files need not change: each runs a script, a command line or a training job end to end, several
# seconds of CPU or more. The default tier keeps a cheaper test of the same code where there is one.
SLOW_ELSEWHERE: Dict[str, Dict[str, str]] = {
    'test_benchmarks_speed.py': dict.fromkeys((
        'test_speed_reports_flop_and_time_ratios_against_resnet18',
        'test_pipeline_speed_compares_each_epoch_with_the_bare_step',
        'test_op_profile_splits_the_step_by_kind_of_operator',
        'test_attention_shortcut_mac_ratios_against_the_cifar_resnet50',
        'test_speed_family_reports_its_targets_against_the_materialised_formulation',
        'test_speed_family_leaves_out_a_model_that_does_not_fit',
        'test_peak_memory_reports_a_step_larger_than_the_memory_available',
        'test_op_profile_family_splits_out_the_depth_attention',
    ), 'a benchmark script run on tiny settings: timed steps, profiles or training epochs'),
    'test_cli_errors.py': dict.fromkeys((
        'test_data_dir_alone_is_an_image_folder',
        'test_a_batch_the_model_cannot_train_on_is_refused_before_training',
        'test_unknown_flags_get_what_to_use_instead',
        'test_paths_that_cannot_work',
        'test_config_files_that_cannot_work',
        'test_pth_with_objects_is_one_line_at_the_command_line',
        'test_evaluate_truncated_safetensors_is_one_line',
        'test_evaluate_flags',
    ), 'one or more train.py / evaluate command lines in fresh interpreters (the default tier keeps '
       'test_unknown_pretrained_tag_lists_the_known_ones and the in-process checks of the same errors)'),
    'test_recipes.py': dict.fromkeys((
        'test_cnntention_recipe_trains_resnet20_on_digits',
        'test_max_updates_stops_mid_epoch_and_resumes',
        'test_results_hold_the_best_and_the_last_epoch_test_figures',
    ), 'a training run (the default tier keeps the recipes\' settings and schedules, checked without training)'),
    'test_train.py': dict.fromkeys((
        'test_compiled_training_saves_the_models_own_parameter_names',
        'test_a_head_wider_than_the_dataset_names_its_extra_outputs',
    ), 'a train.py run end to end, like the file\'s tests already marked slow'),
    'test_publish.py': dict.fromkeys((
        'test_hf_cache_loads_by_registry_name_offline',
    ), 'a fresh interpreter loading from the Hugging Face cache (test_pretrained_loading.py does so by default)'),
}


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.originalname in SLOW_ELSEWHERE.get(item.path.name, {}):
            item.add_marker(pytest.mark.slow)
