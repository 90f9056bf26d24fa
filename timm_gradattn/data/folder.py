"""Images stored as files: your own image folder (dataset name 'folder') and file-list datasets.

A folder dataset is one sub-folder per class, either directly in ``data_dir`` (split 70/15/15 here, by class and
seeded) or inside ``train/``, ``val/`` and an optional ``test/`` (missing splits are carved from train, by class).
File discovery uses timm's folder reader; loading goes through ``load_image``, which names the file
that cannot be decoded instead of skipping it (timm's ImageDataset skips bad files with a warning).

The images themselves set a folder's default input: a sample of headers (``sample_geometry``) gives the channels
(1 when every sampled image is greyscale) and the side (the median longer side, kept within 32-224 px), which
``--input-size`` / ``--in-chans`` / ``--img-size`` override (starting weights do not: a fine-tune trains at its
data's input). Images of more than 8 bits per pixel (16-bit PNG, float TIFF) are scaled to 8 bits by one rule for the
whole folder (``PixelScale``), never clipped at 255. Once the run's channels and side are known, a folder whose
images, as the transforms' first steps leave them, are sure to fit in ``PRELOAD_BYTES`` is decoded once instead of in
every epoch (``preload_folder``), and one line says what the images are read as (``read_folder``).
"""
import contextlib
import functools
import logging
import os
import statistics
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from timm.data import create_dataset
from timm.data.readers.img_extensions import get_img_extensions
from timm.utils.misc import natural_key
from torch.utils.data import Dataset

from ..errors import UserError
from .datasets import DatasetNotFoundError, RawSplits, register_adapter
from .info import IMAGENET_MEAN, IMAGENET_STD, DatasetInfo
from .transforms import input_steps

__all__ = ['UnreadableImageError', 'load_image', 'ImageFileDataset', 'FolderSummary', 'check_image_folder',
           'ImageGeometry', 'sample_geometry', 'PixelScale', 'held_bytes_bound', 'read_folder', 'preload_folder',
           'SPLIT_FOLDERS', 'FIT_SIZES', 'PRELOAD_BYTES']

_logger = logging.getLogger(__name__)

# Sub-folder names recognised as a split, in order of preference.
SPLIT_FOLDERS = {'train': ('train', 'training'), 'val': ('val', 'valid', 'validation'), 'test': ('test', 'testing')}
# A folder's default side, from its images: at least the zoo's smallest paper input (28-32 px; below 32 px a
# ResNet-18's last stage is already 1x1), at most timm's usual 224 px.
FIT_SIZES = (32, 224)
# PIL modes without colour: a folder whose sampled images all have one of these (or a grey palette) is read as 1
# channel.
GREY_MODES = frozenset(('1', 'L', 'LA', 'La', 'I', 'I;16', 'I;16B', 'I;16L', 'I;16N', 'F'))
# PIL modes of more than 8 bits per pixel: scaled to 8 bits by the folder's PixelScale.
INTEGER_MODES = frozenset(('I', 'I;16', 'I;16B', 'I;16L', 'I;16N'))
FLOAT_MODES = frozenset(('F',))
# Folders whose images, held decoded for the run's input, are sure to take at most this much memory in each
# process are decoded once rather than every epoch.
PRELOAD_BYTES = 512 * 2 ** 20


class UnreadableImageError(UserError, OSError):
    """An image file exists but cannot be decoded."""


@contextlib.contextmanager
def _opened(path: str) -> Iterator[Image.Image]:
    """``Image.open(path)``; a failure to open or decode it in the block is an UnreadableImageError naming the file."""
    try:
        with Image.open(path) as image:
            yield image
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise UnreadableImageError(
            f'Cannot read image {path}: {error}. Replace or delete the file; '
            f'timm_gradattn.data.check_image_folder(..., verify=True) lists every such file.') from error


@dataclass(frozen=True)
class PixelScale:
    """How images of more than 8 bits per pixel become 8-bit grey: one rule for a whole folder, so that a pixel
    value means the same in every image (a per-image min-max would make a dark image as bright as a bright one).

    Integer images (PIL 'I;16', 'I') map 0..``integer_peak`` to 0..255, float images ('F') map ``float_range`` to
    0..255, rounded; values beyond are clipped. ``ImageGeometry.scale`` fits the rule to a folder's sample.
    """
    integer_peak: int = 2 ** 16 - 1
    float_range: Tuple[float, float] = (0.0, 1.0)

    def to_8bit(self, image: Image.Image) -> Image.Image:
        low, high = (0.0, float(self.integer_peak)) if image.mode in INTEGER_MODES else self.float_range
        values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=low)
        return Image.fromarray(np.clip(np.rint((values - low) * (255 / (high - low))), 0, 255).astype(np.uint8))


