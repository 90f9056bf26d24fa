"""Hugging Face Hub helpers: put exported weights into the Hub cache, and tell early whether weights can be had.

``place_in_hf_cache`` writes a folder exported by ``timm.models.save_for_hf`` into huggingface_hub's cache
layout, as if it had been downloaded from ``repo_id``: ``create_model('<model>.<tag>', pretrained=True)`` and
``create_model('hf-hub:<repo_id>')`` then load it offline (``HF_HUB_OFFLINE=1``) through timm's own code.

``export_hub_folder`` writes an export whose ``config.json`` both timm (``local-dir:``, ``hf-hub:``) and
transformers' ``AutoModelForImageClassification`` / ``AutoImageProcessor`` (its TimmWrapper) read.

How the models find their weights (the namespace, the early look before timm's download) is
``timm_gradattn.models._hub``.
"""
import copy
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from huggingface_hub import constants
from huggingface_hub.file_download import are_symlinks_supported, repo_folder_name
from timm.models import save_for_hf

from .files import replace_folder

__all__ = ['place_in_hf_cache', 'export_hub_folder', 'client_config']


def place_in_hf_cache(
        folder: Union[str, Path],
        repo_id: str,
        cache_dir: Optional[Union[str, Path]] = None,
        revision: str = 'main',
) -> Path:
    """Copy the files of ``folder`` into the Hugging Face cache as revision ``revision`` of model repo ``repo_id``.

    Writes huggingface_hub's documented layout under ``cache_dir`` (default: ``HF_HUB_CACHE``)::

        models--<namespace>--<name>/
            blobs/<sha256 of the file>
            snapshots/<commit>/<file>  -> ../../blobs/<sha256>   (a copy where symlinks are unsupported)
            refs/<revision>            holds <commit>

    The commit hash is derived from the files' names and contents, so placing the same folder twice changes
    nothing, and placing changed files adds a new snapshot and moves the ref to it.

    Returns:
        The snapshot folder.
    """
    folder = Path(folder)
    files = sorted(p for p in folder.rglob('*') if p.is_file())
    if not files:
        raise FileNotFoundError(f'No files to place in the Hugging Face cache: {folder} is empty or missing. '
                                f'Export a model first with timm.models.save_for_hf(model, folder).')
    cache_dir = Path(cache_dir if cache_dir is not None else constants.HF_HUB_CACHE).expanduser()
    storage = cache_dir / repo_folder_name(repo_id=repo_id, repo_type='model')

    digests = {p.relative_to(folder).as_posix(): _sha256(p) for p in files}
    commit = hashlib.sha1(''.join(f'{name}\0{digest}\n' for name, digest in digests.items()).encode()).hexdigest()
    snapshot = storage / 'snapshots' / commit
    use_symlinks = are_symlinks_supported(cache_dir)
    for path in files:
        name = path.relative_to(folder).as_posix()
        blob = storage / 'blobs' / digests[name]
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            shutil.copyfile(path, blob)
        pointer = snapshot / name
        pointer.parent.mkdir(parents=True, exist_ok=True)
        if pointer.exists() or pointer.is_symlink():
            pointer.unlink()
        if use_symlinks:
            pointer.symlink_to(os.path.relpath(blob, pointer.parent))
        else:
            shutil.copyfile(blob, pointer)
    ref = storage / 'refs' / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(commit)  # no trailing newline: huggingface_hub reads the file as the hash
    return snapshot


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open('rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest()


def export_hub_folder(
        model,
        folder: Union[str, Path],
        label_names: Optional[Sequence[str]] = None,
        input_size: Optional[Sequence[int]] = None,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
        pretrained_cfg: Optional[dict] = None,
) -> Path:
    """Write ``folder/config.json`` and ``folder/model.safetensors`` with timm's ``save_for_hf``.

    The config records the architecture and the arguments that rebuild it (classes, channels), the class
    names and the preprocessing the weights were trained with, so that after ``import timm_gradattn``
    ``timm.create_model('local-dir:<folder>', pretrained=True)`` and transformers'
    ``AutoModelForImageClassification.from_pretrained(folder)`` give back the same model (see
    ``client_config``). The folder is written under a temporary name and swapped in whole. A channels-last model
    (the default on CPU from 224 px) is exported from a contiguous copy: safetensors refuses strided tensors.

    Args:
        model: The trained (unwrapped) timm model.
        folder: Where to write; an existing export there is replaced.
        label_names: Class names in classifier order.
        input_size, mean, std: The preprocessing of the training data, (C, H, W) and per-channel.
        pretrained_cfg: Other pretrained-config fields to record (e.g. tag, license, notes).
    """
    folder = Path(folder)
    tmp = folder.with_name(f'{folder.name}.tmp')
    shutil.rmtree(tmp, ignore_errors=True)
    data_config = {k: tuple(v) for k, v in dict(input_size=input_size, mean=mean, std=std).items() if v is not None}
    model_config = dict(pretrained_cfg=dict(pretrained_cfg or {}, **data_config))
    if label_names:
        model_config['label_names'] = list(label_names)
    if not all(tensor.is_contiguous() for tensor in model.state_dict().values()):
        model = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    save_for_hf(model, str(tmp), model_config=model_config, safe_serialization=True, data_config=data_config)
    config_path = tmp / 'config.json'
    config = client_config(json.loads(config_path.read_text(encoding='utf-8')))
    config_path.write_text(json.dumps(config, indent=2) + '\n', encoding='utf-8')
    replace_folder(tmp, folder)
    return folder


def client_config(config: dict) -> dict:
    """A timm export's ``config.json`` contents in the form both timm and transformers load.

    timm's ``save_for_hf`` repeats ``num_classes`` inside ``model_args``. transformers' TimmWrapper calls
    ``timm.create_model(architecture, num_classes=<num_labels>, **model_args)`` (``num_classes=0`` for
    ``AutoModel``), so the repeat is a duplicate keyword and the load fails. The top-level ``num_classes`` is
    the one both read (timm: the pretrained cfg's default; transformers: ``num_labels``), so it leaves
    ``model_args``. ``in_chans`` and ``global_pool`` stay there: TimmWrapper passes neither itself, and
    ``model_args`` is the only place it rebuilds them from.
    """
    config = json.loads(json.dumps(config))  # a deep copy
    model_args = config.get('model_args')
    if isinstance(model_args, dict) and 'num_classes' in model_args:
        if config.get('num_classes') is None:
            config['num_classes'] = model_args['num_classes']
        elif config['num_classes'] != model_args['num_classes']:
            raise ValueError(
                f"config.json disagrees with itself: num_classes {config['num_classes']} at the top level, "
                f"{model_args['num_classes']} in model_args. Re-export the weights with export_hub_folder.")
        del model_args['num_classes']
        if not model_args:
            del config['model_args']
    return config
