"""The papers' protocols exactly: ``--protocol official --val-fraction 0`` trains on the whole official training split
with no validation split (as CNNtention and Attention Shortcuts trained on all 50,000 CIFAR images) and keeps the last
epoch's weights; ``--test-every-epoch`` draws a per-epoch test curve (Attention Shortcuts' Figure 2) that selects
nothing.

The runs are tiny and in-process (resnet20 at 16 px, plots skipped) on a Fashion-MNIST written in its upstream IDX
format: official training and test splits and no validation split, like CIFAR. Digits has no official split at
all, so --val-fraction 0 is refused for it; the test curve's runs use digits, with a validation split. The default
tier keeps one run; those that compare two runs, or resume one, are in the slow tier.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from safetensors import safe_open
from safetensors.torch import load_file

from data_fixtures import write_fashion_mnist, write_image_folder
from train_runs import REPO, summary_rows, train, train_cli
from timm_gradattn import engine
from timm_gradattn.data import build_datasets
from timm_gradattn.settings import resolve_train_settings as parse_args

# 64 training images in batches of 16: 4 updates an epoch.
TINY = ['--model', 'resnet20', '--img-size', '16', '-b', '16', '--workers', '0', '--log-interval', '1']
NO_VALIDATION = ['--protocol', 'official', '--val-fraction', '0']
COMPARED = ('train_loss', 'train_top1', 'val_loss', 'val_top1', 'test_loss', 'test_top1', 'lr')


@pytest.fixture(scope='module')
def fashion_mnist(tmp_path_factory) -> str:
    """Fashion-MNIST's IDX files with 64 training and 32 test images: official splits, no validation split."""
    root = tmp_path_factory.mktemp('fashion_mnist')
    write_fashion_mnist(str(root), train=64, test=32)
    return str(root)


def official(data_dir: str) -> list:
    return [*TINY, '--dataset', 'fashion_mnist', '--data-dir', data_dir, *NO_VALIDATION]


def assert_same_weights(path: Path, expected: Path) -> None:
    weights, expected_weights = load_file(path), load_file(expected)
    assert weights.keys() == expected_weights.keys()
    for key in weights:
        assert torch.equal(weights[key], expected_weights[key]), (path, key)


# --- the data layer -------------------------------------------------------------------------------------------
def test_val_fraction_zero_keeps_the_whole_official_training_split(fashion_mnist):
    data = build_datasets('fashion_mnist', data_dir=fashion_mnist, protocol='official', val_fraction=0)
    assert data.sizes() == {'train': 64, 'val': 0, 'test': 32} and not data.has_validation
    assert data.train.indices == list(range(64)), 'every official training image, in the files\' order'
    carved = build_datasets('fashion_mnist', data_dir=fashion_mnist, protocol='official', val_fraction=0.25)
    assert carved.sizes() == {'train': 48, 'val': 16, 'test': 32} and carved.has_validation


def test_val_fraction_zero_is_refused_where_it_cannot_apply(tmp_path, capsys):
    # Digits has no official split: its seeded 70/15/15 split always holds out validation images.
    with pytest.raises(ValueError, match=r'digits has no official training and test splits.*70/15/15.*'
                                         r'Drop --val-fraction 0'):
        build_datasets('digits', protocol='official', val_fraction=0)
    # An official validation split is the dataset's own, which --val-fraction never changes; it is not dropped.
    folder = write_image_folder(str(tmp_path / 'split'), classes=3, size=16, splits={'train': 4, 'val': 2, 'test': 2})
    with pytest.raises(ValueError, match=r'has an official validation split \(6 images\).*Drop --val-fraction 0'):
        build_datasets('folder', data_dir=folder, protocol='official', val_fraction=0)
    with pytest.raises(ValueError, match="protocol 'paper' re-splits the data.*Pass --protocol official"):
        build_datasets('cifar100', protocol='paper', val_fraction=0)
    # At the command line: one line, before a run folder is made.
    assert train_cli.main([*NO_VALIDATION, '--output', str(tmp_path / 'runs')]) == 2
    message = capsys.readouterr().err
    assert message.count('\n') == 1 and "Dataset 'digits': digits has no official" in message
    assert not (tmp_path / 'runs').exists()


