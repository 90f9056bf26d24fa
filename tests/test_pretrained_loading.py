"""Weights travel through timm's own loading code: local folders, files, the Hugging Face cache, offline.

Exports are written with timm's ``save_for_hf``; the Hub is never contacted. Checks that depend on
environment variables huggingface_hub reads at import time (``HF_HUB_OFFLINE``, ``HF_HUB_CACHE``,
``HF_ENDPOINT``) and on ``TIMM_GRADATTN_HUB_NAMESPACE`` run in a fresh interpreter. The per-model checks run for
one model per family by default and for the rest of the zoo under the ``zoo`` marker (``tests/tiers.py``).
"""
import os
import re
from pathlib import Path

import pytest
import torch
from huggingface_hub import scan_cache_dir, try_to_load_from_cache
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import timm
import timm_gradattn
from timm.models import save_for_hf
from timm_gradattn import MissingWeightsError
from timm_gradattn.families import FAMILIES, MODEL_NAMES
from timm_gradattn.hub import place_in_hf_cache
from tiers import one_per_family

SOURCE_TAG = 'cifar10'  # 3 channels, 10 classes
TEST_NAMESPACE = 'test-lab'  # set through TIMM_GRADATTN_HUB_NAMESPACE in the subprocess checks
CACHED_MODELS = ('gradattn_resnet18_rope', 'resnet18_cbam')


class _Exported(dict):
    """``name -> value``, exporting the model ``name`` on first use (``export``)."""

    def __init__(self, export, **given):
        super().__init__(given)
        self._export = export

    def __missing__(self, name):
        self._export(name)
        return self[name]


@pytest.fixture(scope='module')
def exports(tmp_path_factory):
    """Models at tag cifar10, with trained-looking BN statistics, exported by timm; plus reference logits.

    ``exports['folders'|'models'|'reference'][name]`` exports ``name`` on first use, so a run exports only the
    models its tests read. ``exports['reference_file']()`` writes the images and the logits exported so far.
    """
    root = tmp_path_factory.mktemp('exports')
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def export(name):
        torch.manual_seed(MODEL_NAMES.index(name))
        model = timm.create_model(f'{name}.{SOURCE_TAG}')
        with torch.no_grad():
            model.train()(torch.randn(4, 3, 32, 32))  # move BN running statistics off their defaults
            model.eval()
            reference[name] = model(images)
        save_for_hf(model, root / name, safe_serialization=True)
        folders[name], models[name] = root / name, model

    def reference_file():
        save_file(dict(reference), root / 'reference.safetensors')
        return root / 'reference.safetensors'

    folders, models, reference = _Exported(export), _Exported(export), _Exported(export, images=images)
    return dict(root=root, folders=folders, models=models, reference=reference, reference_file=reference_file)


def _logits(model, images):
    with torch.no_grad():
        return model.eval()(images)


