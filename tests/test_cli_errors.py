"""The command lines as a user meets them: the real ``train.py`` and ``python -m timm_gradattn.evaluate`` in a
subprocess. A mistake ends in one last line that names the problem and the fix, exit code 2, no traceback, and
before any training or evaluation starts; what timm users mean (a data folder alone, ``--input-size``) is done.
The cheaper checks behind these (settings, weight files) are tested in-process below them."""
import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

import timm
from data_fixtures import write_image_folder
from timm_gradattn import factory
from timm_gradattn.checkpoint import WeightsError, load_weights
from timm_gradattn.errors import UserError
from timm_gradattn.settings import resolve_train_settings as parse_args

REPO = Path(__file__).resolve().parents[1]
TINY_GRADATTN = dict(channels=(16, 32, 64, 128), embed_dim=64, mlp_dim=128, num_heads=4)


def last_line(command, tmp_path, cwd=REPO) -> str:
    """Run a command line; assert it was refused as a user error and return its last line of output."""
    done = subprocess.run([sys.executable, *command], cwd=cwd, capture_output=True, text=True, timeout=120)
    output = (done.stdout + done.stderr).strip()
    assert done.returncode == 2, output
    assert 'Traceback' not in output and 'usage:' not in output, output
    assert not (tmp_path / 'out').exists() or not any((tmp_path / 'out').iterdir()), 'no run folder was made'
    return output.splitlines()[-1]


def train(*argv, tmp_path):
    return last_line(['train.py', *argv, '--output', str(tmp_path / 'out')], tmp_path)


def evaluate(*argv, tmp_path):
    return last_line(['-m', 'timm_gradattn.evaluate', *argv, '--output', str(tmp_path / 'out')], tmp_path)


# --- train.py -------------------------------------------------------------------------------------------------
def test_data_dir_alone_is_an_image_folder(tmp_path):
    # As in timm: the folder is read as images, one sub-folder per class (here one, which is then refused).
    folder = write_image_folder(str(tmp_path / 'my_images'), classes=1, per_class=4, size=8)
    done = subprocess.run([sys.executable, 'train.py', '--data-dir', folder, '--output', str(tmp_path / 'out')],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and 'Traceback' not in done.stderr
    assert "without --dataset: training on it as an image folder (--dataset folder)" in done.stderr
    assert "Dataset 'folder'" in done.stderr and 'at least 2' in done.stderr.strip().splitlines()[-1]


def test_data_dir_with_a_named_dataset_keeps_it(tmp_path):
    assert parse_args(['--data-dir', str(tmp_path)]).dataset == 'folder'
    assert parse_args(['--dataset', 'digits', '--data-dir', str(tmp_path)]).dataset == 'digits'
    config = tmp_path / 'c.yaml'
    config.write_text('dataset: cifar10\n')
    assert parse_args(['--config', str(config), '--data-dir', str(tmp_path)]).dataset == 'cifar10'


def test_input_size_is_timms_channels_and_side():
    args = parse_args(['--input-size', '3', '24', '24'])
    assert (args.in_chans, args.img_size) == (3, 24) and not hasattr(args, 'input_size')
    with pytest.raises(UserError, match='--input-size 1 32 32 and --img-size 16 disagree'):
        parse_args(['--input-size', '1', '32', '32', '--img-size', '16'])


@pytest.mark.slow
def test_a_non_square_input_size_is_one_line(tmp_path):
    assert 'H must equal W' in train('--input-size', '3', '32', '48', tmp_path=tmp_path)


def test_unknown_pretrained_tag_lists_the_known_ones(tmp_path):
    line = train('--model', 'gradattn_resnet18_rope.imagenet', '--pretrained', tmp_path=tmp_path)
    assert "no pretrained tag 'imagenet'" in line
    assert 'cifar10' in line and 'digits' in line and '--model gradattn_resnet18_rope.' in line


def test_a_batch_the_model_cannot_train_on_is_refused_before_training(tmp_path):
    # 8 px: GradAttn's deepest maps are 1x1, so a batch of one image gives its BatchNorm one value per channel.
    line = train('--img-size', '8', '--batch-size', '1', tmp_path=tmp_path)
    assert 'cannot train on a batch of one 1x8x8 image' in line and '--batch-size' in line
    # 17 images in batches of 2: the last batch of every epoch is one image.
    with pytest.raises(UserError, match=r'last batch of each epoch holds 1 image.*--batch-size \(e\.g\. 3\)'):
        factory.check_model_computes(
            timm.create_model('gradattn_resnet18_rope', in_chans=1, num_classes=10, **TINY_GRADATTN),
            argparse.Namespace(model='gradattn_resnet18_rope', batch_size=2, mixup=0.0, freeze_backbone=False),
            argparse.Namespace(input_size=(1, 8, 8)), train_images=17, per_process_batch=2, processes=1)


def test_small_images_train_when_the_model_computes(tmp_path):
    # No artificial minimum: 8 px through a 32x-reducing ResNet is 1x1 maps, fine with batches of 2 or more.
    model = timm.create_model('gradattn_resnet18_rope', in_chans=1, num_classes=10, **TINY_GRADATTN)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    factory.check_model_computes(
        model, argparse.Namespace(model='gradattn_resnet18_rope', batch_size=64, mixup=0.0, freeze_backbone=False),
        argparse.Namespace(input_size=(1, 8, 8)), train_images=1257, per_process_batch=64, processes=1)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), 'statistics left as they were'
    assert torch.equal(torch.get_rng_state(), rng)
    loss = nn.functional.cross_entropy(model.train()(torch.randn(64, 1, 8, 8)), torch.arange(64) % 10)
    loss.backward()
    assert torch.isfinite(loss)


