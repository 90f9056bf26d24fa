"""train.py run in-process by the tests: its ``main``, a finished run's results and its ``summary.csv`` rows.

train.py is a script, not a module of the package, so it is loaded from the repository once here. Each run builds
its own Accelerator: ``train`` resets Accelerate's state after it, as conftest's ``fresh_accelerator_state`` does
around every test.
"""
import importlib.util
import json
from pathlib import Path
from typing import Dict, List, Sequence

from accelerate.state import AcceleratorState

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location('train_cli', REPO / 'train.py')
train_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_cli)


def train(argv: Sequence[str], output: Path, experiment: str) -> Dict:
    """Train ``argv`` into ``output/experiment``, assert it succeeded, and return its ``results.json``."""
    assert train_cli.main([*argv, '--output', str(output), '--experiment', experiment]) == 0
    AcceleratorState._reset_state(True)
    return json.loads((output / experiment / 'results.json').read_text())


def summary_rows(run_dir: Path) -> List[Dict[str, str]]:
    """``summary.csv`` as one dict of strings per epoch."""
    lines = (run_dir / 'summary.csv').read_text().strip().splitlines()
    header = lines[0].split(',')
    return [dict(zip(header, line.split(','))) for line in lines[1:]]
