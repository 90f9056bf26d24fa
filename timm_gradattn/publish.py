"""Publish a training run to the Hugging Face Hub as a timm model repository.

    python -m timm_gradattn.publish output/<experiment> --repo-id <namespace>/<model>.<tag> [--dry-run]
    python -m timm_gradattn.publish --weights-table

Publishing stages the run's ``hub/`` export (timm's ``save_for_hf``) with a model card rendered from
``hub_cards/<family>.md`` into ``<run>/upload/`` (or ``--out``), never changing the run's own files; verifies
that folder (exactly ``UPLOAD_FILES``, a model-index equal to ``results.json``, and ``create_model('local-dir:')``
logits equal to ``model_best.safetensors``'); uploads exactly it and records it in ``hub_cards/weights.json``,
which ``--weights-table`` turns into the table of docs/publishing.md. timm's ``push_to_hf_hub`` is not used, as it re-exports
into a temporary folder with a pickled copy of the weights and a generic card; the Hub calls are the ones it
makes (``HfApi`` with timm's library name, ``create_repo``, ``upload_folder``).
"""
import argparse
import datetime
import json
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import yaml
from huggingface_hub import HfApi, ModelCard, get_token
from huggingface_hub.utils import HFValidationError, validate_repo_id

import timm
from timm.models import get_arch_name, is_model

from .checkpoint import load_weights
from .cli import CommandLineParser, build_train_parser, run_entry_point
from .errors import UserError
from .families import DEFAULT_MODEL, MODEL_NAMES, paper_recipe
from .files import atomic_write_bytes, atomic_write_text
from .hub import client_config
from .model_card import HUB_CARDS_DIR, build_card, card_metrics
from .models import DEFAULT_HUB_NAMESPACE, HUB_NAMESPACE_ENV, hub_namespace, model_tags
from .reporting import markdown_table

PathLike = Union[str, Path]
UPLOAD_FILES = ('README.md', 'config.json', 'model.safetensors')  # what a published repository holds
WEIGHTS_REGISTRY = HUB_CARDS_DIR / 'weights.json'  # read for the table; uploads are recorded in a source checkout's
SOURCE_REGISTRY = Path(__file__).resolve().parent.parent / 'hub_cards' / 'weights.json'  # missing in a wheel install
DEFAULT_STAGING = 'upload'
NEAR_CHANCE_POINTS = 5.0  # a top-1 within this many points of 100 / classes draws a warning before publishing

_logger = logging.getLogger(__name__)


class PublishError(UserError, RuntimeError):
    """Publishing stopped before anything was uploaded."""


class RunFolderError(PublishError):
    """The run folder lacks a file publishing needs, or its files disagree."""


class VerificationError(PublishError):
    """The staged upload folder is not a faithful, loadable copy of the run's best weights."""


@dataclass
class Run:
    """The files of a finished training run that publishing reads."""
    folder: Path
    results: Dict[str, Any]      # results.json: test metrics and run facts
    settings: Dict[str, Any]     # config.yaml: the resolved run settings
    hub_config: Dict[str, Any]   # hub/config.json: timm's export config

    hub_folder = property(lambda self: self.folder / 'hub')
    best_weights = property(lambda self: self.folder / 'model_best.safetensors')
    architecture = property(lambda self: self.hub_config['architecture'])
    pretrained_cfg = property(lambda self: self.hub_config.get('pretrained_cfg', {}))
    tag = property(lambda self: self.results.get('dataset') or self.pretrained_cfg.get('tag'))


@dataclass
class PublishResult:
    folder: Path                       # the verified folder (uploaded unless dry_run)
    repo_id: str
    max_abs_logit_diff: float          # staged folder vs model_best.safetensors on the verification batch
    uploaded: bool
    commit_url: Optional[str] = None
    registry_updated: bool = False
    registry_note: Optional[str] = None  # why the upload was not recorded in the weights registry
    repo_id_note: Optional[str] = None   # where a dry run's repo id comes from when no default exists


# --- reading a run ------------------------------------------------------------------------------------
def check_repo_id(repo_id: str) -> str:
    """``repo_id`` if it is a valid ``<namespace>/<name>`` model repo id, else a ``PublishError``."""
    if not isinstance(repo_id, str) or repo_id.count('/') != 1:
        raise PublishError(
            f"Repo id {repo_id!r} must have the form '<namespace>/<name>' (a user or organisation, one slash, "
            f"a repository name), e.g. '{DEFAULT_HUB_NAMESPACE}/{DEFAULT_MODEL}.digits'.")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise PublishError(f'Repo id {repo_id!r} is not valid on the Hugging Face Hub: {error}') from error
    return repo_id