def test_unknown_flags_get_what_to_use_instead(tmp_path):
    line = train('--crop-pct', '0.9', '--fuser', 'te', tmp_path=tmp_path)
    assert '--crop-pct is not a flag of train.py' in line and 'centre crop' in line and 'TorchScript fusers' in line
    assert line.endswith('`train.py --help` lists every flag.')
    assert 'did you mean --lr' in train('--lrr', '0.1', tmp_path=tmp_path)


@pytest.mark.parametrize('argv, expected', [
    (['--aa', 'rand-m9'], '--train-augment'),
    (['--bn-momentum', '0.1'], '--model-kwargs'),
    (['--checkpoint-hist', '3'], 'resumable last/ folder'),
    (['--start-epoch', '5'], '--resume RUN_DIR'),
    (['--log-wandb'], 'summary.csv'),
    (['--fuser', 'te'], 'drop the flag'),
    (['--checkpoint', 'x.pth'], '--initial-checkpoint'),
    (['my_images/'], 'a data folder is --data-dir my_images/'),
    (['--epochs', 'ten'], "--epochs must be a whole number, got 'ten'"),
])
def test_flags_timm_users_type(argv, expected):
    with pytest.raises(UserError, match='.*' + expected.replace('(', r'\(').replace('.', r'\.')) as error:
        parse_args(argv)
    assert '\n' not in str(error.value)


def test_timm_dataset_download_flag_is_honoured():
    assert parse_args(['--dataset-download']).download is True


def test_paths_that_cannot_work(tmp_path):
    a_file = tmp_path / 'a_file'
    a_file.write_text('x')
    assert f'--output {a_file} is a file' in last_line(['train.py', '--output', str(a_file)], tmp_path)
    assert f'--data-dir {a_file} is a file' in train('--dataset', 'folder', '--data-dir', str(a_file),
                                                     tmp_path=tmp_path)
    assert '--initial-checkpoint' in train('--resume', str(a_file), tmp_path=tmp_path)
    assert 'is a folder; pass the weights file' in train('--initial-checkpoint', str(tmp_path), tmp_path=tmp_path)


