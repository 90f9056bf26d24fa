"""Every model through the clients users already have, none of them written here.

- transformers: ``AutoModelForImageClassification`` / ``AutoModel`` / ``AutoImageProcessor`` (its TimmWrapper) load an
  export of ``timm_gradattn.hub.export_hub_folder`` from a folder and, offline, from the Hugging Face cache, and
  give timm's logits; timm's ``local-dir:`` and ``hf-hub:`` read the same files.
- ONNX: ``timm.utils.onnx.onnx_export`` (timm's helper, dynamic batch axis), with the TorchScript exporter and the
  dynamo exporter, runs in onnxruntime with PyTorch's outputs at another batch size than exported.
- ``torch.export.export`` with a dynamic batch: the exported program computes what eager computes.

Every registered model is checked (families added later join through ``MODEL_NAMES``) at 32 px, batch 2: one model
per family by default, the rest of the zoo under the ``zoo`` marker (``tests/tiers.py``).
"""
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import save_file

import timm
from timm.utils.onnx import onnx_export
from timm_gradattn import DATASETS
from timm_gradattn.families import MODEL_NAMES
from timm_gradattn.hub import export_hub_folder, place_in_hf_cache
from timm_gradattn.models import model_tags
from tiers import REPRESENTATIVES, is_representative, one_per_family

SIZE, BATCH = 32, 2
CHANNELS = (1, 3)
HF_ATOL = 1e-5
ONNX_ATOL = 1e-4


def _tag_with_channels(name, chans):
    """The model's first tag whose data has ``chans`` channels, or None."""
    return next((tag for tag in model_tags(name) if DATASETS[tag].in_chans == chans), None)


def _images(chans, batch=BATCH, seed=0):
    return torch.randn(batch, chans, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
    """``exported(name, chans) -> (folder, timm model)``: a trained-looking model exported once per module.

    The model is its tag with that many channels (its default tag with ``in_chans`` where it has none), with BN
    running statistics moved off their defaults, written by ``export_hub_folder`` as training writes ``hub/``.
    """
    root = tmp_path_factory.mktemp('client_exports')
    made = {}

    def get(name, chans):
        if (name, chans) not in made:
            tag = _tag_with_channels(name, chans)
            torch.manual_seed(len(made))
            if tag is not None:
                info = DATASETS[tag]
                model = timm.create_model(f'{name}.{tag}')
                mean, std = info.mean, info.std
            else:
                tag = model_tags(name)[0]
                info = DATASETS[tag]
                model = timm.create_model(f'{name}.{tag}', in_chans=chans)
                mean = (sum(info.mean) / len(info.mean),) * chans
                std = (sum(info.std) / len(info.std),) * chans
            with torch.no_grad():
                model.train()(torch.randn(4, chans, SIZE, SIZE))
            model.eval()
            folder = export_hub_folder(
                model, root / f'{name}-{chans}ch', label_names=info.label_names,
                input_size=(chans, *info.input_size[1:]), mean=mean, std=std,
                pretrained_cfg=dict(tag=tag, license=info.license))
            made[name, chans] = folder, model
        return made[name, chans]
    return get


def _logits(model, images):
    with torch.no_grad():
        return model.eval()(images)


# --- transformers ------------------------------------------------------------------------------------------

@pytest.mark.parametrize('chans', CHANNELS)
@pytest.mark.parametrize('name', one_per_family())
def test_export_config_suits_both_timm_and_transformers(name, chans, exported):
    folder, model = exported(name, chans)
    config = json.loads((folder / 'config.json').read_text())
    assert config['architecture'] == name and config['num_classes'] == model.num_classes
    # TimmWrapper passes num_classes itself; a second one in model_args is a duplicate keyword argument.
    assert 'num_classes' not in config.get('model_args', {})
    assert config['model_args']['in_chans'] == chans, 'transformers rebuilds the stem from model_args only'
    reloaded = timm.create_model(f'local-dir:{folder}', pretrained=True)
    assert (reloaded.num_classes, reloaded.in_chans) == (model.num_classes, chans)
    assert torch.equal(_logits(reloaded, _images(chans)), _logits(model, _images(chans)))


@pytest.mark.parametrize('chans', CHANNELS)
@pytest.mark.parametrize('name', one_per_family())
def test_transformers_model_gives_timms_logits(name, chans, exported):
    folder, model = exported(name, chans)
    hf_model = transformers.AutoModelForImageClassification.from_pretrained(folder).eval()
    assert type(hf_model.timm_model) is type(model)
    assert hf_model.config.id2label == dict(enumerate(model.pretrained_cfg['label_names']))
    images = _images(chans)
    with torch.no_grad():
        logits = hf_model(pixel_values=images).logits
    torch.testing.assert_close(logits, _logits(model, images), atol=HF_ATOL, rtol=0)

    if chans == 1:
        return  # the backbone (num_classes=0) path once per model is enough
    backbone = transformers.AutoModel.from_pretrained(folder).eval()
    with torch.no_grad():
        pooled = backbone(pixel_values=images).pooler_output
        expected = model.forward_head(model.forward_features(images), pre_logits=True)
    torch.testing.assert_close(pooled, expected, atol=HF_ATOL, rtol=0)


@pytest.mark.parametrize('chans', CHANNELS)
@pytest.mark.parametrize('name', one_per_family())
def test_transformers_image_processor_is_timms_eval_transform(name, chans, exported):
    folder, model = exported(name, chans)
    processor = transformers.AutoImageProcessor.from_pretrained(folder)
    data_config = timm.data.resolve_model_data_config(model)
    assert processor.data_config == data_config
    pixels = np.random.default_rng(0).integers(0, 256, (40, 48, chans), dtype=np.uint8)
    image = Image.fromarray(pixels[..., 0] if chans == 1 else pixels)  # 'L' for 1 channel, 'RGB' for 3
    expected = timm.data.create_transform(**data_config)(image).unsqueeze(0)
    pixel_values = processor(image)['pixel_values']
    assert pixel_values.shape == (1, *data_config['input_size'])
    torch.testing.assert_close(pixel_values, expected)


def test_non_default_pooling_survives_the_export(tmp_path):
    name = 'resnet18_se'
    model = timm.create_model(f'{name}.cifar10', global_pool='max').eval()
    folder = export_hub_folder(model, tmp_path / 'max', input_size=(3, SIZE, SIZE), mean=(0.5,) * 3, std=(0.25,) * 3)
    images = _images(3)
    hf_model = transformers.AutoModelForImageClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf_model(pixel_values=images).logits, model(images), atol=HF_ATOL, rtol=0)
    assert torch.equal(_logits(timm.create_model(f'local-dir:{folder}', pretrained=True), images), model(images))



