"""Publish a training run to the Hugging Face Hub as a timm model repository.

    python -m timm_gradattn.publish output/<experiment> --repo-id <namespace>/<model>.<tag> [--dry-run]
    python -m timm_gradattn.publish --weights-table

A run folder written by ``train.py`` holds ``hub/``: its best weights exported with timm's ``save_for_hf``
(``config.json`` + ``model.safetensors``). Publishing

1. stages a copy of that export with a model card (``README.md``, rendered from ``hub_cards/<family>.md``
   with the run's measured metrics) in ``<run>/upload/`` or ``--out``; the run's own files are never changed,
2. verifies the staged folder: exactly the upload files, a card whose model-index equals ``results.json``,
   and ``timm.create_model('local-dir:<folder>', pretrained=True)`` giving the same logits as the run's
   ``model_best.safetensors`` on a fixed random batch,
3. uploads exactly that folder with huggingface_hub (skipped with ``--dry-run``) and records the upload in
   ``hub_cards/weights.json``, from which ``--weights-table`` writes the README's weights table.

timm's ``push_to_hf_hub`` is not called directly: it re-exports the model into a temporary folder, writes a
pickled copy of the weights by default and keeps its own generic card, whereas here the folder that was
verified is the one uploaded, in safetensors only. The Hub calls are the ones it makes (``HfApi`` with
timm's library name, ``create_repo``, ``upload_folder``).
"""
import argparse
import datetime
import json
import re
import shutil
import string
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import yaml
from huggingface_hub import EvalResult, HfApi, ModelCardData, get_token, metadata_load
from huggingface_hub.utils import HFValidationError, validate_repo_id

import timm
from timm.models import (
    get_arch_name, get_pretrained_cfg, is_model, is_model_in_modules, load_checkpoint, model_entrypoint,
    split_model_name_tag)

from .data.info import DATASETS
from .metrics import METRIC_KEYS
from .models import MODEL_NAMES
from .models._pretrained import DEFAULT_HUB_NAMESPACE, HUB_NAMESPACE_ENV, TAGS, hub_namespace

__all__ = [
    'PublishError', 'RunFolderError', 'CardTemplateError', 'VerificationError', 'Run', 'PublishResult',
    'UPLOAD_FILES', 'HUB_CARDS_DIR', 'WEIGHTS_REGISTRY', 'CARD_METRICS', 'check_repo_id', 'load_run',
    'card_template_for', 'card_fields', 'card_metrics', 'render_card', 'stage_upload_folder',
    'verify_upload_folder', 'publish', 'load_registry', 'record_published', 'weights_table', 'main',
]

# What a published repository holds, exactly: timm's config, the weights, the card.
UPLOAD_FILES = ('README.md', 'config.json', 'model.safetensors')
HUB_CARDS_DIR = Path(__file__).resolve().parent.parent / 'hub_cards'
WEIGHTS_REGISTRY = HUB_CARDS_DIR / 'weights.json'
GENERIC_TEMPLATE = 'generic.md'
DEFAULT_STAGING = 'upload'

# results.json key -> (model-index metric type, metric config, name shown on the card). Keys and meaning
# are those of timm_gradattn.metrics; top-k accuracies are percent, the rest fractions or nats.
_METRIC_DESCRIPTIONS = {
    'top1': ('accuracy', None, 'Top-1 accuracy (%)'),
    'top3': ('top_3_accuracy', None, 'Top-3 accuracy (%)'),
    'top5': ('top_5_accuracy', None, 'Top-5 accuracy (%)'),
    'precision_macro': ('precision', 'macro', 'Precision (macro)'),
    'precision_weighted': ('precision', 'weighted', 'Precision (weighted)'),
    'recall_macro': ('recall', 'macro', 'Recall (macro)'),
    'recall_weighted': ('recall', 'weighted', 'Recall (weighted)'),
    'f1_macro': ('f1', 'macro', 'F1 (macro)'),
    'f1_weighted': ('f1', 'weighted', 'F1 (weighted)'),
    'ece': ('expected_calibration_error', None, 'ECE (10 bins)'),
    'nll': ('nll', None, 'NLL (nats)'),
}
CARD_METRICS: Tuple[Tuple[str, str, Optional[str], str], ...] = tuple(
    (key, *_METRIC_DESCRIPTIONS[key]) for key in METRIC_KEYS)

# results.json keys describing the run (not test metrics) shown on the card, with their labels.
_RUN_FACTS = (
    ('recipe', 'Recipe'),
    ('split_sizes', 'Images per split'),
    ('best_epoch', 'Best epoch (by validation top-1)'),
    ('epochs_run', 'Epochs run'),
    ('val_top1_best', 'Best validation top-1 (%)'),
    ('train_top1_at_best', 'Train top-1 at the best epoch (%)'),
    ('train_val_gap', 'Train-validation gap at the best epoch (points)'),
    ('seconds_per_epoch', 'Seconds per epoch'),
    ('machine', 'Trained on'),
)
# Settings that hold local paths or secrets: a public card must not leak them.
_PRIVATE_SETTING = re.compile(r'(dir|path|output|resume|token|checkpoint)', re.IGNORECASE)
# Settings of train.py that change how a run executes, not what it learns.
_NOT_RECIPE = {'workers', 'log_interval', 'download', 'grad_stats_every'}
_WEIGHT_FILE_SUFFIXES = ('.safetensors', '.pth', '.pt', '.bin', '.ckpt', '.tar')
_VERIFY_BATCH = 4
_VERIFY_SEED = 0


