"""A folder of a few dozen images, trained as a new user trains it: every class in every split (the splits are in
test_data_folder.py), a batch no larger than the training set, and only the top-k accuracies that say something."""
import argparse

import pytest
import yaml

from data_fixtures import write_image_folder
from train_runs import summary_rows, train
from timm_gradattn import factory
from timm_gradattn.errors import UserError

TINY = ['--model', 'resnet20', '--img-size', '16', '--workers', '0', '--epochs', '1']


class Processes:
    """What ``check_batch_size`` asks of an Accelerator: the number of processes, and a print for its line."""

    def __init__(self, num_processes: int):
        self.num_processes = num_processes
        self.lines = []

    def print(self, line: str) -> None:
        self.lines.append(line)


@pytest.mark.parametrize('batch, processes, mixup, fitted, suggested', [
    (128, 1, 0.0, 42, 10),   # a folder's default batch, 42 training images: one batch of them all
    (32, 1, 0.0, 32, None),  # fits: as given
    (42, 1, 0.0, 42, None),
    (128, 2, 0.0, 42, 10),   # the global batch, 21 a process
    (128, 4, 0.0, 40, 8),    # a multiple of the processes
    (128, 4, 0.2, 40, 8),    # ... in even halves for Mixup
    (128, 8, 0.2, 32, 16),
])
def test_the_batch_never_exceeds_the_training_set(batch, processes, mixup, fitted, suggested):
    args = argparse.Namespace(batch_size=batch, mixup=mixup)
    accelerator = Processes(processes)
    assert factory.check_batch_size(args, accelerator, train_images=42) == fitted // processes
    assert args.batch_size == fitted  # the settings config.yaml records
    assert accelerator.lines == ([] if suggested is None else [
        f'--batch-size {batch} is more than the 42 training images: batch {fitted} (pass a smaller --batch-size, '
        f'e.g. {suggested}, for more than one update an epoch).'])


def test_a_batch_that_does_not_split_over_the_processes_is_still_refused():
    with pytest.raises(UserError, match='--batch-size 30 is the global batch and must split evenly over 4'):
        factory.check_batch_size(argparse.Namespace(batch_size=30, mixup=0.0), Processes(4), train_images=42)


def test_a_small_folder_trains_on_a_batch_it_has_and_reports_the_top_k_that_inform(tmp_path, capsys, no_plots):
    # 60 images of 3 classes: 42 / 9 / 9 by class. The folder's default batch, 128, is one batch of the 42.
    folder = write_image_folder(str(tmp_path / 'shapes'), classes=3, per_class=20, size=16,
                                class_names=['circles', 'squares', 'triangles'])
    run_dir = tmp_path / 'runs' / 'shapes'
    results = train(['--data-dir', folder, *TINY], tmp_path / 'runs', 'shapes')
    printed = capsys.readouterr().out
    assert ('--batch-size 128 is more than the 42 training images: batch 42 (pass a smaller --batch-size, e.g. 10, '
            'for more than one update an epoch).') in printed
    assert 'shapes: 60 images split 70/15/15 by class into train / val / test (seed 42): 42 / 9 / 9.' in printed
    assert results['split_sizes'] == {'train': 42, 'val': 9, 'test': 9} and results['num_updates'] == 1
    assert yaml.safe_load((run_dir / 'config.yaml').read_text())['batch_size'] == 42
    # Top-3 and top-5 of 3 classes are 100 % whatever the model does: None in results.json, a blank summary.csv
    # cell, and not printed.
    assert results['top1'] is not None and (results['top3'], results['top5']) == (None, None)
    assert results['test_last_epoch']['top5'] is None and summary_rows(run_dir)[0]['val_top5'] == ''
    closing = next(line for line in printed.splitlines() if line.startswith('Test top-1'))
    assert 'top-5' not in closing and 'F1 (macro)' in closing

    # A resume trains on with the batch the run used, from its config.yaml: no second line, one update an epoch.
    results = train(['--resume', str(run_dir), '--epochs', '2'], tmp_path / 'runs', 'shapes')
    printed = capsys.readouterr().out
    assert 'Resuming' in printed and 'is more than the 42 training images' not in printed
    assert 'batch 42 (42 per process)' in printed
    assert results['epochs_run'] == 2 and results['num_updates'] == 2
    assert yaml.safe_load((run_dir / 'config.yaml').read_text())['batch_size'] == 42
