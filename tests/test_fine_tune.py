"""Fine-tuning as a user does it, following docs/training.md ("Resume, fine-tune, several processes"): the default
run's export (grey digits at 32 px) fine-tuned on a folder of colour 64-px images, evaluated and published.

- The data's input wins: the run trains at the folder's 3x64x64, the weights adapted as timm adapts them (the first
  convolution by ``adapt_input_conv``, for ``--pretrained`` and ``--initial-checkpoint``; a fixed-size ViT built for
  the new side), and every line about the input says what is trained.
- ``--pretrained`` follows one rule in train.py and evaluate, and a missing-weights error names the exact
  ``<model>.<tag>`` looked for.
- Publishing the fine-tune: a dry run needs no ``--repo-id``, and the card names the export it started from.

The models are a quarter-width GradAttn (as tests/test_train.py's ``TINY``), so that the run takes seconds.
"""
import contextlib
import io
import json
import re
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants
from safetensors.torch import load_file, save_file

import timm
from timm.models import adapt_input_conv

from data_fixtures import write_image_folder
from train_runs import train
from timm_gradattn import factory, run_files
from timm_gradattn.data import DATASETS
from timm_gradattn.errors import UserError
from timm_gradattn.evaluate import main as evaluate
from timm_gradattn.hub import export_hub_folder, place_in_hf_cache
from timm_gradattn.models import pretrained_name
from timm_gradattn.publish import PublishError, publish
from timm_gradattn.settings import resolve_evaluate_settings, resolve_train_settings

MODEL = 'gradattn_resnet18_rope'
SMALL = dict(channels=(16, 32, 64, 128), embed_dim=64, mlp_dim=128, num_heads=4)
SMALL_FLAGS = ['--model-kwargs', 'channels=(16,32,64,128)', 'embed_dim=64', 'mlp_dim=128', 'num_heads=4']
ADAPTED = "first convolution adapted from 1 to 3 channels (timm's adapt_input_conv)"


@pytest.fixture(scope='module')
def digits_run(tmp_path_factory) -> Path:
    """What `python train.py` leaves (grey digits at 32 px, 10 classes), from a small untrained model: the run's
    ``hub/`` export and ``model_best.safetensors``."""
    run = tmp_path_factory.mktemp('digits_run')
    torch.manual_seed(0)
    model = timm.create_model(MODEL, num_classes=10, in_chans=1, **SMALL)
    save_file(model.state_dict(), run / 'model_best.safetensors')
    export_hub_folder(model, run / 'hub', input_size=(1, 32, 32), mean=(0.3053,), std=(0.376,),
                      pretrained_cfg=dict(tag='digits'))
    return run


@pytest.fixture(scope='module')
def photos(tmp_path_factory) -> str:
    """The issue's folder: 60 colour 64-px images in 3 classes."""
    return write_image_folder(str(tmp_path_factory.mktemp('data') / 'my_images'), classes=3, per_class=20, size=64)


@pytest.fixture(scope='module')
def fine_tune(digits_run, photos, tmp_path_factory):
    """The issue's command, one epoch, in-process and without plots: (its run folder, what it printed)."""
    output, printed = tmp_path_factory.mktemp('runs'), io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(printed):
        patch.setattr(run_files, 'plot_curves', lambda *args, **kwargs: None)
        patch.setattr(run_files, 'plot_test', lambda *args, **kwargs: None)
        train(['--model', f'local-dir:{digits_run / "hub"}', '--pretrained', '--dataset', 'folder', '--data-dir',
               photos, '--freeze-backbone', '--epochs', '1', '-b', '14'], output, 'tuned')
    return output / 'tuned', printed.getvalue()


def _settings(*argv: str, output: Path):
    return resolve_train_settings([*argv, '--output', str(output)])


# --- 1. the data's input wins ------------------------------------------------------------------------------------
def test_a_fine_tune_trains_at_the_folders_input_and_every_line_says_so(fine_tune, digits_run):
    run, printed = fine_tune
    source = f'local-dir:{digits_run / "hub"}'
    read_as = [line for line in printed.splitlines() if 'read as' in line]
    assert len(read_as) == 1 and 'colour, 64x64 px (median of' in read_as[0]
    assert "read as 3x64x64: the images' own channels and side" in read_as[0]
    assert (f'Starting weights {source}: trained at 1x32x32, this run trains at 3x64x64; {ADAPTED}; 64 px needs no '
            f'change (no fixed input size in the pretrained cfg).') in printed.splitlines()
    assert re.search(r'^local-dir:\S+ on folder \(.*, 3 classes, 3x64x64\)', printed, re.M)
    assert [line for line in printed.splitlines() if '1x32x32' in line] == [
        line for line in printed.splitlines() if line.startswith('Starting weights')]
    # The stem is timm's adaptation of the export's (the frozen backbone kept it); the export records 3x64x64.
    tuned, original = load_file(run / 'model_best.safetensors'), load_file(digits_run / 'model_best.safetensors')
    assert torch.equal(tuned['stem.conv.weight'], adapt_input_conv(3, original['stem.conv.weight'], base_chans=1))
    config = json.loads((run / 'hub' / 'config.json').read_text())
    assert config['pretrained_cfg']['input_size'] == [3, 64, 64] and config['model_args']['in_chans'] == 3
    assert json.loads((run / 'results.json').read_text())['pretrained_from'] == source