class PublishError(RuntimeError):
    """Publishing stopped before anything was uploaded."""


class RunFolderError(PublishError):
    """The run folder lacks a file publishing needs, or its files disagree."""


class CardTemplateError(PublishError):
    """A model-card template asks for a field publishing cannot fill."""


class VerificationError(PublishError):
    """The staged upload folder is not a faithful, loadable copy of the run's best weights."""


@dataclass
class Run:
    """The files of a finished training run that publishing reads."""
    folder: Path
    results: Dict[str, Any]      # results.json: test metrics and run facts
    settings: Dict[str, Any]     # config.yaml: the resolved run settings
    hub_config: Dict[str, Any]   # hub/config.json: timm's export config

    @property
    def hub_folder(self) -> Path:
        return self.folder / 'hub'

    @property
    def best_weights(self) -> Path:
        return self.folder / 'model_best.safetensors'

    @property
    def architecture(self) -> str:
        return self.hub_config['architecture']

    @property
    def tag(self) -> Optional[str]:
        return self.results.get('dataset') or self.hub_config.get('pretrained_cfg', {}).get('tag')

    @property
    def pretrained_cfg(self) -> Dict[str, Any]:
        return self.hub_config.get('pretrained_cfg', {})


@dataclass
class PublishResult:
    folder: Path                       # the verified folder (uploaded unless dry_run)
    repo_id: str
    max_abs_logit_diff: float          # staged folder vs model_best.safetensors on the verification batch
    uploaded: bool
    commit_url: Optional[str] = None
    registry_updated: bool = False
    registry_note: Optional[str] = None  # why the upload was not recorded in the weights registry


# --- reading a run ------------------------------------------------------------------------------------

def check_repo_id(repo_id: str) -> str:
    """``repo_id`` if it is a valid ``<namespace>/<name>`` model repo id, else a ``PublishError``."""
    if not isinstance(repo_id, str) or repo_id.count('/') != 1:
        raise PublishError(
            f"Repo id {repo_id!r} must have the form '<namespace>/<name>' (a user or organisation, one slash, "
            f"a repository name), e.g. '{DEFAULT_HUB_NAMESPACE}/gradattn_resnet18_rope.digits'.")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise PublishError(f'Repo id {repo_id!r} is not valid on the Hugging Face Hub: {error}') from error
    return repo_id


def _read_json(path: Path) -> Dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding='utf-8'))
    except json.JSONDecodeError as error:
        raise RunFolderError(f'{path} is not valid JSON ({error}); the run folder may be damaged.') from error


def load_run(folder: Union[str, Path]) -> Run:
    """Read a run folder and check its files agree with each other."""
    folder = Path(folder)
    if not folder.is_dir():
        raise RunFolderError(
            f'Run folder {folder} does not exist. Pass the folder train.py wrote, <output>/<experiment>.')
    needed = {
        'model_best.safetensors': 'the best weights; training writes them at the first validated epoch, '
                                  'so finish (or resume) the run before publishing',
        'results.json': 'the test metrics; training writes it after the final test evaluation, '
                        'so finish (or resume) the run before publishing',
        'config.yaml': 'the resolved run settings, which the card shows as the training recipe',
        'hub/config.json': "timm's export config; training writes hub/ with timm.models.save_for_hf",
        'hub/model.safetensors': 'the exported weights (safetensors); re-export them with '
                                 'timm.models.save_for_hf(model, "<run>/hub", safe_serialization=True)',
    }
    for name, why in needed.items():
        if not (folder / name).is_file():
            raise RunFolderError(f'Run folder {folder} has no {name}: publishing needs {why}.')
    results = _read_json(folder / 'results.json')
    try:
        settings = yaml.safe_load((folder / 'config.yaml').read_text(encoding='utf-8')) or {}
    except yaml.YAMLError as error:
        raise RunFolderError(f'{folder / "config.yaml"} is not valid YAML ({error}).') from error
    run = Run(folder=folder, results=results, settings=settings, hub_config=_read_json(folder / 'hub/config.json'))

    for key in ('architecture', 'num_classes', 'pretrained_cfg'):
        if key not in run.hub_config:
            raise RunFolderError(
                f"{folder / 'hub/config.json'} has no {key!r}; it is not a timm export. Re-export the best "
                f"weights with timm.models.save_for_hf.")
    for key in ('mean', 'std', 'input_size'):
        if key not in run.pretrained_cfg:
            raise RunFolderError(f"{folder / 'hub/config.json'} has no pretrained_cfg[{key!r}]; re-export it "
                                 f"with timm.models.save_for_hf so users get the preprocessing.")
    if not is_model(run.architecture):
        raise RunFolderError(f'Architecture {run.architecture!r} in hub/config.json is not a timm model '
                             f'(after import timm_gradattn); the export does not match this installation.')
    if 'top1' not in results:
        raise RunFolderError(f'{folder / "results.json"} has no test top-1 ("top1"); the run did not finish '
                             f'its test evaluation.')
    model = results.get('model')
    # train.py records the --model it was given: a registry name (maybe with a tag), or hf-hub:/local-dir:.
    if isinstance(model, str) and ':' not in model and get_arch_name(model) != run.architecture:
        raise RunFolderError(f'results.json is for model {model!r} but hub/config.json exports '
                             f'{run.architecture!r}: the folder mixes two runs.')
    num_classes = results.get('num_classes')
    if num_classes is not None and num_classes != run.hub_config['num_classes']:
        raise RunFolderError(f'results.json has {num_classes} classes but hub/config.json has '
                             f'{run.hub_config["num_classes"]}: the folder mixes two runs.')
    label_names = results.get('label_names')
    if label_names and run.hub_config.get('label_names') and list(label_names) != list(run.hub_config['label_names']):
        raise RunFolderError('results.json and hub/config.json name the classes differently: the folder '
                             'mixes two runs.')
    return run


