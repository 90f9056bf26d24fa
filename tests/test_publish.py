"""Publishing a run to the Hugging Face Hub: the upload folder, its card, loading it back, the upload call.

No network: the folder is checked where users would load it (``local-dir:``, the Hugging Face cache under
``HF_HUB_OFFLINE=1``); only the upload itself goes to a stand-in ``HfApi``.
"""
import csv
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Subset

import timm
from timm.models import save_for_hf

import timm_gradattn
from timm_gradattn import publish as publish_module
from timm_gradattn.data.datasets import build_datasets
from timm_gradattn.hub import place_in_hf_cache
from timm_gradattn.metrics import classification_metrics
from timm_gradattn.model_card import (
    CARD_CITATIONS, CARD_METRICS, HUB_CARDS_DIR, CardTemplateError, card_fields, card_metadata, card_template_for,
    render_card,
)
from timm_gradattn.models import model_tags
from timm_gradattn.publish import (
    UPLOAD_FILES, PublishError, Run, RunFolderError, VerificationError, load_registry, near_chance, publish,
    record_published, weights_table,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL = 'gradattn_resnet18_rope'


def _evaluate(model, dataset):
    logits, targets = [], []
    with torch.inference_mode():
        for images, labels in DataLoader(dataset, batch_size=512):
            logits.append(model(images))
            targets.append(labels)
    return torch.cat(logits), torch.cat(targets)


def make_run(folder: Path, model_name: str = MODEL, tag: str = 'digits', seed: int = 0) -> Path:
    """A run folder with train.py's layout; its metrics are measured on the digits test split."""
    torch.manual_seed(seed)
    model = timm.create_model(f'{model_name}.{tag}').eval()
    splits = build_datasets(tag)
    results = classification_metrics(*_evaluate(model, splits.test))
    val_top1 = classification_metrics(*_evaluate(model, splits.val))['top1']
    train_top1 = classification_metrics(*_evaluate(model, Subset(splits.train, range(128))))['top1']
    results.update(
        model=model_name, dataset=tag, protocol='paper', seed=42, num_classes=model.num_classes,
        label_names=list(model.pretrained_cfg['label_names']), best_epoch=1, epochs_run=1,
        val_top1_best=val_top1, train_top1_at_best=train_top1, train_val_gap=abs(train_top1 - val_top1),
        seconds_per_epoch=1.0, num_params=sum(p.numel() for p in model.parameters()),
        machine='test fixture: untrained weights, train top-1 on 128 images', pretrained_from=None)
    folder.mkdir(parents=True)
    save_file(model.state_dict(), folder / 'model_best.safetensors')
    save_for_hf(model, folder / 'hub', safe_serialization=True)
    (folder / 'results.json').write_text(json.dumps(results, indent=2))
    (folder / 'config.yaml').write_text(yaml.safe_dump(dict(
        model=model_name, dataset=tag, data_dir='/home/someone/data', output='/home/someone/output',
        epochs=1, batch_size=64, opt='adam', lr=1e-3, weight_decay=1e-4, sched='plateau', seed=42)))
    with (folder / 'summary.csv').open('w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(['epoch', 'train_loss', 'train_top1', 'val_loss', 'val_top1', 'lr', 'epoch_time_s'])
        writer.writerow([1, 2.3, train_top1, 2.3, val_top1, 1e-3, 1.0])
    return folder


def _file_digests(folder: Path):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob('*')) if p.is_file()}


class RecordingApi:
    """Stands in for ``huggingface_hub.HfApi`` at the network boundary; records what it was asked to do."""

    def __init__(self, token=None, **kwargs):
        self.token = token
        self.calls = []
        self.uploaded_files = None

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(('create_repo', repo_id, kwargs))
        return type('RepoUrl', (), {'repo_id': repo_id})()

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(('create_branch', repo_id, kwargs))

    def upload_folder(self, **kwargs):
        self.calls.append(('upload_folder', kwargs['repo_id'], kwargs))
        self.uploaded_files = _file_digests(Path(kwargs['folder_path']))
        return type('CommitInfo', (), {'oid': 'f' * 40, 'commit_url': 'https://huggingface.co/commit',
                                       'pr_url': None})()


