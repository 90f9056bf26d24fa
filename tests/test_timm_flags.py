"""timm's train.py flags reach timm's factories with timm's meaning, are recorded in config.yaml, and Ctrl-C ends a
run in one line."""
import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import yaml
from timm.data import Mixup
from timm.loss import BinaryCrossEntropy, SoftTargetCrossEntropy

from timm_gradattn import factory, precision
from timm_gradattn.errors import UserError
from timm_gradattn.settings import resolve_train_settings

REPO = Path(__file__).resolve().parents[1]


def test_optimizer_flags_reach_timm():
    args = resolve_train_settings(['--opt', 'adamw', '--opt-eps', '1e-6', '--opt-betas', '0.8', '0.9',
                                   '--opt-kwargs', 'amsgrad=True', '--lr', '0.01'])
    group = factory.create_optimizer(args, nn.Linear(4, 2), torch.device('cpu')).param_groups[0]
    assert (group['eps'], group['betas'], group['amsgrad'], group['lr']) == (1e-6, (0.8, 0.9), True, 0.01)


def test_lr_base_scales_with_the_global_batch_unless_lr_is_given():
    assert resolve_train_settings(['--lr-base', '0.1', '-b', '64', '--opt', 'sgd']).lr == pytest.approx(0.025)
    assert resolve_train_settings(['--lr-base', '0.1', '-b', '64', '--opt', 'adam']).lr == pytest.approx(0.05)
    assert resolve_train_settings(['--lr-base', '0.1', '--lr', '0.3']).lr == 0.3


def test_scheduler_flags_reach_timm_and_set_the_run_length():
    args = resolve_train_settings(['--sched', 'cosine', '--epochs', '10', '--warmup-epochs', '2', '--warmup-lr',
                                   '1e-4', '--cooldown-epochs', '3', '--lr-k-decay', '0.5', '--lr', '0.1'])
    optimizer = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=args.lr)
    scheduler, epochs = factory.create_scheduler(args, optimizer, updates_per_epoch=5)
    assert epochs == 13, 'the cool-down is added, as timm does'
    assert optimizer.param_groups[0]['lr'] == pytest.approx(1e-4), 'warm-up starts at --warmup-lr'
    assert scheduler.k_decay == 0.5 and scheduler.warmup_lr_init == 1e-4
    noisy, _ = factory.create_scheduler(
        resolve_train_settings(['--lr-noise', '0.5', '--lr-noise-std', '0.3']), optimizer, 5)
    assert (noisy.noise_range_t, noisy.noise_std) == (6.0, 0.3), "noise from half of the default recipe's 12 epochs"


def test_cutmix_and_bce_flags_build_timms_mixing_and_loss():
    mixup_fn, loss_fn = factory.create_losses(resolve_train_settings(
        ['--cutmix', '1.0', '--mixup-prob', '0.5', '--mixup-mode', 'pair']), num_classes=10)
    assert isinstance(mixup_fn, Mixup) and isinstance(loss_fn, SoftTargetCrossEntropy)
    assert (mixup_fn.cutmix_alpha, mixup_fn.mix_prob, mixup_fn.mode) == (1.0, 0.5, 'pair')
    _, bce = factory.create_losses(resolve_train_settings(['--bce-loss', '--bce-target-thresh', '0.2']), 10)
    assert isinstance(bce, BinaryCrossEntropy) and bce.target_threshold == 0.2
    assert factory.create_losses(resolve_train_settings([]), 10)[0] is None


def test_model_flags_reach_create_model_and_the_head():
    args = resolve_train_settings(['--model', 'resnet18', '--drop-path', '0.1', '--gp', 'max', '--head-init-scale',
                                   '0', '--head-init-bias', '0.5', '--grad-checkpointing'])
    info = argparse.Namespace(num_classes=10, in_chans=1, img_size=32, input_size=(1, 32, 32))
    model = factory.create_model(args, info)
    assert model.layer4[-1].drop_path.drop_prob > 0 and model.global_pool.pool_type == 'max'
    assert model.grad_checkpointing
    assert torch.all(model.get_classifier().weight == 0) and torch.all(model.get_classifier().bias == 0.5)
    with pytest.raises(UserError, match="Cannot create 'gradattn_resnet18_rope'.*drop_path_rate"):
        factory.create_model(resolve_train_settings(['--drop-path', '0.1']), info)