def test_evaluate_reads_the_fine_tuned_export_at_the_input_it_trained_at(fine_tune, photos, tmp_path):
    run, _ = fine_tune
    results = evaluate(['--model', f'local-dir:{run / "hub"}', '--dataset', 'folder', '--data-dir', photos,
                        '--output', str(tmp_path / 'eval')])
    assert (results['preprocessing']['in_chans'], results['preprocessing']['img_size']) == (3, 64)
    assert results['num_samples'] == json.loads((run / 'results.json').read_text())['split_sizes']['test']


def test_an_initial_checkpoint_of_other_channels_is_adapted_not_refused(digits_run, photos, tmp_path, capsys):
    weights = digits_run / 'model_best.safetensors'
    args = _settings(*SMALL_FLAGS, '--initial-checkpoint', str(weights), '--dataset', 'folder', '--data-dir', photos,
                     output=tmp_path)
    data = factory.load_data(args)
    model = factory.create_model(args, data.info)
    assert data.info.input_size == (3, 64, 64)
    assert torch.equal(model.state_dict()['stem.conv.weight'],
                       adapt_input_conv(3, load_file(weights)['stem.conv.weight'], base_chans=1))
    assert f'--initial-checkpoint {weights}: {ADAPTED}.' in capsys.readouterr().out.splitlines()


def test_flags_set_the_folders_input_over_its_images_and_the_weights(digits_run, photos, tmp_path):
    args = _settings('--model', f'local-dir:{digits_run / "hub"}', '--pretrained', '--dataset', 'folder', '--data-dir',
                     photos, '--in-chans', '1', '--img-size', '48', output=tmp_path)
    data = factory.load_data(args)
    assert data.info.input_size == (1, 48, 48)
    assert any('read as 1x48x48, as asked (the images alone give 3x64x64)' in note for note in data.notes)


def test_a_fixed_size_model_is_built_for_the_run_or_refused_in_one_line(photos, tmp_path, capsys):
    """A ViT's pretrained cfg fixes its input size: built for the folder's 64 px, timm resampling its position
    embeddings. An MLP-Mixer's token MLPs cannot be resized: one line names the --img-size its weights take."""
    data = factory.load_data(_settings('--dataset', 'folder', '--data-dir', photos, output=tmp_path))
    for name, kwargs in (('vit_tiny_patch16_224', dict(depth=1, embed_dim=32, num_heads=2)), ('mixer_s32_224', {})):
        model = timm.create_model(name, num_classes=10, in_chans=1, img_size=32, **kwargs)
        export_hub_folder(model, tmp_path / name, input_size=(1, 32, 32), mean=(0.5,), std=(0.5,))
    vit = _settings('--model', f'local-dir:{tmp_path / "vit_tiny_patch16_224"}', '--pretrained', '--dataset',
                    'folder', '--data-dir', photos, output=tmp_path)
    model = factory.create_model(vit, data.info)
    assert model.patch_embed.img_size == (64, 64) and model(torch.zeros(2, 3, 64, 64)).shape == (2, 3)
    assert 'built for 64 px, timm resampling its position embeddings (the pretrained cfg fixes the input size)' \
           in capsys.readouterr().out
    mixer = vit.replace(model=f'local-dir:{tmp_path / "mixer_s32_224"}')
    with pytest.raises(UserError, match=r"has a fixed input size .* trained at 32 px, cannot be built for this run's "
                                        r"64 px \(.*\)\. Pass --img-size 32\.$") as error:
        factory.create_model(mixer, data.info)
    assert '\n' not in str(error.value)


HUB_FINE_TUNES = '''
import contextlib, io, json
from timm_gradattn import factory
from timm_gradattn.settings import resolve_train_settings
results, printed = {}, io.StringIO()
for repo in ('someone/rope-digits', 'someone/vit-digits'):
    args = resolve_train_settings(['--model', 'hf-hub:' + repo, '--pretrained', '--dataset', 'folder', '--data-dir',
                                   PHOTOS, '--output', OUTPUT])
    data = factory.load_data(args)
    with contextlib.redirect_stdout(printed):
        model = factory.create_model(args, data.info)
    first_conv = model.get_submodule(model.pretrained_cfg['first_conv'])
    side = getattr(getattr(model, 'patch_embed', None), 'img_size', (None,))[0]
    results[repo] = dict(stem=list(first_conv.weight.shape), side=side)
results['printed'] = printed.getvalue().splitlines()
print(json.dumps(results))
'''