@pytest.fixture(scope='module')
def digits_run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp('runs') / f'{MODEL}.digits')


@pytest.fixture(scope='module')
def dry_run(digits_run):
    before = _file_digests(digits_run)
    result = publish(digits_run, f'timm-gradattn/{MODEL}.digits', dry_run=True, registry=None)
    after = {k: v for k, v in _file_digests(digits_run).items() if not k.startswith('upload/')}
    assert after == before, 'publishing changed the run\'s own files'
    return result


def _reference_logits(run_folder: Path, batch: torch.Tensor) -> torch.Tensor:
    model = timm.create_model(f'{MODEL}.digits', pretrained=False).eval()
    model.load_state_dict(load_file(run_folder / 'model_best.safetensors'))
    with torch.inference_mode():
        return model(batch)


def _batch():
    return torch.randn((3, 1, 32, 32), generator=torch.Generator().manual_seed(123))


# --- the dry-run folder ------------------------------------------------------------------------------

def test_dry_run_writes_exactly_the_upload_files(digits_run, dry_run):
    assert dry_run.folder == digits_run / 'upload'
    assert not dry_run.uploaded
    assert sorted(p.name for p in dry_run.folder.iterdir()) == sorted(UPLOAD_FILES) == [
        'README.md', 'config.json', 'model.safetensors']


def test_dry_run_config_is_timm_config(digits_run, dry_run):
    config = json.loads((dry_run.folder / 'config.json').read_text())
    results = json.loads((digits_run / 'results.json').read_text())
    assert config['architecture'] == MODEL
    assert config['num_classes'] == 10
    assert config['label_names'] == results['label_names'] == [str(i) for i in range(10)]
    assert config['model_args']['in_chans'] == 1
    pretrained_cfg = config['pretrained_cfg']
    assert pretrained_cfg['input_size'] == [1, 32, 32]
    assert pretrained_cfg['mean'] == [0.3053] and pretrained_cfg['std'] == [0.376]
    model = timm.create_model(f'local-dir:{dry_run.folder}', pretrained=True)
    assert type(model).__name__ == 'GradAttnResNet' and model.num_classes == 10
    assert model.pretrained_cfg['label_names'] == config['label_names']


def test_dry_run_card_metadata_matches_results(digits_run, dry_run):
    text = (dry_run.folder / 'README.md').read_text()
    assert text.startswith('---\n')
    metadata = yaml.safe_load(text.split('---\n')[1])
    results = json.loads((digits_run / 'results.json').read_text())
    assert metadata['library_name'] == 'timm'
    assert {'image-classification', 'timm', 'gradattn', 'arxiv:2603.26756'} <= set(metadata['tags'])
    assert metadata['license'] == 'cc-by-4.0'
    assert metadata['datasets'] == ['digits']
    assert 'base_model' not in metadata  # trained from scratch
    index = metadata['model-index'][0]
    assert index['name'] == f'{MODEL}.digits'
    result = index['results'][0]
    assert result['task']['type'] == 'image-classification'
    assert result['dataset']['split'] == 'test'
    card = {(m['type'], m.get('config')): m['value'] for m in result['metrics']}
    expected = {(metric_type, config): results[key] for key, metric_type, config, _ in CARD_METRICS}
    assert len(card) == len(result['metrics']) == len(CARD_METRICS) == 11
    assert card == expected


def test_dry_run_card_body(digits_run, dry_run):
    text = (dry_run.folder / 'README.md').read_text()
    results = json.loads((digits_run / 'results.json').read_text())
    assert '$' not in text
    assert f"| Top-1 accuracy (%) | {results['top1']:.2f} |" in text
    assert f"| ECE (10 bins) | {results['ece']:.4f} |" in text
    assert f"timm.create_model('hf-hub:timm-gradattn/{MODEL}.digits', pretrained=True)" in text
    assert text.index('import timm_gradattn') < text.index('timm.create_model(')
    assert "convert('L')" in text  # one-channel digits
    assert '| `lr` | 0.001 |' in text and '| `opt` | adam |' in text
    assert '/home/someone' not in text and 'data_dir' not in text  # local paths stay private
    assert 'Applied Sciences' in text and '2603.26756' in text and '10.5281/zenodo.4414861' in text
    assert f"{results['num_params']:,} parameters" in text


