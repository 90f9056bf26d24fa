"""What the package and the benchmarks both write into reports: Markdown tables, the machine a figure was
measured on, and a run's per-epoch ``summary.csv``. One copy each, so that a results file, a model card
and a benchmark table describe things the same way.
"""
import csv
import math
import os
import platform
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch

import accelerate
import timm

from .precision import native_bf16

__all__ = ['markdown_cell', 'markdown_table', 'describe_machine', 'machine_line', 'load_average',
           'read_summary_csv']


def markdown_cell(value: Any) -> str:
    """``value`` as the text of one Markdown table cell (floats to 6 significant digits, pipes escaped)."""
    if isinstance(value, float):
        text = f'{value:.6g}'
    elif isinstance(value, dict):
        text = '; '.join(f'{k}: {markdown_cell(v)}' for k, v in value.items() if v is not None)
    elif isinstance(value, (list, tuple)):
        text = ', '.join(str(v) for v in value)
    else:
        text = str(value)
    return text.replace('|', '\\|').replace('\n', ' ')


def markdown_table(header: Sequence[Any], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table, one line per row, without a trailing newline."""
    lines = ['| ' + ' | '.join(map(markdown_cell, header)) + ' |', '|' + '---|' * len(header)]
    lines += ['| ' + ' | '.join(map(markdown_cell, row)) + ' |' for row in rows]
    return '\n'.join(lines)


def _cpu_name() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            return next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def describe_machine(device: Optional[Union[str, torch.device]] = None, **extra: Any) -> Dict[str, Any]:
    """The hardware and library versions a measurement was taken with, JSON-ready.

    ``device`` is the one the work ran on (default: the first GPU, else the CPU); ``extra`` adds what the
    caller knows about how it ran (e.g. the engine's process count and precision).
    """
    device = torch.device(device if device is not None else 'cuda' if torch.cuda.is_available() else 'cpu')
    return dict(
        cpu=_cpu_name(), cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
        # the vector instructions torch's CPU kernels use (e.g. AVX2, AVX512) and what computes bf16 natively, if
        # anything: two machines sold under one CPU name can differ several-fold in both
        cpu_capability=torch.backends.cpu.get_cpu_capability(), native_bf16=native_bf16(), device=str(device),
        gpu=torch.cuda.get_device_name(device) if device.type == 'cuda' else None,
        gpu_count=torch.cuda.device_count(), os=platform.platform(), python=platform.python_version(),
        torch=torch.__version__, timm=timm.__version__, accelerate=accelerate.__version__, **extra)


def machine_line(machine: Union[str, Dict[str, Any]]) -> str:
    """One line naming the device and versions of a ``describe_machine`` record.

    Also reads the records of older results files: ``gpus`` (a list), ``cores`` and ``threads``.
    """
    if not isinstance(machine, dict):
        return str(machine)
    gpu = machine.get('gpu') or ', '.join(machine.get('gpus') or [])
    cores = machine.get('cpu_count', machine.get('cores'))
    threads = machine.get('torch_threads', machine.get('threads'))
    capability = f", {machine['cpu_capability']}" if machine.get('cpu_capability') else ''
    cpu = f"{machine.get('cpu')} ({cores} cores{capability}" + (f', {threads} torch threads)' if threads else ')')
    device = f'{gpu} with {cpu}' if gpu else cpu
    versions = ', '.join(f'{name} {machine[name]}' for name in ('torch', 'timm', 'accelerate', 'python')
                         if machine.get(name))
    return f"{device}, {machine.get('num_processes', 1)} process(es), {versions}"


def peak_rss_mb() -> Optional[float]:
    """This process's peak resident memory in MB (Linux's VmHWM; else ``ru_maxrss``); None where neither exists."""
    try:
        with open('/proc/self/status') as status:
            return next(int(line.split()[1]) for line in status if line.startswith('VmHWM:')) / 1024
    except (OSError, StopIteration, ValueError):
        pass
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KB on Linux, bytes on macOS
    return peak / (1024 * 1024 if sys.platform == 'darwin' else 1024)


def load_average() -> Optional[List[float]]:
    """The 1, 5 and 15 minute load averages (None where the platform has none): how shared the machine was."""
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def read_summary_csv(path: Union[str, Path]) -> List[Dict[str, float]]:
    """Rows of a run's ``summary.csv`` with every field as a float (missing values as NaN)."""
    with open(path, newline='') as f:
        rows = [{key: float(value) if value not in ('', None) else math.nan for key, value in row.items()}
                for row in csv.DictReader(f)]
    if not rows:
        raise ValueError(f'{path} has no rows: was the run stopped before its first epoch ended?')
    return rows
