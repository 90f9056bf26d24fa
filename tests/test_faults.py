"""Faults in long runs end in one line, at once, with the last complete state intact and resumable: a disk that fills
mid-run and one remounted read-only (a real, small tmpfs where the machine allows mounting one: as root, as CI runs),
SIGTERM from a scheduler, a kill between the best weights and the checkpoint, and two runs started together.

Runs are tiny and in-process (resnet20 on 16 px digits, 64 training images in batches of 16: 4 updates an epoch).
"""
import errno
import json
import os
import sys
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from safetensors import safe_open

from train_runs import REPO, summary_rows, train, train_cli
from timm_gradattn import checkpoint, engine, factory
from timm_gradattn.settings import resolve_train_settings as parse_args

TINY = ['--model', 'resnet20', '--img-size', '16', '-b', '16', '--train-subset', '64', '--log-interval', '1',
        '--channels-last', '--mixed-precision', 'no']


def _run(output: Path, experiment: str, *extra: str, on_epoch_end=None):
    settings = parse_args([*TINY, *extra, '--output', str(output), '--experiment', experiment])
    try:
        return engine.train(settings, on_epoch_end=on_epoch_end)
    finally:
        AcceleratorState._reset_state(True)


def _epochs_done(run_dir: Path) -> int:
    return json.loads((checkpoint.find_last_checkpoint(run_dir) / 'state.json').read_text())['epochs_done']


# --- the background writer ----------------------------------------------------------------------------------------
def test_a_failed_write_is_raised_at_the_next_look_and_writes_in_flight_are_bounded():
    writer = checkpoint.BackgroundWriter()
    release = threading.Event()
    writer.submit(release.wait)
    started = time.perf_counter()
    threading.Timer(0.3, release.set).start()
    writer.submit(lambda: None)  # one write in flight at most: this waits for the first
    assert time.perf_counter() - started >= 0.25

    def disk_full():
        raise OSError(errno.ENOSPC, 'No space left on device')
    writer.submit(disk_full)
    writer.wait(raise_errors=False)  # it has finished; nothing asked yet
    writer.submit(disk_full)
    deadline = time.time() + 5
    with pytest.raises(OSError, match='No space left'):
        while time.time() < deadline:  # what the engine does between steps: look, never wait
            writer.raise_failure()
            time.sleep(0.01)
    writer.submit(disk_full)
    time.sleep(0.2)
    with pytest.raises(OSError, match='No space left'):  # the next submit raises it too
        writer.submit(lambda: None)
    writer.close()


# --- a disk that fills, a folder that turns read-only ---------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB tmpfs (a disk that can really fill), or skip where mounting one is not allowed (not root)."""
    mount = tmp_path / 'disk'
    mount.mkdir()
    if shutil.which('mount') is None or os.geteuid() != 0 or subprocess.run(
            ['mount', '-t', 'tmpfs', '-o', 'size=16m', 'tmpfs', str(mount)], capture_output=True).returncode:
        pytest.skip('cannot mount a small tmpfs here (needs root)')
    yield mount
    subprocess.run(['umount', '-l', str(mount)], check=False)


def _fill(folder: Path) -> None:
    with open(folder / 'filler', 'wb') as f:
        try:
            while True:
                f.write(b'\0' * (1 << 20))
                f.flush()
        except OSError as error:
            assert error.errno == errno.ENOSPC


def test_a_disk_that_fills_stops_the_run_in_that_epoch_and_it_resumes(small_disk, capsys):
    def fill_after_epoch_one(row):
        if row['epoch'] == 1:
            row['wait_for_checkpoint']()
            _fill(small_disk)
    with pytest.raises(engine.RunStopped) as stopped:
        _run(small_disk, 'full', '--epochs', '6', on_epoch_end=fill_after_epoch_one)
    message = str(stopped.value)
    run_dir = small_disk / 'full'
    assert 'No space left on device' in message and str(run_dir) in message, message
    assert 'training stopped in epoch 2 and the state after epoch 1 is intact' in message, message
    assert f'--resume {run_dir}' in message and '\n' not in message
    assert _epochs_done(run_dir) == 1 and len(summary_rows(run_dir)) <= 2
    with safe_open(run_dir / 'model_best.safetensors', 'pt') as f:
        assert f.metadata()['epoch'] == '1'
    (small_disk / 'filler').unlink()
    capsys.readouterr()
    assert train_cli.main(['--resume', str(run_dir), '--epochs', '2']) == 0
    AcceleratorState._reset_state(True)
    assert 'Resuming' in capsys.readouterr().out and len(summary_rows(run_dir)) == 2
    assert (run_dir / 'results.json').is_file() and not (run_dir / 'last.tmp').exists()