def test_dry_run_folder_loads_with_matching_logits(digits_run, dry_run):
    model = timm.create_model(f'local-dir:{dry_run.folder}', pretrained=True).eval()
    batch = _batch()
    with torch.inference_mode():
        logits = model(batch)
    torch.testing.assert_close(logits, _reference_logits(digits_run, batch), rtol=0, atol=0)
    assert dry_run.max_abs_logit_diff == 0.0


def test_cli_dry_run_to_out_folder(digits_run, tmp_path, capsys):
    out = tmp_path / 'staged'
    assert publish_module.main([str(digits_run), '--repo-id', 'someone/digits-net', '--dry-run', '--out', str(out),
                                '--registry', str(tmp_path / 'weights.json')]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(UPLOAD_FILES)
    assert 'Dry run: nothing uploaded' in capsys.readouterr().out
    assert not (tmp_path / 'weights.json').exists()
    card = (out / 'README.md').read_text()
    assert 'not named `<namespace>/<model>.<tag>`' in card


# --- loading back through the Hugging Face cache ----------------------------------------------------

_LOAD_FROM_CACHE = textwrap.dedent('''
    import sys, torch, timm, timm_gradattn
    from safetensors.torch import save_file
    repo_id, out = sys.argv[1], sys.argv[2]
    batch = torch.randn((3, 1, 32, 32), generator=torch.Generator().manual_seed(123))
    by_name = timm.create_model('{model}.digits', pretrained=True).eval()
    by_repo = timm.create_model('hf-hub:' + repo_id, pretrained=True).eval()
    assert by_name.pretrained_cfg['hf_hub_id'] == repo_id, by_name.pretrained_cfg['hf_hub_id']
    with torch.inference_mode():
        save_file(dict(by_name=by_name(batch), by_repo=by_repo(batch)), out)
''').format(model=MODEL)


@pytest.mark.parametrize('namespace', [None, 'my-lab'])
def test_hf_cache_loads_by_registry_name_offline(digits_run, dry_run, tmp_path, namespace):
    repo_id = f'{namespace or "timm-gradattn"}/{MODEL}.digits'
    cache = tmp_path / 'hf-cache'
    snapshot = place_in_hf_cache(dry_run.folder, repo_id, cache)
    assert sorted(p.name for p in snapshot.iterdir()) == sorted(UPLOAD_FILES)
    env = {k: v for k, v in os.environ.items() if k != 'TIMM_GRADATTN_HUB_NAMESPACE'}
    env.update(HF_HUB_OFFLINE='1', HF_HUB_CACHE=str(cache), HF_HOME=str(tmp_path / 'hf-home'))
    if namespace:
        env['TIMM_GRADATTN_HUB_NAMESPACE'] = namespace
    out = tmp_path / 'logits.safetensors'
    subprocess.run([sys.executable, '-c', _LOAD_FROM_CACHE, repo_id, str(out)], env=env, check=True,
                   cwd=tmp_path, capture_output=True, text=True)
    logits = load_file(out)
    reference = _reference_logits(digits_run, _batch())
    torch.testing.assert_close(logits['by_name'], reference, rtol=0, atol=0)
    torch.testing.assert_close(logits['by_repo'], reference, rtol=0, atol=0)


# --- the upload call ---------------------------------------------------------------------------------

def test_upload_receives_the_verified_folder(digits_run, dry_run, tmp_path):
    api, registry = RecordingApi(), tmp_path / 'weights.json'
    result = publish(digits_run, f'my-lab/{MODEL}.digits', out=tmp_path / 'staged', private=True,
                     commit_message='Add weights', registry=registry, api=api)
    assert [call[0] for call in api.calls] == ['create_repo', 'upload_folder']
    assert api.calls[0][1:] == (f'my-lab/{MODEL}.digits', dict(private=True, exist_ok=True))
    upload = api.calls[1][2]
    assert upload == dict(repo_id=f'my-lab/{MODEL}.digits', folder_path=tmp_path / 'staged', revision=None,
                          create_pr=False, commit_message='Add weights')
    assert api.uploaded_files == _file_digests(tmp_path / 'staged')
    assert sorted(api.uploaded_files) == sorted(UPLOAD_FILES)
    # Same weights and config as the dry run; only the card names another repository.
    dry = _file_digests(dry_run.folder)
    assert api.uploaded_files['model.safetensors'] == dry['model.safetensors']
    assert api.uploaded_files['config.json'] == dry['config.json']
    assert result.uploaded and result.registry_updated
    results = json.loads((digits_run / 'results.json').read_text())
    (entry,) = load_registry(registry)
    assert entry['repo_id'] == f'my-lab/{MODEL}.digits' and entry['model'] == MODEL and entry['tag'] == 'digits'
    assert entry['top1'] == results['top1'] and entry['private'] is True and entry['commit'] == 'f' * 40


def test_cli_passes_token_and_options_to_huggingface_hub(digits_run, tmp_path, monkeypatch, capsys):
    apis = []
    monkeypatch.setattr(publish_module, 'HfApi', lambda **kwargs: apis.append(RecordingApi(**kwargs)) or apis[-1])
    registry = tmp_path / 'weights.json'
    code = publish_module.main([
        str(digits_run), '--repo-id', 'my-lab/digits-rope', '--out', str(tmp_path / 'staged'), '--token', 'hf_given',
        '--revision', 'experiments', '--create-pr', '--registry', str(registry)])
    assert code == 0, capsys.readouterr().err
    (api,) = apis
    assert api.token == 'hf_given'
    assert [call[0] for call in api.calls] == ['create_repo', 'create_branch', 'upload_folder']
    assert api.calls[1][2] == dict(branch='experiments', exist_ok=True)
    upload = api.calls[2][2]
    assert (upload['revision'], upload['create_pr'], upload['folder_path']) == ('experiments', True, tmp_path / 'staged')
    assert not registry.exists()  # a pull request is not published weights
    assert 'Not recorded in the weights registry' in capsys.readouterr().out


def test_token_comes_from_hf_token_env(digits_run, tmp_path, monkeypatch):
    apis = []
    monkeypatch.setattr(publish_module, 'HfApi', lambda **kwargs: apis.append(RecordingApi(**kwargs)) or apis[-1])
    monkeypatch.delenv('HF_OIDC_RESOURCE', raising=False)
    monkeypatch.setenv('HF_TOKEN', 'hf_from_env')
    assert publish_module.main([str(digits_run), '--out', str(tmp_path / 'staged'),
                                '--registry', str(tmp_path / 'weights.json')]) == 0
    assert apis[0].token == 'hf_from_env'
    assert apis[0].calls[-1][1] == f'timm-gradattn/{MODEL}.digits'  # default repo id: <namespace>/<model>.<tag>
    assert load_registry(tmp_path / 'weights.json')[0]['repo_id'] == f'timm-gradattn/{MODEL}.digits'


def test_no_token_is_a_clear_error_before_anything(digits_run, tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants
    apis = []
    monkeypatch.setattr(publish_module, 'HfApi', lambda **kwargs: apis.append(RecordingApi(**kwargs)) or apis[-1])
    for name in ('HF_TOKEN', 'HUGGING_FACE_HUB_TOKEN', 'HF_OIDC_RESOURCE'):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, 'HF_TOKEN_PATH', str(tmp_path / 'no-token'))
    assert publish_module.main([str(digits_run), "--out", str(tmp_path / "staged")]) == 2
    assert 'No Hugging Face token' in capsys.readouterr().err
    assert apis == [] and not (tmp_path / 'staged').exists()


# --- bad input: clear errors, nothing uploaded -------------------------------------------------------

def _copy_run(run: Path, dest: Path, skip=()) -> Path:
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns('upload', *skip))
    return dest


