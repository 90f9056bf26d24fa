"""The pieces under train.py: settings resolution, crash-safe checkpoint files, exact state restore, predict."""
import argparse
import json
import os
import platform
import random

import numpy as np
import pytest
import torch
import torch.nn as nn
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from torch.utils.data import DataLoader, TensorDataset

import timm
from safetensors.torch import save_file
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from timm_gradattn import checkpoint
from timm_gradattn.checkpoint import (
    WeightsError, find_last_checkpoint, load_scheduler_state_dict, load_training_state,
    load_weights, save_training_state, scheduler_state_dict,
)
from timm_gradattn.errors import UserError
from timm_gradattn.families import RECIPES
from timm_gradattn.settings import dataset_defaults, resolve_train_settings as parse_args
from timm_gradattn.cpu import keep_freed_memory
from timm_gradattn.files import atomic_write_text
from timm_gradattn.data import get_dataset_info
from timm_gradattn.loop import NonFiniteLossError, stop_unless_finite
from timm_gradattn.factory import _has_fused_kernel, create_ema as _create_ema, create_optimizer
from timm_gradattn.metrics import predict


@pytest.fixture
def accelerator():
    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(True)


def test_settings_precedence_recipe_then_yaml_then_flags(tmp_path):
    args = parse_args(['--recipe', 'paper'])
    assert (args.opt, args.lr, args.weight_decay, args.sched, args.decay_rate, args.patience_epochs, args.min_lr,
            args.patience, args.epochs, args.seed, args.smoothing) == ('adam', 1e-3, 1e-4, 'plateau', 0.2, 3, 1e-7,
                                                                      7, 100, 42, 0.0)
    assert args.decay_norm_and_bias, 'the paper decays every parameter (coupled L2 on all of them)'
    config = tmp_path / 'c.yaml'
    config.write_text('recipe: paper\nlr: 0.01\nepochs: 5\n')
    args = parse_args(['--config', str(config), '--epochs', '7'])
    assert (args.recipe, args.sched, args.lr, args.epochs) == ('paper', 'plateau', 0.01, 7)
    assert parse_args([]).recipe == 'default' and parse_args([]).epochs == RECIPES['default']['epochs']


def kept(settings):
    """The settings a run is made of, without where this command line took its precision from."""
    return {k: v for k, v in dict(vars(settings) if not isinstance(settings, dict) else settings).items()
            if k != 'mixed_precision_source'}


def test_saved_settings_load_back_unchanged(tmp_path):
    args = parse_args(['--recipe', 'paper', '--model-kwargs', 'embed_dim=64', 'channels=(8,16,32,64)',
                       '--no-decay-norm-and-bias', '--mixup', '0.2', '--experiment', 'x'])
    config = tmp_path / 'config.yaml'
    config.write_text(args.to_yaml())
    again = parse_args(['--config', str(config), '--experiment', 'x'])
    expected = dict(vars(args), config=str(config), model_kwargs=dict(embed_dim=64, channels=[8, 16, 32, 64]))
    assert kept(again) == kept(expected)


@pytest.mark.parametrize('argv', [['--recipe', 'cnntention', '--model', 'resnet20_cbam', '--dataset', 'cifar10'],
                                  ['--recipe', 'attention-shortcuts', '--model', 'asnet50_kv', '--dataset', 'cifar10']])
def test_saved_settings_of_a_per_model_recipe_load_back_unchanged(tmp_path, argv):
    # Milestones, mean/std lists and an epoch count left to --max-updates survive config.yaml.
    args = parse_args([*argv, '--experiment', 'x'])
    config = tmp_path / 'config.yaml'
    config.write_text(args.to_yaml())
    assert kept(parse_args(['--config', str(config), '--experiment', 'x'])) == kept(dict(vars(args), config=str(config)))
    (tmp_path / 'run').mkdir()
    (tmp_path / 'run' / 'config.yaml').write_text(args.to_yaml())
    with pytest.raises(UserError, match=r'val_fraction: 0.1 -> 0.2'):
        parse_args(['--resume', str(tmp_path / 'run'), '--val-fraction', '0.2'])


def test_resume_refuses_other_identity(tmp_path):
    (tmp_path / 'config.yaml').write_text(parse_args(['--img-size', '16']).to_yaml())
    with pytest.raises(UserError, match=r'img_size: 16 -> 24'):
        parse_args(['--resume', str(tmp_path), '--img-size', '24'])
    assert parse_args(['--resume', str(tmp_path), '--epochs', '30']).epochs == 30