def default_repo_id(run: Run) -> str:
    """``<namespace>/<model>.<tag>``, the name ``create_model('<model>.<tag>', pretrained=True)`` looks up."""
    if run.tag not in TAGS:
        raise PublishError(
            f"The run's dataset {run.tag!r} is not a pretrained tag of the registry ({', '.join(TAGS)}), so there "
            f"is no default repository name; pass --repo-id <namespace>/<name>.")
    return f'{hub_namespace()}/{run.architecture}.{run.tag}'


# --- the model card -----------------------------------------------------------------------------------

def card_template_for(architecture: str, templates_dir: Union[str, Path] = HUB_CARDS_DIR) -> Path:
    """The card template of the model family (the timm module that registers ``architecture``)."""
    templates_dir = Path(templates_dir)
    if not templates_dir.is_dir():
        raise CardTemplateError(
            f'Model-card templates folder {templates_dir} is missing. Publishing reads hub_cards/ from a '
            f'source checkout of timm-gradattn (pip install -e .); pass --template to use another card.')
    for template in sorted(templates_dir.glob('*.md')):
        if template.name != GENERIC_TEMPLATE and is_model_in_modules(get_arch_name(architecture), [template.stem]):
            return template
    return templates_dir / GENERIC_TEMPLATE


def card_metrics(results: Dict[str, Any], num_classes: int) -> List[Tuple[str, str, Optional[str], str, Any]]:
    """(results key, metric type, metric config, name, value) of every test metric the card reports."""
    metrics = []
    for key, metric_type, metric_config, name in CARD_METRICS:
        if key not in results or results[key] is None:
            continue
        k = int(key[3:]) if key.startswith('top') else None
        if k is not None and k > 1 and k >= num_classes:
            continue  # top-k over k >= num_classes classes is 100 % whatever the model does
        metrics.append((key, metric_type, metric_config, name, results[key]))
    return metrics


def _hub_base_model(pretrained_from: Any) -> Optional[str]:
    """The Hub repo of the weights a run was fine-tuned from, or None (from scratch, or a local file)."""
    if not pretrained_from or not isinstance(pretrained_from, str):
        return None
    if pretrained_from.startswith('hf-hub:'):
        return pretrained_from[len('hf-hub:'):].split('@')[0]
    if (pretrained_from.startswith(('local-dir:', '/', '.', '~')) or '\\' in pretrained_from
            or pretrained_from.lower().endswith(_WEIGHT_FILE_SUFFIXES) or Path(pretrained_from).exists()):
        return None  # a file or folder on the training machine
    name, tag = split_model_name_tag(pretrained_from)
    if is_model(name):
        cfg = get_pretrained_cfg(pretrained_from if tag else name)
        return getattr(cfg, 'hf_hub_id', None) if cfg is not None else None
    if pretrained_from.count('/') == 1:
        return pretrained_from  # already a repo id
    return None


def _markdown_cell(value: Any) -> str:
    if isinstance(value, float):
        text = f'{value:.6g}'
    elif isinstance(value, dict):
        text = '; '.join(f'{k}: {_markdown_cell(v)}' for k, v in value.items() if v is not None)
    elif isinstance(value, (list, tuple)):
        text = ', '.join(str(v) for v in value)
    else:
        text = str(value)
    return text.replace('|', '\\|').replace('\n', ' ')


def _table(header: Tuple[str, str], rows: Sequence[Tuple[Any, Any]]) -> str:
    lines = [f'| {header[0]} | {header[1]} |', '|---|---|']
    lines += [f'| {_markdown_cell(name)} | {_markdown_cell(value)} |' for name, value in rows]
    return '\n'.join(lines)


def _flatten(settings: Dict[str, Any], prefix: str = '') -> List[Tuple[str, Any]]:
    items = []
    for key, value in settings.items():
        name = f'{prefix}{key}'
        if isinstance(value, dict):
            items += _flatten(value, f'{name}.')
        else:
            items.append((name, value))
    return items