def test_a_channels_last_model_exports_and_stays_channels_last(tmp_path):
    """Training on CPU from 224 px is channels-last by default; safetensors refuses its strided weights."""
    model = timm.create_model('resnet20_cbam', num_classes=3).eval()
    images = _images(3)
    expected = _logits(model, images)
    model = model.to(memory_format=torch.channels_last)
    folder = export_hub_folder(model, tmp_path / 'hub', input_size=(3, SIZE, SIZE), mean=(0.5,) * 3, std=(0.25,) * 3)
    assert model.state_dict()['conv1.weight'].is_contiguous(memory_format=torch.channels_last)  # the caller's model
    assert torch.equal(_logits(timm.create_model(f'local-dir:{folder}', pretrained=True), images), expected)


OFFLINE_LOAD = '''
import json
import torch
import timm
import timm_gradattn  # registers the zoo: without it transformers cannot build the architecture
from safetensors.torch import load_file
from transformers import AutoImageProcessor, AutoModelForImageClassification

reference = load_file(REFERENCE)
results = {}
for repo_id in REPO_IDS:
    images = reference[repo_id + '/images']
    model = AutoModelForImageClassification.from_pretrained(repo_id).eval()
    processor = AutoImageProcessor.from_pretrained(repo_id)
    timm_model = timm.create_model('hf-hub:' + repo_id, pretrained=True).eval()
    with torch.no_grad():
        results[repo_id] = dict(
            transformers=float((model(pixel_values=images).logits - reference[repo_id]).abs().max()),
            timm=float((timm_model(images) - reference[repo_id]).abs().max()),
            input_size=list(processor.data_config['input_size']))
print(json.dumps(results))
'''


@pytest.fixture(scope='module')
def offline_results(exported, tmp_path_factory, run_python_json):
    """``offline_results(name)``: what loading the model's 3-channel export from the Hugging Face cache offline gave.

    The models of one tier (the families' representatives, or the rest of the zoo) are placed in a fresh cache and
    loaded in one offline interpreter, when the first of them is asked for.
    """
    results = {}

    def get(name):
        if name not in results:
            tier = [other for other in MODEL_NAMES if is_representative(other) == is_representative(name)]
            results.update(_load_offline(tier, exported, tmp_path_factory, run_python_json))
        return results[name]
    return get