def _is_grey(image: Image.Image) -> bool:
    """A grey mode, or a palette of greys only (which decodes the pixels: PIL loads the palette with them)."""
    if image.mode in ('P', 'PA'):
        palette = image.getpalette() or [0, 0, 0]
        return palette[0::3] == palette[1::3] == palette[2::3]
    return image.mode in GREY_MODES


def _eight_bit(image: Image.Image, scale: PixelScale) -> Image.Image:
    """A decoded image as 8-bit 'L' (any image without colour) or 'RGB' (alpha dropped, as before)."""
    if image.mode in INTEGER_MODES or image.mode in FLOAT_MODES:
        return scale.to_8bit(image)
    if image.mode in ('L', 'RGB'):
        return image
    return image.convert('L' if _is_grey(image) else 'RGB')


def load_image(path: str, scale: PixelScale = PixelScale()) -> Image.Image:
    """Decode an image file to an 8-bit greyscale ('L') or RGB PIL image, or raise UnreadableImageError naming the
    file. Grey stays grey (the transforms make it RGB for a 3-channel run); more than 8 bits are scaled by ``scale``.
    """
    with _opened(path) as image:
        image.load()  # decodes the pixels, so truncated files fail here
        return _eight_bit(image, scale)


class ImageFileDataset(Dataset):
    """(8-bit 'L' or 'RGB' PIL image, class index) for a list of (path, class index) samples, decoded by
    ``load_image`` with the folder's ``scale``; ``preload()`` decodes them once."""

    def __init__(self, samples: Sequence[Tuple[str, int]], scale: PixelScale = PixelScale()):
        self.samples = [(str(path), int(target)) for path, target in samples]
        self.scale = scale
        self._images: Optional[List[np.ndarray]] = None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Tuple[Image.Image, int]:
        path, target = self.samples[index]
        if self._images is not None:
            return Image.fromarray(self._images[index]), target  # a new image: transforms cannot edit what is held
        return load_image(path, self.scale), target

    @property
    def targets(self) -> List[int]:
        """Every sample's class index, without decoding an image (torchvision's name for them)."""
        return [target for _, target in self.samples]

    @property
    def in_memory(self) -> bool:
        return self._images is not None

    @property
    def held_bytes(self) -> int:
        """Bytes of decoded pixels held in memory (0 before ``preload``)."""
        return sum(image.nbytes for image in self._images or ())

    def preload(self, in_chans: int, img_size: int) -> None:
        """Decode every image now, for a run of ``in_chans`` channels at ``img_size`` px, and serve it from memory.

        Each image is held as the transforms' first steps (``transforms.input_steps``) would leave it, one byte per
        channel and pixel (a uint8 array: PIL holds RGB in 4): 'L' for a 1-channel run, and a grey image grey in a
        3-channel run too (the pipeline makes it RGB after the resize; copying a band into three and resizing
        commute, each band being resampled alike); an image of more pixels than the model's input resized to that
        input (the pipeline's own resize then returns it as it is), a smaller one as it is. So the tensors are those
        of images decoded from the files in every epoch (``tests/test_data_folder_pixels.py`` checks that).

        Raises:
            UnreadableImageError: naming every file that cannot be decoded (up to 5, and how many in all).
        """
        to_channels, resize = input_steps(in_chans, img_size)
        images, broken = [], []
        for path, _ in self.samples:
            try:
                image = load_image(path, self.scale)
            except UnreadableImageError:
                broken.append(path)
                continue
            image = image if image.mode == 'L' else to_channels(image)
            images.append(np.asarray(resize(image) if image.width * image.height > img_size ** 2 else image))
        if broken:
            raise UnreadableImageError(f'{len(broken)} image file(s) cannot be read: {_examples(broken)}. '
                                       f'Replace or delete them.')
        self._images = images