def _public_settings(settings: Dict[str, Any]) -> List[Tuple[str, Any]]:
    public = []
    for name, value in _flatten(settings):
        key = name.rsplit('.', 1)[-1]
        if value is None or key in _NOT_RECIPE or _PRIVATE_SETTING.search(key):
            continue
        if isinstance(value, str) and (value.startswith(('/', '~')) or re.match(r'^[A-Za-z]:[\\/]', value)):
            continue
        public.append((f'`{name}`', value))
    return public


def _format_metric(key: str, value: Any) -> str:
    if not isinstance(value, (int, float)):
        return str(value)
    return f'{value:.2f}' if key.startswith('top') else f'{value:.4f}'


def card_fields(run: Run, repo_id: str, config: Optional[Dict[str, Any]] = None,
                license: Optional[str] = None) -> Dict[str, Optional[str]]:
    """Every value a card template may use, as text; None where the run does not record it.

    ``config`` is the config.json going into the upload folder (the run's, completed with label names).
    """
    config = config or run.hub_config
    results, pretrained_cfg = run.results, config['pretrained_cfg']
    architecture, tag = run.architecture, run.tag
    info = DATASETS.get(tag) if tag else None
    num_classes = config['num_classes']

    doc = (model_entrypoint(architecture).__doc__ or '').strip().split('\n\n')[0]
    model_summary = ' '.join(doc.split()) or f'A timm `{architecture}` image classifier.'
    model_args = config.get('model_args') or {}
    labels = config.get('label_names') or pretrained_cfg.get('label_names')
    if labels:
        shown = [str(label) for label in labels[:20]]
        label_text = ', '.join(f'`{label}`' for label in shown)
        if len(labels) > len(shown):
            label_text += f' ... ({len(labels)} in all, listed in `config.json`)'
    else:
        label_text = f'class indices 0-{num_classes - 1} (no names recorded)'
    in_chans = pretrained_cfg['input_size'][0]

    pretrained_from = results.get('pretrained_from')
    base_model = _hub_base_model(pretrained_from)
    if not pretrained_from:
        origin = 'from scratch'
    elif base_model:
        origin = f'fine-tuned from [`{base_model}`](https://huggingface.co/{base_model})'
    else:
        origin = 'fine-tuned from local weights'

    metrics = card_metrics(results, num_classes)
    metrics_table = _table(('Test metric', 'Value'), [(name, _format_metric(key, value))
                                                      for key, _, _, name, value in metrics])
    run_facts = [(label, results[key]) for key, label in _RUN_FACTS if results.get(key) is not None]
    recipe = _public_settings(run.settings)

    namespace, _, repo_name = repo_id.partition('/')
    if tag in TAGS and repo_name == f'{architecture}.{tag}':
        registry_usage = (
            f"The registry name finds this repository too: `timm.create_model('{architecture}.{tag}', "
            f"pretrained=True)` (after `import timm_gradattn`) looks up `<namespace>/{architecture}.{tag}`, "
            f"with the namespace `{DEFAULT_HUB_NAMESPACE}` unless the environment variable "
            f"`{HUB_NAMESPACE_ENV}` names another" + (
                '.' if namespace == DEFAULT_HUB_NAMESPACE else f"; set `{HUB_NAMESPACE_ENV}={namespace}` for this one."))
    else:
        registry_usage = (f"This repository is not named `<namespace>/<model>.<tag>`, so load it by its id "
                          f"(`hf-hub:{repo_id}`) as above.")

    return {
        'repo_id': repo_id,
        'repo_name': repo_name,
        'architecture': architecture,
        'model_summary': model_summary,
        'tag': tag,
        'dataset': f'[{info.title}]({info.homepage})' if info else (f'`{tag}`' if tag else None),
        'dataset_citation': f'Dataset: {info.citation}' if info and info.citation else '',
        'num_classes': str(num_classes),
        'label_names': label_text,
        'input_size': ' x '.join(str(s) for s in pretrained_cfg['input_size']),
        'image_mode': {1: 'L', 3: 'RGB', 4: 'RGBA'}.get(in_chans),
        'mean': str(tuple(pretrained_cfg['mean'])),
        'std': str(tuple(pretrained_cfg['std'])),
        'num_params': f'{results["num_params"]:,}' if results.get('num_params') is not None else None,
        'model_args': ', '.join(f'`{k}={v!r}`' for k, v in model_args.items()) or 'the registered defaults',
        'origin': origin,
        'registry_usage': registry_usage,
        'metrics_table': metrics_table,
        'run_table': _table(('Run', 'Value'), run_facts) if run_facts else '',
        'recipe_table': _table(('Setting', 'Value'), recipe) if recipe else None,
        'protocol': None if results.get('protocol') is None else str(results['protocol']),
        'seed': None if results.get('seed') is None else str(results['seed']),
        'license': license or pretrained_cfg.get('license') or (info.license if info else None),
        'citations': _read_citations(),
        'timm_version': timm.__version__,
    }


def _read_citations() -> Optional[str]:
    path = HUB_CARDS_DIR / 'citations.bib'
    return path.read_text(encoding='utf-8').strip() if path.is_file() else None