def test_a_full_disk_at_the_start_is_one_line(small_disk, capsys):
    _fill(small_disk)
    argv = [*TINY, '--epochs', '1', '--output', str(small_disk / 'runs'), '--experiment', 'x']
    assert train_cli.main(argv) == 2
    AcceleratorState._reset_state(True)
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'No space left on device' in err and 'Traceback' not in err, err


def test_a_disk_remounted_read_only_mid_run_stops_it(small_disk):
    def remount_after_epoch_one(row):
        if row['epoch'] == 1:
            row['wait_for_checkpoint']()
            subprocess.run(['mount', '-o', 'remount,ro', str(small_disk)], check=True)
    try:
        with pytest.raises(engine.RunStopped, match='Read-only file system.*state after epoch 1 is intact'):
            _run(small_disk, 'ro', '--epochs', '4', on_epoch_end=remount_after_epoch_one)
    finally:
        subprocess.run(['mount', '-o', 'remount,rw', str(small_disk)], check=False)
    assert _epochs_done(small_disk / 'ro') == 1


def test_a_write_error_in_the_export_says_training_is_done(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError(errno.EDQUOT, 'Disk quota exceeded', str(tmp_path / 'quota' / 'hub.tmp'))
    monkeypatch.setattr(engine, 'export_hub_folder', refuse)
    with pytest.raises(engine.RunStopped, match=r'Disk quota exceeded; training is done and the state after epoch 2'):
        _run(tmp_path, 'quota', '--epochs', '2')
    monkeypatch.undo()
    results = train(['--resume', str(tmp_path / 'quota')], tmp_path, 'quota')  # finishes: tests and exports
    assert results['epochs_run'] == 2 and (tmp_path / 'quota' / 'hub' / 'model.safetensors').is_file()


# --- SIGTERM ---------------------------------------------------------------------------------------------------------
def test_sigterm_stops_like_ctrl_c_with_exit_code_143(tmp_path, capsys):
    def preempt_after_epoch_two(row):
        if row['epoch'] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
    previous = signal.getsignal(signal.SIGTERM)
    argv = [*TINY, '--epochs', '5', '--output', str(tmp_path), '--experiment', 'preempted']
    settings = parse_args(argv)
    with pytest.raises(engine.TrainingInterrupted) as stopped:
        engine.train(settings, on_epoch_end=preempt_after_epoch_two)
    AcceleratorState._reset_state(True)
    assert stopped.value.exit_code == 143 and signal.getsignal(signal.SIGTERM) == previous
    run_dir = tmp_path / 'preempted'
    assert 'Stopped by SIGTERM in epoch 2; the state after epoch 2 is intact' in str(stopped.value)
    assert _epochs_done(run_dir) == 2 and not (run_dir / 'last.tmp').exists()
    assert train_cli.main(['--resume', str(run_dir), '--epochs', '3']) == 0
    AcceleratorState._reset_state(True)
    assert len(summary_rows(run_dir)) == 3


@pytest.mark.slow
def test_sigterm_to_the_process_exits_143_with_one_line(tmp_path):
    command = [sys.executable, str(REPO / 'train.py'), *TINY, '--epochs', '200', '--output', str(tmp_path),
               '--experiment', 'killed']
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ, OMP_NUM_THREADS='1'))
    for line in process.stdout:
        if line.startswith('epoch 2/'):
            break
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err
    last = err.strip().splitlines()[-1]
    assert last.startswith('train.py: Stopped by SIGTERM') and 'error' not in last and '--resume' in last, err
    kept = _epochs_done(tmp_path / 'killed')  # epoch 1, or 2 if its checkpoint was taken before the signal came
    assert kept >= 1 and f'the state after epoch {kept} is intact' in last, err


# --- best weights and checkpoint committed together -------------------------------------------------------------------
def test_best_weights_are_restored_from_the_checkpoint_after_a_kill_between_writes(tmp_path):
    run_dir = tmp_path / 'torn'

    def stop_after_epoch_two(row):
        if row['epoch'] == 2:
            raise KeyboardInterrupt
    with pytest.raises(engine.TrainingInterrupted):
        _run(tmp_path, 'torn', '--epochs', '3', on_epoch_end=stop_after_epoch_two)
    best_epoch = json.loads((run_dir / 'last' / 'state.json').read_text())['best_epoch']
    # What a kill between two separate writes leaves: model_best.safetensors from another epoch than the state knows.
    checkpoint.atomic_save_weights({'conv1.weight': torch.zeros(1)}, run_dir / 'model_best.safetensors',
                                   metadata=dict(epoch='3'))
    assert train_cli.main(['--resume', str(run_dir), '--epochs', '2']) == 0  # 2 of 2 done: it tests and exports
    AcceleratorState._reset_state(True)
    with safe_open(run_dir / 'model_best.safetensors', 'pt') as f:
        assert f.metadata()['epoch'] == str(best_epoch) and 'conv1.weight' in f.keys()
    assert (run_dir / 'model_best.safetensors').stat().st_size == (run_dir / 'last' / 'best.safetensors').stat().st_size