@pytest.mark.slow  # a fresh interpreter, for the Hugging Face cache and offline mode read at import
def test_hf_hub_weights_are_adapted_alike(digits_run, photos, tmp_path, run_python_json):
    """An hf-hub: repo's cfg comes with its download: the stem is adapted and a fixed-size ViT is built again for the
    run's side, from the Hugging Face cache, offline."""
    vit = timm.create_model('vit_tiny_patch16_224', num_classes=10, in_chans=1, img_size=32, depth=1, embed_dim=32,
                            num_heads=2)
    export_hub_folder(vit, tmp_path / 'vit', input_size=(1, 32, 32), mean=(0.5,), std=(0.5,))
    cache = tmp_path / 'hf'
    place_in_hf_cache(digits_run / 'hub', 'someone/rope-digits', cache_dir=cache)
    place_in_hf_cache(tmp_path / 'vit', 'someone/vit-digits', cache_dir=cache)
    code = HUB_FINE_TUNES.replace('PHOTOS', repr(photos)).replace('OUTPUT', repr(str(tmp_path / 'out')))
    results = run_python_json(code, env=dict(HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE='1'))
    assert results['someone/rope-digits']['stem'][1] == results['someone/vit-digits']['stem'][1] == 3
    assert results['someone/vit-digits']['side'] == 64
    assert [line.split(': ', 1)[1] for line in results['printed']] == [
        f'trained at 1x32x32, this run trains at 3x64x64; {ADAPTED}; 64 px needs no change (no fixed input size in '
        f'the pretrained cfg).',
        f'trained at 1x32x32, this run trains at 3x64x64; {ADAPTED}; built for 64 px, timm resampling its position '
        f'embeddings (the pretrained cfg fixes the input size).']


# --- 2. one rule for --pretrained --------------------------------------------------------------------------------
@pytest.mark.parametrize('model, dataset, expected', (
    (MODEL, 'digits', f'{MODEL}.digits'),                    # the dataset's tag
    (MODEL, 'fashion-mnist', f'{MODEL}.fashion_mnist'),
    (MODEL, 'folder', f'{MODEL}.tiny_imagenet'),             # no tag of the dataset: the model's default
    ('resnet20', 'tiny_imagenet', 'resnet20.cifar10'),
    ('resnet18', 'digits', 'resnet18.a1_in1k'),              # timm's own model: its default tag
    (f'{MODEL}.svhn', 'digits', f'{MODEL}.svhn'),            # a tag given is kept, as are hf-hub: and local-dir:
    ('hf-hub:someone/rope', 'digits', 'hf-hub:someone/rope'),
))
def test_pretrained_takes_the_datasets_tag_else_the_models_default(model, dataset, expected):
    assert pretrained_name(model, dataset) == expected


def test_train_and_evaluate_look_for_the_same_weights_and_name_them(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)  # not published: the error comes at once, without the Hub
    train_args = _settings('--pretrained', output=tmp_path)  # train.py's defaults: the model on digits
    eval_args = resolve_evaluate_settings(['--model', MODEL, '--pretrained', '--dataset', 'digits'])
    assert train_args.model == eval_args.model == f'{MODEL}.digits'
    errors = []
    with pytest.raises(UserError) as error:
        factory.create_model(train_args, DATASETS['digits'])
    errors.append(str(error.value))
    with pytest.raises(UserError) as error:
        evaluate(['--model', MODEL, '--pretrained', '--dataset', 'digits', '--output', str(tmp_path / 'eval')])
    errors.append(str(error.value))
    for message in errors:
        assert f'weights {MODEL}.digits from' in message and '\n' not in message
        assert '--dataset digits' in message and f'--repo-id <namespace>/{MODEL}.digits' in message


# --- 3. publishing the fine-tune ---------------------------------------------------------------------------------
def test_a_dry_run_of_the_fine_tune_needs_no_repo_id_and_its_card_names_the_export(fine_tune, digits_run,
                                                                                   monkeypatch, tmp_path):
    monkeypatch.delenv('TIMM_GRADATTN_HUB_NAMESPACE', raising=False)
    run, _ = fine_tune
    result = publish(run, dry_run=True, out=tmp_path / 'upload', registry=None)
    assert result.repo_id == f'timm-gradattn/{MODEL}.my_images' and 'pass --repo-id' in result.repo_id_note
    card = (result.folder / 'README.md').read_text()
    assert f'fine-tuned from the local weights `local-dir:.../{digits_run.name}/hub`' in card
    assert str(digits_run.parent) not in card
    with pytest.raises(PublishError, match=re.escape(f'pass --repo-id <namespace>/<name> (a --dry-run without one '
                                                     f'stages it as timm-gradattn/{MODEL}.my_images)')):
        publish(run, out=tmp_path / 'upload', registry=None)  # an upload needs a name the user chose
