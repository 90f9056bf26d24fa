"""benchmarks/speed.py, op_profile.py and pipeline_speed.py on tiny settings: they measure, count and report.

Nothing here asserts a speed (timings belong to the benchmarks' own committed output); these check that the
scripts run end to end and that what they write is computed from what they measured.
"""
import json
import sys
from pathlib import Path

import pytest

from timm_gradattn.families import FAMILIES as REGISTRY

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'benchmarks'))
import op_profile  # noqa: E402
import pipeline_speed  # noqa: E402
import speed  # noqa: E402
import vs_timm_train  # noqa: E402


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
    # The plain run: each epoch's wall time covers its training loop; overhead = the share outside it.
    plain = result['overhead']['epochs']
    assert [e['epoch'] for e in plain] == [1, 2] and all(e['wall_s'] >= e['train_loop_s'] > 0 for e in plain)
    assert result['overhead']['overhead'] == pytest.approx(plain[1]['overhead'])
    assert 0 <= plain[1]['overhead'] == pytest.approx(1 - plain[1]['train_loop_s'] / plain[1]['wall_s'], abs=2e-3)
    assert 'Time off the training loop' in (tmp_path / 'p.md').read_text()
    # The end of the run (test passes, export, plots) is timed after the last epoch, inside the engine call.
    assert 0 < result['overhead']['end_of_run_s'] < result['overhead']['engine_seconds'] - sum(e['wall_s'] for e in plain)
    assert f"took {result['overhead']['end_of_run_s']:.2f} s" in (tmp_path / 'p.md').read_text()


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


# --- families (speed.py --family, op_profile.py --family) ---------------------------------------------------
def test_materialised_variant_switches_every_fused_attention_and_counts_the_same_macs():
    fused, materialised = speed.create_model('resnet20_mha'), speed.create_model('resnet20_mha:materialised')
    assert all(m.fused_attn for m in fused.modules() if hasattr(m, 'fused_attn'))
    assert [m.fused_attn for m in materialised.modules() if hasattr(m, 'fused_attn')] == [False] * 3
    # torch has no FLOP formula for its CPU flash kernel; flop_counter supplies one, so both paths count the
    # attention products, which at 32 px double ResNet-20's arithmetic (the issue's "MAC ratio about 2.0").
    base = speed.forward_flops('resnet20', 32)[0]
    for name in ('resnet20_selfatt', 'resnet20_mha'):
        assert speed.forward_flops(name, 32) == speed.forward_flops(f'{name}:materialised', 32)
        assert 1.9 < speed.forward_flops(name, 32)[0] / base < 2.1
    with pytest.raises(ValueError, match='resnet20 has 0'):
        speed.create_model('resnet20:materialised')
    with pytest.raises(ValueError, match='the only variant'):
        speed.create_model('resnet20_mha:fused')


def test_attention_shortcut_mac_ratios_against_the_cifar_resnet50():
    base = speed.forward_flops('resnet50_cifar', 32)[0]
    assert speed.forward_flops('asnet50_out', 32)[0] / base == pytest.approx(0.85, abs=0.01)
    assert speed.forward_flops('asnet50_kv', 32)[0] / base == pytest.approx(0.87, abs=0.01)


def test_speed_family_reports_its_targets_against_the_materialised_formulation(tmp_path):
    speed.main(['--family', 'cnntention', '--models', 'resnet20', 'resnet20_mha', 'resnet20_mha:materialised',
                '--sizes', '16', '--batch-size', '4', '--warmup', '1', '--repeats', '1', '--out', str(tmp_path)])
    result = json.loads((tmp_path / 'speed_cnntention.json').read_text())
    assert not (tmp_path / 'speed_cnntention.png').exists()
    assert result['family'] == 'cnntention' and result['baseline'] == 'resnet20' and result['did_not_fit'] == []
    rows = {r['model']: r for r in result['rows']}
    assert set(rows) == {'resnet20', 'resnet20_mha', 'resnet20_mha:materialised'}
    assert all(r['batch_size'] == 4 and r['mode'] == 'eager' and 'onnxruntime_infer_img_s' not in r
               for r in rows.values())
    fused, materialised = rows['resnet20_mha'], rows['resnet20_mha:materialised']
    assert fused['flop_ratio'] == materialised['flop_ratio'] > 1
    # The materialised step holds the (4, 8, 256, 256) stage-1 scores and their gradients.
    assert materialised['peak_train_mem_mb'] > fused['peak_train_mem_mb'] > 0
    memory_ratio = fused['peak_train_mem_mb'] / materialised['peak_train_mem_mb']
    time_ratio = materialised['train_img_s'] / fused['train_img_s']
    assert speed._target_value(result['rows'], 'resnet20_mha', 'resnet20_mha:materialised', 'peak_memory', 16,
                               'eager') == pytest.approx(memory_ratio)
    assert speed._target_value(result['rows'], 'resnet20_mha', 'resnet20_mha:materialised', 'train_time', 16,
                               'eager') == pytest.approx(time_ratio)
    report = (tmp_path / 'speed_cnntention.md').read_text()
    assert '# Speed of the cnntention family against resnet20' in report
    memory_target = "| peak training memory / resnet20_{0}:materialised's | 16 px, eager | {1} | <= 0.33 |"
    assert '| resnet20_mha ' + memory_target.format('mha', f'{memory_ratio:.2f}') in report
    # Targets of models left out of --models stay in the table, without a value.
    assert '| resnet20_selfatt ' + memory_target.format('selfatt', '') + '  |' in report


