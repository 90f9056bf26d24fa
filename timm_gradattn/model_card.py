"""The model card of a published run: one template per model family in ``hub_cards/``, filled from the run's
own files, with the run's test metrics as the card's model-index (huggingface_hub's ``ModelCard``,
``ModelCardData`` and ``EvalResult``).

A template is YAML front matter (tags, library: what every card of the family shares) and a Markdown body
with ``${field}`` placeholders (``string.Template``), filled from ``card_fields``. Results are never typed
into a template: ``card_metadata`` adds them from ``results.json``.
"""
import re
import string
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

import timm
from timm.models import get_arch_name, get_pretrained_cfg, is_model, is_model_in_modules, model_entrypoint

from .data.info import DATASETS
from .errors import UserError
from .families import FAMILIES
from .metrics import METRIC_KEYS, topk_informs
from .models import DEFAULT_HUB_NAMESPACE, HUB_NAMESPACE_ENV, model_tags
from .reporting import machine_line, markdown_table

__all__ = ['HUB_CARDS_DIR', 'CARD_METRICS', 'CARD_CITATIONS', 'CardTemplateError', 'card_template_for', 'card_metrics',
           'card_citations', 'card_fields', 'card_metadata', 'load_template', 'render_card', 'build_card']

PathLike = Union[str, Path]
# A wheel ships the templates inside the package; a source checkout (editable install) has them at the top.
_PACKAGED_CARDS = Path(__file__).resolve().parent / 'hub_cards'
HUB_CARDS_DIR = _PACKAGED_CARDS if _PACKAGED_CARDS.is_dir() else Path(__file__).resolve().parent.parent / 'hub_cards'
GENERIC_TEMPLATE = 'generic.md'
CITATIONS_FILE = HUB_CARDS_DIR / 'citations.bib'
# The papers a card cites, as keys of citations.bib, by card template (the timm module that registers the model,
# from the family registry). Every card also cites the entries no family names (the software: timm). The SE / CBAM
# baselines and any other timm model are trained with the GradAttn paper's protocol.
CARD_CITATIONS: Dict[str, Tuple[str, ...]] = {
    **{module: (family.paper.bibtex_key,) for family in FAMILIES.values() for module in family.modules},
    'generic': (FAMILIES['gradattn'].paper.bibtex_key,),
}
_BIB_ENTRY = re.compile(r'^@\w+\{([^,\s]+),.*?^\}', re.MULTILINE | re.DOTALL)  # key; ends at a line-initial brace
# results.json key -> (model-index metric type, metric config, name on the card). Keys and units are those of
# timm_gradattn.metrics: top-k accuracies in percent, the rest fractions or nats.
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
    ('selection', 'Weights kept'),
    ('best_epoch', 'Epoch of the weights kept'),
    ('epochs_run', 'Epochs run'),
    ('val_top1_best', 'Best validation top-1 (%)'),
    ('train_top1_at_best', 'Train top-1 at the best epoch (%)'),
    ('train_val_gap', 'Train-validation gap at the best epoch (points)'),
    ('seconds_per_epoch', 'Seconds per epoch'),
    ('machine', 'Trained on'),
)
_PRIVATE_SETTING = re.compile(r'(dir|path|output|resume|token|checkpoint)', re.IGNORECASE)  # never on a public card
_NOT_RECIPE = {'workers', 'log_interval', 'download', 'grad_stats_every'}  # how a run executes, not what it learns
_ABSOLUTE_PATH = re.compile(r'^([/~]|[A-Za-z]:[\\/])')
_LOCAL_WEIGHTS = re.compile(r'^(local-dir:|[/.~]|[A-Za-z]:[\\/])|\\|\.(safetensors|pth|pt|bin|ckpt|tar)$',
                            re.IGNORECASE)
# Where the card fields that are not results.json values of the same name come from, for errors about a missing value.
_FIELD_SOURCES = {
    'recipe_table': 'config.yaml (no publishable settings)',
    'license': 'hub/config.json pretrained_cfg "license" or the dataset; pass --license',
    'dataset': 'results.json "dataset"',
    'tag': 'results.json "dataset"',
    'image_mode': 'hub/config.json pretrained_cfg "input_size" (1, 3 or 4 channels)',
    'citations': str(CITATIONS_FILE),
}


class CardTemplateError(UserError, ValueError):
    """A model-card template asks for a field the run cannot fill."""