def _truncated_copy(folder: Path, destination: Path) -> Path:
    destination.mkdir()
    (destination / 'config.json').write_bytes((folder / 'config.json').read_bytes())
    weights = (folder / 'model.safetensors').read_bytes()
    (destination / 'model.safetensors').write_bytes(weights[:len(weights) // 2])
    return destination / 'model.safetensors'


# --- local folders and files -----------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', one_per_family())
def test_local_dir_export_reloads_identically(name, exports):
    folder = exports['folders'][name]
    assert sorted(p.name for p in folder.iterdir()) == ['config.json', 'model.safetensors']
    model = timm.create_model(f'local-dir:{folder}', pretrained=True)
    assert type(model) is type(exports['models'][name])
    assert model.pretrained_cfg['tag'] == SOURCE_TAG and model.num_classes == 10
    assert len(model.pretrained_cfg['label_names']) == 10
    source_state = exports['models'][name].state_dict()
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, source_state[key]), key
    assert torch.equal(_logits(model, exports['reference']['images']), exports['reference'][name])


@pytest.mark.parametrize('name', CACHED_MODELS)
def test_file_overlay_and_checkpoint_path_reload_identically(name, exports):
    weights = exports['folders'][name] / 'model.safetensors'
    images, expected = exports['reference']['images'], exports['reference'][name]
    overlay = timm.create_model(f'{name}.{SOURCE_TAG}', pretrained=True, pretrained_cfg_overlay=dict(file=str(weights)))
    assert torch.equal(_logits(overlay, images), expected)
    checkpoint = timm.create_model(f'{name}.{SOURCE_TAG}', checkpoint_path=str(weights))
    assert torch.equal(_logits(checkpoint, images), expected)


@pytest.mark.parametrize('name', one_per_family())
def test_pretrained_load_adapts_stem_to_one_channel_and_resets_head(name, exports):
    source = exports['models'][name]
    model = timm.create_model(f'local-dir:{exports["folders"][name]}', pretrained=True, in_chans=1, num_classes=5)
    first_conv, classifier = source.pretrained_cfg['first_conv'], source.pretrained_cfg['classifier']
    source_state, state = source.state_dict(), model.state_dict()
    # timm's adapt_input_conv folds RGB filters into one channel by summing them.
    assert torch.allclose(state[f'{first_conv}.weight'], source_state[f'{first_conv}.weight'].sum(1, keepdim=True))
    assert state[f'{classifier}.weight'].shape[0] == 5
    assert not torch.equal(state[f'{classifier}.weight'], source_state[f'{classifier}.weight'][:5])
    for key, tensor in state.items():
        if not key.startswith((f'{first_conv}.', f'{classifier}.')):
            assert torch.equal(tensor, source_state[key]), key
    assert _logits(model, exports['reference']['images'][:, :1]).shape == (2, 5)


def test_truncated_weights_file_is_named_in_the_error(exports, tmp_path):
    truncated = _truncated_copy(exports['folders']['gradattn_resnet18_rope'], tmp_path / 'broken')
    with pytest.raises(MissingWeightsError, match='truncated or corrupt') as error:
        timm.create_model(f'gradattn_resnet18_rope.{SOURCE_TAG}', pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(truncated)))
    assert str(truncated) in str(error.value)
    with pytest.raises(MissingWeightsError, match='truncated or corrupt') as error:
        timm.create_model(f'local-dir:{truncated.parent}', pretrained=True)
    assert str(truncated.parent) in str(error.value)
    # checkpoint_path is loaded by timm's create_model itself, after the model is built: safetensors' own error.
    with pytest.raises(SafetensorError, match='deserializing header'):
        timm.create_model(f'gradattn_resnet18_rope.{SOURCE_TAG}', checkpoint_path=str(truncated))


def test_missing_local_folder_is_named_in_the_error(tmp_path):
    with pytest.raises(FileNotFoundError, match='config.json'):
        timm.create_model(f'local-dir:{tmp_path / "nowhere"}', pretrained=True)


# --- exports written before the encoder was built from timm's layers ----------------------------------------------

GRADATTN_NAMES = tuple(name for name in FAMILIES['gradattn'].models if name.startswith('gradattn_'))


def _earlier_names(state):
    """Today's state dict under the names of earlier releases: ``encoder.N.qkv``, ``encoder.N.fc1``, ..."""
    return {re.sub(r'^(encoder\.\d+\.)(?:attn|mlp)\.', r'\1', key): value for key, value in state.items()}


@pytest.mark.parametrize('name', one_per_family(GRADATTN_NAMES))
def test_export_under_earlier_names_still_loads(name, exports, tmp_path):
    source = exports['folders'][name]
    state = load_file(source / 'model.safetensors')
    earlier = _earlier_names(state)
    assert 'encoder.0.qkv.weight' in earlier and 'encoder.2.fc2.bias' in earlier and earlier.keys() != state.keys()
    folder = tmp_path / 'earlier'
    folder.mkdir()
    (folder / 'config.json').write_bytes((source / 'config.json').read_bytes())
    save_file(earlier, folder / 'model.safetensors')
    images, expected = exports['reference']['images'], exports['reference'][name]

    assert torch.equal(_logits(timm.create_model(f'local-dir:{folder}', pretrained=True), images), expected)
    weights = str(folder / 'model.safetensors')
    overlay = timm.create_model(f'{name}.{SOURCE_TAG}', pretrained=True, pretrained_cfg_overlay=dict(file=weights))
    assert torch.equal(_logits(overlay, images), expected)
    # checkpoint_path= and a plain load_state_dict take no filter: the model maps the names itself.
    checkpoint = timm.create_model(f'{name}.{SOURCE_TAG}', checkpoint_path=weights)
    assert torch.equal(_logits(checkpoint, images), expected)
    wrapped = torch.nn.Sequential(timm.create_model(f'{name}.{SOURCE_TAG}'))
    wrapped.load_state_dict({f'0.{key}': value for key, value in earlier.items()})
    assert torch.equal(_logits(wrapped, images), expected)
    # The package's one filter for its own loaders dispatches to the family's.
    mapped = timm_gradattn.models.checkpoint_filter_fn(earlier, checkpoint)
    assert mapped.keys() == state.keys() and all(torch.equal(mapped[k], state[k]) for k in state)
    assert timm_gradattn.models.checkpoint_filter_fn(state, checkpoint).keys() == state.keys()


