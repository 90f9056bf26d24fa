"""benchmarks/speed.py, op_profile.py and pipeline_speed.py on tiny settings: they measure, count and report.

Nothing here asserts a speed (timings belong to the benchmarks' own committed output); these check that the
scripts run end to end and that what they write is computed from what they measured.
"""
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'benchmarks'))
import op_profile  # noqa: E402
import pipeline_speed  # noqa: E402
import speed  # noqa: E402


def test_speed_reports_flop_and_time_ratios_against_resnet18(tmp_path, monkeypatch):
    monkeypatch.setattr(speed, 'configure_compile', lambda device: None)  # process-wide inductor settings
    speed.main(['--models', 'resnet18', 'gradattn_resnet18_nope', '--sizes', '32', '--modes', 'eager',
                '--warmup', '1', '--repeats', '2', '--no-memory', '--out', str(tmp_path), '--name', 'tiny'])
    result = json.loads((tmp_path / 'tiny.json').read_text())
    rows = {r['model']: r for r in result['rows']}
    assert set(rows) == {'resnet18', 'gradattn_resnet18_nope'}
    base, gradattn = rows['resnet18'], rows['gradattn_resnet18_nope']
    assert base['params'] == 11_181_642 and gradattn['params'] == 12_849_994
    # At 32 px the encoder's ~8 M multiply-adds are about a fifth of ResNet-18's arithmetic (the paper's
    # architecture; the three removed downsample convolutions take back a little).
    assert gradattn['flop_ratio'] == pytest.approx(gradattn['gflops_per_image'] / base['gflops_per_image'])
    assert 1.15 < gradattn['flop_ratio'] < 1.25
    assert gradattn['executed_flop_ratio'] > gradattn['flop_ratio'], 'padding taps are a larger share of resnet18'
    for row in rows.values():
        assert row['infer_img_s'] > 0 and row['train_img_s'] > 0
    assert gradattn['train_time_ratio'] == pytest.approx(base['train_img_s'] / gradattn['train_img_s'])
    assert gradattn['train_efficiency'] == pytest.approx(gradattn['train_time_ratio'] / gradattn['flop_ratio'])
    report = (tmp_path / 'tiny.md').read_text()
    assert result['machine']['cpu'] in report and 'gradattn_resnet18_nope' in report
    assert (tmp_path / 'tiny.png').stat().st_size > 0


def test_speed_rejects_sizes_without_a_batch_size(tmp_path, capsys):
    with pytest.raises(SystemExit):
        speed.main(['--sizes', '48', '--out', str(tmp_path)])
    assert 'no batch size defined for sizes [48]' in capsys.readouterr().err


def test_pipeline_speed_compares_each_epoch_with_the_bare_step(tmp_path):
    pipeline_speed.main(['--epochs', '2', '--warmup', '1', '--repeats', '2', '--out', str(tmp_path), '--name', 'p',
                         '--', '--train-subset', '96', '--img-size', '16', '-b', '32', '--no-fused-opt'])
    result = json.loads((tmp_path / 'p.json').read_text())
    epochs = result['pipeline']['epochs']
    assert [e['epoch'] for e in epochs] == [1, 2] and all(e['images'] == 96 for e in epochs)
    assert len(result['pipeline']['bare_img_s']) == 3, 'bare step timed before the first epoch and after each'
    assert epochs[1]['bare_img_s'] == pytest.approx(sum(result['pipeline']['bare_img_s'][1:]) / 2)
    assert result['efficiency'] == pytest.approx(epochs[1]['img_s'] / epochs[1]['bare_img_s'])
    assert result['batch_size'] == 32 and result['fused_opt'] is False and result['opt'] == 'adam'
    assert 'Pipeline efficiency' in (tmp_path / 'p.md').read_text()


def test_pipeline_speed_needs_two_epochs(tmp_path, capsys):
    with pytest.raises(SystemExit):
        pipeline_speed.main(['--epochs', '1', '--out', str(tmp_path)])
    assert 'at least 2 are needed' in capsys.readouterr().err


def test_op_profile_splits_the_step_by_kind_of_operator(tmp_path):
    op_profile.main(['--models', 'resnet18', 'gradattn_resnet18_nope', '--sizes', '32', '--warmup', '1',
                     '--steps', '2', '--out', str(tmp_path), '--name', 'ops'])
    result = json.loads((tmp_path / 'ops.json').read_text())
    rows = {r['model']: r for r in result['rows']}
    base, gradattn = rows['resnet18'], rows['gradattn_resnet18_nope']
    # Only GradAttn has an encoder: its linear layers' products and dropout masks show up under their kinds.
    linear, dropout = 'matrix products (linear layers)', 'dropout random numbers'
    assert gradattn['profiled_ms'][linear] > 0 and gradattn['profiled_ms'][dropout] > 0
    assert base['profiled_ms'].get(dropout, 0.) == 0.
    assert gradattn['flops'][linear] > 10 * base['flops'].get(linear, 1.)
    assert base['flops']['convolution'] > gradattn['flops']['convolution'], 'no downsample convolutions'
    assert 'dropout random numbers' in (tmp_path / 'ops.md').read_text()


def test_every_profiled_operator_has_a_kind():
    assert op_profile.kind_of('aten::convolution_backward') == 'convolution'
    assert op_profile.kind_of('aten::addmm') == 'matrix products (linear layers)'
    assert op_profile.kind_of('aten::bernoulli_') == 'dropout random numbers'
    assert op_profile.kind_of('aten::as_strided') == op_profile.OTHER
