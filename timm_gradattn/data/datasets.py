"""Train / val / test datasets for every dataset the project knows, with the paper's splits.

``build_datasets(name, ...)`` returns train / val / test datasets of (normalised tensor, int label).
Each adapter (``adapters.py``, ``folder.py``) only reads the upstream files and returns *raw* datasets
of (PIL image, int label); splitting and transforms are done here once for all of them, so every
dataset gets the same seeded split and the same single normalisation. The named datasets are split as their
reference did (``paper_split``: torch's ``random_split``, seed 42); an image folder, the user's own images, is split
by class (``stratified_split``), so that every split holds every class in the same proportions.
"""
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import ConcatDataset, Dataset, random_split

from ..errors import UserError
from .info import DatasetInfo, get_dataset_info
from .transforms import build_transform, resolve_info

__all__ = ['DataSplits', 'RawSplits', 'TransformedDataset', 'ArrayImageDataset', 'build_datasets', 'dataset_info',
           'register_adapter', 'ADAPTERS', 'PROTOCOLS', 'split_lengths', 'paper_split', 'class_split_lengths',
           'stratified_split', 'DatasetNotFoundError', 'FEW_IMAGES']

PROTOCOLS = ('paper', 'official')
SPLIT_NAMES = ('train', 'val', 'test')
# A class with fewer images than this in a split gets a warning: its figures there rest on a handful of images.
FEW_IMAGES = 5


class DatasetNotFoundError(UserError, FileNotFoundError):
    """The dataset files are not where the user pointed (or are damaged)."""


@dataclass
class RawSplits:
    """What an adapter reads: the official splits (any may be None) as (PIL image, label) datasets.

    ``groups`` optionally maps each sample of ``train`` (an adapter that sets it returns only ``train``)
    to a group, e.g. a patient, that must not be split across train / val / test. ``decode_once``, where an
    adapter reads image files, is called by ``build_datasets`` with the run's (in_chans, img_size) once they are
    resolved: it holds the images decoded for that input when they fit, and returns its line for the user.
    ``by_class``: the splits carved here are stratified by class (``stratified_split``, read from each dataset's
    ``targets``): an image folder, whose classes may be few and small. The named datasets keep the seeded
    ``random_split`` their reference used.
    """
    train: Optional[Dataset] = None
    val: Optional[Dataset] = None
    test: Optional[Dataset] = None
    groups: Optional[Sequence] = None
    info: Optional[DatasetInfo] = None  # filled in by adapters that learn facts from the files
    notes: Tuple[str, ...] = ()          # what the adapter learnt or did that a user should hear, one line each
    decode_once: Optional[Callable[[int, int], str]] = None
    by_class: bool = False


@dataclass
class DataSplits:
    info: DatasetInfo
    train: Dataset
    val: Dataset
    test: Dataset
    protocol: str = 'paper'
    notes: Tuple[str, ...] = ()  # lines for the user: the adapter's (e.g. the input size an image folder suggests),
    #                              how a folder was split by class and which of its classes a split holds few of

    def sizes(self) -> Dict[str, int]:
        return {'train': len(self.train), 'val': len(self.val), 'test': len(self.test)}

    @property
    def has_validation(self) -> bool:
        """False for ``val_fraction=0`` under the official protocol: ``val`` is empty, and the whole official
        training split is ``train``."""
        return len(self.val) > 0


def held_in_memory(*splits: Dataset) -> bool:
    """Whether every split's images are held decoded in memory (a split is a dataset or a view of one)."""
    return all(getattr(getattr(split, 'base', split), 'in_memory', False) for split in splits)


def loader_workers(workers: Optional[int], *splits: Dataset) -> int:
    """``workers`` if given, else 0 for splits whose images are held decoded in memory (worker processes would only
    compete with torch's threads for the cores), else 2."""
    if workers is not None:
        return workers
    return 0 if held_in_memory(*splits) else 2


class ArrayImageDataset(Dataset):
    """Images held in a uint8 array (N, H, W) or (N, H, W, C) with integer labels, served as PIL images."""

    def __init__(self, images: np.ndarray, labels: Sequence[int]):
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if len(images) != len(labels):
            raise ValueError(f'{len(images)} images but {len(labels)} labels.')
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Tuple[Image.Image, int]:
        return Image.fromarray(np.asarray(self.images[index])), int(self.labels[index])


