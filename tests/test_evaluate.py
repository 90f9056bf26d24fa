"""The evaluation command end to end on digits, with small untrained models."""
import json
import os
import subprocess
import sys

import pytest
import timm
from safetensors.torch import save_file
from timm.models import save_for_hf

import timm_gradattn  # noqa: F401  (registers the GradAttn models)
from timm_gradattn.errors import UserError
from timm_gradattn.evaluate import cli, main
from timm_gradattn.metrics import METRIC_KEYS

SMALL_GRADATTN = dict(layers=(1, 1, 1, 1), channels=(8, 16, 16, 16), embed_dim=32, num_heads=2, mlp_dim=64)


def _check_results(results, output_dir, num_classes=10):
    written = json.loads((output_dir / 'metrics.json').read_text())
    assert set(METRIC_KEYS) <= set(written)
    for key in ('top1', 'top3', 'top5'):
        assert 0.0 <= written[key] <= 100.0
    assert written['top1'] <= written['top3'] <= written['top5']
    for key in METRIC_KEYS[3:10]:
        assert 0.0 <= written[key] <= 1.0, key
    assert written['nll'] > 0
    counts = written['confusion_matrix']
    assert len(counts) == num_classes and all(len(row) == num_classes for row in counts)
    assert sum(map(sum, counts)) == written['num_samples'] > 0
    assert written['label_names'] == [str(i) for i in range(num_classes)]
    correct = sum(counts[i][i] for i in range(num_classes))
    assert written['top1'] == pytest.approx(100 * correct / written['num_samples'])
    assert {key: written[key] for key in METRIC_KEYS} == {key: results[key] for key in METRIC_KEYS}
    for name in ('reliability.png', 'confusion_matrix.png'):
        assert (output_dir / name).stat().st_size > 10_000
    return written


def test_local_dir_export_with_routing_and_gradient_health(tmp_path):
    model_args = dict(SMALL_GRADATTN, in_chans=1, num_classes=10)
    model = timm.create_model('gradattn_resnet18_rope.digits', **model_args)
    save_for_hf(model, tmp_path / 'export', model_args=model_args, safe_serialization=True)
    output_dir = tmp_path / 'eval'
    results = main([
        '--model', f'local-dir:{tmp_path / "export"}', '--dataset', 'digits', '--split', 'test',
        '--batch-size', '136', '--workers', '0', '--routing', '--gradient-health', '--gradient-batches', '1',
        '--output', str(output_dir)])
    written = _check_results(results, output_dir)
    assert written['preprocessing'] == dict(in_chans=1, img_size=32, mean=[0.3053], std=[0.376])
    assert written['num_samples'] == 271  # 15 % of scikit-learn's 1,797 digits, the remainder split
    for method in ('rollout', 'gradient'):
        assert sum(written['routing'][method]['overall']) == pytest.approx(1.0)
        assert written['routing'][method]['points'] == ['stem', 'stage1', 'stage2', 'stage3', 'stage4']
    health = written['gradient_health']['reference_1e-6_10']
    assert health['analysed'] == len(written['gradient_norms']['norms']) > 0
    for name in ('routing.png', 'gradient_norms.png'):
        assert (output_dir / name).stat().st_size > 10_000


def test_registry_name_with_safetensors_checkpoint(tmp_path):
    model = timm.create_model('resnet18', num_classes=10, in_chans=1)
    save_file(model.state_dict(), tmp_path / 'model.safetensors')
    output_dir = tmp_path / 'eval'
    results = main([
        '--model', 'resnet18', '--checkpoint', str(tmp_path / 'model.safetensors'), '--dataset', 'digits',
        '--split', 'val', '-b', '256', '-j', '0', '--output', str(output_dir)])
    written = _check_results(results, output_dir)
    assert written['split'] == 'val' and written['checkpoint'].endswith('model.safetensors')


def test_a_checkpoint_of_other_channels_is_refused_naming_the_in_chans_it_takes(tmp_path):
    # train.py --initial-checkpoint adapts such a first convolution (tests/test_fine_tune.py); an evaluation never
    # changes the weights it scores, so the channels must match.
    save_file(timm.create_model('resnet18', num_classes=10, in_chans=3).state_dict(), tmp_path / 'rgb.safetensors')
    with pytest.raises(UserError, match=r'trained on 3-channel images but the model takes 1\. Pass --in-chans 3'):
        main(['--model', 'resnet18', '--checkpoint', str(tmp_path / 'rgb.safetensors'), '--dataset', 'digits',
              '--output', str(tmp_path / 'eval')])