# Where each card field comes from, for errors about a value the run lacks.
_FIELD_SOURCES = {
    'num_params': 'results.json "num_params"',
    'protocol': 'results.json "protocol"',
    'seed': 'results.json "seed"',
    'recipe_table': 'config.yaml (no publishable settings)',
    'license': 'hub/config.json pretrained_cfg "license" or the dataset; pass --license',
    'dataset': 'results.json "dataset"',
    'tag': 'results.json "dataset"',
    'image_mode': 'hub/config.json pretrained_cfg "input_size" (1, 3 or 4 channels)',
    'citations': f'{HUB_CARDS_DIR / "citations.bib"}',
}


def card_metadata(run: Run, fields: Dict[str, Optional[str]], template_metadata: Dict[str, Any]) -> ModelCardData:
    """The card's YAML metadata: the template's (tags, library) plus what the run measured."""
    info = DATASETS.get(run.tag) if run.tag else None
    dataset_id = (info.hf_dataset or info.name) if info else run.tag
    dataset_name = info.title if info else run.tag
    eval_results = [
        EvalResult(
            task_type='image-classification', task_name='Image Classification',
            dataset_type=dataset_id, dataset_name=dataset_name, dataset_split='test',
            metric_type=metric_type, metric_config=metric_config, metric_name=name, metric_value=value)
        for key, metric_type, metric_config, name, value in card_metrics(run.results, run.hub_config['num_classes'])
    ]
    metadata = dict(template_metadata)
    metadata.update(license=fields['license'], model_name=fields['repo_name'], eval_results=eval_results)
    if dataset_id:
        metadata['datasets'] = [dataset_id]
    if fields['license'] == 'other' and info is not None:
        # The Hub asks 'other' licences for a name and a link to their terms: the dataset's own page.
        metadata.setdefault('license_name', f'{info.name.replace("_", "-")}-terms')
        metadata.setdefault('license_link', info.homepage)
    base_model = _hub_base_model(run.results.get('pretrained_from'))
    if base_model:
        metadata.update(base_model=base_model, base_model_relation='finetune')
    return ModelCardData(**metadata)


_FRONT_MATTER = re.compile(r'\A---\n(.*?)\n---\n', re.DOTALL)


def render_card(template_path: Union[str, Path], fields: Dict[str, Optional[str]],
                metadata: Optional[ModelCardData] = None) -> str:
    """Fill a card template (YAML front matter + ``string.Template`` Markdown body) with ``fields``.

    The front matter of the template is static YAML (tags, library); the run's metadata is merged in by
    ``card_metadata`` and passed as ``metadata``. Every ``${field}`` of the body must be a card field with
    a value, else ``CardTemplateError`` names the field and the template.
    """
    template_path = Path(template_path)
    text = template_path.read_text(encoding='utf-8')
    match = _FRONT_MATTER.match(text)
    body = text[match.end():] if match else text
    body_template = string.Template(body)
    for found in body_template.pattern.finditer(body):
        if found.group('invalid') is not None:
            line = body[:found.start()].count('\n') + 1 + (text[:match.end()].count('\n') if match else 0)
            raise CardTemplateError(
                f"Model-card template {template_path} has a lone '$' on line {line}; write '$$' for a dollar "
                f"sign or '${{field}}' for a card field.")
        name = found.group('named') or found.group('braced')
        if name is None:
            continue
        if name not in fields:
            raise CardTemplateError(
                f"Model-card template {template_path} uses ${{{name}}}, which is not a card field. "
                f"Card fields: {', '.join(sorted(fields))}.")
        if fields[name] is None:
            source = _FIELD_SOURCES.get(name, 'the run folder')
            raise CardTemplateError(
                f"Model-card template {template_path} needs ${{{name}}}, but the run records no value for it "
                f"(from {source}). Add it to the run, or drop the field from the template.")
    rendered = body_template.substitute(fields)
    if metadata is None:
        return rendered
    return f'---\n{metadata.to_yaml()}\n---\n{rendered}'


def _template_metadata(template_path: Path) -> Dict[str, Any]:
    match = _FRONT_MATTER.match(template_path.read_text(encoding='utf-8'))
    if not match:
        return {}
    try:
        metadata = yaml.safe_load(match.group(1)) or {}
    except yaml.YAMLError as error:
        raise CardTemplateError(f'The YAML front matter of model-card template {template_path} does not parse: '
                                f'{error}') from error
    if not isinstance(metadata, dict):
        raise CardTemplateError(f'The front matter of model-card template {template_path} must be a YAML mapping.')
    return metadata


# --- staging and verification ------------------------------------------------------------------------

def _upload_config(run: Run) -> Dict[str, Any]:
    """hub/config.json completed with the class names the run recorded, if the export lacks them."""
    config = json.loads(json.dumps(run.hub_config))
    if not config.get('label_names') and run.results.get('label_names'):
        config['label_names'] = list(run.results['label_names'])
    return config


