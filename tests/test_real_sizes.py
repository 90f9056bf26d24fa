"""The default path at photo size, end to end, as a user with a folder of their own photos meets it.

A generated folder of 256-320 px images (RGB, and greyscale) goes through ``train.py`` with no precision or
memory-format flag (so at 224 px: channels-last on, bf16 where the CPU computes it natively, the folder decoded once)
-> ``--resume`` -> ``evaluate --cam`` -> the Hub export loaded back in timm, transformers and ONNX Runtime ->
``publish --dry-run``, for the cheapest model of each family that trains at 224 px on two cores and for timm's
``resnet18``; and once with ``--channels-last --mixed-precision bf16`` forced, so that a machine without native bf16
still covers the default of one that has it. Slow tier: about a minute a model on a 2-core CPU.
"""
import json
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
import transformers
import yaml
from accelerate.state import AcceleratorState
from PIL import Image

import timm
from timm.utils.onnx import onnx_export
from train_runs import summary_rows, train_cli
from timm_gradattn import evaluate, publish
from timm_gradattn.precision import default_mixed_precision

pytestmark = pytest.mark.slow

# The cheapest model of each family at 224 px (CNNtention's self-attention over 224x224 positions is not), and timm's.
MODELS = [('gradattn_resnet18_nope', 'rgb'), ('resnet20_cbam', 'grey'), ('resnet50_cifar_050', 'grey'),
          ('resnet18', 'rgb')]
SIZES = ((300, 300), (320, 256), (256, 288))
LAYOUT = {'train': 2, 'val': 1, 'test': 1}  # images per class


def _photo(kind: str, label: int, index: int, size) -> Image.Image:
    """Stripes whose direction is the class, under noise: something to learn and to localise."""
    width, height = size
    rng = np.random.default_rng(100 * label + index)
    y, x = np.mgrid[:height, :width]
    stripes = np.sin((x if label else y) / (6 + index)) * 80 + 128
    channels = [stripes + rng.normal(0, 30, stripes.shape) for _ in range(3 if kind == 'rgb' else 1)]
    pixels = np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels[..., 0] if kind == 'grey' else pixels)


@pytest.fixture(scope='module')
def folders(tmp_path_factory):
    made = {}
    for kind in ('rgb', 'grey'):
        root = tmp_path_factory.mktemp(f'photos_{kind}')
        for split, count in LAYOUT.items():
            for label, name in enumerate(('horizontal', 'vertical')):
                (root / split / name).mkdir(parents=True)
                for index in range(count):
                    size = SIZES[(index + label) % len(SIZES)]
                    _photo(kind, label, index, size).save(root / split / name / f'{name}_{index}.png')
        made[kind] = root
    return made


def _train(argv, capsys) -> str:
    capsys.readouterr()
    assert train_cli.main(argv) == 0
    AcceleratorState._reset_state(True)
    return capsys.readouterr().out


def _logits(model, images):
    with torch.no_grad():
        return model.eval()(images)


def _check_clients(hub: Path, channels: int, tmp_path: Path) -> None:
    """The export loads in timm, transformers and ONNX Runtime at 224 px, each with timm's logits."""
    images = torch.randn(2, channels, 224, 224, generator=torch.Generator().manual_seed(0))
    model = timm.create_model(f'local-dir:{hub}', pretrained=True).eval()
    assert model.pretrained_cfg['input_size'] == (channels, 224, 224)
    expected = _logits(model, images)
    hf_model = transformers.AutoModelForImageClassification.from_pretrained(hub).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf_model(pixel_values=images).logits, expected, atol=1e-4, rtol=1e-4)
    onnx_file = tmp_path / 'model.onnx'
    onnx_export(model, str(onnx_file), example_input=images[:1], dynamic_size=False, check_forward=False)
    session = onnxruntime.InferenceSession(str(onnx_file), providers=['CPUExecutionProvider'])
    (output,) = session.run(None, {session.get_inputs()[0].name: images.numpy()})
    np.testing.assert_allclose(output, expected.numpy(), atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize('model, kind', MODELS)
def test_the_default_path_at_photo_size(model, kind, folders, tmp_path, capsys):
    data, channels = folders[kind], 3 if kind == 'rgb' else 1
    run = tmp_path / 'runs' / 'photos'
    log = _train(['--model', model, '--data-dir', str(data), '--epochs', '1', '--output', str(tmp_path / 'runs'),
                  '--experiment', 'photos'], capsys)
    precision = default_mixed_precision()[0]  # bf16 where this CPU computes it natively, else fp32 ('no')
    assert f'Mixed precision {precision}: default' in log and 'Channels-last on' in log, log
    assert f'{channels}x224x224' in log and 'decoded once' in log, log
    config = yaml.safe_load((run / 'config.yaml').read_text())
    assert config['channels_last'] is True and config['mixed_precision'] == precision
    assert (run / 'results.json').is_file() and not (run / 'hub.tmp').exists()

    log = _train(['--resume', str(run), '--epochs', '2'], capsys)
    assert 'Resuming' in log and len(summary_rows(run)) == 2
    assert json.loads((run / 'results.json').read_text())['epochs_run'] == 2

    metrics = evaluate.main(['--model', f'local-dir:{run / "hub"}', '--data-dir', str(data), '--cam', '2',
                             '--output', str(tmp_path / 'eval')])
    AcceleratorState._reset_state(True)
    assert 0 <= metrics['top1'] <= 100 and (tmp_path / 'eval' / 'cam.png').is_file()

    _check_clients(run / 'hub', channels, tmp_path)
    assert publish.main([str(run), '--repo-id', 'you/photos', '--dry-run']) == 0
    assert 'Dry run: nothing uploaded' in capsys.readouterr().out


def test_forced_channels_last_and_bf16_at_photo_size(folders, tmp_path, capsys):
    """The default of a CPU with native bf16, on any CPU (emulated bf16 is slower, not different)."""
    run = tmp_path / 'forced'
    log = _train(['--model', 'resnet20_cbam', '--data-dir', str(folders['grey']), '--epochs', '1',
                  '--channels-last', '--mixed-precision', 'bf16', '--output', str(tmp_path), '--experiment', 'forced'],
                 capsys)
    assert 'Mixed precision bf16: --mixed-precision' in log and '1x224x224' in log, log
    _check_clients(run / 'hub', 1, tmp_path)
    assert publish.main([str(run), '--repo-id', 'you/forced', '--dry-run']) == 0