_FINISH = 'so finish (or resume) the run before publishing'
_RUN_FILES = {  # what publishing reads each file for
    'model_best.safetensors': f'the best weights; training writes them at the first validated epoch, {_FINISH}',
    'results.json': f'the test metrics; training writes it after the final test evaluation, {_FINISH}',
    'config.yaml': 'the resolved run settings, which the card shows as the training recipe',
    'hub/config.json': "timm's export config; training writes hub/ with timm.models.save_for_hf",
    'hub/model.safetensors': 'the exported weights; re-export them with timm.models.save_for_hf(model, '
                             '"<run>/hub", safe_serialization=True)',
}


def _read(path: Path, parse=json.loads) -> Dict[str, Any]:
    try:
        return parse(path.read_text(encoding='utf-8')) or {}
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise RunFolderError(f'{path} does not parse ({error}); the run folder may be damaged.') from error


def load_run(folder: PathLike) -> Run:
    """Read a run folder and check that its files agree with each other."""
    folder = Path(folder)
    if not folder.is_dir():
        raise RunFolderError(f'Run folder {folder} does not exist. Pass the folder train.py wrote, '
                             f'<output>/<experiment>.')
    for name, why in _RUN_FILES.items():
        if not (folder / name).is_file():
            raise RunFolderError(f'Run folder {folder} has no {name}: publishing needs {why}.')
    run = Run(folder, _read(folder / 'results.json'), _read(folder / 'config.yaml', yaml.safe_load),
              _read(folder / 'hub/config.json'))
    config, results = run.hub_config, run.results
    missing = [key for key in ('architecture', 'num_classes', 'pretrained_cfg') if key not in config]
    missing += [f'pretrained_cfg[{key!r}]' for key in ('mean', 'std', 'input_size') if key not in run.pretrained_cfg]
    if missing:
        raise RunFolderError(f"{folder / 'hub/config.json'} has no {', '.join(missing)}; re-export the best weights "
                             f'with timm.models.save_for_hf so that users get the architecture and preprocessing.')
    if not is_model(run.architecture):
        raise RunFolderError(f'Architecture {run.architecture!r} in hub/config.json is not a timm model '
                             f'(after import timm_gradattn); the export does not match this installation.')
    if 'top1' not in results:
        raise RunFolderError(f'{folder / "results.json"} has no test top-1 ("top1"); the run did not finish '
                             f'its test evaluation.')
    model = results.get('model')  # the --model train.py was given: a registry name or hf-hub:/local-dir:
    if isinstance(model, str) and ':' not in model and get_arch_name(model) != run.architecture:
        raise RunFolderError(f'results.json is for model {model!r} but hub/config.json exports '
                             f'{run.architecture!r}: the folder mixes two runs.')
    if results.get('num_classes') not in (None, config['num_classes']):
        raise RunFolderError(f'results.json has {results["num_classes"]} classes but hub/config.json has '
                             f'{config["num_classes"]}: the folder mixes two runs.')
    labels, exported = results.get('label_names'), config.get('label_names')
    if labels and exported and list(labels) != list(exported):
        raise RunFolderError('results.json and hub/config.json name the classes differently: the folder mixes '
                             'two runs.')
    return run


def default_repo_id(run: Run) -> str:
    """``<namespace>/<model>.<tag>``, the name ``create_model('<model>.<tag>', pretrained=True)`` looks up."""
    tags = model_tags(run.architecture)
    if run.tag not in tags:
        raise PublishError(f"The run's dataset {run.tag!r} is not a pretrained tag of {run.architecture} "
                           f"({', '.join(tags)}), so there is no default repository name; pass --repo-id "
                           f"<namespace>/<name> (a --dry-run without one stages it as {local_repo_id(run)}).")
    return f'{hub_namespace()}/{run.architecture}.{run.tag}'


def local_repo_id(run: Run) -> str:
    """A dry run's repo id where ``default_repo_id`` has none: ``<namespace>/<model>.<data>``, the data being an
    image folder's own name (its ``--data-dir``'s last part) or the dataset's, as a tag would stand there."""
    data = Path(str(run.settings.get('data_dir') or '')).name if run.tag == 'folder' else ''
    name = re.sub(r'[^A-Za-z0-9_.-]+', '-', f'{run.architecture}.{data or run.tag}').strip('.-')[:96]
    return check_repo_id(f'{hub_namespace()}/{name}')