def card_template_for(architecture: str, templates_dir: PathLike = HUB_CARDS_DIR) -> Path:
    """The card template of the model family (the timm module that registers ``architecture``)."""
    templates_dir = Path(templates_dir)
    if not templates_dir.is_dir():
        raise CardTemplateError(f'Model-card templates folder {templates_dir} is missing: reinstall timm-gradattn, '
                                f'or pass --template to use another card.')
    family = [t for t in sorted(templates_dir.glob('*.md'))
              if t.name != GENERIC_TEMPLATE and is_model_in_modules(get_arch_name(architecture), [t.stem])]
    return family[0] if family else templates_dir / GENERIC_TEMPLATE


def _bib_entries(text: str) -> Dict[str, str]:
    return {found.group(1): found.group(0) for found in _BIB_ENTRY.finditer(text)}


def card_citations(architecture: str, bib: PathLike = CITATIONS_FILE) -> Optional[str]:
    """The BibTeX entries of ``bib`` a card of ``architecture`` cites, in the file's order: its family's papers
    (``CARD_CITATIONS``) and every entry no family claims. None without the file."""
    bib = Path(bib)
    if not bib.is_file():
        return None
    own = CARD_CITATIONS.get(card_template_for(architecture).stem, ())
    claimed = {key for keys in CARD_CITATIONS.values() for key in keys}
    return '\n\n'.join(entry for key, entry in _bib_entries(bib.read_text(encoding='utf-8')).items()
                        if key in own or key not in claimed)


def card_metrics(results: Dict[str, Any], num_classes: int) -> List[Tuple[str, str, Optional[str], str, Any]]:
    """(results key, metric type, metric config, name, value) of every test metric the card reports."""
    def meaningful(key: str) -> bool:  # top-k over k >= num_classes classes is 100 % whatever the model does
        return not key.startswith('top') or topk_informs(int(key[3:]), num_classes)
    return [(key, metric_type, config, name, results[key]) for key, metric_type, config, name in CARD_METRICS
            if results.get(key) is not None and meaningful(key)]


def _hub_base_model(pretrained_from: Any) -> Optional[str]:
    """The Hub repo of the weights a run was fine-tuned from, or None (from scratch, or a local file)."""
    if not isinstance(pretrained_from, str) or not pretrained_from:
        return None
    if pretrained_from.startswith('hf-hub:'):
        return pretrained_from[len('hf-hub:'):].split('@')[0]
    if _LOCAL_WEIGHTS.search(pretrained_from) or Path(pretrained_from).exists():
        return None  # a file or folder on the training machine
    if is_model(get_arch_name(pretrained_from)):
        return getattr(get_pretrained_cfg(pretrained_from), 'hf_hub_id', None)
    return pretrained_from if pretrained_from.count('/') == 1 else None


def _local_weights_name(pretrained_from: str) -> str:
    """Local starting weights as a public card names them: a relative path as the run recorded it, an absolute one
    by its last two parts (the run folder and ``hub`` or the weights file), never the machine's folders above."""
    scheme = 'local-dir:' if pretrained_from.startswith('local-dir:') else ''
    path = pretrained_from[len(scheme):]
    if _ABSOLUTE_PATH.match(path):
        path = '.../' + '/'.join(re.split(r'[\\/]+', path.rstrip('/\\'))[-2:])
    return scheme + path


def _origin(pretrained_from: Any, base_model: Optional[str]) -> str:
    """How the run started, for the card's text: from scratch, or the weights it was fine-tuned from."""
    if not pretrained_from:
        return 'from scratch'
    if base_model:
        return f'fine-tuned from [`{base_model}`](https://huggingface.co/{base_model})'
    return f'fine-tuned from the local weights `{_local_weights_name(str(pretrained_from))}`'


def _public_settings(settings: Dict[str, Any], prefix: str = '') -> Iterator[Tuple[str, Any]]:
    """(`name`, value) of every setting a public card may show: no local paths, secrets or execution details."""
    for key, value in settings.items():
        if isinstance(value, str) and value.startswith('local-dir:'):  # --model: a fine-tune's starting export
            value = _local_weights_name(value)
        if isinstance(value, dict):
            yield from _public_settings(value, f'{prefix}{key}.')
        elif not (value is None or key in _NOT_RECIPE or _PRIVATE_SETTING.search(key)
                  or isinstance(value, str) and _ABSOLUTE_PATH.match(value)):
            yield f'`{prefix}{key}`', value