def stage_upload_folder(
        run: Run,
        repo_id: str,
        out: Optional[Union[str, Path]] = None,
        template: Optional[Union[str, Path]] = None,
        license: Optional[str] = None,
) -> Path:
    """Write the folder to upload (``UPLOAD_FILES``) to ``out`` (default ``<run>/upload``) and return it.

    The card is rendered before anything is written, so a template error leaves no half-made folder.
    """
    out = Path(out) if out is not None else run.folder / DEFAULT_STAGING
    protected = {run.folder.resolve(), run.hub_folder.resolve(), (run.folder / 'last').resolve()}
    if out.resolve() in protected:
        raise PublishError(f'--out {out} would write into the run\'s own files; choose a new folder, e.g. '
                           f'{run.folder / DEFAULT_STAGING}.')
    if out.exists():
        if not out.is_dir():
            raise PublishError(f'--out {out} exists and is not a folder; choose a new folder.')
        unexpected = sorted(p.name for p in out.iterdir() if p.name not in UPLOAD_FILES)
        if unexpected:
            raise PublishError(
                f'{out} holds files that are not part of an upload ({", ".join(unexpected)}); publishing only '
                f'overwrites {", ".join(UPLOAD_FILES)}. Choose another --out or move those files away.')

    config = _upload_config(run)
    template = Path(template) if template is not None else card_template_for(run.architecture)
    fields = card_fields(run, repo_id, config=config, license=license)
    card = render_card(template, fields, card_metadata(run, fields, _template_metadata(template)))

    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run.hub_folder / 'model.safetensors', out / 'model.safetensors')
    (out / 'config.json').write_text(json.dumps(config, indent=2) + '\n', encoding='utf-8')
    (out / 'README.md').write_text(card, encoding='utf-8')
    return out


def _verification_batch(input_size: Sequence[int]) -> torch.Tensor:
    generator = torch.Generator().manual_seed(_VERIFY_SEED)
    return torch.randn((_VERIFY_BATCH, *input_size), generator=generator)


def verify_upload_folder(folder: Union[str, Path], run: Run, rtol: float = 1e-4, atol: float = 1e-5) -> float:
    """Check ``folder`` is exactly what should be uploaded for ``run``; return the largest logit difference.

    Raises ``VerificationError`` when the file set is wrong, the card's model-index differs from
    results.json, the folder does not load with ``create_model('local-dir:...', pretrained=True)``, or its
    logits differ from those of ``model_best.safetensors`` on a fixed random batch.
    """
    folder = Path(folder)
    present = sorted(p.name for p in folder.iterdir())
    if present != sorted(UPLOAD_FILES):
        raise VerificationError(f'{folder} holds {present}; an upload must hold exactly {sorted(UPLOAD_FILES)}.')

    metadata = metadata_load(folder / 'README.md') or {}
    try:
        card_values = {(m['type'], m.get('config')): m['value']
                       for m in metadata['model-index'][0]['results'][0]['metrics']}
    except (KeyError, IndexError, TypeError) as error:
        raise VerificationError(f'{folder / "README.md"} has no model-index with metrics in its front matter.') from error
    expected = {(metric_type, metric_config): value for _, metric_type, metric_config, _, value
                in card_metrics(run.results, run.hub_config['num_classes'])}
    if card_values != expected:
        raise VerificationError(f'The model-index of {folder / "README.md"} ({card_values}) differs from the '
                                f"run's results.json ({expected}).")

    config = json.loads((folder / 'config.json').read_text(encoding='utf-8'))
    try:
        published = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    except Exception as error:  # noqa: BLE001 - any failure here means users could not load the upload
        raise VerificationError(f"timm.create_model('local-dir:{folder}', pretrained=True) fails: "
                                f'{type(error).__name__}: {error}') from error
    if published.num_classes != run.hub_config['num_classes']:
        raise VerificationError(f'{folder} loads with {published.num_classes} classes, the run has '
                                f'{run.hub_config["num_classes"]}.')

    input_size = tuple(config['pretrained_cfg']['input_size'])
    model_args = dict(config.get('model_args') or {})
    model_args.setdefault('num_classes', config['num_classes'])
    model_args.setdefault('in_chans', input_size[0])
    reference = timm.create_model(config['architecture'], pretrained=False, **model_args).eval()
    try:
        load_checkpoint(reference, str(run.best_weights), strict=True)
    except RuntimeError as error:
        raise VerificationError(f'{run.best_weights} does not fit the architecture in hub/config.json '
                                f'({config["architecture"]}, {model_args}): {error}') from error

    batch = _verification_batch(input_size)
    with torch.inference_mode():
        published_logits, reference_logits = published(batch), reference(batch)
    max_diff = float((published_logits - reference_logits).abs().max())
    if not torch.allclose(published_logits, reference_logits, rtol=rtol, atol=atol):
        raise VerificationError(
            f"The weights in {run.hub_folder} are not the run's best weights: on a fixed random batch their logits "
            f'differ from those of {run.best_weights} by up to {max_diff:.4g} (tolerance {atol} + {rtol} x |logit|). '
            f'Re-export hub/ from model_best.safetensors with timm.models.save_for_hf before publishing.')
    return max_diff


# --- uploading ---------------------------------------------------------------------------------------