def test_speed_family_leaves_out_a_model_that_does_not_fit(tmp_path, monkeypatch):
    monkeypatch.setattr(speed, 'peak_train_memory_mb', lambda name, size, batch_size: (
        None if name.endswith(':materialised') else 10.))
    speed.main(['--family', 'cnntention', '--models', 'resnet20', 'resnet20_selfatt', 'resnet20_selfatt:materialised',
                '--sizes', '16', '--batch-size', '2', '--warmup', '1', '--repeats', '1', '--out', str(tmp_path),
                '--name', 'nofit'])
    result = json.loads((tmp_path / 'nofit.json').read_text())
    assert [r['model'] for r in result['rows']] == ['resnet20', 'resnet20_selfatt']
    assert result['did_not_fit'] == [dict(model='resnet20_selfatt:materialised', size=16, batch_size=2)]
    report = (tmp_path / 'nofit.md').read_text()
    assert '**Did not fit**: resnet20_selfatt:materialised at 16 px, batch 2' in report
    assert '--batch-size 1 --models resnet20 <its fused counterpart> resnet20_selfatt:materialised' in report


def test_peak_memory_reports_a_step_larger_than_the_memory_available(monkeypatch):
    # The subprocess runs under RLIMIT_DATA = the memory available, so a step too large for the machine fails in
    # torch's allocator instead of waking the OOM killer. Materialised MHA at 32 px, batch 32: about 3 GB.
    monkeypatch.setattr(speed, 'available_memory_bytes', lambda: 2 << 30)
    assert speed.peak_train_memory_mb('resnet20_mha:materialised', 32, 32) is None
    assert speed.peak_train_memory_mb('resnet20', 16, 2) > 0


def test_speed_family_rejects_an_unknown_variant_and_quick(tmp_path, capsys):
    with pytest.raises(SystemExit):
        speed.main(['--family', 'cnntention', '--models', 'resnet20', 'resnet20:materialised', '--out', str(tmp_path)])
    assert 'resnet20 has 0' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        speed.main(['--family', 'cnntention', '--quick', '--out', str(tmp_path)])
    assert 'choose one' in capsys.readouterr().err


def test_op_profile_family_splits_out_the_depth_attention(tmp_path):
    # The underscore spelling is an alias: the run is filed under the registry key.
    op_profile.main(['--family', 'attention_shortcuts', '--models', 'resnet50_cifar', 'asnet50_out', '--sizes', '16',
                     '--batch-size', '2', '--warmup', '1', '--steps', '1', '--out', str(tmp_path)])
    result = json.loads((tmp_path / 'op_profile_attention-shortcuts.json').read_text())
    assert result['family'] == 'attention-shortcuts'
    assert result['baseline'] == 'resnet50_cifar' and result['kinds'] == 'depth_attention'
    rows = {r['model']: r for r in result['rows']}
    base, asnet = rows['resnet50_cifar'], rows['asnet50_out']
    assert base['batch_size'] == asnet['batch_size'] == 2
    for kind in ('layer norm', op_profile._DEPTH_ATTENTION, 'softmax'):
        assert asnet['profiled_ms'][kind] > 0
    assert base['profiled_ms'].get('layer norm', 0.) == 0.
    # The baseline's only sum there is the classifier's bias gradient.
    depth_attention = op_profile._DEPTH_ATTENTION
    assert base['profiled_ms'].get(depth_attention, 0.) < asnet['profiled_ms'][depth_attention] / 5
    assert 0.8 < sum(asnet['flops'].values()) / sum(base['flops'].values()) < 0.9
    report = (tmp_path / 'op_profile_attention-shortcuts.md').read_text()
    assert 'step FLOP ratio against resnet50_cifar' in report and 'K/V cache' in report


def test_depth_attention_kinds():
    kinds = op_profile.DEPTH_ATTENTION_KINDS
    assert op_profile.kind_of('aten::addcmul', kinds) == op_profile._DEPTH_ATTENTION
    assert op_profile.kind_of('aten::_softmax_backward_data', kinds) == 'softmax'
    assert op_profile.kind_of('aten::stack', kinds).startswith('K/V cache')
    assert op_profile.kind_of('aten::native_layer_norm_backward', kinds) == 'layer norm'
    assert op_profile.kind_of('aten::addcmul') == 'element-wise and copies', 'the default kinds are unchanged'