def test_run_without_best_weights(digits_run, tmp_path):
    run = _copy_run(digits_run, tmp_path / 'run', skip=('model_best.safetensors',))
    api = RecordingApi()
    with pytest.raises(RunFolderError, match=r'has no model_best\.safetensors.*finish \(or resume\) the run'):
        publish(run, f'my-lab/{MODEL}.digits', api=api, registry=None)
    assert api.calls == [] and not (run / 'upload').exists()


@pytest.mark.parametrize('repo_id', ['no-namespace', 'a/b/c', 'my lab/model', 'my-lab/', '-lab/model'])
def test_repo_id_of_the_wrong_form(digits_run, tmp_path, repo_id):
    api = RecordingApi()
    with pytest.raises(PublishError, match=re.escape(repr(repo_id))):
        publish(digits_run, repo_id, out=tmp_path / 'staged', api=api, registry=None)
    assert api.calls == [] and not (tmp_path / 'staged').exists()


def test_card_template_with_unknown_field(digits_run, tmp_path):
    template = tmp_path / 'broken.md'
    template.write_text('---\nlibrary_name: timm\n---\n# ${repo_name}\n\nFLOPs: ${gflops}\n')
    api = RecordingApi()
    with pytest.raises(CardTemplateError, match=r'broken\.md uses \$\{gflops\}, which is not a card field'):
        publish(digits_run, f'my-lab/{MODEL}.digits', out=tmp_path / 'staged', template=template, api=api,
                registry=None)
    assert api.calls == [] and not (tmp_path / 'staged').exists()