def test_atomic_write_keeps_the_old_file_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / 'results.json'
    atomic_write_text(path, '{"top1": 1}')

    def crash(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(os, 'replace', crash)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(path, '{"top1": 2}')
    assert path.read_text() == '{"top1": 1}'


def _tiny_training(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 3))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        nn.functional.cross_entropy(model(torch.randn(6, 4)), torch.randint(0, 3, (6,))).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def _draws():
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_training_state_restores_weights_optimizer_generators_and_plateau(tmp_path, accelerator):
    model, optimizer = _tiny_training()
    with pytest.warns(FutureWarning):
        scheduler, _ = create_scheduler_v2(optimizer, 'plateau', num_epochs=10, patience_epochs=3, decay_rate=0.2)
    for epoch, metric in enumerate([50.0, 49.0, 48.0, 47.0], start=1):
        scheduler.step(epoch, metric)
    state = dict(model='tiny', epochs_done=3, scheduler=scheduler_state_dict(scheduler), summary_rows=[{'epoch': 1}])
    save_training_state(tmp_path, accelerator, model, optimizer, state)
    expected_draws = _draws()

    fresh, fresh_optimizer = _tiny_training(seed=1)
    with pytest.warns(FutureWarning):
        fresh_scheduler, _ = create_scheduler_v2(fresh_optimizer, 'plateau', num_epochs=10, patience_epochs=3,
                                                 decay_rate=0.2)
    loaded = load_training_state(find_last_checkpoint(tmp_path), accelerator, fresh, fresh_optimizer)
    load_scheduler_state_dict(fresh_scheduler, loaded['scheduler'])
    assert _draws() == expected_draws
    assert loaded['summary_rows'] == [{'epoch': 1}] and loaded['epochs_done'] == 3
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    assert torch.equal(fresh_optimizer.state_dict()['state'][0]['exp_avg'], optimizer.state_dict()['state'][0]['exp_avg'])
    # timm's own state_dict would drop this counter; the fourth bad epoch in a row (patience 3) decays the lr.
    assert fresh_scheduler.lr_scheduler.num_bad_epochs == 3
    fresh_scheduler.step(5, 46.0)
    assert fresh_optimizer.param_groups[0]['lr'] == pytest.approx(1e-2 * 0.2)


def test_checkpoint_swap_leaves_a_complete_checkpoint(tmp_path, accelerator):
    model, optimizer = _tiny_training()
    for epochs_done in (1, 2):
        save_training_state(tmp_path, accelerator, model, optimizer, dict(epochs_done=epochs_done))
    assert sorted(p.name for p in tmp_path.iterdir()) == ['last']
    # A crash between the two renames leaves last.prev (complete) and last.tmp (maybe incomplete).
    os.replace(tmp_path / 'last', tmp_path / 'last.prev')
    (tmp_path / 'last.tmp').mkdir()
    assert find_last_checkpoint(tmp_path) == tmp_path / 'last.prev'
    assert json.loads((tmp_path / 'last.prev' / 'state.json').read_text())['epochs_done'] == 2
    save_training_state(tmp_path, accelerator, model, optimizer, dict(epochs_done=3))
    assert find_last_checkpoint(tmp_path) == tmp_path / 'last'


def test_background_writes_save_what_was_taken_in_order(tmp_path, accelerator):
    model, optimizer = _tiny_training()
    writer = checkpoint.BackgroundWriter()
    save_training_state(tmp_path / 'sync', accelerator, model, optimizer, dict(epochs_done=1))
    save_training_state(tmp_path / 'async', accelerator, model, optimizer, dict(epochs_done=1), writer=writer)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():  # training goes on while the files are written: they hold what was taken
        for param in model.parameters():
            param.add_(1.0)
    writer.wait()
    for folder in ('sync', 'async'):
        fresh, fresh_optimizer = _tiny_training(seed=1)
        loaded = load_training_state(find_last_checkpoint(tmp_path / folder), accelerator, fresh, fresh_optimizer)
        assert loaded['epochs_done'] == 1
        for key, value in expected.items():
            assert torch.equal(fresh.state_dict()[key], value), (folder, key)
    order = []
    for index in range(5):
        writer.submit(order.append, index)
    writer.wait()
    assert order == list(range(5))
    writer.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):  # a failed write is not lost
        writer.wait()
    writer.close()
    synchronous = checkpoint.BackgroundWriter(enabled=False)
    synchronous.submit(order.append, 5)
    assert order[-1] == 5  # written before submit returned