# --- the Hugging Face cache layout -----------------------------------------------------------------------------------

def test_place_in_hf_cache_writes_the_layout_huggingface_hub_reads(exports, tmp_path):
    cache = tmp_path / 'hub'
    repo_id = f'{TEST_NAMESPACE}/gradattn_resnet18_rope.{SOURCE_TAG}'
    folder = exports['folders']['gradattn_resnet18_rope']
    snapshot = place_in_hf_cache(folder, repo_id, cache_dir=cache)
    storage = cache / f'models--{TEST_NAMESPACE}--gradattn_resnet18_rope.{SOURCE_TAG}'
    assert snapshot.parent == storage / 'snapshots'
    assert (storage / 'refs' / 'main').read_text() == snapshot.name and len(snapshot.name) == 40

    cached = try_to_load_from_cache(repo_id, 'model.safetensors', cache_dir=cache)
    assert cached == str(snapshot / 'model.safetensors')
    assert Path(cached).read_bytes() == (folder / 'model.safetensors').read_bytes()
    if os.path.islink(cached):
        assert Path(os.path.realpath(cached)).parent == (storage / 'blobs').resolve()

    # huggingface_hub's own cache scanner accepts it: one repo, one revision on main, the two files.
    info = scan_cache_dir(cache)
    assert not info.warnings
    (repo,) = info.repos
    assert (repo.repo_id, repo.repo_type, set(repo.refs)) == (repo_id, 'model', {'main'})
    (revision,) = repo.revisions
    assert {f.file_name for f in revision.files} == {'config.json', 'model.safetensors'}

    # Placing the same files again changes nothing; placing other files adds a snapshot and moves main.
    assert place_in_hf_cache(folder, repo_id, cache_dir=cache) == snapshot
    newer = place_in_hf_cache(exports['folders']['resnet18_cbam'], repo_id, cache_dir=cache)
    assert newer != snapshot and (storage / 'refs' / 'main').read_text() == newer.name


def test_place_in_hf_cache_refuses_an_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match='save_for_hf'):
        place_in_hf_cache(tmp_path, 'ns/repo', cache_dir=tmp_path / 'hub')


# --- offline and unreachable Hub, in a fresh interpreter ----------------------------------------------------------

HUB_CHECKS = '''
import json, time
import torch, timm, timm_gradattn
from safetensors.torch import load_file

reference = load_file(REFERENCE)
images = reference['images']
results = {}


def attempt(key, fn):
    start = time.perf_counter()
    try:
        results[key] = dict(value=fn())
    except Exception as error:
        results[key] = dict(error=type(error).__name__, message=str(error))
    results[key]['seconds'] = round(time.perf_counter() - start, 3)


def same_logits(model_name, name, **kwargs):
    model = timm.create_model(model_name, pretrained=True, **kwargs).eval()
    with torch.no_grad():
        return torch.equal(model(images), reference[name])


def adapted_shape():
    model = timm.create_model('gradattn_resnet18_rope.cifar10', pretrained=True, in_chans=1, num_classes=5).eval()
    with torch.no_grad():
        return list(model(images[:, :1]).shape)


results['digits_repo'] = timm.models.get_pretrained_cfg('gradattn_resnet18_rope.digits').hf_hub_id
for name in CACHED_MODELS:
    attempt(name, lambda: same_logits(name + '.cifar10', name))
attempt('hf_hub_prefix', lambda: same_logits('hf-hub:' + NAMESPACE + '/gradattn_resnet18_rope.cifar10',
                                             'gradattn_resnet18_rope'))
attempt('adapted', adapted_shape)
attempt('missing', lambda: timm.create_model('gradattn_resnet18_rope.digits', pretrained=True) and None)
attempt('corrupt', lambda: timm.create_model('gradattn_resnet18_nope.cifar10', pretrained=True) and None)
print(json.dumps(results))
'''