def _unnamed_repo_id(run: Run, dry_run: bool) -> Tuple[str, Optional[str]]:
    """The repo id of a publish without ``--repo-id``, and how it was named where that is not the default."""
    if not dry_run or run.tag in model_tags(run.architecture):
        return default_repo_id(run), None
    return local_repo_id(run), (f'a name derived from the run: its dataset {run.tag!r} is no pretrained tag of '
                                f'{run.architecture}, so there is no default; pass --repo-id <namespace>/<name> to '
                                f'upload')


def near_chance(run: Run) -> Optional[str]:
    """A warning when the run's validation top-1 (its test top-1 without a validation split) is within
    ``NEAR_CHANCE_POINTS`` of chance, 100 / classes: such a run has likely learnt nothing. None otherwise."""
    split, top1 = 'validation', run.results.get('val_top1_best')
    if top1 is None:
        split, top1 = 'test', run.results.get('top1')
    classes = run.hub_config['num_classes']
    chance = 100.0 / classes
    if top1 is None or top1 > chance + NEAR_CHANCE_POINTS:
        return None
    return (f'{run.folder}: {split} top-1 {top1:.2f} % is within {NEAR_CHANCE_POINTS:g} points of chance '
            f'({chance:.2f} % for {classes} classes): the model may have learnt nothing. Look at its summary.csv and '
            f'training curves before publishing it.')


# --- staging, verification and upload ------------------------------------------------------------------
def stage_upload_folder(run: Run, repo_id: str, out: Optional[PathLike] = None, template: Optional[PathLike] = None,
                        license: Optional[str] = None) -> Path:
    """Write the folder to upload (``UPLOAD_FILES``) to ``out`` (default ``<run>/upload``) and return it.

    The card is rendered before anything is written, so a template error leaves no half-made folder.
    """
    out = Path(out) if out is not None else run.folder / DEFAULT_STAGING
    if out.resolve() in {run.folder.resolve(), run.hub_folder.resolve(), (run.folder / 'last').resolve()}:
        raise PublishError(f"--out {out} would write into the run's own files; choose a new folder, e.g. "
                           f'{run.folder / DEFAULT_STAGING}.')
    if out.exists() and not out.is_dir():
        raise PublishError(f'--out {out} exists and is not a folder; choose a new folder.')
    unexpected = sorted(p.name for p in out.iterdir() if p.name not in UPLOAD_FILES) if out.is_dir() else []
    if unexpected:
        raise PublishError(f'{out} holds files that are not part of an upload ({", ".join(unexpected)}); publishing '
                           f'only overwrites {", ".join(UPLOAD_FILES)}. Choose another --out or move those files away.')
    # A run exported before exports were written for transformers too still uploads a config it loads.
    config = client_config(run.hub_config)  # a copy, completed with the class names the run recorded
    if not config.get('label_names') and run.results.get('label_names'):
        config['label_names'] = list(run.results['label_names'])
    card = build_card(run, repo_id, config, template=template, license=license)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / 'model.safetensors', (run.hub_folder / 'model.safetensors').read_bytes())
    atomic_write_text(out / 'config.json', json.dumps(config, indent=2) + '\n')
    atomic_write_text(out / 'README.md', card)
    return out


def _check_card(folder: Path, run: Run) -> None:
    """The card's model-index holds exactly the metrics of the run's results.json."""
    try:
        found = {(r.metric_type, r.metric_config): r.metric_value
                 for r in ModelCard.load(folder / 'README.md').data.eval_results or []}
    except ValueError as error:
        raise VerificationError(f'{folder / "README.md"} has no valid model-index: {error}') from error
    expected = {(metric_type, config): value for _, metric_type, config, _, value
                in card_metrics(run.results, run.hub_config['num_classes'])}
    if found != expected:
        raise VerificationError(f'The model-index of {folder / "README.md"} ({found}) differs from the run\'s '
                                f'results.json ({expected}).')