def test_card_field_the_run_does_not_record(digits_run, tmp_path):
    run = _copy_run(digits_run, tmp_path / 'run')
    results = json.loads((run / 'results.json').read_text())
    del results['seed']
    (run / 'results.json').write_text(json.dumps(results))
    api = RecordingApi()
    with pytest.raises(CardTemplateError, match=r'gradattn\.md needs \$\{seed\}.*results\.json "seed"'):
        publish(run, f'my-lab/{MODEL}.digits', api=api, registry=None)
    assert api.calls == []


def test_card_template_with_lone_dollar(tmp_path, digits_run):
    template = tmp_path / 'prices.md'
    template.write_text('# ${repo_name}\n\nCosts $ 5.\n')
    with pytest.raises(CardTemplateError, match=r"prices\.md has a lone '\$' on line 3"):
        publish(digits_run, f'my-lab/{MODEL}.digits', out=tmp_path / 'staged', template=template, dry_run=True,
                registry=None)


def test_hub_export_that_is_not_the_best_weights(digits_run, tmp_path):
    run = _copy_run(digits_run, tmp_path / 'run')
    weights = load_file(run / 'hub' / 'model.safetensors')
    weights['head.bias'] = weights['head.bias'] + 0.5
    save_file(weights, run / 'hub' / 'model.safetensors')
    api = RecordingApi()
    with pytest.raises(VerificationError, match=r'not the run\'s best weights.*differ .* by up to 0\.5'):
        publish(run, f'my-lab/{MODEL}.digits', api=api, registry=tmp_path / 'weights.json')
    assert api.calls == [] and not (tmp_path / 'weights.json').exists()


def test_run_files_from_two_runs(digits_run, tmp_path):
    run = _copy_run(digits_run, tmp_path / 'run')
    results = json.loads((run / 'results.json').read_text())
    results['model'] = 'gradattn_resnet18_lpe'
    (run / 'results.json').write_text(json.dumps(results))
    with pytest.raises(RunFolderError, match='gradattn_resnet18_lpe.*mixes two runs'):
        publish(run, f'my-lab/{MODEL}.digits', dry_run=True, registry=None)


def test_out_folder_is_never_the_runs_own(digits_run):
    with pytest.raises(PublishError, match="would write into the run's own files"):
        publish(digits_run, f'my-lab/{MODEL}.digits', out=digits_run / 'hub', dry_run=True, registry=None)


# --- templates of every family -----------------------------------------------------------------------