def test_dataset_defaults_fill_only_what_was_not_given():
    assert get_dataset_info('digits').batch_size == 64 and get_dataset_info('cifar10').batch_size == 128
    resolved = parse_args([])
    assert (resolved.batch_size, resolved.workers) == (64, 0), "digits: its paper batch, in memory"
    unset = argparse.Namespace(dataset='cifar10', batch_size=None, workers=None)
    assert dataset_defaults(unset) == dict(batch_size=128, workers=2) and unset.batch_size is None, 'args unchanged'
    assert dataset_defaults(argparse.Namespace(dataset='CIFAR-10', batch_size=None, workers=None))['batch_size'] == 128
    # An image folder's workers are decided once it is read (0 when its images fit in memory).
    assert dataset_defaults(argparse.Namespace(dataset='folder', batch_size=None, workers=None))['workers'] is None
    given = parse_args(['-b', '32', '-j', '3'])
    assert (given.batch_size, given.workers) == (32, 3)


def test_load_weights_names_the_mismatch(tmp_path):
    save_file({'weight': torch.zeros(2, 2)}, str(tmp_path / 'w.safetensors'), metadata={'model': 'other_net'})
    with pytest.raises(ValueError, match=r"saved from other_net.*1 missing \(e.g. \['bias'\]\); 1 of another shape"):
        load_weights(nn.Linear(3, 2), tmp_path / 'w.safetensors')


def test_load_weights_names_a_damaged_file(tmp_path):
    (tmp_path / 'w.pth').write_bytes(b'pickled')
    with pytest.raises(UserError, match=r'--checkpoint .*w.pth cannot be read as weights'):
        load_weights(nn.Linear(3, 2), tmp_path / 'w.pth', what='--checkpoint')
    save_file(nn.Linear(3, 2).state_dict(), str(tmp_path / 'w.safetensors'))
    (tmp_path / 'cut.safetensors').write_bytes((tmp_path / 'w.safetensors').read_bytes()[:-8])
    with pytest.raises(WeightsError, match='cut.safetensors cannot be read as weights') as error:
        load_weights(nn.Linear(3, 2), tmp_path / 'cut.safetensors')
    assert '\n' not in str(error.value)
    with pytest.raises(WeightsError, match=r'missing.safetensors does not exist\.$'):
        load_weights(nn.Linear(3, 2), tmp_path / 'missing.safetensors')


def test_load_weights_maps_old_names_and_can_keep_a_new_head(tmp_path, monkeypatch):
    source = timm.create_model('resnet18', num_classes=10, in_chans=1)
    old_names = {k.replace('layer1.', 'old_layer1.'): v for k, v in source.state_dict().items()}
    save_file(old_names, str(tmp_path / 'old.safetensors'))
    with pytest.raises(WeightsError, match='does not fit'):
        load_weights(timm.create_model('resnet18', num_classes=10, in_chans=1), tmp_path / 'old.safetensors')
    # Every path (evaluate, --initial-checkpoint, --resume, publish) goes through the zoo's filter.
    monkeypatch.setattr(checkpoint, 'checkpoint_filter_fn',
                        lambda state, model: {k.replace('old_layer1.', 'layer1.'): v for k, v in state.items()})
    target = timm.create_model('resnet18', num_classes=3, in_chans=1)
    fresh_head = target.fc.weight.detach().clone()
    with pytest.raises(WeightsError, match=r"1 of another shape|2 of another shape"):
        load_weights(target, tmp_path / 'old.safetensors')
    load_weights(target, tmp_path / 'old.safetensors', new_head=True)
    assert torch.equal(target.layer1[0].conv1.weight, source.layer1[0].conv1.weight)
    assert torch.equal(target.fc.weight, fresh_head), 'a classifier of another size stays as initialised'


@pytest.mark.parametrize('recipe, pos_embed_decay', [('default', 0.0), ('paper', 1e-4)])
def test_paper_recipe_decays_every_parameter(recipe, pos_embed_decay):
    model = timm.create_model('gradattn_resnet18_lpe', num_classes=10, in_chans=1)
    optimizer = create_optimizer(parse_args(['--recipe', recipe]), model, torch.device('cpu'))
    decay = {id(p): group['weight_decay'] for group in optimizer.param_groups for p in group['params']}
    assert len(decay) == len(list(model.parameters()))
    assert decay[id(model.pos_embed)] == pos_embed_decay
    biases = [p for name, p in model.named_parameters() if name.endswith('.bias')]
    assert {decay[id(p)] for p in biases} == {pos_embed_decay}, 'biases follow pos_embed'
    assert decay[id(model.get_classifier().weight)] == 1e-4