@pytest.mark.parametrize('native', (None, 'the CPU has AVX512-BF16'))
def test_mixed_precision_precedence(monkeypatch, tmp_path, native):
    monkeypatch.delenv('ACCELERATE_MIXED_PRECISION', raising=False)
    monkeypatch.setattr(precision, 'native_bf16', lambda: native)
    default = resolve_train_settings([])
    assert default.mixed_precision == ('bf16' if native else 'no')  # bf16 by default only where it is native
    assert default.mixed_precision_source.startswith('default: ') and 'mixed_precision_source' not in default.to_yaml()
    assert resolve_train_settings(['--amp']).mixed_precision == ('fp16' if torch.cuda.is_available() else 'bf16')
    assert resolve_train_settings(['--amp', '--amp-dtype', 'bfloat16']).mixed_precision == 'bf16'
    assert resolve_train_settings(['--mixed-precision', 'no']).mixed_precision == 'no'
    with pytest.raises(UserError, match='disagree'):
        resolve_train_settings(['--mixed-precision', 'no', '--amp', '--amp-dtype', 'bfloat16'])
    monkeypatch.setenv('ACCELERATE_MIXED_PRECISION', 'bf16')
    assert resolve_train_settings([]).mixed_precision == 'bf16', 'accelerate launch --mixed_precision'
    assert resolve_train_settings(['--mixed-precision', 'no']).mixed_precision == 'no', 'the flag wins'
    monkeypatch.delenv('ACCELERATE_MIXED_PRECISION')
    run = tmp_path / 'run'
    run.mkdir()
    (run / 'config.yaml').write_text(resolve_train_settings(['--mixed-precision', 'bf16' if not native else 'no'])
                                     .to_yaml())
    resumed = resolve_train_settings(['--resume', str(run)])
    assert resumed.mixed_precision == ('bf16' if not native else 'no'), 'a resume keeps the run\'s precision'
    assert resumed.mixed_precision_source == f'the resumed run ({run / "config.yaml"})'


def test_timm_flags_are_recorded_in_config_yaml_and_read_back(tmp_path):
    args = resolve_train_settings(['--opt-betas', '0.8', '0.9', '--cooldown-epochs', '2', '--cutmix', '0.5',
                                   '--clip-grad', '1', '--clip-mode', 'agc', '--amp', '--no-aug', '--experiment', 'x'])
    saved = yaml.safe_load(args.to_yaml())
    assert (saved['opt_betas'], saved['cooldown_epochs'], saved['cutmix'], saved['clip_mode']) == (
        [0.8, 0.9], 2, 0.5, 'agc')
    assert saved['mixed_precision'] == 'bf16' and saved['train_augment'] == 'none'
    assert not {'amp', 'amp_dtype', 'no_aug', 'input_size', 'lr_base'} & set(saved), 'folded into other settings'
    (tmp_path / 'config.yaml').write_text(args.to_yaml())
    again = resolve_train_settings(['--config', str(tmp_path / 'config.yaml'), '--experiment', 'x'])
    del args.mixed_precision_source, again.mixed_precision_source  # where it came from: this command line only
    assert vars(again) == dict(vars(args), config=str(tmp_path / 'config.yaml'))


def test_pretrained_path_is_initial_checkpoint(tmp_path):
    (tmp_path / 'w.safetensors').write_bytes(b'')
    args = resolve_train_settings(['--pretrained-path', str(tmp_path / 'w.safetensors')])
    assert args.initial_checkpoint == str(tmp_path / 'w.safetensors')


@pytest.mark.slow
def test_ctrl_c_ends_in_one_line_with_the_resume_command(tmp_path):
    """SIGINT in the middle of a run: one line naming the kept epoch and the --resume command, exit code 130."""
    command = [sys.executable, str(REPO / 'train.py'), '--epochs', '50', '--train-subset', '64', '--batch-size', '8',
               '--model-kwargs', 'embed_dim=32', 'channels=(8,16,32,64)', '--output', str(tmp_path),
               '--experiment', 'run']
    # Unbuffered: each epoch's line reaches this test as it is printed, not when a pipe buffer fills or at exit.
    # SIGINT's default action restored in the child: a shell without job control starts background jobs (such as a
    # CI script run with &) with SIGINT ignored, and Python then leaves it ignored.
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                               env=dict(os.environ, PYTHONUNBUFFERED='1'),
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in process.stdout:  # wait for the first finished epoch
        if line.startswith('epoch 2/'):  # epoch 1's checkpoint is complete by then
            break
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, (line, out[-2000:], err[-2000:])
    lines = [line for line in err.strip().splitlines() if line.startswith('train.py')]
    assert len(lines) == 1 and 'Traceback' not in err, err
    assert f'python train.py --resume {tmp_path / "run"}' in lines[0] and 'state after epoch' in lines[0]
