"""Bad input to train.py: each mistake is reported as one message naming the problem and the fix, with a
non-zero exit code and no traceback, before any training starts (and before a run folder is made)."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from data_fixtures import write_image_folder
from train_runs import REPO, train_cli

TINY = ['--model-kwargs', 'channels=(16,32,64,128)', 'embed_dim=64', 'mlp_dim=128', 'num_heads=4',
        '--img-size', '16', '--epochs', '1']


def fails(argv, output: Path, capsys) -> str:
    """Run train.py's main in-process; assert a user error (exit code 2) and return its message."""
    assert train_cli.main([*argv, '--output', str(output)]) == 2
    message = capsys.readouterr().err
    assert message.startswith('train.py: error: ') and 'Traceback' not in message
    return message


def test_user_error_exits_without_traceback(tmp_path):
    done = subprocess.run([sys.executable, 'train.py', '--model', 'resnet18x', '--output', str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and 'Traceback' not in done.stderr
    assert "Unknown model 'resnet18x'" in done.stderr and 'resnet18' in done.stderr
    assert not any(tmp_path.iterdir())


def test_unknown_model_suggests_names(tmp_path, capsys):
    message = fails(['--model', 'gradattn_resnet18_ropee'], tmp_path, capsys)
    assert 'Did you mean gradattn_resnet18_rope' in message
    assert not any(tmp_path.iterdir()), 'no run folder for a run that never started'


def test_unknown_dataset(tmp_path, capsys):
    message = fails(['--dataset', 'imagenet-42'], tmp_path, capsys)
    assert 'imagenet-42' in message and 'digits' in message


def test_missing_data_path(tmp_path, capsys):
    assert '--data-dir' in fails(['--dataset', 'folder'], tmp_path, capsys)
    missing = tmp_path / 'no_such_folder'
    assert str(missing) in fails(['--dataset', 'folder', '--data-dir', str(missing)], tmp_path, capsys)


def test_folder_with_one_class(tmp_path, capsys):
    folder = write_image_folder(str(tmp_path / 'one'), classes=1, per_class=10, size=16)
    assert 'at least 2' in fails(['--dataset', 'folder', '--data-dir', folder], tmp_path, capsys)


def test_folder_with_too_few_images_to_split(tmp_path, capsys):
    # Two images a class cannot be in train, val and test: split by class, one of them would miss the class.
    folder = write_image_folder(str(tmp_path / 'few'), classes=2, per_class=2, size=16)
    message = fails(['--dataset', 'folder', '--data-dir', folder], tmp_path, capsys)
    assert "Class 'class_0' has 2 images, too few to be in each of the train, val and test splits" in message
    assert 'Add images to it (at least 3)' in message


def test_unreadable_image(tmp_path, capsys):
    folder = write_image_folder(str(tmp_path / 'broken'), classes=3, per_class=6, size=16)
    bad = Path(folder) / 'class_1' / 'class_1_999.png'
    bad.write_bytes(b'\x89PNG\r\n\x1a\n' + b'not really a png' * 4)
    message = fails(['--dataset', 'folder', '--data-dir', folder, '--workers', '0', *TINY], tmp_path / 'out', capsys)
    assert str(bad) in message


def test_unsupported_in_chans(tmp_path, capsys):
    assert '--in-chans 1 or 3' in fails(['--in-chans', '2'], tmp_path, capsys)


def test_initial_checkpoint_not_weights(tmp_path, capsys):
    path = tmp_path / 'weights.pth'
    path.write_bytes(b'definitely not a checkpoint')
    assert 'cannot be read as weights' in fails(['--initial-checkpoint', str(path)], tmp_path / 'out', capsys)


def test_existing_run_folder_is_never_overwritten(tmp_path, capsys):
    run_dir = tmp_path / 'mine'
    run_dir.mkdir()
    (run_dir / 'summary.csv').write_text('epoch\n1\n')
    message = fails(['--experiment', 'mine'], tmp_path, capsys)
    assert 'never overwritten' in message and f'--resume {run_dir}' in message
    assert (run_dir / 'summary.csv').read_text() == 'epoch\n1\n'


def test_resume_folder_of_another_model(tmp_path, capsys):
    run_dir = tmp_path / 'se_run'
    run_dir.mkdir()
    (run_dir / 'config.yaml').write_text(yaml.safe_dump(dict(model='resnet18_se', dataset='digits', seed=42)))
    message = fails(['--resume', str(run_dir), '--model', 'gradattn_resnet18_rope'], tmp_path, capsys)
    assert "model: 'resnet18_se' -> 'gradattn_resnet18_rope'" in message


def test_resume_checkpoint_that_does_not_fit(tmp_path, capsys):
    # config.yaml says one architecture, the checkpoint holds another (e.g. files copied between runs).
    run_dir = tmp_path / 'mixed'
    (run_dir / 'last').mkdir(parents=True)
    (run_dir / 'config.yaml').write_text(yaml.safe_dump(dict(model='gradattn_resnet18_rope', epochs=1, img_size=16,
                                                             model_kwargs=dict(channels=[16, 32, 64, 128], embed_dim=64,
                                                                               mlp_dim=128, num_heads=4))))
    save_file({'fc.weight': torch.zeros(10, 512)}, str(run_dir / 'last' / 'model.safetensors'),
              metadata={'model': 'resnet18'})
    (run_dir / 'last' / 'state.json').write_text('{"epochs_done": 1}')
    message = fails(['--resume', str(run_dir)], tmp_path, capsys)
    assert 'saved from resnet18' in message and 'does not fit' in message


def test_resume_without_a_run(tmp_path, capsys):
    assert 'no config.yaml' in fails(['--resume', str(tmp_path / 'nothing')], tmp_path, capsys)


def test_config_with_unknown_setting(tmp_path, capsys):
    config = tmp_path / 'bad.yaml'
    config.write_text('learning_rate: 0.1\n')
    assert "unknown settings ['learning_rate']" in fails(['--config', str(config)], tmp_path, capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason='fp16 is valid with a GPU')
def test_fp16_without_gpu(tmp_path, capsys):
    assert 'bf16' in fails(['--mixed-precision', 'fp16'], tmp_path, capsys)


def test_unknown_optimizer_and_scheduler(tmp_path, capsys):
    assert 'adamx' in fails([*TINY, '--opt', 'adamx'], tmp_path, capsys)
    assert 'cosine' in fails([*TINY, '--sched', 'cosinus'], tmp_path, capsys)


def test_unknown_compile_backend(tmp_path, capsys):
    message = fails(['--torchcompile', 'inductorr'], tmp_path, capsys)
    assert "--torchcompile 'inductorr'" in message and 'inductor' in message
    assert not any(tmp_path.iterdir())


def test_eight_pixel_images_train(tmp_path, capsys):
    # No size minimum: at 8 px GradAttn's deepest maps are 1x1, which batches of 64 train on.
    argv = [*TINY, '--img-size', '8', '--batch-size', '64', '--train-subset', '64', '--experiment', 'eight']
    assert train_cli.main([*argv, '--output', str(tmp_path)]) == 0
    assert (tmp_path / 'eight' / 'results.json').is_file()


def test_resume_with_other_optimizer_groups_names_the_flags(tmp_path, capsys):
    # The weights fit; the optimizer state was made with other parameter groups (weight decay on 1-D parameters).
    common = ['--model', 'resnet20', '--img-size', '16', '--train-subset', '32', '--workers', '0']
    assert train_cli.main([*common, '--epochs', '1', '--output', str(tmp_path), '--experiment', 'run']) == 0
    capsys.readouterr()
    message = fails(['--resume', str(tmp_path / 'run'), '--epochs', '2', '--decay-norm-and-bias'], tmp_path, capsys)
    assert 'optimizer state does not fit' in message and '--decay-norm-and-bias' in message
    assert 'config.yaml' in message and '--model the run was trained with' not in message
    assert (tmp_path / 'run' / 'last' / 'optimizer.pt').is_file()  # nothing of the run was lost


@pytest.mark.parametrize('argv, names, fix', [
    (['--val-fraction', '0'], '--protocol paper pools the official splits', 'Add --protocol official'),
    (['--protocol', 'official', '--val-fraction', '0', '--sched', 'plateau'], '--sched plateau lowers the rate',
     'e.g. --sched cosine'),
    (['--protocol', 'official', '--val-fraction', '0', '--patience', '3'], '--patience 3 stops early',
     'pass --patience 0'),
    (['--recipe', 'paper', '--protocol', 'official', '--val-fraction', '0'],
     '--sched plateau (from --recipe paper) lowers the rate when validation top-1 stops improving and --patience 7 '
     '(from --recipe paper)', 'pass --patience 0'),
], ids=['protocol-paper', 'plateau', 'patience', 'recipe-paper'])
def test_no_validation_split_refuses_what_needs_one(argv, names, fix, tmp_path, capsys):
    # --val-fraction 0 leaves no validation split: a protocol that re-splits, a schedule on validation top-1 and
    # early stopping are each one line, naming the fix and the other way out, before any data or run folder.
    message = fails(argv, tmp_path, capsys)
    assert message.count('\n') == 1 and names in message and fix in message, message
    assert 'or pass a --val-fraction above 0' in message
    assert not any(tmp_path.iterdir())