def test_predict_returns_every_sample_once(accelerator):
    images, targets = torch.randn(11, 4), torch.arange(11) % 3
    model = nn.Linear(4, 3)
    loader = accelerator.prepare(DataLoader(TensorDataset(images, targets), batch_size=4))
    logits, gathered = predict(accelerator.prepare(model), loader, accelerator)
    assert logits.shape == (11, 3) and torch.equal(gathered, targets)
    torch.testing.assert_close(logits, model(images).detach())


@pytest.mark.parametrize('opt', ['adam', 'adamw', 'sgd'])
def test_fused_optimizer_takes_the_same_steps_as_the_loop(opt):
    torch.manual_seed(0)
    # No BatchNorm after a biased layer: that bias gets a zero gradient up to rounding, which Adam scales to
    # full steps of arbitrary sign.
    models = [nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    optimizers = [create_optimizer(parse_args(['--opt', opt, '--lr', '0.01', *flag]), model, torch.device('cpu'))
                  for model, flag in zip(models, ([], ['--no-fused-opt']))]
    assert optimizers[0].defaults['fused'] and not optimizers[1].defaults['fused']
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    for _ in range(5):
        for model, optimizer in zip(models, optimizers):
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    for fused, loop in zip(models[0].parameters(), models[1].parameters()):
        assert torch.allclose(fused, loop, atol=1e-6)


def test_optimizers_without_a_fused_kernel_are_built_as_before():
    model = nn.Linear(4, 2)
    for opt in ('lamb', 'nadam', 'lookahead_adam'):
        optimizer = create_optimizer(parse_args(['--opt', opt]), model, torch.device('cpu'))
        assert not optimizer.defaults.get('fused')
    assert not _has_fused_kernel('adam', torch.device('meta'))
    with pytest.raises(UserError, match="Cannot create optimizer --opt 'adamm'"):
        create_optimizer(parse_args(['--opt', 'adamm']), model, torch.device('cpu'))


@pytest.mark.skipif(platform.libc_ver()[0] != 'glibc', reason='glibc malloc settings')
def test_keep_freed_memory_sets_glibc_malloc():
    assert keep_freed_memory() is True


def test_help_lists_every_flag_with_its_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(['--help'])
    assert exit_info.value.code == 0
    text = ' '.join(capsys.readouterr().out.split())  # argparse wraps lines at the terminal width
    assert text.startswith('usage: train.py') and '--fused-opt, --no-fused-opt' in text
    assert "'official': the dataset's own splits (default: paper)" in text, '--protocol shows its default'


def test_model_ema_warmup_lets_the_average_follow_the_first_updates():
    model = nn.Linear(4, 2)
    assert _create_ema(parse_args([]), model) is None
    plain = _create_ema(parse_args(['--model-ema', '--model-ema-decay', '0.998']), model)
    warm = _create_ema(parse_args(['--model-ema', '--model-ema-decay', '0.998', '--model-ema-warmup']), model)
    assert plain.get_decay(2) == 0.998
    assert warm.get_decay(2) == pytest.approx(1 - 2 ** (-2 / 3)) and warm.get_decay(10 ** 9) == 0.998
    with torch.no_grad():
        model.weight.add_(1.0)
    plain.update(model, step=2)
    warm.update(model, step=2)
    moved = [(ema.module.weight - model.weight).abs().max().item() for ema in (plain, warm)]
    assert moved[1] < 0.4 < moved[0] < 1.0, moved


def test_an_epoch_with_non_finite_weights_is_neither_validated_nor_saved(accelerator):
    model, ema_source = nn.Linear(4, 2), nn.Linear(4, 2)
    stop_unless_finite(0, model, None, accelerator)  # finite: nothing happens
    ema = ModelEmaV3(ema_source)
    with torch.no_grad():
        ema.module.bias[0] = float('inf')
    with pytest.raises(NonFiniteLossError, match=r'during epoch 3: .*the state after epoch 2 is kept'):
        stop_unless_finite(2, model, ema, accelerator)
    with torch.no_grad():
        model.weight[0, 0] = float('nan')
    with pytest.raises(NonFiniteLossError, match='no epoch had finished.*Lower --lr'):
        stop_unless_finite(0, model, None, accelerator)