# --- runs -----------------------------------------------------------------------------------------------------
def test_a_run_without_validation_keeps_and_tests_the_last_epoch(fashion_mnist, tmp_path, no_plots, capsys):
    results = train([*official(fashion_mnist), '--epochs', '2', '--test-every-epoch'], tmp_path, 'last')
    run_dir = tmp_path / 'last'
    out = capsys.readouterr().out
    assert out.count('No validation split (--protocol official --val-fraction 0): no validation pass, no early '
                     'stopping') == 1
    assert results['selection'] == engine.LAST_EPOCH_WITHOUT_VALIDATION == 'last epoch (no validation split)'
    assert results['split_sizes'] == {'train': 64, 'val': 0, 'test': 32}
    assert (results['best_epoch'], results['epochs_run'], results['stopped_early']) == (2, 2, False)
    assert results['val_top1_best'] is None and results['train_val_gap'] is None
    assert results['test_last_epoch'] == dict({k: results[k] for k in results['test_last_epoch'] if k != 'epoch'},
                                              epoch=2), 'the headline figures are the last epoch\'s'
    rows = summary_rows(run_dir)
    assert list(rows[0]) == ['epoch', 'train_loss', 'train_top1', 'test_loss', 'test_top1', 'lr', 'epoch_time_s']
    assert float(rows[-1]['test_top1']) == pytest.approx(results['top1'], abs=1e-9)
    assert float(rows[-1]['test_loss']) == pytest.approx(results['nll'], rel=1e-6)
    assert float(rows[-1]['train_top1']) == results['train_top1_at_best']
    # model_best.safetensors is the last epoch's weights, and says so.
    assert_same_weights(run_dir / 'model_best.safetensors', run_dir / 'last' / 'model.safetensors')
    with safe_open(run_dir / 'model_best.safetensors', 'pt') as f:
        metadata = f.metadata()
    assert (metadata['epoch'], metadata['selection']) == ('2', 'last epoch (no validation split)')
    assert 'val_top1' not in metadata


@pytest.mark.slow
def test_a_run_without_validation_resumes_exactly(fashion_mnist, tmp_path, no_plots):
    # With the EMA (the weights a run validates, keeps and tests): without validation, the last epoch's EMA.
    argv = [*official(fashion_mnist), '--epochs', '2', '--model-ema', '--model-ema-warmup', '--test-every-epoch']
    train(argv, tmp_path, 'whole')
    whole = tmp_path / 'whole'
    assert_same_weights(whole / 'model_best.safetensors', whole / 'last' / 'ema.safetensors')

    # The same run stopped once epoch 1's checkpoint is taken, as Ctrl-C or a kill leaves it, then resumed.
    def stop_after_epoch_one(row):
        if row['epoch'] == 1:
            raise KeyboardInterrupt
    settings = parse_args([*argv, '--output', str(tmp_path), '--experiment', 'stopped'])
    with pytest.raises(engine.TrainingInterrupted, match='the state after epoch 1 is intact'):
        engine.train(settings, on_epoch_end=stop_after_epoch_one)
    AcceleratorState._reset_state(True)
    stopped = tmp_path / 'stopped'
    assert not (stopped / 'results.json').exists() and len(summary_rows(stopped)) == 1
    results = train(['--resume', str(stopped)], tmp_path, 'stopped')

    rows, expected_rows = summary_rows(stopped), summary_rows(whole)
    assert [row.keys() for row in rows] == [row.keys() for row in expected_rows]
    for row, expected in zip(rows, expected_rows):
        assert {k: row[k] for k in COMPARED if k in row} == {k: expected[k] for k in COMPARED if k in expected}
    for name in ('model_best.safetensors', 'last/model.safetensors', 'last/ema.safetensors'):
        assert_same_weights(stopped / name, whole / name)
    expected = json.loads((whole / 'results.json').read_text())
    assert (results['top1'], results['selection'], results['best_epoch']) == (
        expected['top1'], expected['selection'], expected['best_epoch'])