@dataclass(frozen=True)
class ImageGeometry:
    """What a sample of image files says: colour or grey, the median width and height (from their headers), and
    for images of more than 8 bits per pixel the largest integer value and the float range they reach."""
    sampled: int
    grey: bool
    width: int
    height: int
    integer_max: Optional[int] = None                  # None: no integer image of more than 8 bits sampled
    float_range: Optional[Tuple[float, float]] = None  # None: no float image sampled

    @property
    def in_chans(self) -> int:
        return 1 if self.grey else 3

    @property
    def img_size(self) -> int:
        """The side a model sees by default: the median longer side, kept within ``FIT_SIZES``."""
        low, high = FIT_SIZES
        return min(high, max(low, self.width, self.height))

    @property
    def scale(self) -> PixelScale:
        """The folder's one rule for images of more than 8 bits: integers by its bit depth, the smallest 2^k - 1
        (k >= 8) at least the largest sampled value (12-bit data in 16-bit files is common); floats as [0, 1], or
        the sampled range where it reaches beyond."""
        peak = PixelScale.integer_peak if self.integer_max is None else 2 ** max(8, self.integer_max.bit_length()) - 1
        low, high = self.float_range or (0.0, 1.0)
        return PixelScale(integer_peak=peak, float_range=(min(0.0, low), max(1.0, high)))

    def describe(self) -> str:
        kind = 'greyscale' if self.grey else 'colour'
        return f'{kind}, {self.width}x{self.height} px (median of {self.sampled} sampled)'

    def read_as(self, in_chans: int, img_size: int) -> str:
        """The input a run reads these images as, and whose choice it is: the images' (their channels, their median
        longer side within ``FIT_SIZES``) or the caller's (train.py's ``--input-size`` / ``--in-chans`` /
        ``--img-size``; the input of the model ``evaluate`` runs)."""
        shape, own = f'{in_chans}x{img_size}x{img_size}', f'{self.in_chans}x{self.img_size}x{self.img_size}'
        if (in_chans, img_size) != (self.in_chans, self.img_size):
            return f'read as {shape}, as asked (the images alone give {own})'
        if self.img_size != max(self.width, self.height):
            return f"read as {shape}: the images' channels, their side kept within {FIT_SIZES[0]}-{FIT_SIZES[1]} px"
        return f"read as {shape}: the images' own channels and side"

    def describe_scale(self) -> Optional[str]:
        """How the sampled images of more than 8 bits are read, or None when the sample has none."""
        scale, parts = self.scale, []
        if self.integer_max is not None:
            parts.append(f'integer pixels 0-{scale.integer_peak} as 0-255 ({scale.integer_peak.bit_length()}-bit: '
                         f'the largest sampled value is {self.integer_max})')
        if self.float_range is not None:
            low, high = scale.float_range
            parts.append(f'float pixels {low:g} to {high:g} as 0-255')
        if not parts:
            return None
        return (f'images of more than 8 bits scaled to 8 bits by one rule for every image (not stretched per image, '
                f'values beyond clipped): {"; ".join(parts)}')


