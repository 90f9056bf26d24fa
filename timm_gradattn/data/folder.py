"""Images stored as files: your own image folder (dataset name 'folder') and file-list datasets.

A folder dataset is one sub-folder per class, either directly in ``data_dir`` (split 70/15/15 here,
seeded) or inside ``train/``, ``val/`` and an optional ``test/`` (missing splits are carved from train).
File discovery uses timm's folder reader; loading goes through ``load_image``, which names the file
that cannot be decoded instead of skipping it (timm's ImageDataset skips bad files with a warning).

The images themselves set a folder's default input: a sample of headers (``sample_geometry``) gives the channels
(1 when every sampled image is greyscale) and the side (the median longer side, kept within 32-224 px), which
``--input-size`` / ``--in-chans`` / ``--img-size`` override. A folder whose decoded pixels fit in
``PRELOAD_BYTES`` is decoded once, when the dataset is built, instead of in every epoch.
"""
import logging
import os
import statistics
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from PIL import Image
from timm.data import create_dataset
from timm.data.readers.img_extensions import get_img_extensions
from timm.utils.misc import natural_key
from torch.utils.data import Dataset

from ..errors import UserError
from .datasets import DatasetNotFoundError, RawSplits, register_adapter
from .info import IMAGENET_MEAN, IMAGENET_STD, DatasetInfo

__all__ = ['UnreadableImageError', 'load_image', 'ImageFileDataset', 'FolderSummary', 'check_image_folder',
           'ImageGeometry', 'sample_geometry', 'SPLIT_FOLDERS', 'FIT_SIZES', 'PRELOAD_BYTES']

_logger = logging.getLogger(__name__)

# Sub-folder names recognised as a split, in order of preference.
SPLIT_FOLDERS = {'train': ('train', 'training'), 'val': ('val', 'valid', 'validation'), 'test': ('test', 'testing')}
# A folder's default side, from its images: at least the zoo's smallest paper input (28-32 px; below 32 px a
# ResNet-18's last stage is already 1x1), at most timm's usual 224 px.
FIT_SIZES = (32, 224)
# PIL modes without colour: a folder whose sampled images all have one of these is read as 1 channel.
GREY_MODES = frozenset(('1', 'L', 'LA', 'I', 'I;16', 'I;16B', 'I;16L', 'I;16N', 'F'))
# Folders whose decoded RGB pixels take at most this much memory are decoded once rather than every epoch.
PRELOAD_BYTES = 512 * 2 ** 20


class UnreadableImageError(UserError, OSError):
    """An image file exists but cannot be decoded."""


def load_image(path: str) -> Image.Image:
    """Decode an image file to an RGB PIL image, or raise UnreadableImageError naming the file."""
    try:
        with Image.open(path) as image:
            return image.convert('RGB')  # decodes the pixels, so truncated files fail here
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise UnreadableImageError(
            f'Cannot read image {path}: {error}. Replace or delete the file; '
            f'timm_gradattn.data.check_image_folder(..., verify=True) lists every such file.') from error


class ImageFileDataset(Dataset):
    """(RGB PIL image, class index) for a list of (path, class index) samples; ``preload()`` decodes them once."""

    def __init__(self, samples: Sequence[Tuple[str, int]]):
        self.samples = [(str(path), int(target)) for path, target in samples]
        self._images: Optional[List[Image.Image]] = None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Tuple[Image.Image, int]:
        path, target = self.samples[index]
        return (self._images[index] if self._images is not None else load_image(path)), target

    @property
    def in_memory(self) -> bool:
        return self._images is not None

    def preload(self) -> None:
        """Decode every image now and serve the decoded images from then on (transforms copy, never edit them).

        Raises:
            UnreadableImageError: naming every file that cannot be decoded (up to 5, and how many in all).
        """
        images, broken = [], []
        for path, _ in self.samples:
            try:
                images.append(load_image(path))
            except UnreadableImageError:
                broken.append(path)
        if broken:
            raise UnreadableImageError(f'{len(broken)} image file(s) cannot be read: {_examples(broken)}. '
                                       f'Replace or delete them.')
        self._images = images


@dataclass(frozen=True)
class ImageGeometry:
    """What the headers of a sample of image files say: colour or grey, and the median width and height."""
    sampled: int
    grey: bool
    width: int
    height: int

    @property
    def in_chans(self) -> int:
        return 1 if self.grey else 3

    @property
    def img_size(self) -> int:
        """The side a model sees by default: the median longer side, kept within ``FIT_SIZES``."""
        low, high = FIT_SIZES
        return min(high, max(low, self.width, self.height))

    def describe(self) -> str:
        kind = 'greyscale' if self.grey else 'colour'
        return f'{kind}, {self.width}x{self.height} px (median of {self.sampled} sampled)'