def test_checkpoint_that_is_not_weights_is_refused(tmp_path):
    (tmp_path / 'weights.pth').write_bytes(b'not read')
    with pytest.raises(UserError, match='weights.pth cannot be read as weights'):
        main(['--model', 'resnet18', '--checkpoint', str(tmp_path / 'weights.pth'), '--dataset', 'digits',
              '-j', '0', '--output', str(tmp_path / 'eval')])


def test_shell_gets_one_line_and_exit_code_2(tmp_path, capsys):
    assert cli(['--model', 'resnet18', '--dataset', 'digits', '--checkpoint', str(tmp_path / 'missing.safetensors'),
                '--output', str(tmp_path / 'eval')]) == 2
    assert 'missing.safetensors does not exist.' in capsys.readouterr().err.strip().splitlines()[-1]


def test_routing_on_a_model_without_depth_tokens_is_refused(tmp_path):
    with pytest.raises(UserError, match='--routing: .*GradAttn model'):
        main(['--model', 'resnet18', '--dataset', 'digits', '--split', 'val', '-b', '512', '-j', '0', '--routing',
              '--output', str(tmp_path / 'eval')])


@pytest.mark.slow
def test_two_processes_count_every_sample_once(tmp_path):
    # 269 validation images over 2 processes: Accelerate pads one shard with a repeated sample, which
    # gather_for_metrics must drop, so the metrics equal those of one process exactly.
    model_args = dict(SMALL_GRADATTN, in_chans=1, num_classes=10)
    save_for_hf(timm.create_model('gradattn_resnet18_nope.digits', **model_args), tmp_path / 'export',
                model_args=model_args, safe_serialization=True)
    common = ['--model', f'local-dir:{tmp_path / "export"}', '--dataset', 'digits', '--split', 'val',
              '-b', '64', '-j', '0', '--routing']
    single = main(common + ['--output', str(tmp_path / 'single')])
    done = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
         '-m', 'timm_gradattn.evaluate', *common, '--output', str(tmp_path / 'double')],
        env=dict(os.environ, ACCELERATE_USE_CPU='true', OMP_NUM_THREADS='1'),
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    double = json.loads((tmp_path / 'double' / 'metrics.json').read_text())
    assert double['num_processes'] == 2
    assert double['num_samples'] == single['num_samples'] == 269
    assert double['confusion_matrix'] == single['confusion_matrix']
    for key in METRIC_KEYS:
        assert double[key] == pytest.approx(single[key], abs=1e-9), key
    assert double['routing']['rollout']['class_counts'] == single['routing']['rollout']['class_counts']


def test_a_head_narrower_than_the_dataset_is_refused(tmp_path):
    model_args = dict(in_chans=1, num_classes=5)
    save_for_hf(timm.create_model('resnet20', **model_args), tmp_path / 'export', model_args=model_args,
                safe_serialization=True)
    with pytest.raises(UserError, match=r'predicts 5 classes but .* has 10\. Evaluate it on the dataset it was'):
        main(['--model', f'local-dir:{tmp_path / "export"}', '--dataset', 'digits', '--workers', '0',
              '--output', str(tmp_path / 'eval')])


def test_gradient_health_and_cam_under_cpu_bf16_run_with_the_one_pixel_guard(tmp_path, monkeypatch):
    # Their backward passes meet the PyTorch bf16 bug on 1x1 maps (resnet18's layer4 at 32 px) as training does.
    import torch.nn as nn
    from timm_gradattn import evaluate
    from timm_gradattn.precision import OnePixelFp32
    unguarded = {}

    def spy(name, analysis):
        def run(model, *args, **kwargs):
            unguarded[name] = [module_name for module_name, module in model.named_modules()
                               if isinstance(module, nn.Conv2d) and max(module.kernel_size) > 1
                               and not isinstance(module, OnePixelFp32)]
            return analysis(model, *args, **kwargs)
        return run
    monkeypatch.setattr(evaluate, 'gradient_norms', spy('gradient_norms', evaluate.gradient_norms))
    monkeypatch.setattr(evaluate, 'class_activation_maps', spy('cam', evaluate.class_activation_maps))
    results = main(['--model', 'resnet18', '--dataset', 'digits', '--split', 'val', '-b', '512', '-j', '0',
                    '--mixed-precision', 'bf16', '--gradient-health', '--gradient-batches', '1', '--cam', '2',
                    '--output', str(tmp_path / 'eval')])
    assert unguarded == {'gradient_norms': [], 'cam': []} and results['gradient_health']