# The BibTeX key of each family's paper in hub_cards/citations.bib; timm's entry is on every card.
_PAPER_KEYS = {'gradattn.md': 'ghoshal2026gradattn', 'resnet_attn.md': 'ghoshal2026gradattn',
               'generic.md': 'ghoshal2026gradattn', 'cnntention.md': 'kapila2024cnntention',
               'attention_shortcuts.md': 'erroz2025attentionshortcuts'}


@pytest.mark.parametrize('architecture, family', [
    ('gradattn_resnet18_nope', 'gradattn.md'), ('gradattn_resnet18_lpe', 'gradattn.md'),
    ('resnet18_se', 'resnet_attn.md'), ('resnet18_cbam', 'resnet_attn.md'), ('resnet18', 'generic.md'),
    ('resnet20_mha', 'cnntention.md'), ('asnet50_kv', 'attention_shortcuts.md'),
    ('resnet50_cifar_plain', 'attention_shortcuts.md'),
])
def test_every_family_template_renders(digits_run, architecture, family):
    template = card_template_for(architecture)
    assert template.name == family
    run = _synthetic_run(digits_run, model=architecture)
    run.hub_config['architecture'] = architecture
    run.results['pretrained_from'] = 'resnet18.a1_in1k' if architecture == 'resnet18' else None
    fields = card_fields(run, f'my-lab/{architecture}.digits')
    template_metadata = yaml.safe_load(template.read_text().split('---\n')[1])
    text = render_card(template, fields, card_metadata(run, fields, template_metadata))
    metadata = yaml.safe_load(text.split('---\n')[1])
    assert metadata['library_name'] == 'timm' and 'image-classification' in metadata['tags']
    assert len(metadata['model-index'][0]['results'][0]['metrics']) == len(CARD_METRICS)
    if architecture == 'resnet18':
        assert metadata['base_model'] == 'timm/resnet18.a1_in1k'
        assert 'fine-tuned from [`timm/resnet18.a1_in1k`]' in text
        assert 'import timm_gradattn' not in text
    else:
        assert 'import timm_gradattn' in text
    cited = re.findall(r'^@\w+\{([^,\s]+),', text, re.MULTILINE)
    assert cited.count(_PAPER_KEYS[family]) == 1  # the family's own paper, once (CNNtention's template types it)
    assert set(cited) == {_PAPER_KEYS[family], 'wightman2019timm'}, 'no other family\'s paper'
    assert '10.5281/zenodo.4414861' in text
    assert '${' not in text


def test_card_of_a_run_without_validation_says_whose_weights_it_holds(digits_run):
    # --protocol official --val-fraction 0: the last epoch's weights, no validation figures to show.
    run = _synthetic_run(digits_run, selection='last epoch (no validation split)', best_epoch=3, epochs_run=3,
                         val_top1_best=None, train_val_gap=None, split_sizes=dict(train=1257, val=0, test=271))
    table = card_fields(run, f'my-lab/{MODEL}.digits')['run_table']
    assert '| Weights kept | last epoch (no validation split) |' in table
    assert '| Epoch of the weights kept | 3 |' in table
    assert 'validation top-1' not in table and 'Train-validation gap' not in table


def test_every_family_cites_a_paper_the_bib_has():
    keys = re.findall(r'^@\w+\{([^,\s]+),', (HUB_CARDS_DIR / 'citations.bib').read_text(), re.MULTILINE)
    assert len(keys) == len(set(keys))
    assert set(CARD_CITATIONS) == {template.stem for template in HUB_CARDS_DIR.glob('*.md')}
    for family, papers in CARD_CITATIONS.items():
        assert papers and set(papers) <= set(keys), family
    assert 'erroz2025attentionshortcuts' in keys and 'kapila2024cnntention' in keys


def _synthetic_run(digits_run, **results):
    run = Run(folder=digits_run, results=json.loads((digits_run / 'results.json').read_text()),
              settings=yaml.safe_load((digits_run / 'config.yaml').read_text()),
              hub_config=json.loads((digits_run / 'hub' / 'config.json').read_text()))
    run.results.update(results)
    return run