def test_unwritable_output_is_refused(tmp_path, monkeypatch):
    # Emulated: tests may run as root, for whom chmod 000 changes nothing.
    monkeypatch.setattr(os, 'access', lambda path, mode: Path(path) != tmp_path)
    with pytest.raises(UserError, match=f'--output {tmp_path}/runs: {tmp_path} is not writable'):
        parse_args(['--output', str(tmp_path / 'runs')])


def test_config_files_that_cannot_work(tmp_path):
    broken = tmp_path / 'broken.yaml'
    broken.write_text('model: [a\n  b: c\n')
    assert 'cannot be read as YAML' in train('--config', str(broken), tmp_path=tmp_path)
    for text, expected in (('epochs: 1.5\n', 'epochs must be a whole number, got 1.5'),
                           ('lr: fast\n', "lr must be a number, got 'fast'"),
                           ('pretrained: maybe\n', "pretrained must be true or false, got 'maybe'"),
                           ('protocol: mine\n', 'protocol must be one of paper, official'),
                           ('mean: 0.5\n', 'mean must be a list')):
        (tmp_path / 'c.yaml').write_text(text)
        with pytest.raises(UserError, match=expected):
            parse_args(['--config', str(tmp_path / 'c.yaml')])
    with pytest.raises(UserError, match='is a folder'):
        parse_args(['--config', str(tmp_path)])


@pytest.mark.parametrize('argv, expected', [
    (['--epochs', '0'], '--epochs must be at least 1'),
    (['-b', '0'], '--batch-size must be at least 1'),
    (['--img-size', '0'], '--img-size must be at least 1'),
    (['--num-classes', '0'], '--num-classes must be at least 1'),
    (['--in-chans', '4'], '--in-chans 1 or 3'),
    (['-j', '-1'], '--workers must not be negative'),
    (['--lr', '-1'], '--lr must not be negative'),
    (['--seed', '-1'], '--seed must not be negative'),
    (['--min-lr', '-1'], '--min-lr must not be negative'),
    (['--warmup-epochs', '-2'], '--warmup-epochs must not be negative'),
    (['--clip-grad', '-1'], '--clip-grad must be positive'),
    (['--layer-decay', '0'], '--layer-decay must be positive'),
    (['--smoothing', '1'], r'--smoothing must be in \[0, 1\)'),
    (['--drop', '2'], r'--drop must be in \[0, 1\)'),
    (['--model-ema-decay', '2'], r'--model-ema-decay must be in \[0, 1\]'),
    (['--model-ema-warmup'], r'--model-ema-warmup warms up the weight average of --model-ema; add --model-ema'),
])
def test_numbers_out_of_range(argv, expected):
    with pytest.raises(UserError, match=expected):
        parse_args(argv)


# --- weights files ------------------------------------------------------------------------------------------------
@pytest.fixture
def torch_load_spy(monkeypatch):
    """Fail any torch.load that could unpickle arbitrary objects."""
    torch_load = torch.load

    def load(*args, **kwargs):
        assert kwargs.get('weights_only') is True, kwargs
        return torch_load(*args, **kwargs)
    monkeypatch.setattr(torch, 'load', load)


@pytest.mark.parametrize('wrap', [lambda s: s, lambda s: {'state_dict': s, 'epoch': 3, 'args': argparse.Namespace(a=1)},
                                  lambda s: {'model': s}])
def test_pth_state_dicts_load_as_tensors_only(tmp_path, torch_load_spy, wrap):
    source = nn.Linear(3, 2)
    torch.save(wrap(source.state_dict()), tmp_path / 'w.pth')
    target = nn.Linear(3, 2)
    assert load_weights(target, tmp_path / 'w.pth') == {}
    assert torch.equal(target.weight, source.weight)