def _label_text(labels: Optional[Sequence[Any]], num_classes: int) -> str:
    if not labels:
        return f'class indices 0-{num_classes - 1} (no names recorded)'
    text = ', '.join(f'`{label}`' for label in labels[:20])
    return text + (f' ... ({len(labels)} in all, listed in `config.json`)' if len(labels) > 20 else '')


def _registry_usage(architecture: str, tag: Optional[str], repo_id: str) -> str:
    namespace, _, repo_name = repo_id.partition('/')
    if tag not in model_tags(architecture) or repo_name != f'{architecture}.{tag}':
        return (f'This repository is not named `<namespace>/<model>.<tag>`, so load it by its id '
                f'(`hf-hub:{repo_id}`) as above.')
    return (f"The registry name finds this repository too: `timm.create_model('{architecture}.{tag}', "
            f"pretrained=True)` (after `import timm_gradattn`) looks up `<namespace>/{architecture}.{tag}`, with the "
            f"namespace `{DEFAULT_HUB_NAMESPACE}` unless the environment variable `{HUB_NAMESPACE_ENV}` names another"
            + ('.' if namespace == DEFAULT_HUB_NAMESPACE else f"; set `{HUB_NAMESPACE_ENV}={namespace}` for this one."))


def card_fields(run, repo_id: str, config: Optional[Dict[str, Any]] = None,
                license: Optional[str] = None) -> Dict[str, Optional[str]]:
    """Every value a card template may use, as text; None where the run does not record it.

    ``config`` is the config.json going into the upload folder (the run's, completed with label names).
    """
    config = config or run.hub_config
    results, pretrained_cfg, architecture, tag = run.results, config['pretrained_cfg'], run.architecture, run.tag
    info, num_classes = DATASETS.get(tag) if tag else None, config['num_classes']
    doc = ' '.join((model_entrypoint(architecture).__doc__ or '').strip().split('\n\n')[0].split())
    base_model, pretrained_from = _hub_base_model(results.get('pretrained_from')), results.get('pretrained_from')
    metrics = [(name, f'{value:.2f}' if key.startswith('top') else f'{value:.4f}')
               for key, _, _, name, value in card_metrics(results, num_classes)]
    run_facts = [(label, machine_line(results[key]) if key == 'machine' else results[key])
                 for key, label in _RUN_FACTS if results.get(key) is not None]
    recipe = list(_public_settings(run.settings))
    return {
        'repo_id': repo_id, 'repo_name': repo_id.partition('/')[2], 'architecture': architecture,
        'model_summary': doc or f'A timm `{architecture}` image classifier.', 'tag': tag,
        'dataset': f'[{info.title}]({info.homepage})' if info else (f'`{tag}`' if tag else None),
        'dataset_citation': f'Dataset: {info.citation}' if info and info.citation else '',
        'num_classes': str(num_classes),
        'label_names': _label_text(config.get('label_names') or pretrained_cfg.get('label_names'), num_classes),
        'input_size': ' x '.join(str(s) for s in pretrained_cfg['input_size']),
        'image_mode': {1: 'L', 3: 'RGB', 4: 'RGBA'}.get(pretrained_cfg['input_size'][0]),
        'mean': str(tuple(pretrained_cfg['mean'])), 'std': str(tuple(pretrained_cfg['std'])),
        'num_params': f'{results["num_params"]:,}' if results.get('num_params') is not None else None,
        'model_args': ', '.join(f'`{k}={v!r}`' for k, v in (config.get('model_args') or {}).items())
                      or 'the registered defaults',
        'origin': _origin(pretrained_from, base_model),
        'registry_usage': _registry_usage(architecture, tag, repo_id),
        'metrics_table': markdown_table(('Test metric', 'Value'), metrics),
        'run_table': markdown_table(('Run', 'Value'), run_facts) if run_facts else '',
        'recipe_table': markdown_table(('Setting', 'Value'), recipe) if recipe else None,
        'protocol': None if results.get('protocol') is None else str(results['protocol']),
        'seed': None if results.get('seed') is None else str(results['seed']),
        'license': license or pretrained_cfg.get('license') or (info.license if info else None),
        'citations': card_citations(architecture),
        'timm_version': timm.__version__,
    }