# --- the run folder -------------------------------------------------------------------------------------------------
def test_a_run_folder_is_claimed_atomically(tmp_path):
    folder = tmp_path / 'out' / 'a'
    assert factory.claim_run_dir(folder, 'model: x\n') and (folder / 'config.yaml').read_text() == 'model: x\n'
    assert not factory.claim_run_dir(folder, 'model: y\n')  # a second run started at the same time loses
    factory.release_run_dir(folder)
    assert not (tmp_path / 'out').exists(), 'what the claim created is removed'
    results = []
    barrier = threading.Barrier(8)

    def claim():
        barrier.wait()
        results.append(factory.claim_run_dir(tmp_path / 'race', 'x'))
    threads = [threading.Thread(target=claim) for _ in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert sorted(results) == [False] * 7 + [True]


def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path, monkeypatch):
    monkeypatch.setattr(factory.time, 'strftime', lambda _: '20261208-000000')
    settings = parse_args([*TINY, '--epochs', '1', '--output', str(tmp_path)])
    first, second = factory._choose_run_dir(settings), factory._choose_run_dir(settings)
    assert first[0] != second[0] and second[0].endswith('-1') and None is first[1] is second[1]


@pytest.mark.parametrize('name', ['../escape', 'a/b', '..', '.'])
def test_an_experiment_name_cannot_leave_the_output_folder(tmp_path, name, capsys):
    assert train_cli.main([*TINY, '--epochs', '1', '--output', str(tmp_path / 'out'), '--experiment', name]) == 2
    assert 'must be one folder name' in capsys.readouterr().err
    assert not (tmp_path / 'escape').exists() and not (tmp_path / 'out').exists()


# --- resume with loader workers ----------------------------------------------------------------------------------
def test_loader_passes_leave_the_global_random_stream_alone():
    """What keeps dropout and drop-path masks of a resumed run with loader workers equal to the uninterrupted run's
    (the workers' own augmentation draws are not saved: docs/training.md says what differs)."""
    settings = parse_args([*TINY, '--epochs', '1', '--workers', '1'])
    loaders = factory.create_loaders(settings, factory.load_data(settings))
    loaders = factory.create_accelerator(settings).prepare(*loaders)
    before = torch.get_rng_state()
    for loader in loaders:
        next(iter(loader))
    assert torch.equal(before, torch.get_rng_state())


def test_evaluate_on_a_full_disk_is_one_line(small_disk, tmp_path, capsys):
    from safetensors.torch import save_file
    from timm_gradattn.evaluate import cli as evaluate_cli
    import timm
    save_file(timm.create_model('resnet20', num_classes=10, in_chans=1).state_dict(), tmp_path / 'model.safetensors')
    _fill(small_disk)
    assert evaluate_cli(['--model', 'resnet20', '--checkpoint', str(tmp_path / 'model.safetensors'), '--dataset',
                         'digits', '--img-size', '16', '-j', '0', '--output', str(small_disk / 'eval')]) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'No space left on device' in err and 'Traceback' not in err, err


# --- a launch that starts fewer processes than asked -----------------------------------------------------------------
def test_accelerate_launch_cpu_starting_one_process_says_so(monkeypatch, capsys):
    """``accelerate launch --cpu --num_processes 2`` runs its simple launcher: one process, MASTER_ADDR set, no
    WORLD_SIZE (accelerate/utils/launch.py). A warning, not a silent single-process run."""
    settings = parse_args([*TINY, '--epochs', '1'])
    monkeypatch.delenv('WORLD_SIZE', raising=False)
    factory.create_accelerator(settings)
    assert 'started this one alone' not in capsys.readouterr().out
    AcceleratorState._reset_state(True)
    for key, value in dict(MASTER_ADDR='127.0.0.1', MASTER_PORT='29500', ACCELERATE_USE_CPU='True',
                           ACCELERATE_MIXED_PRECISION='no').items():
        monkeypatch.setenv(key, value)
    factory.create_accelerator(settings)
    out = capsys.readouterr().out
    assert 'started this one alone' in out and '--multi_gpu --num_processes N' in out and out.count('\n') == 1