# --- the families come from timm_gradattn.families, under one spelling -------------------------------------
def test_benchmark_families_are_the_registrys():
    assert speed.BASELINE == REGISTRY['gradattn'].baseline
    assert set(speed.MODELS) == {REGISTRY['gradattn'].baseline, 'seresnet18', *REGISTRY['gradattn'].models}
    assert speed.QUICK_MODELS == ('resnet18', 'gradattn_resnet18_rope')
    assert set(speed.FAMILIES) < set(REGISTRY)
    for key, benchmark in speed.FAMILIES.items():
        family = REGISTRY[key]
        assert benchmark.family is family and benchmark.baseline == family.baseline
        assert benchmark.models[0] == family.baseline
        assert [m for m in benchmark.models if ':' not in m] == [family.baseline] + [
            m for m in family.models if m != family.baseline]
        assert all(m.partition(':')[0] in family.models for m in benchmark.models)
    # The profiled models: the ones the speed targets are about, baseline first.
    assert op_profile.family_models(speed.FAMILIES['cnntention']) == ('resnet20', 'resnet20_selfatt', 'resnet20_mha')
    assert op_profile.family_models(speed.FAMILIES['attention-shortcuts']) == (
        'resnet50_cifar', 'asnet50_out', 'asnet50_kv')


def test_materialised_variants_are_the_cnntention_models_with_fused_attention():
    benchmark = speed.FAMILIES['cnntention']
    fused = {name for name in benchmark.family.models
             if any(hasattr(m, 'fused_attn') for m in speed.create_model(name).modules())}
    assert {v.partition(':')[0] for v in benchmark.variants} == fused == {'resnet20_selfatt', 'resnet20_mha'}
    assert {target[0] for target in benchmark.targets} == fused


def test_family_option_takes_the_registry_key_and_its_underscore_alias(tmp_path, capsys):
    assert speed.family_choice('attention_shortcuts') == speed.family_choice('attention-shortcuts') == \
        'attention-shortcuts'
    with pytest.raises(SystemExit):  # the alias parses; only --quick with --family is refused
        speed.main(['--family', 'attention_shortcuts', '--quick', '--out', str(tmp_path)])
    assert 'choose one' in capsys.readouterr().err
    for main in (speed.main, op_profile.main):
        with pytest.raises(SystemExit):
            main(['--family', 'attention_shortcut', '--out', str(tmp_path)])
        message = capsys.readouterr().err.strip().splitlines()[-1]
        assert ": error: argument --family: invalid choice: 'attention_shortcut'" in message, message


@pytest.mark.parametrize('name', ['speed.json', 'speed_cnntention.json', 'speed_attention-shortcuts.json'])
def test_committed_speed_results_still_report(name):
    # Files measured before the families had one spelling hold "family": "attention_shortcuts".
    result = json.loads((speed.RESULTS_DIR / name).read_text())
    text = speed.report(result)
    if 'family' in result:
        family = REGISTRY[speed.family_choice(result['family'])]
        assert text.startswith(f'# Speed of the {family.key} family against {family.baseline}')
    else:
        assert text.startswith('# Speed against resnet18')


@pytest.mark.parametrize('name', ['op_profile.json', 'op_profile_attention-shortcuts.json'])
def test_committed_op_profiles_still_report(name):
    result = json.loads((speed.RESULTS_DIR / name).read_text())
    assert f"step FLOP ratio against {result.get('baseline', 'resnet18')}" in op_profile.report(result)


def test_the_photo_size_case_gives_both_tools_the_same_224_px_folder(tmp_path):
    """``vs_timm_train.py --case photos``: photo-sized files, read at 224 px by both tools, in the asked colour."""
    from PIL import Image
    counts = vs_timm_train.write_photos_folder(tmp_path, chans=3)
    assert counts == {'train': 96, 'validation': 32, 'test': 32}
    files = sorted(tmp_path.rglob('*.png'))
    assert len(files) == 160 and {Image.open(f).mode for f in files} == {'RGB'}
    assert {Image.open(f).size for f in files} == {(300, 300), (320, 280)}
    ours, timm_default = (vs_timm_train.command(config, Path('timm/train.py'), 'm', 2, tmp_path, tmp_path / 'out',
                                                'photos', 3, 4) for config in ('ours', 'timm_default'))
    for argv in (ours, timm_default):
        assert ' '.join(argv).count('--input-size 3 224 224 --mean 0.5 0.5 0.5 --std 0.25 0.25 0.25 -b 32') == 1
    assert '--input-img-mode RGB --num-classes 4' in ' '.join(timm_default)
    assert vs_timm_train.images_per_epoch('timm_default', 96, 32) == 96