@pytest.fixture(scope='module')
def hub_cache(exports, tmp_path_factory):
    """A Hugging Face cache holding the rope and cbam exports, and a truncated nope export, under TEST_NAMESPACE."""
    cache = tmp_path_factory.mktemp('hf') / 'hub'
    for name in CACHED_MODELS:
        place_in_hf_cache(exports['folders'][name], f'{TEST_NAMESPACE}/{name}.{SOURCE_TAG}', cache_dir=cache)
    truncated = _truncated_copy(exports['folders']['gradattn_resnet18_nope'], tmp_path_factory.mktemp('broken') / 'x')
    place_in_hf_cache(truncated.parent, f'{TEST_NAMESPACE}/gradattn_resnet18_nope.{SOURCE_TAG}', cache_dir=cache)
    return cache


def _run_hub_checks(run_python_json, exports, hub_cache, **env):
    for name in CACHED_MODELS:  # the logits the checks compare with
        exports['reference'][name]
    code = (HUB_CHECKS.replace('REFERENCE', repr(str(exports['reference_file']())))
            .replace('CACHED_MODELS', repr(CACHED_MODELS)).replace('NAMESPACE', repr(TEST_NAMESPACE)))
    return run_python_json(code, env=dict(
        HF_HUB_CACHE=str(hub_cache), TIMM_GRADATTN_HUB_NAMESPACE=TEST_NAMESPACE, HF_HUB_DISABLE_TELEMETRY='1', **env))


@pytest.fixture(scope='module')
def offline_results(run_python_json, exports, hub_cache):
    return _run_hub_checks(run_python_json, exports, hub_cache, HF_HUB_OFFLINE='1')


@pytest.fixture(scope='module')
def unreachable_results(run_python_json, exports, hub_cache):
    # Not offline, but the Hub endpoint refuses connections: what a machine without network sees.
    return _run_hub_checks(run_python_json, exports, hub_cache, HF_HUB_OFFLINE=None, TRANSFORMERS_OFFLINE=None,
                           HF_ENDPOINT='http://127.0.0.1:9')


# The unreachable-Hub variant builds a second cache in a fresh interpreter: the slow tier.
@pytest.mark.parametrize('results', ('offline_results', pytest.param('unreachable_results', marks=pytest.mark.slow)))
def test_cached_weights_load_by_tag_and_hf_hub_prefix(results, request):
    results = request.getfixturevalue(results)
    for key in (*CACHED_MODELS, 'hf_hub_prefix'):
        assert results[key] == dict(value=True, seconds=results[key]['seconds']), key
    assert results['adapted']['value'] == [2, 5]


@pytest.mark.parametrize('results, reason', (
    ('offline_results', 'HF_HUB_OFFLINE is set'),
    pytest.param('unreachable_results', 'the Hugging Face Hub cannot be reached', marks=pytest.mark.slow),
))
def test_missing_weights_error_names_repo_reason_and_remedies(results, reason, request):
    results = request.getfixturevalue(results)
    repo_id = f'{TEST_NAMESPACE}/gradattn_resnet18_rope.digits'
    assert results['digits_repo'] == repo_id  # TIMM_GRADATTN_HUB_NAMESPACE moved every tag's repo
    missing = results['missing']
    assert missing['error'] == 'MissingWeightsError'
    for hint in (repo_id, 'local-dir:', 'train.py', 'TIMM_GRADATTN_HUB_NAMESPACE', 'pretrained=False'):
        assert hint in missing['message'], hint
    assert reason in missing['message']  # said before any download retries, not after them


def test_corrupt_cached_weights_say_how_to_refetch(offline_results):
    corrupt = offline_results['corrupt']
    assert corrupt['error'] == 'MissingWeightsError'
    assert 'truncated or corrupt' in corrupt['message']
    assert f'hf cache rm model/{TEST_NAMESPACE}/gradattn_resnet18_nope.{SOURCE_TAG}' in corrupt['message']