def _check_logits(folder: Path, run: Run, rtol: float, atol: float) -> float:
    """The folder loads as users would load it and computes the logits of ``model_best.safetensors``."""
    try:
        published = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    except Exception as error:  # noqa: BLE001 - any failure here means users could not load the upload
        raise VerificationError(f"timm.create_model('local-dir:{folder}', pretrained=True) fails: "
                                f'{type(error).__name__}: {error}') from error
    num_classes, input_size = run.hub_config['num_classes'], run.pretrained_cfg['input_size']
    if published.num_classes != num_classes:
        raise VerificationError(f'{folder} loads with {published.num_classes} classes, the run has {num_classes}.')
    model_args = {'num_classes': num_classes, 'in_chans': input_size[0], **(run.hub_config.get('model_args') or {})}
    reference = timm.create_model(run.architecture, pretrained=False, **model_args).eval()
    try:
        load_weights(reference, run.best_weights, what='Best weights')
    except ValueError as error:
        raise VerificationError(f'{error} (architecture {run.architecture}, {model_args})') from error
    batch = torch.randn((4, *input_size), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        published_logits, reference_logits = published(batch), reference(batch)
    max_diff = float((published_logits - reference_logits).abs().max())
    if not torch.allclose(published_logits, reference_logits, rtol=rtol, atol=atol):
        raise VerificationError(
            f"The weights in {run.hub_folder} are not the run's best weights: on a fixed random batch their logits "
            f'differ from those of {run.best_weights} by up to {max_diff:.4g} (tolerance {atol} + {rtol} x |logit|). '
            f'Re-export hub/ from model_best.safetensors with timm.models.save_for_hf before publishing.')
    return max_diff


def verify_upload_folder(folder: PathLike, run: Run, rtol: float = 1e-4, atol: float = 1e-5) -> float:
    """Check ``folder`` is exactly what should be uploaded for ``run`` (its files, card and logits, else
    ``VerificationError``); return the largest logit difference from ``model_best.safetensors``."""
    folder = Path(folder)
    present = sorted(p.name for p in folder.iterdir())
    if present != sorted(UPLOAD_FILES):
        raise VerificationError(f'{folder} holds {present}; an upload must hold exactly {sorted(UPLOAD_FILES)}.')
    _check_card(folder, run)
    return _check_logits(folder, run, rtol, atol)


def _upload(api: HfApi, folder: Path, run: Run, repo_id: str, private: bool, revision: Optional[str],
            create_pr: bool, commit_message: Optional[str]):
    """Create the repository (and branch) if missing and upload ``folder`` as one commit; returns (repo id, commit)."""
    repo_id = getattr(api.create_repo(repo_id, private=private, exist_ok=True), 'repo_id', None) or repo_id
    if revision:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    commit_message = commit_message or (f'Add {run.architecture} trained on {run.tag} '
                                        f'(test top-1 {run.results["top1"]:.2f} %)')
    return repo_id, api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision, create_pr=create_pr,
                                      commit_message=commit_message)


def publish(run_folder: PathLike, repo_id: Optional[str] = None, *, out: Optional[PathLike] = None,
            dry_run: bool = False, private: bool = False, revision: Optional[str] = None, create_pr: bool = False,
            token: Optional[str] = None, commit_message: Optional[str] = None, template: Optional[PathLike] = None,
            license: Optional[str] = None, registry: Optional[PathLike] = SOURCE_REGISTRY,
            api: Optional[HfApi] = None) -> PublishResult:
    """Stage, verify and (unless ``dry_run``) upload a run; see the module docstring.

    ``repo_id`` defaults to ``<namespace>/<model>.<tag>`` (a dry run of a run whose dataset is no tag of the model:
    ``local_repo_id``), ``out`` to ``<run>/upload``; ``private``, ``revision`` (a missing branch is created),
    ``create_pr`` and ``commit_message`` are as in ``HfApi.upload_folder``; ``token`` defaults to huggingface_hub's
    own (HF_TOKEN, then the cached login); ``template`` replaces the family's card, ``license`` the licence of the
    export / dataset; the upload is recorded in ``registry`` (None: nowhere); ``api`` is the ``HfApi`` to upload with.
    A run whose top-1 is near chance draws one warning first (``near_chance``).
    """
    if repo_id is not None:
        check_repo_id(repo_id)
    run = load_run(run_folder)
    warning = near_chance(run)
    if warning:
        _logger.warning(warning)
    repo_id, repo_id_note = (repo_id, None) if repo_id else _unnamed_repo_id(run, dry_run)
    token = token or (get_token() if not dry_run and api is None else None)
    if not dry_run and api is None and not token:
        raise PublishError('No Hugging Face token: pass --token, set HF_TOKEN, or log in once with `hf auth login`. '
                           'Use --dry-run to build and verify the upload folder without one.')
    folder = stage_upload_folder(run, repo_id, out=out, template=template, license=license)
    result = PublishResult(folder, repo_id, verify_upload_folder(folder, run), uploaded=not dry_run,
                           repo_id_note=repo_id_note)
    if dry_run:
        return result
    api = api or HfApi(token=token, library_name='timm', library_version=timm.__version__)
    result.repo_id, commit = _upload(api, folder, run, repo_id, private, revision, create_pr, commit_message)
    result.commit_url = getattr(commit, 'pr_url', None) or getattr(commit, 'commit_url', None)
    # create_model(..., pretrained=True) loads the main branch: a branch or pull request is not published yet.
    if create_pr or revision not in (None, 'main'):
        result.registry_note = 'the upload is on a branch or pull request, not on main'
    elif registry is None:
        result.registry_note = 'no registry given'
    elif not Path(registry).parent.is_dir():
        result.registry_note = f'{Path(registry).parent} does not exist (not a source checkout)'
    else:
        record_published(registry, dict(
            repo_id=result.repo_id, model=run.architecture, tag=run.tag, top1=run.results['top1'],
            date=datetime.datetime.now(datetime.timezone.utc).date().isoformat(),
            commit=getattr(commit, 'oid', None), private=private))
        result.registry_updated = True
    return result