@pytest.mark.parametrize('pretrained_from, base_model, named', [
    (None, None, None),
    ('hf-hub:someone/rope-digits@v2', 'someone/rope-digits', 'someone/rope-digits'),
    ('gradattn_resnet18_rope.tiny_imagenet', 'timm-gradattn/gradattn_resnet18_rope.tiny_imagenet',
     'timm-gradattn/gradattn_resnet18_rope.tiny_imagenet'),
    ('resnet18.a1_in1k', 'timm/resnet18.a1_in1k', 'timm/resnet18.a1_in1k'),
    ('weights/init.safetensors', None, 'weights/init.safetensors'),
    ('local-dir:/home/someone/run/hub', None, 'local-dir:.../run/hub'),
    ('/home/someone/base/model_best.safetensors', None, '.../base/model_best.safetensors'),
])
def test_base_model_metadata(digits_run, pretrained_from, base_model, named):
    run = _synthetic_run(digits_run, pretrained_from=pretrained_from)
    fields = card_fields(run, f'my-lab/{MODEL}.digits')
    metadata = card_metadata(run, fields, {}).to_dict()
    assert metadata.get('base_model') == base_model
    assert metadata.get('base_model_relation') == ('finetune' if base_model else None)
    if pretrained_from is None:
        assert fields['origin'] == 'from scratch'
    else:  # the weights a fine-tune started from, by Hub id or path, never the training machine's folders
        assert fields['origin'].startswith('fine-tuned from') and f'`{named}`' in fields['origin']
        assert '/home/someone' not in fields['origin']


@pytest.mark.parametrize('results, warned', [
    (dict(val_top1_best=14.0), 'validation top-1 14.00 % is within 5 points of chance (10.00 % for 10 classes)'),
    (dict(val_top1_best=16.0), None),
    (dict(val_top1_best=None, top1=12.5), 'test top-1 12.50 % is within 5 points of chance'),
])
def test_near_chance_compares_validation_top1_with_100_over_classes(digits_run, results, warned):
    warning = near_chance(_synthetic_run(digits_run, **results))
    assert warning is None if warned is None else warned in warning


def test_a_run_near_chance_is_published_with_one_warning(digits_run, caplog, tmp_path):
    folder = tmp_path / 'run'
    shutil.copytree(digits_run, folder, ignore=shutil.ignore_patterns('upload'))
    results = json.loads((folder / 'results.json').read_text())
    (folder / 'results.json').write_text(json.dumps(dict(results, val_top1_best=11.0)))
    with caplog.at_level('WARNING', logger='timm_gradattn.publish'):
        publish(folder, f'my-lab/{MODEL}.digits', dry_run=True, registry=None)
    assert [record.getMessage() for record in caplog.records if record.name == 'timm_gradattn.publish'] == [
        f'{folder}: validation top-1 11.00 % is within 5 points of chance (10.00 % for 10 classes): the model may have '
        f'learnt nothing. Look at its summary.csv and training curves before publishing it.']


def test_other_licence_links_the_dataset_terms(digits_run):
    run = _synthetic_run(digits_run, dataset='tiny_imagenet')
    run.hub_config['pretrained_cfg']['license'] = 'other'
    fields = card_fields(run, f'my-lab/{MODEL}.tiny_imagenet')
    metadata = card_metadata(run, fields, {}).to_dict()
    assert metadata['license'] == 'other' and metadata['license_link'] == 'http://cs231n.stanford.edu/tiny-imagenet-200.zip'
    assert metadata['datasets'] == ['zh-plus/tiny-imagenet']


# --- the weights registry and table ------------------------------------------------------------------

def _registered_weights() -> int:
    """Every (model, tag) the registry names: one table cell each (45 for the five ResNet-18 models)."""
    return sum(len(model_tags(model)) for model in timm_gradattn.MODEL_NAMES)