def sample_geometry(paths: Sequence[str], samples: int = 64) -> ImageGeometry:
    """Read the headers (not the pixels) of up to ``samples`` files spread evenly over ``paths``.

    Raises:
        UnreadableImageError: a sampled file is not an image PIL can open.
    """
    if not paths:
        raise ValueError('sample_geometry needs at least one image path.')
    chosen = [paths[i * len(paths) // min(samples, len(paths))] for i in range(min(samples, len(paths)))]
    modes, widths, heights = [], [], []
    for path in chosen:
        try:
            with Image.open(path) as image:
                modes.append(image.mode)
                widths.append(image.width)
                heights.append(image.height)
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            raise UnreadableImageError(f'Cannot read image {path}: {error}. Replace or delete the file.') from error
    return ImageGeometry(sampled=len(chosen), grey=all(mode in GREY_MODES for mode in modes),
                         width=int(statistics.median_low(widths)), height=int(statistics.median_low(heights)))


@dataclass
class FolderSummary:
    """What ``check_image_folder`` found in a class-per-sub-folder image folder."""
    root: str
    classes: List[str]                                  # class folder names, in class-index order
    counts: Dict[str, int]                              # images per class
    ignored: List[str] = field(default_factory=list)    # files that are not images timm reads

    @property
    def num_images(self) -> int:
        return sum(self.counts.values())


def check_image_folder(root: str, min_classes: int = 2, verify: bool = False) -> FolderSummary:
    """Quick upfront check of an image folder: class folders, image counts, empty and misplaced files.

    Costs one directory listing (and a ``stat`` per file); it does not open the images unless
    ``verify`` is set, which checks every file's header with PIL (slow on large folders).

    Raises:
        DatasetNotFoundError: ``root`` does not exist.
        ValueError: fewer than ``min_classes`` class folders, a class folder without images, images in
            nested sub-folders, zero-byte image files, or (with ``verify``) files PIL cannot identify.
    """
    root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(root):
        raise DatasetNotFoundError(
            f'Image folder {root} does not exist. Point --data-dir at a folder with one sub-folder of '
            f'images per class (or with train/, val/ and optionally test/ sub-folders laid out that way).')
    extensions = set(get_img_extensions(as_set=True))
    classes = sorted((e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith('.')), key=natural_key)
    counts: Dict[str, int] = {}
    ignored, empty, nested, broken = [], [], [], []
    for class_name in classes:
        class_dir = os.path.join(root, class_name)
        counts[class_name] = 0
        for folder, subfolders, files in os.walk(class_dir, followlinks=True):
            subfolders[:] = [s for s in subfolders if not s.startswith('.')]
            for file_name in files:
                path = os.path.join(folder, file_name)
                if os.path.splitext(file_name)[1].lower() not in extensions:
                    if not file_name.startswith('.'):
                        ignored.append(path)
                elif folder != class_dir:
                    nested.append(path)
                elif os.path.getsize(path) == 0:
                    empty.append(path)
                else:
                    counts[class_name] += 1
                    if verify and not _header_ok(path):
                        broken.append(path)
    if len(classes) < min_classes:
        raise ValueError(
            f'{root} has {len(classes)} class folder(s) {classes}; a classifier needs at least {min_classes}. '
            f'Put the images of each class in their own sub-folder (e.g. {root}/cat/*.jpg, {root}/dog/*.jpg).')
    if nested:
        raise ValueError(
            f'{len(nested)} images sit in folders nested inside a class folder (e.g. {nested[0]}). '
            f'Class folders must hold their images directly: {root}/<class>/<image>.')
    if empty:
        raise ValueError(f'{len(empty)} image files are empty (0 bytes): {_examples(empty)}. Delete or replace them.')
    if broken:
        raise ValueError(
            f'{len(broken)} files are not images PIL can read: {_examples(broken)}. Delete or replace them.')
    without_images = [c for c in classes if counts[c] == 0]
    if without_images:
        raise ValueError(
            f'Class folder(s) {without_images} in {root} hold no images ({", ".join(sorted(extensions))}). '
            f'Add images or remove the folder(s).')
    if ignored:
        _logger.warning(
            'Ignoring %d files in %s that are not %s images, e.g. %s.',
            len(ignored), root, '/'.join(sorted(extensions)), _examples(ignored, 3))
    return FolderSummary(root=root, classes=classes, counts=counts, ignored=ignored)


def _header_ok(path: str) -> bool:
    try:
        with Image.open(path) as image:
            image.verify()
        return True
    except Exception:  # PIL raises many types for a damaged header; any of them means "not readable"
        return False


def _examples(paths: Sequence[str], limit: int = 5) -> str:
    shown = ', '.join(paths[:limit])
    return shown + (f' and {len(paths) - limit} more' if len(paths) > limit else '')


def _find_split_folders(root: str) -> Dict[str, Optional[str]]:
    found = {}
    for split, names in SPLIT_FOLDERS.items():
        found[split] = next((os.path.join(root, n) for n in names if os.path.isdir(os.path.join(root, n))), None)
    return found


def _image_folder_split(summary: FolderSummary, class_to_idx: Dict[str, int]) -> ImageFileDataset:
    # timm's folder reader finds the files and sorts them (natural order); the class map pins the class
    # indices to those of train/, so a val/ or test/ missing a class keeps the same label numbering.
    reader = create_dataset('', root=summary.root, search_split=False, class_map=class_to_idx).reader
    if len(reader.samples) != summary.num_images:
        raise ValueError(
            f'timm found {len(reader.samples)} images in {summary.root} but the folder check counted '
            f'{summary.num_images}; check for images outside the class folders.')
    return ImageFileDataset(reader.samples)


@register_adapter('folder')
def load_image_folder(info: Optional[DatasetInfo], data_dir: Optional[str], download: bool, protocol: str) -> RawSplits:
    """Your own images: one sub-folder per class, optionally inside train/ val/ test/ split folders."""
    if not data_dir:
        raise DatasetNotFoundError(
            'The folder dataset needs --data-dir: a folder with one sub-folder of images per class, '
            'or with train/, val/ and optionally test/ sub-folders laid out that way.')
    root = os.path.abspath(os.path.expanduser(data_dir))
    if download:
        _logger.warning('--download has no effect for an image folder; using the files in %s.', root)
    split_folders = _find_split_folders(root)
    has_split_folders = any(split_folders.values())
    if has_split_folders and split_folders['train'] is None:
        raise DatasetNotFoundError(
            f'{root} has {[os.path.basename(p) for p in split_folders.values() if p]} but no train/ folder. '
            f'Add train/<class>/ folders, or put the class folders directly in {root} to split them automatically.')
    train_summary = check_image_folder(split_folders['train'] if has_split_folders else root)
    classes = train_summary.classes
    class_to_idx = {name: index for index, name in enumerate(classes)}
    splits = {'train': _image_folder_split(train_summary, class_to_idx)}
    for split in ('val', 'test'):
        if split_folders[split] is None:
            continue
        summary = check_image_folder(split_folders[split], min_classes=1)
        unknown = [c for c in summary.classes if c not in class_to_idx]
        if unknown:
            raise ValueError(
                f'Class folder(s) {unknown} in {summary.root} have no counterpart in {train_summary.root} '
                f'(classes there: {classes}). Every class must have training images.')
        splits[split] = _image_folder_split(summary, class_to_idx)
    geometry = sample_geometry([path for path, _ in splits['train'].samples])
    size = geometry.img_size
    notes = [f'Image folder {root}: {geometry.describe()}; read as {geometry.in_chans}x{size}x{size} unless '
             f'--input-size (or --in-chans / --img-size) says otherwise.']
    images = sum(len(split) for split in splits.values())
    pixel_bytes = images * geometry.width * geometry.height * 3
    if pixel_bytes <= PRELOAD_BYTES:
        for split in splits.values():
            split.preload()
        notes.append(f'Image folder {root}: {images:,} images decoded once into memory '
                     f'({pixel_bytes / 2 ** 20:.0f} MB) rather than in every epoch.')
    folder_info = DatasetInfo(
        name='folder', title=os.path.basename(root) or root, num_classes=len(classes),
        input_size=(geometry.in_chans, size, size), mean=IMAGENET_MEAN, std=IMAGENET_STD,
        label_names=tuple(classes), license='unknown', homepage='', train_augment='folder')
    return RawSplits(train=splits['train'], val=splits.get('val'), test=splits.get('test'), info=folder_info,
                     notes=tuple(notes))