# --- the weights registry and the docs' table ----------------------------------------------------------
def load_registry(path: PathLike = WEIGHTS_REGISTRY) -> List[Dict[str, Any]]:
    path = Path(path)
    data = json.loads(path.read_text(encoding='utf-8')) if path.is_file() else {'weights': []}
    if not isinstance(data, dict) or not isinstance(data.get('weights'), list):
        raise PublishError(f'{path} is not a weights registry: expected {{"weights": [...]}}.')
    return data['weights']


def record_published(path: PathLike, entry: Dict[str, Any]) -> None:
    """Add ``entry`` to the registry at ``path``, replacing an earlier upload to the same repo."""
    entries = [e for e in load_registry(path) if e.get('repo_id') != entry['repo_id']] + [entry]
    entries.sort(key=lambda e: (str(e.get('model')), str(e.get('tag')), e['repo_id']))
    atomic_write_text(path, json.dumps({'weights': entries}, indent=2) + '\n')


def train_and_publish_command(model: str, tag: str, namespace: str) -> str:
    """The command line that trains ``model`` on ``tag`` with its paper's recipe and publishes the result."""
    output, experiment = build_train_parser().get_default('output'), f'{model}.{tag}'
    data = '' if tag == 'digits' else f' --data-dir data/{tag} --download'  # digits ships with scikit-learn
    return (f'python train.py --model {model} --dataset {tag}{data} --recipe {paper_recipe(model)} --experiment {experiment} && '
            f'python -m timm_gradattn.publish {output}/{experiment} --repo-id {namespace}/{experiment}')


def weights_table(registry: PathLike = WEIGHTS_REGISTRY, namespace: Optional[str] = None) -> str:
    """Markdown: for every registered model and tag, the published repo and its measured test top-1."""
    namespace = namespace or hub_namespace()
    entries = load_registry(registry)
    by_repo = {e['repo_id']: e for e in entries}
    tags_of = {model: model_tags(model) for model in MODEL_NAMES}
    columns = list(dict.fromkeys(tag for tags in tags_of.values() for tag in tags))
    expected = {f'{namespace}/{model}.{tag}': (model, tag) for model, tags in tags_of.items() for tag in tags}
    missing = [pair for repo_id, pair in expected.items() if repo_id not in by_repo]

    def cell(model: str, tag: str) -> str:
        entry = by_repo.get(f'{namespace}/{model}.{tag}')
        if tag not in tags_of[model]:
            return '–'  # not a tag of this model
        if entry is None:
            return 'not published'
        private = ' (private)' if entry.get('private') else ''
        return f'[{float(entry["top1"]):.2f}](https://huggingface.co/{entry["repo_id"]}){private}'

    published = len(expected) - len(missing)
    lines = [f'Test top-1 (%) of the published weights, `<model>.<tag>` on the Hub as `{namespace}/<model>.<tag>`; '
             f'"not published" where no weights exist yet. Generated by `python -m timm_gradattn.publish '
             f'--weights-table` from `hub_cards/weights.json`, which each successful upload updates.', '',
             markdown_table(['model', *columns], [[f'`{m}`', *(cell(m, t) for t in columns)] for m in MODEL_NAMES]),
             '', f'Published: {published} of {len(expected)}.' + (
                 '' if published else ' No weights have been published yet.')]
    others = [e for e in entries if e['repo_id'] not in expected]
    if others:
        lines += ['', 'Other published repositories (load with `hf-hub:<repo>`):', '', markdown_table(
            ['repository', 'model', 'dataset', 'test top-1 (%)', 'date'],
            [[f'[{e["repo_id"]}](https://huggingface.co/{e["repo_id"]})', f'`{e.get("model")}`', e.get('tag'),
              f'{float(e["top1"]):.2f}', e.get('date', '')] for e in others])]
    if missing:
        lines += ['', f'<details><summary>Train and publish the {len(missing)} missing weights</summary>', '',
                  '```bash', *(train_and_publish_command(model, tag, namespace) for model, tag in missing), '```', '',
                  'Datasets other than digits are read from `data/<tag>`: `--download` fetches those that can be '
                  'fetched, and train.py says where to get the others.', '', '</details>']
    return '\n'.join(lines) + '\n'