def publish(
        run_folder: Union[str, Path],
        repo_id: Optional[str] = None,
        *,
        out: Optional[Union[str, Path]] = None,
        dry_run: bool = False,
        private: bool = False,
        revision: Optional[str] = None,
        create_pr: bool = False,
        token: Optional[str] = None,
        commit_message: Optional[str] = None,
        template: Optional[Union[str, Path]] = None,
        license: Optional[str] = None,
        registry: Optional[Union[str, Path]] = WEIGHTS_REGISTRY,
        api: Optional[HfApi] = None,
) -> PublishResult:
    """Stage, verify and (unless ``dry_run``) upload a run; see the module docstring.

    Args:
        run_folder: The run folder train.py wrote.
        repo_id: ``<namespace>/<name>``; default ``<namespace>/<model>.<tag>`` from the run.
        out: Where to stage the upload folder; default ``<run>/upload``.
        dry_run: Stage and verify only.
        private, revision, create_pr, commit_message: As ``HfApi.upload_folder``; a missing ``revision``
            branch is created.
        token: Hub token; default huggingface_hub's own (HF_TOKEN, then the cached login).
        template: A card template to use instead of the family's one in hub_cards/.
        license: The licence to declare, instead of the one in the export config / of the dataset.
        registry: The weights registry to record the upload in (None: do not record).
        api: The ``HfApi`` to upload with (default: one made with ``token``).
    """
    if repo_id is not None:
        check_repo_id(repo_id)
    run = load_run(run_folder)
    repo_id = repo_id or default_repo_id(run)
    if not dry_run and api is None:
        token = token or get_token()
        if not token:
            raise PublishError(
                'No Hugging Face token: pass --token, set HF_TOKEN, or log in once with `hf auth login`. '
                'Use --dry-run to build and verify the upload folder without one.')
    folder = stage_upload_folder(run, repo_id, out=out, template=template, license=license)
    max_diff = verify_upload_folder(folder, run)
    if dry_run:
        return PublishResult(folder=folder, repo_id=repo_id, max_abs_logit_diff=max_diff, uploaded=False)

    api = api or HfApi(token=token, library_name='timm', library_version=timm.__version__)
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
    repo_id = getattr(repo_url, 'repo_id', None) or repo_id
    if revision:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo_id, folder_path=folder, revision=revision, create_pr=create_pr,
        commit_message=commit_message or f'Add {run.architecture} trained on {run.tag} (test top-1 '
                                         f'{run.results["top1"]:.2f} %)')
    result = PublishResult(folder=folder, repo_id=repo_id, max_abs_logit_diff=max_diff, uploaded=True,
                           commit_url=getattr(commit, 'pr_url', None) or getattr(commit, 'commit_url', None))
    # create_model(..., pretrained=True) loads the main branch: a branch or pull request is not published yet.
    if create_pr or revision not in (None, 'main'):
        result.registry_note = 'the upload is on a branch or pull request, not on main'
    elif registry is None:
        result.registry_note = 'no registry given'
    elif not Path(registry).parent.is_dir():
        result.registry_note = f'{Path(registry).parent} does not exist (publishing from outside a source checkout)'
    else:
        record_published(registry, dict(
            repo_id=repo_id, model=run.architecture, tag=run.tag, top1=run.results['top1'],
            date=datetime.datetime.now(datetime.timezone.utc).date().isoformat(),
            commit=getattr(commit, 'oid', None), private=private))
        result.registry_updated = True
    return result


# --- the weights registry and the README table ------------------------------------------------------

