"""The CNNtention and Attention Shortcuts recipes: what each resolves to per model and dataset, the schedules
they reach timm's scheduler as (epochs or updates), --max-updates, and the two test blocks of results.json.

The training runs are tiny (resnet20 on 64 digits at 16 px, in-process, plots skipped): they check the loop's
mechanics, which do not depend on the model or the data size.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from accelerate.state import AcceleratorState
from PIL import Image
from torch.utils.data import DataLoader

import timm
import timm_gradattn  # noqa: F401  registers the models
from timm_gradattn import engine, factory
from timm_gradattn.checkpoint import load_weights
from timm_gradattn.errors import UserError
from timm_gradattn.families import FAMILIES, RECIPES
from timm_gradattn.settings import recipe_settings, resolve_train_settings as parse_args

CNNTENTION_MODELS = FAMILIES['cnntention'].models
ATTENTION_SHORTCUTS_MODELS = FAMILIES['attention-shortcuts'].models
from timm_gradattn.data import build_datasets, datasets
from timm_gradattn.data.datasets import ArrayImageDataset, RawSplits
from timm_gradattn.data.info import DATASETS
from timm_gradattn.data.transforms import build_transform
from timm_gradattn.metrics import classification_metrics
from train_runs import summary_rows, train, train_cli

# 64 training digits in batches of 16: 4 updates an epoch.
TINY = ['--model', 'resnet20', '--img-size', '16', '--train-subset', '64', '-b', '16', '--log-interval', '1']
AUTHORS = {  # SEED_SYSTEMS.md A.6: optimiser, lr, weight decay and torch MultiStepLR milestones per model
    'resnet20': ('momentum', 0.1, 1e-4, [91, 136]),
    'resnet20_selfatt': ('adam', 5e-4, 1e-3, [91, 115]),
    'resnet20_mha': ('adam', 5e-4, 1e-3, [91, 115]),
    'resnet20_cbam': ('adam', 5e-3, 1e-4, [45, 91, 136]),
}


def optimizer_steps(run_dir: Path) -> int:
    state = torch.load(run_dir / 'last' / 'optimizer.pt', weights_only=True)['state']
    return int(state[0]['step'])  # Adam counts its updates per parameter


def lr_by_epoch(args, epochs):
    """The learning rate of each epoch (counted from 1) as the engine drives the scheduler."""
    optimizer = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=args.lr)
    scheduler, _ = factory.create_scheduler(args, optimizer, updates_per_epoch=10)
    rates = []
    for epoch in range(epochs):
        rates.append(optimizer.param_groups[0]['lr'])
        scheduler.step(epoch + 1)
    return rates


# --- what the recipes resolve to ------------------------------------------------------------------------------
@pytest.mark.parametrize('model', CNNTENTION_MODELS)
def test_cnntention_recipe_is_the_authors_per_model_recipe(model):
    args = parse_args(['--recipe', 'cnntention', '--model', f'{model}.cifar10', '--dataset', 'cifar10'])
    opt, lr, weight_decay, _ = AUTHORS[model]
    assert (args.opt, args.lr, args.weight_decay) == (opt, lr, weight_decay)
    assert (args.sched, args.decay_rate, args.epochs, args.batch_size, args.sched_on_updates) == (
        'multistep', 0.1, 182, 128, False)
    assert args.decay_norm_and_bias and args.warmup_epochs == 0 and args.smoothing == 0 and args.patience == 0
    assert (args.protocol, args.val_fraction) == ('official', 0.1)
    assert args.mean == [0.4918688, 0.4918598, 0.4918584] and args.std == [0.2469712, 0.2469677, 0.2469720]
    assert args.max_updates is None and args.momentum == 0.9
    sgd = parse_args(['--recipe', 'cnntention-sgd', '--model', model])
    assert (sgd.opt, sgd.lr, sgd.weight_decay, sgd.decay_milestones, sgd.epochs) == (
        'momentum', 0.1, 1e-4, [92, 137], 182), 'the controlled comparison: the baseline recipe for all four'


@pytest.mark.parametrize('model', CNNTENTION_MODELS)
def test_cnntention_milestones_give_the_authors_torch_schedule(model):
    # The authors' torch MultiStepLR steps after each epoch; timm's milestone m is the first epoch at the lower
    # rate. Every epoch of 182 must get the rate theirs got.
    args = parse_args(['--recipe', 'cnntention', '--model', model])
    *_, torch_milestones = AUTHORS[model]
    optimizer = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=args.lr)
    reference = torch.optim.lr_scheduler.MultiStepLR(optimizer, torch_milestones, gamma=0.1)
    expected = []
    for _ in range(182):
        expected.append(optimizer.param_groups[0]['lr'])
        optimizer.step()
        reference.step()
    assert lr_by_epoch(args, 182) == pytest.approx(expected, rel=1e-12)


def test_recipes_set_data_per_dataset():
    mnist = parse_args(['--recipe', 'cnntention', '--model', 'resnet20', '--dataset', 'MNIST'])
    assert (mnist.mean, mnist.std, mnist.train_augment) == ([0.0], [1.0], 'cnntention_mnist')
    digits = parse_args(['--recipe', 'cnntention', '--model', 'resnet20'])
    assert (digits.mean, digits.std, digits.train_augment) == (None, None, None), 'digits keeps its tag'
    shortcuts = parse_args(['--recipe', 'attention-shortcuts', '--model', 'resnet50_cifar', '--dataset', 'cifar10'])
    assert (shortcuts.mean, shortcuts.std) == ([0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616])
    assert DATASETS['cifar10'].std == (0.2023, 0.1994, 0.2010), 'the cifar10 tag GradAttn uses is unchanged'
    cifar100 = parse_args(['--recipe', 'attention-shortcuts', '--model', 'asnet50_out', '--dataset', 'cifar100'])
    assert cifar100.mean is None, "the cifar100 tag's statistics are already the training set's"


@pytest.mark.parametrize('model', ATTENTION_SHORTCUTS_MODELS)
def test_attention_shortcuts_recipe_counts_updates(model):
    args = parse_args(['--recipe', 'attention-shortcuts', '--model', model])
    assert (args.opt, args.momentum, args.lr, args.weight_decay, args.batch_size) == ('momentum', 0.9, 0.1, 1e-4, 128)
    assert args.decay_norm_and_bias and args.warmup_epochs == 0 and args.smoothing == 0 and args.patience == 0
    assert (args.sched, args.sched_on_updates, args.decay_milestones, args.max_updates, args.epochs) == (
        'multistep', True, [32001, 48001], 64000, None)
    assert (args.protocol, args.val_fraction) == ('official', 0.1)


def test_attention_shortcuts_schedule_divides_at_32k_and_48k_updates():
    args = parse_args(['--recipe', 'attention-shortcuts', '--model', 'asnet50_out'])
    optimizer = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=args.lr)
    assert args.epochs is None, 'the update cap sets the length'
    args.epochs = engine.epochs_for(args, updates_per_epoch=352)
    scheduler, _ = factory.create_scheduler(args, optimizer, updates_per_epoch=352)  # 45k images, batch 128
    rate = {}
    for update in range(1, 64001):  # the rate update n uses, as train_one_epoch drives the scheduler
        rate[update] = optimizer.param_groups[0]['lr']
        scheduler.step_update(num_updates=update)
        if update % 352 == 0:
            scheduler.step(update // 352)  # the per-epoch call must not touch a per-update schedule
    assert (rate[1], rate[32000], rate[32001], rate[48000], rate[48001], rate[64000]) == pytest.approx(
        (0.1, 0.1, 0.01, 0.01, 0.001, 0.001))
    assert args.epochs == 182, '64k updates of 352 per epoch'
    assert engine.epochs_for(parse_args(['--recipe', 'attention-shortcuts', '--model', 'asnet50_out']), 391) == 164


def test_settings_precedence_with_a_per_model_recipe(tmp_path):
    config = tmp_path / 'c.yaml'
    config.write_text('recipe: cnntention\nmodel: resnet20_selfatt\nlr: 0.002\nepochs: 5\n')
    args = parse_args(['--config', str(config), '--epochs', '7', '--decay-milestones', '3', '6'])
    assert (args.opt, args.weight_decay, args.lr, args.epochs, args.decay_milestones) == (
        'adam', 1e-3, 0.002, 7, [3, 6]), 'defaults < recipe (per model) < --config < flags'
    assert RECIPES['default']['epochs'] == 12 and parse_args([]).decay_milestones is None


@pytest.mark.parametrize('recipe, model', [
    ('cnntention', 'gradattn_resnet18_rope'), ('cnntention-sgd', 'resnet50_cifar'),
    ('attention-shortcuts', 'resnet20'), ('cnntention', 'hf-hub:someone/resnet20_selfatt')])
def test_a_recipe_refuses_a_model_outside_its_family(recipe, model, tmp_path, capsys):
    with pytest.raises(UserError, match=rf'--recipe {recipe} is the recipe of .*--model {model} is not one of them'):
        recipe_settings(recipe, model, 'digits')
    assert train_cli.main(['--recipe', recipe, '--model', model, '--output', str(tmp_path)]) == 2
    message = capsys.readouterr().err
    assert message.count('\n') == 1 and 'Pass one of those registry names' in message
    assert not any(tmp_path.iterdir()), 'refused before any run folder or training'


def test_multistep_needs_increasing_milestones(tmp_path):
    for argv, problem in ((['--sched', 'multistep'], 'needs --decay-milestones'),
                          (['--sched', 'multistep', '--decay-milestones', '5', '3'], 'must be increasing epochs'),
                          (['--sched', 'plateau', '--sched-on-updates'], 'once per epoch')):
        with pytest.raises(UserError, match=problem):
            parse_args(argv)
    no_length = tmp_path / 'c.yaml'
    no_length.write_text('epochs: null\n')
    with pytest.raises(UserError, match='Neither --epochs nor --max-updates'):
        parse_args(['--config', str(no_length)])


# --- the data the recipes ask for -----------------------------------------------------------------------------
def test_cnntention_mnist_trains_on_32_px_crops_and_tests_at_28_px():
    info = DATASETS['mnist']
    digit = Image.fromarray(np.full((28, 28), 255, dtype=np.uint8))
    train = build_transform(info, train=True, augment='cnntention_mnist', mean=[0.0], std=[1.0])
    test = build_transform(info, train=False, augment='cnntention_mnist', mean=[0.0], std=[1.0])
    torch.manual_seed(0)
    crops = torch.stack([train(digit) for _ in range(20)])
    assert crops.shape == (20, 1, 32, 32) and test(digit).shape == (1, 28, 28)
    assert torch.equal(test(digit), torch.ones(1, 28, 28)), 'no normalisation'
    assert crops.mean().item() == pytest.approx(28 * 28 / 32 ** 2), 'the whole digit, inside zero padding'


def test_official_protocol_carves_validation_from_train(monkeypatch):
    def fake_cifar10(info, data_dir, download, protocol):
        images = np.zeros((200, 32, 32, 3), dtype=np.uint8)
        return RawSplits(train=ArrayImageDataset(images[:150], np.arange(150) % 10),
                         test=ArrayImageDataset(images[150:], np.arange(50) % 10))
    monkeypatch.setitem(datasets.ADAPTERS, 'cifar10', fake_cifar10)
    data = build_datasets('cifar10', protocol='official', val_fraction=0.1, mean=[0.5] * 3, std=[0.25] * 3)
    assert data.sizes() == {'train': 135, 'val': 15, 'test': 50}
    assert data.info.mean == (0.5, 0.5, 0.5) and data.info.train_augment == 'cifar'
    assert build_datasets('cifar10', protocol='official').sizes()['val'] == 23, "the tag's 0.15 without it"
    with pytest.raises(ValueError, match='--val-fraction'):
        build_datasets('cifar10', protocol='official', val_fraction=1.0)


# --- tiny runs -------------------------------------------------------------------------------------------------
def test_cnntention_recipe_trains_resnet20_on_digits(tmp_path, no_plots):
    results = train(['--recipe', 'cnntention', *TINY, '--epochs', '1'], tmp_path, 'cnntention')
    assert (results['recipe'], results['protocol'], results['epochs_run'], results['num_updates']) == (
        'cnntention', 'official', 1, 4)
    assert results['split_sizes'] == {'train': 64, 'val': 269, 'test': 271}, 'digits has no official split'
    saved = parse_args(['--config', str(tmp_path / 'cnntention' / 'config.yaml')])
    assert (saved.opt, saved.lr, saved.decay_milestones, saved.decay_norm_and_bias) == (
        'momentum', 0.1, [92, 137], True)
    assert float(summary_rows(tmp_path / 'cnntention')[0]['lr']) == 0.1


def test_max_updates_stops_mid_epoch_and_resumes(tmp_path, no_plots, capsys):
    # 4 updates an epoch: 6 updates end in the middle of epoch 2, which is validated and saved like the others.
    # Milestones in updates: update 5 (the first of epoch 2) starts at a tenth of the rate. No epoch count, as in
    # the attention-shortcuts recipe: as many epochs as the updates need.
    no_epochs = tmp_path / 'no_epochs.yaml'
    no_epochs.write_text('epochs: null\n')
    argv = [*TINY, '--config', str(no_epochs), '--max-updates', '6', '--sched', 'multistep', '--sched-on-updates',
            '--decay-milestones', '5', '--lr', '0.01']
    results = train(argv, tmp_path, 'capped')
    run_dir = tmp_path / 'capped'
    rows = summary_rows(run_dir)
    assert (results['num_updates'], results['epochs_run'], len(rows), results['stopped_at_max_updates']) == (
        6, 2, 2, True)
    assert optimizer_steps(run_dir) == 6
    assert [float(row['lr']) for row in rows] == pytest.approx([0.01, 0.001])
    assert json.loads((run_dir / 'last' / 'state.json').read_text())['epochs_done'] == 2
    assert parse_args(['--config', str(run_dir / 'config.yaml')]).epochs is None, 'left to the cap on resume'

    # The finished run says how to train on; a larger cap continues with epoch 3 (4 more updates).
    assert train_cli.main(['--resume', str(run_dir), '--output', str(tmp_path)]) == 2
    assert 'Pass a larger --max-updates' in capsys.readouterr().err
    AcceleratorState._reset_state(True)
    results = train(['--resume', str(run_dir), '--max-updates', '10'], tmp_path, 'capped')
    assert (results['num_updates'], results['epochs_run'], optimizer_steps(run_dir)) == (10, 3, 10)


def test_results_hold_the_best_and_the_last_epoch_test_figures(tmp_path, no_plots):
    # Epoch 2 at a rate of 1 (x1000 at milestone 2) most likely spoils epoch 1's weights, so the two blocks come
    # from different weights; whichever epoch is best, both must be right. In fp32, as the figures are recomputed
    # here (the default is bf16 on a CPU with native bf16).
    results = train([*TINY, '--epochs', '2', '--lr', '0.001', '--sched', 'multistep', '--decay-milestones', '2',
                     '--decay-rate', '1000', '--mixed-precision', 'no'], tmp_path, 'both')
    run_dir = tmp_path / 'both'
    last = results['test_last_epoch']
    assert last['epoch'] == results['epochs_run'] == 2
    assert {'top1', 'top5', 'f1_macro', 'ece', 'nll'} <= set(last) and 'top1' in results

    data = build_datasets('digits', seed=42, img_size=16)
    loader = DataLoader(data.test, batch_size=64)

    def test_top1(weights: Path) -> float:
        model = timm.create_model('resnet20', num_classes=10, in_chans=1).eval()
        load_weights(model, weights)
        with torch.no_grad():
            logits, targets = zip(*[(model(x), y) for x, y in loader])
        return classification_metrics(torch.cat(logits), torch.cat(targets))['top1']
    assert last['top1'] == pytest.approx(test_top1(run_dir / 'last' / 'model.safetensors'))
    assert results['top1'] == pytest.approx(test_top1(run_dir / 'model_best.safetensors'))