class TransformedDataset(Dataset):
    """A view of ``base`` restricted to ``indices``, with a transform applied to the image."""

    def __init__(self, base: Dataset, indices: Optional[Sequence[int]] = None, transform: Optional[Callable] = None):
        self.base = base
        self.indices = list(range(len(base))) if indices is None else list(indices)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        image, target = self.base[self.indices[index]]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(target)


def split_lengths(n: int, fractions: Sequence[float]) -> List[int]:
    """Integer split sizes: floor of each fraction but the last, which takes the remainder."""
    lengths = [int(n * f) for f in fractions[:-1]]
    return lengths + [n - sum(lengths)]


def paper_split(
        n: int,
        fractions: Sequence[float],
        seed: int = 42,
        groups: Optional[Sequence] = None,
) -> List[List[int]]:
    """Seeded random split of ``range(n)``, as the reference's ``random_split`` with seed 42.

    With ``groups``, whole groups are assigned to one split (by shuffling the distinct groups and
    filling each split up to its share of samples), so no group appears in two splits. A split that
    is full moves on to the next one, never past it, so with at least as many groups as splits every
    split gets a group even when one large group overshoots a share.
    """
    if groups is None:
        generator = torch.Generator().manual_seed(seed)
        return [list(s.indices) for s in random_split(range(n), split_lengths(n, fractions), generator=generator)]
    if len(groups) != n:
        raise ValueError(f'{len(groups)} group labels for {n} samples; give one group per sample.')
    unique, group_of_sample = np.unique(np.asarray(groups), return_inverse=True)
    by_group = np.argsort(group_of_sample, kind='stable')
    members = np.split(by_group, np.cumsum(np.bincount(group_of_sample, minlength=len(unique)))[:-1])
    order = np.random.default_rng(seed).permutation(len(unique))
    targets = np.cumsum(split_lengths(n, fractions))
    splits: List[List[int]] = [[] for _ in fractions]
    filled, current = 0, 0
    for g in order:
        if current < len(fractions) - 1 and filled >= targets[current]:
            current += 1
        splits[current].extend(members[g].tolist())
        filled += len(members[g])
    return [sorted(s) for s in splits]


def class_split_lengths(n: int, fractions: Sequence[float]) -> List[int]:
    """One class's images per split: its share of each split, rounded by largest remainder, and at least one in every
    split of a share above 0 (a class of 3 images is split 1/1/1 at 70/15/15 rather than leaving val without it)."""
    ideal = n * np.asarray(fractions, dtype=np.float64)
    lengths = np.maximum(np.floor(ideal).astype(int), (ideal > 0).astype(int))
    while lengths.sum() < n:
        lengths[np.argmax(ideal - lengths)] += 1
    while lengths.sum() > n:  # the minimum of one took more than the class has: from the splits above their share
        lengths[np.argmax(np.where(lengths > 1, lengths - ideal, -np.inf))] -= 1
    return lengths.tolist()