def load_registry(path: Union[str, Path] = WEIGHTS_REGISTRY) -> List[Dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    data = json.loads(path.read_text(encoding='utf-8'))
    if not isinstance(data, dict) or not isinstance(data.get('weights'), list):
        raise PublishError(f'{path} is not a weights registry: expected {{"weights": [...]}}.')
    return data['weights']


def record_published(path: Union[str, Path], entry: Dict[str, Any]) -> None:
    """Add ``entry`` to the registry at ``path``, replacing an earlier upload to the same repo."""
    entries = [e for e in load_registry(path) if e.get('repo_id') != entry['repo_id']] + [entry]
    entries.sort(key=lambda e: (str(e.get('model')), str(e.get('tag')), e['repo_id']))
    Path(path).write_text(json.dumps({'weights': entries}, indent=2) + '\n', encoding='utf-8')


def train_and_publish_command(model: str, tag: str, namespace: str) -> str:
    """The command line that trains ``model`` on ``tag`` with the paper's recipe and publishes the result."""
    from .config import build_parser
    output = build_parser().get_default('output')
    experiment = f'{model}.{tag}'
    data = '' if tag == 'digits' else f' --data-dir data/{tag} --download'  # digits ships with scikit-learn
    return (f'python train.py --model {model} --dataset {tag}{data} --recipe paper --experiment {experiment} && '
            f'python -m timm_gradattn.publish {output}/{experiment} --repo-id {namespace}/{experiment}')


def weights_table(registry: Union[str, Path] = WEIGHTS_REGISTRY, namespace: Optional[str] = None) -> str:
    """Markdown: for every registered model and tag, the published repo and its measured test top-1."""
    namespace = namespace or hub_namespace()
    entries = load_registry(registry)
    by_repo = {e['repo_id']: e for e in entries}
    expected = {f'{namespace}/{model}.{tag}': (model, tag) for model in MODEL_NAMES for tag in TAGS}

    lines = [
        f'Test top-1 (%) of the published weights, `<model>.<tag>` on the Hub as `{namespace}/<model>.<tag>`; '
        f'"not published" where no weights exist yet. Generated by `python -m timm_gradattn.publish '
        f'--weights-table` from `hub_cards/weights.json`, which each successful upload updates.',
        '',
        '| model | ' + ' | '.join(TAGS) + ' |',
        '|---|' + '---|' * len(TAGS),
    ]
    missing = []
    for model in MODEL_NAMES:
        cells = []
        for tag in TAGS:
            repo_id = f'{namespace}/{model}.{tag}'
            entry = by_repo.get(repo_id)
            if entry is None:
                cells.append('not published')
                missing.append((model, tag))
            else:
                private = ' (private)' if entry.get('private') else ''
                cells.append(f'[{float(entry["top1"]):.2f}](https://huggingface.co/{repo_id}){private}')
        lines.append(f'| `{model}` | ' + ' | '.join(cells) + ' |')

    published = len(expected) - len(missing)
    lines += ['', f'Published: {published} of {len(expected)}.' + (
        ' No weights have been published yet.' if published == 0 else '')]
    others = [e for e in entries if e['repo_id'] not in expected]
    if others:
        lines += ['', 'Other published repositories (load with `hf-hub:<repo>`):', '',
                  '| repository | model | dataset | test top-1 (%) | date |', '|---|---|---|---|---|']
        lines += [f'| [{e["repo_id"]}](https://huggingface.co/{e["repo_id"]}) | `{e.get("model")}` | '
                  f'{e.get("tag")} | {float(e["top1"]):.2f} | {e.get("date", "")} |' for e in others]
    if missing:
        lines += ['', f'<details><summary>Train and publish the {len(missing)} missing weights</summary>', '',
                  '```bash']
        lines += [train_and_publish_command(model, tag, namespace) for model, tag in missing]
        lines += ['```', '', 'Datasets other than digits are read from `data/<tag>`: `--download` fetches those that '
                  'can be fetched, and train.py says where to get the others.', '', '</details>']
    return '\n'.join(lines) + '\n'


# --- command line ------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='python -m timm_gradattn.publish',
        description='Verify a training run and publish its best weights to the Hugging Face Hub as a timm model '
                    '(config.json, model.safetensors, README.md model card).')
    parser.add_argument('run', nargs='?', help='run folder written by train.py (<output>/<experiment>)')
    parser.add_argument('--repo-id', help=f'<namespace>/<name> to publish to (default: <namespace>/<model>.<tag>, '
                                          f'the namespace from ${HUB_NAMESPACE_ENV}, else {DEFAULT_HUB_NAMESPACE})')
    parser.add_argument('--dry-run', action='store_true',
                        help='build and verify the upload folder, upload nothing')
    parser.add_argument('--out', help=f'where to build the upload folder (default: <run>/{DEFAULT_STAGING})')
    parser.add_argument('--private', action='store_true', help='create the repository as private')
    parser.add_argument('--revision', help='branch to upload to (created if missing; default: main)')
    parser.add_argument('--create-pr', action='store_true', help='open a pull request instead of committing')
    parser.add_argument('--token', help='Hugging Face token (default: HF_TOKEN, then the cached `hf auth login`)')
    parser.add_argument('--commit-message', help='commit message (default names the model, dataset and top-1)')
    parser.add_argument('--license', help='licence to declare on the card (default: the dataset\'s)')
    parser.add_argument('--template', help='model-card template to use instead of hub_cards/<family>.md')
    parser.add_argument('--registry', default=str(WEIGHTS_REGISTRY),
                        help='weights registry to record the upload in (default: %(default)s)')
    parser.add_argument('--weights-table', action='store_true',
                        help='print the Markdown table of published weights from the registry and exit')
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.weights_table:
        sys.stdout.write(weights_table(args.registry))
        return 0
    if not args.run:
        parser.error('give a run folder to publish, or --weights-table')
    try:
        result = publish(
            args.run, args.repo_id, out=args.out, dry_run=args.dry_run, private=args.private,
            revision=args.revision, create_pr=args.create_pr, token=args.token, commit_message=args.commit_message,
            template=args.template, license=args.license, registry=args.registry)
    except PublishError as error:
        print(f'error: {error}', file=sys.stderr)
        return 1
    print(f'Verified {result.folder}: loads with timm.create_model("local-dir:{result.folder}", pretrained=True), '
          f'logits within {result.max_abs_logit_diff:.3g} of model_best.safetensors.')
    if not result.uploaded:
        print(f'Dry run: nothing uploaded. {result.folder} is exactly what would go to {result.repo_id}.')
        return 0
    print(f'Uploaded to https://huggingface.co/{result.repo_id}' + (f' ({result.commit_url})' if result.commit_url else ''))
    print(f'Recorded in {args.registry}.' if result.registry_updated else
          f'Not recorded in the weights registry: {result.registry_note}.')
    return 0


if __name__ == '__main__':
    sys.exit(main())