def test_pth_with_objects_is_never_unpickled(tmp_path, torch_load_spy):
    torch.save(nn.Linear(3, 2), tmp_path / 'module.pth')  # a whole module: unpickling it would run its class's code
    with pytest.raises(WeightsError, match=r'non-tensor objects \(e\.g\. torch\.nn\.modules\.linear\.Linear\)'):
        load_weights(nn.Linear(3, 2), tmp_path / 'module.pth')
    torch.save({'epoch': 3}, tmp_path / 'no_weights.pth')
    with pytest.raises(WeightsError, match=r"holds no state dict .* keys \['epoch'\]"):
        load_weights(nn.Linear(3, 2), tmp_path / 'no_weights.pth')
    (tmp_path / 'cut.pth').write_bytes((tmp_path / 'module.pth').read_bytes()[:100])
    with pytest.raises(WeightsError, match='cannot be read as a PyTorch file'):
        load_weights(nn.Linear(3, 2), tmp_path / 'cut.pth')


def test_initial_checkpoint_pth_goes_through_the_zoo_filter(tmp_path, torch_load_spy, monkeypatch):
    from timm_gradattn import checkpoint
    source = nn.Linear(3, 2)
    torch.save({'state_dict': {f'old.{k}': v for k, v in source.state_dict().items()}}, tmp_path / 'ref.pth')
    monkeypatch.setattr(checkpoint, 'checkpoint_filter_fn', lambda state, model: {
        k.replace('old.', ''): v for k, v in state.items()})
    target = nn.Linear(3, 2)
    load_weights(target, tmp_path / 'ref.pth', what='--initial-checkpoint')
    assert torch.equal(target.bias, source.bias)


def test_pth_with_objects_is_one_line_at_the_command_line(tmp_path):
    torch.save({'model': nn.Linear(3, 2)}, tmp_path / 'notebook.pth')
    line = train('--initial-checkpoint', str(tmp_path / 'notebook.pth'), tmp_path=tmp_path)
    assert 'contains non-tensor objects' in line and 'weights_only=True' in line


# --- evaluate ---------------------------------------------------------------------------------------------------
def test_evaluate_truncated_safetensors_is_one_line(tmp_path):
    save_file(timm.create_model('resnet18', num_classes=10, in_chans=1).state_dict(), str(tmp_path / 'w.safetensors'))
    (tmp_path / 'cut.safetensors').write_bytes((tmp_path / 'w.safetensors').read_bytes()[:-1000])
    line = evaluate('--model', 'resnet18', '--dataset', 'digits', '--checkpoint', str(tmp_path / 'cut.safetensors'),
                    tmp_path=tmp_path)
    assert line.startswith('timm_gradattn.evaluate: error: --checkpoint') and 'damaged or truncated' in line


def test_evaluate_flags(tmp_path):
    line = evaluate('--model', 'resnet18', '--dataset', 'digits', '--crop-pct', '0.9', '--use-ema', tmp_path=tmp_path)
    assert '--crop-pct is not a flag' in line and '--use-ema is not a flag' in line and '--checkpoint' in line
    from timm_gradattn.evaluate import parse_args as evaluate_args
    args = evaluate_args(['--model', 'resnet18', '--data-dir', str(tmp_path), '--input-size', '3', '24', '24'])
    assert (args.dataset, args.in_chans, args.img_size) == ('folder', 3, 24)
    for argv, expected in ((['--dataset', 'digits', '-b', '0'], '--batch-size must be at least 1'),
                           (['--dataset', 'digits', '--in-chans', '2'], '--in-chans 1 or 3'),
                           (['--dataset', 'digits', '--checkpoint', str(tmp_path)], 'is a folder'),
                           (['--dataset', 'digits', '--model', 'resnet18.nope'], "no pretrained tag 'nope'"),
                           ([], '--dataset is required')):
        with pytest.raises(UserError, match=expected):
            evaluate_args(['--model', 'resnet18', *argv])