def test_weights_table_without_published_weights(tmp_path):
    table = weights_table(tmp_path / 'weights.json', namespace='timm-gradattn')
    cells = _registered_weights()
    assert table.count('| not published') == cells
    assert f'Published: 0 of {cells}. No weights have been published yet.' in table
    assert table.count('python -m timm_gradattn.publish output/train/') == cells
    assert (f'python train.py --model {MODEL} --dataset digits --recipe paper --experiment {MODEL}.digits && '
            f'python -m timm_gradattn.publish output/train/{MODEL}.digits --repo-id timm-gradattn/{MODEL}.digits') in table
    # Each family's models are trained with their own paper's recipe.
    assert '--model resnet20_selfatt --dataset mnist --data-dir data/mnist --download --recipe cnntention ' in table
    assert '--model asnet50_kv --dataset cifar100 --data-dir data/cifar100 --download --recipe attention-shortcuts ' in table


def test_weights_table_from_registry(tmp_path):
    registry = tmp_path / 'weights.json'
    record_published(registry, dict(repo_id=f'timm-gradattn/{MODEL}.digits', model=MODEL, tag='digits',
                                    top1=97.40740740740742, date='2026-01-02', commit=None, private=False))
    record_published(registry, dict(repo_id='someone/rope-digits', model=MODEL, tag='digits', top1=95.5,
                                    date='2026-01-03', commit=None, private=False))
    # publishing the same repo again replaces its entry
    record_published(registry, dict(repo_id=f'timm-gradattn/{MODEL}.digits', model=MODEL, tag='digits',
                                    top1=98.14814814814815, date='2026-01-04', commit=None, private=False))
    assert len(load_registry(registry)) == 2
    table = weights_table(registry, namespace='timm-gradattn')
    assert f'[98.15](https://huggingface.co/timm-gradattn/{MODEL}.digits)' in table
    assert f'Published: 1 of {_registered_weights()}.' in table
    assert table.count('| not published') == _registered_weights() - 1
    assert '| [someone/rope-digits](https://huggingface.co/someone/rope-digits) |' in table
    assert f'--repo-id timm-gradattn/{MODEL}.digits' not in table  # no command for published weights


def test_committed_registry_and_cli_table(capsys):
    entries = load_registry(REPO_ROOT / 'hub_cards' / 'weights.json')
    assert all({'repo_id', 'model', 'tag', 'top1', 'date'} <= set(entry) for entry in entries)
    conventional = {f'timm-gradattn/{model}.{tag}' for model in timm_gradattn.MODEL_NAMES for tag in model_tags(model)}
    assert publish_module.main(['--weights-table']) == 0
    table = capsys.readouterr().out
    assert f'Published: {sum(e["repo_id"] in conventional for e in entries)} of {len(conventional)}.' in table


# --- a real training run -----------------------------------------------------------------------------

@pytest.mark.slow
def test_publish_a_real_short_digits_run(tmp_path, capsys):
    subprocess.run(
        [sys.executable, str(REPO_ROOT / 'train.py'), '--model', MODEL, '--dataset', 'digits', '--epochs', '1',
         '--train-subset', '32', '--batch-size', '32', '--output', str(tmp_path), '--experiment', 'short'],
        check=True, cwd=tmp_path, capture_output=True, text=True)
    run = tmp_path / 'short'
    before = _file_digests(run)
    assert publish_module.main([str(run), '--dry-run', '--registry', str(tmp_path / 'weights.json')]) == 0
    assert f'exactly what would go to timm-gradattn/{MODEL}.digits' in capsys.readouterr().out
    assert {k: v for k, v in _file_digests(run).items() if not k.startswith('upload/')} == before
    folder = run / 'upload'
    assert sorted(p.name for p in folder.iterdir()) == sorted(UPLOAD_FILES)

    results = json.loads((run / 'results.json').read_text())
    metadata = yaml.safe_load((folder / 'README.md').read_text().split('---\n')[1])
    card = {(m['type'], m.get('config')): m['value'] for m in metadata['model-index'][0]['results'][0]['metrics']}
    assert card == {(metric_type, config): results[key] for key, metric_type, config, _ in CARD_METRICS}

    model = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    assert model.pretrained_cfg['architecture'] == MODEL and model.num_classes == results['num_classes'] == 10
    batch = _batch()
    with torch.inference_mode():
        logits = model(batch)
    torch.testing.assert_close(logits, _reference_logits(run, batch), rtol=0, atol=0)