def stratified_split(
        labels: Sequence[int],
        fractions: Sequence[float],
        seed: int = 42,
        split_names: Sequence[str] = SPLIT_NAMES,
        class_names: Optional[Sequence[str]] = None,
) -> List[List[int]]:
    """Seeded split of ``range(len(labels))`` by class: each class's images, shuffled, are divided in the proportions
    ``fractions`` (``class_split_lengths``), so that every split holds every class in the same proportions.

    Raises:
        ValueError: a class has fewer images than there are splits, so one split would miss it entirely.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    splits: List[List[int]] = [[] for _ in fractions]
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        if len(members) < len(fractions):
            name = class_names[label] if class_names else label
            raise ValueError(
                f'Class {name!r} has {len(members)} image{"s" if len(members) > 1 else ""}, too few to be in each of '
                f'the {_listed(split_names)} splits. Add images to it (at least {len(fractions)}), or split the folder '
                f'yourself into {_listed([f"{split}/" for split in split_names])} sub-folders.')
        bounds = np.cumsum(class_split_lengths(len(members), fractions))[:-1]
        for split, part in zip(splits, np.split(members, bounds)):
            split.extend(part.tolist())
    return [sorted(s) for s in splits]


# --- adapters: name -> fn(info, data_dir, download, protocol) -> RawSplits --------------------------------
# The loaders themselves live in ``adapters.py`` and ``folder.py``; importing the package registers them.
ADAPTERS: Dict[str, Callable[..., RawSplits]] = {}


def register_adapter(name: str):
    def wrap(fn):
        ADAPTERS[name] = fn
        return fn
    return wrap


# Datasets whose official splits the paper pooled and re-split. MedMNIST and PCam keep
# their official splits in the paper too; datasets without official splits are always split here.
_POOLED_IN_PAPER = {'digits', 'tiny_imagenet', 'cifar10', 'svhn', 'fashion_mnist', 'pad_ufes_20'}


def build_datasets(
        name: str,
        data_dir: Optional[str] = None,
        protocol: str = 'paper',
        download: bool = False,
        seed: int = 42,
        img_size: Optional[int] = None,
        in_chans: Optional[int] = None,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
        augment: Optional[str] = None,
        split: Optional[Sequence[float]] = None,
        val_fraction: Optional[float] = None,
) -> DataSplits:
    """Train / val / test datasets for a known dataset name (see ``timm_gradattn.data.info.DATASETS``).

    An adapter's images that fit in memory are decoded here, once, for the resolved channels and side
    (``RawSplits.decode_once``; an image folder: ``folder.preload_folder``).

    Args:
        name: Dataset name ('digits', 'cifar10', ...; 'folder' for an image folder in ``data_dir``).
        data_dir: Where the upstream files are (or will be downloaded to with ``download``).
        protocol: 'paper' pools the official splits and re-splits them as the paper did (seeded);
            'official' keeps the dataset's own splits (a missing val split is carved from train).
        download: Let the upstream loader download missing files.
        seed: Seed of the split.
        img_size, in_chans, mean, std, augment: Overrides of the dataset's facts; the returned
            ``info`` states what was used.
        split: Override of the (train, val, test) fractions.
        val_fraction: Share of the official training split carved out as validation when the dataset has no
            validation split of its own (default: the validation fraction of ``split``). 0, with the official
            protocol, carves nothing: ``train`` is the whole official training split and ``val`` is empty. It is
            refused for a dataset with an official validation split (which it would not change) and for one with
            no official split at all (whose seeded split always has a validation part).

    Raises:
        DatasetNotFoundError: The files are missing (the message gives the expected layout and how to get them).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f'Unknown protocol {protocol!r}; choose one of {PROTOCOLS}.')
    if val_fraction is not None and not 0 <= val_fraction < 1:
        raise ValueError(f'val_fraction (--val-fraction) {val_fraction} must be a share of the training images '
                         f'from 0 (no validation split) up to 1, e.g. 0.1.')
    no_validation = val_fraction == 0
    if no_validation and protocol != 'official':
        raise ValueError(f"val_fraction 0 (--val-fraction 0: no validation split) trains on a dataset's whole "
                         f"official training split; protocol {protocol!r} re-splits the data with a validation part. "
                         f"Pass --protocol official, or a --val-fraction above 0.")
    key = name.strip().lower().replace('-', '_')
    info = None if key == 'folder' else get_dataset_info(key)
    if key not in ADAPTERS:
        raise ValueError(f'No loader for dataset {name!r}; loaders exist for: {", ".join(sorted(ADAPTERS))}.')
    raw = ADAPTERS[key](info, data_dir, download, protocol)
    info = resolve_info(
        raw.info or info, img_size=img_size, in_chans=in_chans, mean=mean, std=std, augment=augment, split=split)
    fractions = info.split
    train_idx = val_idx = test_idx = None
    train, val, test = raw.train, raw.val, raw.test
    if no_validation:
        _check_no_validation(info, raw)
        val, val_idx = train, []
    notes = raw.notes
    if protocol == 'paper' and info.name in _POOLED_IN_PAPER or (train is not None and val is None and test is None):
        pool = _concat([d for d in (train, val, test) if d is not None])
        (train_idx, val_idx, test_idx), told = _split_indices(raw, pool, fractions, seed, info, SPLIT_NAMES)
        notes += told
        train = val = test = pool
    elif val is None or test is None:
        # Carve the missing split(s) from train, keeping the paper's proportions between them.
        missing = [s for s, d in (('val', val), ('test', test)) if d is None]
        val_share = fractions[1] if val_fraction is None else val_fraction
        shares = [val_share if s == 'val' else fractions[2] for s in missing]
        parts, told = _split_indices(raw, train, [1 - sum(shares)] + shares, seed, info, ['train'] + missing)
        notes += told
        train_idx = parts[0]
        for part_name, idx in zip(missing, parts[1:]):
            if part_name == 'val':
                val, val_idx = train, idx
            else:
                test, test_idx = train, idx

    splits = DataSplits(
        info=info, protocol=protocol, notes=notes,
        train=TransformedDataset(train, train_idx, build_transform(info, train=True)),
        val=TransformedDataset(val, val_idx, build_transform(info, train=False)),
        test=TransformedDataset(test, test_idx, build_transform(info, train=False)))
    for split_name, size in splits.sizes().items():
        if size == 0 and not (split_name == 'val' and no_validation):
            raise ValueError(
                f'The {split_name} split of {info.name} is empty: it gets {info.split} of the images as '
                f'(train, val, test). Add more images, give an image folder its own train/, val/ and test/ '
                f'sub-folders, or pass build_datasets(split=...) fractions that leave every split an image.')
    if raw.by_class:
        splits.notes += _few_images_note(splits)
    if raw.decode_once is not None:  # now that the run's channels and side are known
        splits.notes += (raw.decode_once(info.in_chans, info.img_size),)
    return splits