@pytest.mark.slow
def test_test_every_epoch_is_a_curve_that_changes_nothing(tmp_path, no_plots):
    # Digits with its validation split: the same run with and without the test curve trains and selects alike.
    argv = [*TINY, '--train-subset', '64', '--epochs', '2']
    plain = train(argv, tmp_path, 'plain')
    curve = train([*argv, '--test-every-epoch'], tmp_path, 'curve')
    rows, plain_rows = summary_rows(tmp_path / 'curve'), summary_rows(tmp_path / 'plain')
    assert list(rows[0]) == ['epoch', 'train_loss', 'train_top1', 'val_loss', 'val_top1', 'val_top5', 'val_f1_macro',
                             'test_loss', 'test_top1', 'lr', 'epoch_time_s']
    assert 'test_top1' not in plain_rows[0]
    for row, plain_row in zip(rows, plain_rows):
        assert {k: row[k] for k in plain_row if k != 'epoch_time_s'} == {
            k: v for k, v in plain_row.items() if k != 'epoch_time_s'}
    assert (curve['top1'], curve['best_epoch'], curve['selection']) == (
        plain['top1'], plain['best_epoch'], 'best validation top-1')
    assert_same_weights(tmp_path / 'curve' / 'last' / 'model.safetensors',
                        tmp_path / 'plain' / 'last' / 'model.safetensors')
    # The curve's last point is the last epoch's weights on the test split.
    assert float(rows[-1]['test_top1']) == pytest.approx(curve['test_last_epoch']['top1'], abs=1e-9)


@pytest.mark.slow
def test_a_run_without_validation_resumes_exactly_after_sigkill(fashion_mnist, tmp_path):
    # As tests/test_train.py's SIGKILL test, for a run without a validation split: train.py in fresh interpreters.
    env = dict(os.environ, OMP_NUM_THREADS='1')
    argv = [sys.executable, str(REPO / 'train.py'), *official(fashion_mnist), '--epochs', '3', '--test-every-epoch',
            '--output', str(tmp_path)]
    done = subprocess.run([*argv, '--experiment', 'whole'], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    process = subprocess.Popen([*argv, '--experiment', 'killed'], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    killed = tmp_path / 'killed'
    state_file = killed / 'last' / 'state.json'
    deadline = time.monotonic() + 600
    while not state_file.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL, stderr.decode()[-2000:]
    epochs_done = json.loads(state_file.read_text())['epochs_done']
    assert epochs_done < 3 and not (killed / 'results.json').exists()

    done = subprocess.run([sys.executable, str(REPO / 'train.py'), '--resume', str(killed)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    whole = tmp_path / 'whole'
    rows, expected_rows = summary_rows(killed), summary_rows(whole)
    assert [row['epoch'] for row in rows] == ['1', '2', '3']
    for row, expected in zip(rows, expected_rows):
        for key in COMPARED:
            if key in expected:
                assert float(row[key]) == pytest.approx(float(expected[key]), rel=1e-6, abs=1e-9), (key, row)
    for name in ('model_best.safetensors', 'last/model.safetensors'):
        weights, expected_weights = load_file(killed / name), load_file(whole / name)
        for key in weights:
            torch.testing.assert_close(weights[key], expected_weights[key], rtol=0, atol=1e-6)
    results, expected = (json.loads((d / 'results.json').read_text()) for d in (killed, whole))
    assert results['top1'] == pytest.approx(expected['top1'], abs=1e-9)
    assert results['selection'] == expected['selection'] == 'last epoch (no validation split)'