def sample_geometry(paths: Sequence[str], samples: int = 64) -> ImageGeometry:
    """Read the headers of up to ``samples`` files spread evenly over ``paths`` (and the pixels of those with a
    palette or more than 8 bits per pixel: their palette and range).

    Raises:
        UnreadableImageError: a sampled file is not an image PIL can open.
    """
    if not paths:
        raise ValueError('sample_geometry needs at least one image path.')
    chosen = [paths[i * len(paths) // min(samples, len(paths))] for i in range(min(samples, len(paths)))]
    greys, widths, heights, integer_extremes, float_extremes = [], [], [], [], []
    for path in chosen:
        with _opened(path) as image:
            greys.append(_is_grey(image))
            widths.append(image.width)
            heights.append(image.height)
            if image.mode in INTEGER_MODES:
                integer_extremes.append(image.getextrema())
            elif image.mode in FLOAT_MODES:
                float_extremes.append(image.getextrema())
    return ImageGeometry(
        sampled=len(chosen), grey=all(greys),
        width=int(statistics.median_low(widths)), height=int(statistics.median_low(heights)),
        integer_max=max(int(high) for _, high in integer_extremes) if integer_extremes else None,
        float_range=(min(low for low, _ in float_extremes),
                     max(high for _, high in float_extremes)) if float_extremes else None)


def held_bytes_bound(paths: Sequence[str], in_chans: int, img_size: int, stop_above: Optional[int] = None) -> int:
    """The most bytes ``ImageFileDataset.preload(in_chans, img_size)`` can hold for ``paths``, from every file's
    header (no pixels decoded): each image's pixels, at most the model's input, times its channels (1 for a
    1-channel run or a file in a grey mode, else 3: a palette file counts as colour).

    Stops reading headers once the sum passes ``stop_above``: the answer then only says "more than that".
    """
    total = 0
    for path in paths:
        with _opened(path) as image:
            channels = 1 if in_chans == 1 or image.mode in GREY_MODES else 3
            total += channels * min(image.width * image.height, img_size ** 2)
        if stop_above is not None and total > stop_above:
            break
    return total


def read_folder(root: str, datasets: Sequence[ImageFileDataset], geometry: ImageGeometry, in_chans: int,
                img_size: int) -> str:
    """An image folder's ``decode_once``, called with the run's input once it is decided: decodes the images once
    where they fit (``preload_folder``) and returns the one line that says what the images are and what they are read
    as, so that the line agrees with what is trained."""
    held = preload_folder(datasets, in_chans, img_size)
    return f'Image folder {root}: {geometry.describe()}, {geometry.read_as(in_chans, img_size)}; {held}'


def preload_folder(datasets: Sequence[ImageFileDataset], in_chans: int, img_size: int) -> str:
    """Decode a folder's images once, for the run's input, when they are sure to fit in ``PRELOAD_BYTES``; the note.

    No image is held larger than the model's input, so images x channels x side^2 decides without opening a file
    when it fits; past that, every file's header (``held_bytes_bound``). The note's bytes are counted from the held
    images. Each process decides and holds its own copy: the budget is per process.
    """
    paths = [path for dataset in datasets for path, _ in dataset.samples]
    if (len(paths) * in_chans * img_size ** 2 > PRELOAD_BYTES and
            held_bytes_bound(paths, in_chans, img_size, stop_above=PRELOAD_BYTES) > PRELOAD_BYTES):
        return (f'{len(paths):,} images decoded from the files in every epoch: held for this input they could take '
                f'more than {_mebibytes(PRELOAD_BYTES)} in each process.')
    for dataset in datasets:
        dataset.preload(in_chans, img_size)
    held = sum(dataset.held_bytes for dataset in datasets)
    return (f'{len(paths):,} images decoded once into memory rather than in every epoch: {_mebibytes(held)} in each '
            f'process.')


def _mebibytes(size: int) -> str:
    return f'{size / 2 ** 20:,.1f} MiB'


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


def _image_folder_samples(summary: FolderSummary, class_to_idx: Dict[str, int]) -> List[Tuple[str, int]]:
    # timm's folder reader finds the files and sorts them (natural order); the class map pins the class
    # indices to those of train/, so a val/ or test/ missing a class keeps the same label numbering.
    reader = create_dataset('', root=summary.root, search_split=False, class_map=class_to_idx).reader
    if len(reader.samples) != summary.num_images:
        raise ValueError(
            f'timm found {len(reader.samples)} images in {summary.root} but the folder check counted '
            f'{summary.num_images}; check for images outside the class folders.')
    return reader.samples


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
    samples = {'train': _image_folder_samples(train_summary, class_to_idx)}
    for split in ('val', 'test'):
        if split_folders[split] is None:
            continue
        summary = check_image_folder(split_folders[split], min_classes=1)
        unknown = [c for c in summary.classes if c not in class_to_idx]
        if unknown:
            raise ValueError(
                f'Class folder(s) {unknown} in {summary.root} have no counterpart in {train_summary.root} '
                f'(classes there: {classes}). Every class must have training images.')
        samples[split] = _image_folder_samples(summary, class_to_idx)
    geometry = sample_geometry([path for path, _ in samples['train']])
    splits = {split: ImageFileDataset(split_samples, geometry.scale) for split, split_samples in samples.items()}
    size = geometry.img_size
    scaling = geometry.describe_scale()
    notes = [f'Image folder {root}: {scaling}.'] if scaling else []  # what it is read as: read_folder, once decided
    folder_info = DatasetInfo(
        name='folder', title=os.path.basename(root) or root, num_classes=len(classes),
        input_size=(geometry.in_chans, size, size), mean=IMAGENET_MEAN, std=IMAGENET_STD,
        label_names=tuple(classes), license='unknown', homepage='', train_augment='folder')
    return RawSplits(train=splits['train'], val=splits.get('val'), test=splits.get('test'), info=folder_info,
                     notes=tuple(notes),
                     decode_once=functools.partial(read_folder, root, list(splits.values()), geometry),
                     by_class=True)