# --- command line ------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    parser = CommandLineParser(
        prog='python -m timm_gradattn.publish',
        description='Verify a training run and publish its best weights to the Hugging Face Hub as a timm model '
                    '(config.json, model.safetensors, README.md model card).')
    parser.add_argument('run', nargs='?', help='run folder written by train.py (<output>/<experiment>)')
    parser.add_argument('--repo-id', help=f'<namespace>/<name> to publish to (default: <namespace>/<model>.<tag>, '
                                          f'the namespace from ${HUB_NAMESPACE_ENV}, else {DEFAULT_HUB_NAMESPACE}; '
                                          f'needed to upload a run whose dataset is no tag of the model, such as an '
                                          f'image folder: a --dry-run names it <namespace>/<model>.<folder name>)')
    parser.add_argument('--dry-run', action='store_true', help='build and verify the upload folder, upload nothing')
    parser.add_argument('--out', help=f'where to build the upload folder (default: <run>/{DEFAULT_STAGING})')
    parser.add_argument('--private', action='store_true', help='create the repository as private')
    parser.add_argument('--revision', help='branch to upload to (created if missing; default: main)')
    parser.add_argument('--create-pr', action='store_true', help='open a pull request instead of committing')
    parser.add_argument('--token', help='Hugging Face token (default: HF_TOKEN, then the cached `hf auth login`)')
    parser.add_argument('--commit-message', help='commit message (default names the model, dataset and top-1)')
    parser.add_argument('--license', help="licence to declare on the card (default: the dataset's)")
    parser.add_argument('--template', help='model-card template to use instead of hub_cards/<family>.md')
    parser.add_argument('--registry', help=f'weights registry to record the upload in / print (default: '
                                           f'{SOURCE_REGISTRY} / {WEIGHTS_REGISTRY})')
    parser.add_argument('--weights-table', action='store_true',
                        help='print the Markdown table of published weights from the registry and exit')
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line; a problem with the run or the request is one line on stderr and exit code 2."""
    return run_entry_point('timm_gradattn.publish', _main, argv)


def _main(argv: Optional[Sequence[str]] = None) -> None:
    args = _parser().parse_args(argv)
    if args.weights_table:
        sys.stdout.write(weights_table(args.registry or WEIGHTS_REGISTRY))
        return
    if not args.run:
        raise UserError('give a run folder to publish, or --weights-table.')
    registry = args.registry or SOURCE_REGISTRY
    result = publish(args.run, args.repo_id, out=args.out, dry_run=args.dry_run, private=args.private,
                     revision=args.revision, create_pr=args.create_pr, token=args.token, registry=registry,
                     commit_message=args.commit_message, template=args.template, license=args.license)
    print(f'Verified {result.folder}: loads with timm.create_model("local-dir:{result.folder}", pretrained=True), '
          f'logits within {result.max_abs_logit_diff:.3g} of model_best.safetensors.')
    if not result.uploaded:
        named = f' ({result.repo_id_note})' if result.repo_id_note else ''
        print(f'Dry run: nothing uploaded. {result.folder} is exactly what would go to {result.repo_id}{named}.')
        return
    print(f'Uploaded to https://huggingface.co/{result.repo_id} ({result.commit_url or "no commit link"})')
    print(f'Recorded in {registry}.' if result.registry_updated else
          f'Not recorded in the weights registry: {result.registry_note}.')


if __name__ == '__main__':
    sys.exit(main())