def dataset_info(name: str, data_dir: Optional[str] = None, protocol: str = 'paper', download: bool = False
                 ) -> DatasetInfo:
    """A dataset's facts before any split or decoding: the registry's, or for an image folder those its files give
    (classes, channels, side). For a caller that needs them to choose the input the images are then decoded for
    (``evaluate`` builds the model first), so that a folder is decoded once, by ``build_datasets``."""
    key = name.strip().lower().replace('-', '_')
    if key != 'folder':
        return get_dataset_info(key)
    return ADAPTERS[key](None, data_dir, download, protocol).info


def _check_no_validation(info: DatasetInfo, raw: RawSplits) -> None:
    """``val_fraction=0`` needs official training and test splits and no official validation split."""
    if raw.val is not None:
        raise ValueError(
            f'{info.name} has an official validation split ({len(raw.val):,} images), which --val-fraction does not '
            f'change, so --val-fraction 0 cannot remove it. Drop --val-fraction 0: the run then trains on the '
            f'official training split and keeps the weights of the best epoch on the official validation split.')
    if raw.test is None:
        raise ValueError(
            f'{info.name} has no official training and test splits: under --protocol official it is split '
            f'{"/".join(f"{round(100 * f)}" for f in info.split)} (seeded{", by class" if raw.by_class else ""}), '
            f'always with a validation part, so --val-fraction 0 does not apply. Drop --val-fraction 0, or train on a '
            f'dataset with official splits (e.g. cifar10, fashion_mnist, svhn).')


def _split_indices(raw: RawSplits, dataset: Dataset, fractions: Sequence[float], seed: int, info: DatasetInfo,
                   split_names: Sequence[str]) -> Tuple[List[List[int]], Tuple[str, ...]]:
    """``dataset``'s indices split in ``fractions``: by class where the adapter asks for it (``RawSplits.by_class``),
    with a line for the user saying how; else as the dataset's reference did (``paper_split``)."""
    if not raw.by_class:
        return paper_split(len(dataset), fractions, seed, raw.groups), ()
    parts = stratified_split(dataset.targets, fractions, seed, split_names, info.label_names)
    return parts, (f'{info.title}: {len(dataset)} images split {"/".join(f"{100 * f:g}" for f in fractions)} by class '
                   f'into {" / ".join(split_names)} (seed {seed}): {" / ".join(str(len(p)) for p in parts)}.',)


def _few_images_note(splits: DataSplits) -> Tuple[str, ...]:
    """One warning line naming, per split, the classes with fewer than ``FEW_IMAGES`` images there; none if no class has
    so few."""
    names = splits.info.head_label_names(splits.info.num_classes)
    few = []
    for split_name in SPLIT_NAMES:
        split = getattr(splits, split_name)
        if len(split) == 0:
            continue  # no validation split (--val-fraction 0)
        counts = np.bincount(np.asarray(split.base.targets)[split.indices], minlength=len(names))
        classes = [f'{names[label]} {count}' for label, count in enumerate(counts) if count < FEW_IMAGES]
        if classes:
            shown = ', '.join(classes[:6]) + (f' and {len(classes) - 6} more' if len(classes) > 6 else '')
            few.append(f'{split_name}: {shown}')
    if not few:
        return ()
    return (f'Warning: {splits.info.title} has fewer than {FEW_IMAGES} images of a class in a split '
            f'({"; ".join(few)}): each of those images moves its class\'s recall there by more than 20 points. Add '
            f'images for firmer figures.',)


def _listed(names: Sequence[str]) -> str:
    return ', '.join(names[:-1]) + f' and {names[-1]}' if len(names) > 1 else ''.join(names)


def _concat(datasets: List[Dataset]) -> Dataset:
    return datasets[0] if len(datasets) == 1 else ConcatDataset(datasets)
