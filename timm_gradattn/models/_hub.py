"""How the zoo's models find their weights on the Hugging Face Hub, as timm keeps ``timm/models/_hub.py``.

Weights live on the Hub as ``<namespace>/<model>.<tag>``; the namespace defaults to ``timm-gradattn`` and is read
from the environment variable ``TIMM_GRADATTN_HUB_NAMESPACE`` when the package is imported, so users can point
the registry at their own fine-tunes. ``hub_weights_problem`` is a quick look (the cache, then at most one HEAD
request without retries) run before timm's download, which retries with back-off (about 23 s per file name) when
the Hub cannot be reached.
"""
import os
from pathlib import Path
from typing import Optional, Sequence, Union

from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
from huggingface_hub.utils import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

from ..errors import UserError

__all__ = ['HUB_NAMESPACE_ENV', 'DEFAULT_HUB_NAMESPACE', 'WEIGHT_FILENAMES', 'MissingWeightsError', 'hub_namespace',
           'hub_repo_id', 'hub_weights_problem']

HUB_NAMESPACE_ENV = 'TIMM_GRADATTN_HUB_NAMESPACE'
DEFAULT_HUB_NAMESPACE = 'timm-gradattn'
# The names timm's Hub loader tries, in its order (safetensors first).
WEIGHT_FILENAMES = ('model.safetensors', 'pytorch_model.bin')


class MissingWeightsError(UserError, RuntimeError):
    """Pretrained weights for a model tag could not be found or downloaded."""


def hub_namespace() -> str:
    return os.environ.get(HUB_NAMESPACE_ENV, '').strip() or DEFAULT_HUB_NAMESPACE


def hub_repo_id(model_name: str, tag: str) -> str:
    return f'{hub_namespace()}/{model_name}.{tag}'


def hub_weights_problem(
        repo_id: str,
        revision: Optional[str] = None,
        filenames: Sequence[str] = WEIGHT_FILENAMES,
        cache_dir: Optional[Union[str, Path]] = None,
) -> Optional[str]:
    """Why weights for ``repo_id`` cannot be had right now, or None when they are cached or look downloadable.

    Cached weights are enough (huggingface_hub falls back to the cache when the Hub is unreachable). Otherwise
    one HEAD request without retries tells a missing repository or an unreachable Hub apart from a
    download that should work.
    """
    for filename in filenames:
        if isinstance(try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir, revision=revision), str):
            return None
    where = cache_dir if cache_dir is not None else constants.HF_HUB_CACHE
    if constants.HF_HUB_OFFLINE:
        return f'HF_HUB_OFFLINE is set and the weights are not in the Hugging Face cache ({where})'
    try:
        url = hf_hub_url(repo_id, filenames[0], revision=revision)
        get_hf_file_metadata(url, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except (RepositoryNotFoundError, RevisionNotFoundError) as error:
        return f'the repository is not on the Hub, or is private ({type(error).__name__})'
    except HfHubHTTPError:
        return None  # e.g. this file name is absent but another may exist: timm's loader decides
    except Exception as error:  # noqa: BLE001 - transport errors are the HTTP client's own types (httpx, requests)
        return (f'the Hugging Face Hub cannot be reached ({type(error).__name__}: {error}) and the weights are not '
                f'in the Hugging Face cache ({where})')
    return None