def card_metadata(run, fields: Dict[str, Optional[str]], template_metadata: Dict[str, Any]) -> ModelCardData:
    """The card's YAML metadata: the template's (tags, library) plus what the run measured."""
    info = DATASETS.get(run.tag) if run.tag else None
    dataset_id = (info.hf_dataset or info.name) if info else run.tag
    metadata = dict(template_metadata, license=fields['license'], model_name=fields['repo_name'], eval_results=[
        EvalResult(task_type='image-classification', task_name='Image Classification', dataset_type=dataset_id,
                   dataset_name=info.title if info else run.tag, dataset_split='test', metric_type=metric_type,
                   metric_config=metric_config, metric_name=name, metric_value=value)
        for _, metric_type, metric_config, name, value in card_metrics(run.results, run.hub_config['num_classes'])])
    if dataset_id:
        metadata['datasets'] = [dataset_id]
    if fields['license'] == 'other' and info is not None:  # the Hub asks 'other' licences for a link to their terms
        metadata.setdefault('license_name', f'{info.name.replace("_", "-")}-terms')
        metadata.setdefault('license_link', info.homepage)
    base_model = _hub_base_model(run.results.get('pretrained_from'))
    if base_model:
        metadata.update(base_model=base_model, base_model_relation='finetune')
    return ModelCardData(**metadata)


def load_template(path: Path) -> ModelCard:
    try:
        return ModelCard(path.read_text(encoding='utf-8'))
    except (yaml.YAMLError, ValueError) as error:
        raise CardTemplateError(f'The YAML front matter of model-card template {path} is not a mapping of card '
                                f'metadata: {error}') from error


def render_card(template_path: PathLike, fields: Dict[str, Optional[str]],
                metadata: Optional[ModelCardData] = None) -> str:
    """Fill a card template (YAML front matter + ``string.Template`` Markdown body) with ``fields``.

    Every ``${field}`` of the body must be a card field with a value, else ``CardTemplateError`` names the
    field and the template. With ``metadata`` (see ``card_metadata``) the card gets it as front matter.
    """
    template_path = Path(template_path)
    card = load_template(template_path)
    citations = fields.get('citations')
    if citations:  # an entry the template types itself is not cited twice
        for key, entry in _bib_entries(citations).items():
            if re.search(r'^@\w+\{' + re.escape(key) + ',', card.text, re.MULTILINE):
                citations = citations.replace(entry, '')
        fields = dict(fields, citations=re.sub(r'\n{3,}', '\n\n', citations).strip())
    body = string.Template(card.text)
    text = template_path.read_text(encoding='utf-8')
    front_lines = text[:len(text) - len(card.text)].count('\n')  # for line numbers in the template file
    for found in body.pattern.finditer(card.text):
        name = found.group('named') or found.group('braced')
        if found.group('invalid') is not None:
            line = card.text[:found.start()].count('\n') + 1 + front_lines
            raise CardTemplateError(f"Model-card template {template_path} has a lone '$' on line {line}; write '$$' "
                                    f"for a dollar sign or '${{field}}' for a card field.")
        if name is not None and name not in fields:
            raise CardTemplateError(f"Model-card template {template_path} uses ${{{name}}}, which is not a card "
                                    f"field. Card fields: {', '.join(sorted(fields))}.")
        if name is not None and fields[name] is None:
            source = _FIELD_SOURCES.get(name, f'results.json "{name}"')
            raise CardTemplateError(f"Model-card template {template_path} needs ${{{name}}}, but the run records no "
                                    f"value for it (from {source}). Add it to the run, or drop the field from the "
                                    f"template.")
    card.text = body.substitute(fields)
    if metadata is None:
        return card.text
    card.data = metadata
    return str(card)


def build_card(run, repo_id: str, config: Optional[Dict[str, Any]] = None, template: Optional[PathLike] = None,
               license: Optional[str] = None) -> str:
    """The card of ``run`` published as ``repo_id``: its family's template (or ``template``), filled and with
    the run's metadata. ``config`` is the config.json going to the Hub (default: the run's export config)."""
    template = Path(template) if template is not None else card_template_for(run.architecture)
    fields = card_fields(run, repo_id, config=config, license=license)
    return render_card(template, fields, card_metadata(run, fields, load_template(template).data.to_dict()))
