"""mixed_precision.py: a run's precision comes from a flag, else the --config YAML, else the resumed run, else
accelerate launch's bf16 or fp16, else the machine's default; the log line names what set it, and a bf16 run resumed
where bf16 is only emulated says so."""
import logging
import re

import pytest
import torch

from timm_gradattn import precision
from timm_gradattn.errors import UserError
from timm_gradattn.settings import resolve_train_settings

NATIVE = 'the CPU has AVX512-BF16'


@pytest.fixture
def cpu(monkeypatch):
    """``cpu(native)``: a CPU that computes bf16 natively (``native``, the log's reason) or only emulates it (None),
    running ``python train.py`` (no ACCELERATE_MIXED_PRECISION)."""
    monkeypatch.delenv('ACCELERATE_MIXED_PRECISION', raising=False)
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    return lambda native: monkeypatch.setattr(precision, 'native_bf16', lambda: native)


def saved_run(folder, *flags):
    """A run folder with the config.yaml of ``python train.py *flags``, as every run writes it."""
    folder.mkdir()
    (folder / 'config.yaml').write_text(resolve_train_settings(list(flags)).to_yaml())
    return folder


def precision_of(argv):
    settings = resolve_train_settings(argv)
    return settings.mixed_precision, settings.mixed_precision_source


def test_a_flag_beats_the_config_file_which_beats_the_resumed_run(cpu, tmp_path):
    cpu(NATIVE)
    config = str(saved_run(tmp_path / 'fp32', '--mixed-precision', 'no') / 'config.yaml')  # holds mixed_precision
    assert precision_of(['--config', config]) == ('no', f'--config {config}')
    assert precision_of(['--config', config, '--amp']) == ('bf16', '--amp --amp-dtype bfloat16')
    assert precision_of(['--config', config, '--amp-dtype', 'bfloat16']) == ('bf16', '--amp --amp-dtype bfloat16')
    assert precision_of(['--config', config, '--mixed-precision', 'bf16']) == ('bf16', '--mixed-precision')
    bf16_run = saved_run(tmp_path / 'bf16', '--mixed-precision', 'bf16')
    assert precision_of(['--resume', str(bf16_run), '--config', config]) == ('no', f'--config {config}')


def test_a_config_file_that_disagrees_with_itself_is_named(cpu, tmp_path):
    cpu(NATIVE)
    config = tmp_path / 'settings.yaml'
    config.write_text("mixed_precision: 'no'\namp: true\namp_dtype: bfloat16\n")
    with pytest.raises(UserError, match=re.escape(f'disagree in --config {config}; pass only one')):
        resolve_train_settings(['--config', str(config)])
    assert precision_of(['--config', str(config), '--mixed-precision', 'bf16']) == ('bf16', '--mixed-precision')


def test_accelerate_launch_sets_no_whether_asked_or_not(monkeypatch, tmp_path):
    # Why its 'no' counts as unstated: accelerate launch's environment is the same with and without the flag.
    from accelerate.commands import launch
    from accelerate.utils import prepare_simple_launcher_cmd_env
    monkeypatch.setattr(launch, 'default_config_file', str(tmp_path / 'no_accelerate_config.yaml'))
    for flags in ([], ['--mixed_precision', 'no']):
        args, _, _ = launch._validate_launch_command(launch.launch_command_parser().parse_args(flags + ['train.py']))
        assert prepare_simple_launcher_cmd_env(args)[1]['ACCELERATE_MIXED_PRECISION'] == 'no'


def test_accelerate_launch_no_gets_the_machine_default_and_its_bf16_is_chosen(cpu, monkeypatch):
    cpu(NATIVE)
    monkeypatch.setenv('ACCELERATE_MIXED_PRECISION', 'no')  # accelerate launch without --mixed_precision
    launched, source = precision_of([])
    assert launched == 'bf16', 'as python train.py trains on this machine'
    assert source.startswith(f'default: {NATIVE}') and "accelerate launch's 'no' is also its default" in source
    assert precision_of(['--mixed-precision', 'no']) == ('no', '--mixed-precision')  # fp32 under accelerate launch
    cpu(None)
    assert "accelerate launch's" not in precision_of([])[1], 'fp32 either way: nothing to explain'
    monkeypatch.setenv('ACCELERATE_MIXED_PRECISION', 'bf16')
    assert precision_of([]) == ('bf16', "accelerate launch's --mixed_precision (or its config)")


def test_a_bf16_run_resumed_where_bf16_is_emulated_says_how_to_change(cpu, tmp_path, caplog):
    cpu(NATIVE)
    run = saved_run(tmp_path / 'run', '--mixed-precision', 'bf16')
    cpu(None)
    with caplog.at_level(logging.WARNING):
        assert precision_of(['--resume', str(run)])[0] == 'bf16', 'a resumed run continues as it started'
    warning, = [record.getMessage() for record in caplog.records if 'emulates bf16' in record.getMessage()]
    assert 'this CPU' in warning and 'continues in bf16 as it started' in warning
    assert 'pass --mixed-precision no to continue in fp32' in warning and 'no longer the same arithmetic' in warning
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        resolve_train_settings(['--resume', str(run), '--mixed-precision', 'bf16'])  # asked for: nothing to say
        cpu(NATIVE)
        resolve_train_settings(['--resume', str(run)])  # native here: nothing to say
    assert not [record for record in caplog.records if 'emulates bf16' in record.getMessage()]