def _load_offline(names, exported, tmp_path_factory, run_python_json):
    root = tmp_path_factory.mktemp('offline')
    cache, reference, repo_ids = root / 'hub', {}, {}
    for name in names:
        folder, model = exported(name, 3)
        repo_id = repo_ids[name] = f'offline-test/{name}'
        place_in_hf_cache(folder, repo_id, cache_dir=cache)
        reference[repo_id + '/images'] = _images(3, seed=1)
        reference[repo_id] = _logits(model, reference[repo_id + '/images'])
    save_file(reference, root / 'reference.safetensors')
    code = OFFLINE_LOAD.replace('REFERENCE', repr(str(root / 'reference.safetensors'))).replace(
        'REPO_IDS', repr(list(repo_ids.values())))
    results = run_python_json(code, env=dict(HF_HUB_OFFLINE='1', HF_HUB_CACHE=str(cache), HF_HOME=str(root),
                                             HF_ENDPOINT='http://127.0.0.1:9'))
    return {name: results[repo_id] for name, repo_id in repo_ids.items()}


@pytest.mark.parametrize('name', one_per_family())
def test_transformers_and_timm_load_from_the_hub_cache_offline(name, offline_results):
    result = offline_results(name)
    assert result['transformers'] <= HF_ATOL, result  # NaN fails here too
    assert result['timm'] == 0, result
    assert result['input_size'][0] == 3, result


# --- ONNX and torch.export ---------------------------------------------------------------------------------

def _eval_model(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10)
    with torch.no_grad():
        model.train()(torch.randn(4, 3, SIZE, SIZE))  # BN statistics off their defaults
    return model.eval()


def _onnxruntime_outputs(path, images):
    session = onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: images.numpy()})[0])


def _check_onnx(name, path, use_dynamo):
    model = _eval_model(name)
    onnx_export(model, str(path), example_input=_images(3, batch=BATCH), use_dynamo=use_dynamo, check=True)
    images = _images(3, batch=BATCH + 3, seed=1)  # the batch axis is dynamic
    torch.testing.assert_close(_onnxruntime_outputs(path, images), _logits(model, images), atol=ONNX_ATOL, rtol=0)


@pytest.mark.parametrize('name', one_per_family())
def test_onnx_torchscript_export_matches_pytorch_in_onnxruntime(name, tmp_path):
    _check_onnx(name, tmp_path / f'{name}.onnx', use_dynamo=False)


# The TorchScript exporter above covers the whole zoo; the dynamo exporter one model of each family, the
# ResNet-50-sized one (minutes on a CPU) marked slow.
@pytest.mark.parametrize('name', [pytest.param(name, marks=pytest.mark.slow if family == 'attention-shortcuts' else ())
                                  for family, name in REPRESENTATIVES.items()])
def test_onnx_dynamo_export_matches_pytorch_in_onnxruntime(name, tmp_path):
    _check_onnx(name, tmp_path / f'{name}.onnx', use_dynamo=True)


@pytest.mark.parametrize('name', one_per_family())
def test_torch_export_matches_eager(name):
    model = _eval_model(name)
    program = torch.export.export(
        model, (_images(3, batch=BATCH),), dynamic_shapes=({0: torch.export.Dim('batch')},))
    images = _images(3, batch=BATCH + 3, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(images), model(images), atol=1e-5, rtol=0)


@pytest.mark.slow  # a benchmark run end to end: an ONNX export and timed runs of two models
def test_speed_benchmark_times_onnxruntime_beside_eager(tmp_path, monkeypatch):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))
    import speed  # benchmarks/speed.py
    monkeypatch.setattr(speed, 'configure_compile', lambda device: None)  # process-wide inductor settings
    speed.main(['--models', 'resnet18', 'gradattn_resnet18_rope', '--sizes', '32', '--modes', 'eager',
                '--warmup', '1', '--repeats', '2', '--no-memory', '--device', 'cpu', '--out', str(tmp_path),
                '--name', 'tiny'])
    rows = json.loads((tmp_path / 'tiny.json').read_text())['rows']
    assert all(row['onnxruntime_infer_img_s'] > 0 for row in rows)
    assert 'ONNX Runtime against eager' in (tmp_path / 'tiny.md').read_text()
