"""Loaders for the paper's datasets, each through the upstream package a user would expect.

torchvision reads CIFAR-10, CIFAR-100, MNIST, SVHN and PCam (the CIFARs and MNIST through timm's
``create_dataset('torch/...')``), the ``medmnist`` package reads TissueMNIST and BloodMNIST, and
Fashion-MNIST (its IDX files, gzipped or not, as Debian packages them or as torchvision downloads them),
Tiny ImageNet and PAD-UFES-20 are read here from their published layouts (Tiny ImageNet also from
the Hugging Face Hub through timm's ``hfds/`` reader). Each adapter returns the official splits as
(PIL image, int label) datasets; ``build_datasets`` pools, re-splits and transforms them.

Nothing is downloaded unless asked (``download=True``, ``--download``). Missing files raise
DatasetNotFoundError naming the folder, the layout expected there and how to get the files.
"""
import csv
import importlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import numpy as np
from timm.data import create_dataset
from torch.utils.data import ConcatDataset, Dataset

from .datasets import ArrayImageDataset, DatasetNotFoundError, RawSplits, register_adapter
from .folder import ImageFileDataset
from .idx import IDX_IMAGES, IDX_LABELS, IdxError, read_idx
from .info import TINY_IMAGENET_WNIDS, DatasetInfo

__all__ = ['Source', 'SOURCES', 'FASHION_MNIST_SYSTEM_DIR']

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Source:
    """Where a dataset's files live under ``data_dir``, and how a user gets them."""
    files: Tuple[str, ...]      # paths relative to data_dir that must exist
    layout: str                 # the expected layout, as a user reads it
    how_to_get: str
    downloadable: bool = True   # the upstream loader can fetch the files with download=True


_IMAGES = ('.png', '.jpg', '.jpeg')
_TINY_IMAGENET_ZIP = 'download http://cs231n.stanford.edu/tiny-imagenet-200.zip and unzip it into <data_dir>'
# Where the Debian package dataset-fashion-mnist installs the complete dataset (recompressed .gz files,
# so torchvision's checksums of the upstream archives do not match them; the IDX headers are checked instead).
FASHION_MNIST_SYSTEM_DIR = '/usr/share/datasets/fashion-mnist'
_FASHION_MNIST_FILES = (
    'train-images-idx3-ubyte', 'train-labels-idx1-ubyte', 't10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')
_PCAM_FILES = tuple(
    f'pcam/camelyonpatch_level_2_split_{split}_{kind}.h5' for split in ('train', 'valid', 'test') for kind in 'xy')

SOURCES: Dict[str, Source] = {
    'cifar10': Source(
        files=tuple(f'cifar-10-batches-py/{f}' for f in (
            'data_batch_1', 'data_batch_2', 'data_batch_3', 'data_batch_4', 'data_batch_5', 'test_batch',
            'batches.meta')),
        layout='<data_dir>/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta} (the python version)',
        how_to_get='Pass --download (download=True) to fetch it with torchvision.'),
    'cifar100': Source(
        files=tuple(f'cifar-100-python/{f}' for f in ('train', 'test', 'meta')),
        layout='<data_dir>/cifar-100-python/{train, test, meta} (the python version)',
        how_to_get='Pass --download (download=True) to fetch it with torchvision.'),
    'mnist': Source(
        files=tuple(f'MNIST/raw/{f}' for f in (
            'train-images-idx3-ubyte', 'train-labels-idx1-ubyte', 't10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')),
        layout='<data_dir>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte (unzipped IDX files)',
        how_to_get='Pass --download (download=True) to fetch them with torchvision.'),
    'svhn': Source(
        files=('train_32x32.mat', 'test_32x32.mat', 'extra_32x32.mat'),
        layout='<data_dir>/{train,test,extra}_32x32.mat (format 2, cropped digits)',
        how_to_get='Pass --download (download=True) to fetch them with torchvision (the extra split is 1.3 GB).'),
    'fashion_mnist': Source(
        # File names, not paths: they are looked for (plain or .gz) in <data_dir> and <data_dir>/FashionMNIST/raw.
        files=_FASHION_MNIST_FILES,
        layout=('<data_dir>/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz (the Debian package\'s folder) or '
                '<data_dir>/FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte (torchvision\'s), '
                'IDX files gzipped or not'),
        how_to_get=('Install the Debian package: sudo apt-get update && sudo apt-get install dataset-fashion-mnist '
                    f'(it fills {FASHION_MNIST_SYSTEM_DIR}, read when no --data-dir is given), or pass '
                    '--download (download=True) to fetch the files with torchvision into '
                    '<data_dir>/FashionMNIST/raw.')),
    'pcam': Source(
        files=_PCAM_FILES,
        layout='<data_dir>/pcam/camelyonpatch_level_2_split_{train,valid,test}_{x,y}.h5 (unzipped)',
        how_to_get='Pass --download (download=True) to fetch them with torchvision from Google Drive '
                   '(needs `pip install gdown`; about 7 GB), or get them from https://github.com/basveeling/pcam.'),
    'tissuemnist': Source(
        files=('tissuemnist.npz',),
        layout='<data_dir>/tissuemnist.npz (MedMNIST v2, 28 px)',
        how_to_get='Pass --download (download=True) to fetch it with the medmnist package.'),
    'bloodmnist': Source(
        files=('bloodmnist.npz',),
        layout='<data_dir>/bloodmnist.npz (MedMNIST v2, 28 px)',
        how_to_get='Pass --download (download=True) to fetch it with the medmnist package.'),
    'tiny_imagenet': Source(
        files=('wnids.txt', 'train', 'val/images', 'val/val_annotations.txt'),
        layout='<data_dir>/tiny-imagenet-200/ (or <data_dir> itself) with wnids.txt, train/<wnid>/images/*.JPEG, '
               'val/images/*.JPEG and val/val_annotations.txt',
        how_to_get=(_TINY_IMAGENET_ZIP.capitalize() + ', or pass --download to read the Hub dataset '
                    'zh-plus/tiny-imagenet through timm (needs `pip install datasets`).'),
        downloadable=False),
    'pad_ufes_20': Source(
        files=('metadata.csv',),
        layout='<data_dir>/metadata.csv and the PNG images anywhere below <data_dir> '
               '(e.g. images/imgs_part_1/, imgs_part_2/, imgs_part_3/)',
        how_to_get='Download it from https://data.mendeley.com/datasets/zr7vgbcyr2/1 and unzip it (and the '
                   'image archives inside) into <data_dir>; it cannot be downloaded automatically.',
        downloadable=False),
}


# --- shared steps -----------------------------------------------------------------------------------------

def _dataset_root(info: DatasetInfo, data_dir: Optional[str], download: bool) -> str:
    if not data_dir:
        source = SOURCES[info.name]
        raise DatasetNotFoundError(
            f'{info.title} needs --data-dir (data_dir=...): the folder that holds its files, laid out as '
            f'{source.layout}. {source.how_to_get}')
    root = os.path.abspath(os.path.expanduser(data_dir))
    if download and SOURCES[info.name].downloadable:
        os.makedirs(root, exist_ok=True)
    return root


def _not_found(info: DatasetInfo, root: str, what: str) -> DatasetNotFoundError:
    source = SOURCES[info.name]
    return DatasetNotFoundError(
        f'{info.title} not found in {root}: {what}. Expected layout: {source.layout.replace("<data_dir>", root)}. '
        f'{source.how_to_get.replace("<data_dir>", root)}')


def _require_files(info: DatasetInfo, root: str, download: bool) -> None:
    """Raise DatasetNotFoundError unless the files are there (or the upstream loader will download them)."""
    source = SOURCES[info.name]
    if download and source.downloadable:
        return
    missing = [f for f in source.files if not os.path.exists(os.path.join(root, f))]
    if missing:
        more = f' and {len(missing) - 1} more of its files' if len(missing) > 1 else ''
        raise _not_found(info, root, f'missing {missing[0]}{more}')


def _upstream(info: DatasetInfo, root: str, download: bool, load: Callable[[], Dataset]) -> Dataset:
    """Run an upstream loader, turning its integrity and download failures into errors that say what to do."""
    try:
        return load()
    except DatasetNotFoundError:
        raise
    except (RuntimeError, OSError, ImportError) as error:
        # torchvision reports missing or damaged files (md5 mismatch) as RuntimeError; downloads fail with
        # OSError (URLError) or ImportError (gdown for PCam).
        hint = ('Check the network connection, or fetch the files by hand into this layout: '
                + SOURCES[info.name].layout.replace('<data_dir>', root)
                if download else 'If the files are damaged or from another release, delete them and run '
                                 'again with --download.')
        reason = str(error).strip().rstrip('.')
        raise DatasetNotFoundError(f'{info.title} could not be loaded from {root}: {reason}. {hint}') from error


def _require_package(info: DatasetInfo, module: str, package: str) -> None:
    """Fail early, and say what to install, when an optional reader package is missing."""
    try:
        importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f'{info.title} is read with the {package} package: pip install {package} '
            f'(or pip install "timm-gradattn[datasets]" for every dataset reader).') from error


def _find_file(root: str, name: str, depth: int = 1) -> Optional[str]:
    """``root/name``, or ``root/<sub-folder>/name`` (archives often unzip into a folder of their own)."""
    if os.path.isfile(os.path.join(root, name)):
        return os.path.join(root, name)
    if depth > 0 and os.path.isdir(root):
        for entry in sorted(os.scandir(root), key=lambda e: e.name):
            if entry.is_dir():
                found = _find_file(entry.path, name, depth - 1)
                if found:
                    return found
    return None


# --- digits (scikit-learn) --------------------------------------------------------------------------------

@register_adapter('digits')
def _load_digits(info: DatasetInfo, data_dir: Optional[str], download: bool, protocol: str) -> RawSplits:
    # Shipped inside scikit-learn: 1,797 real 8x8 handwritten digits, values 0..16. No official split.
    images, targets = _digits_arrays()
    images = np.round(images * (255.0 / 16.0)).astype(np.uint8)
    return RawSplits(train=ArrayImageDataset(images, targets))


def _digits_arrays() -> Tuple[np.ndarray, np.ndarray]:
    """The digits' 8x8 images (float, 0..16) and labels, read from the CSV file scikit-learn ships, without
    importing scikit-learn (about 2.5 s of a 2-core CPU's start-up); through ``load_digits`` where the file is
    not where scikit-learn keeps it."""
    spec = importlib.util.find_spec('sklearn')  # finds the package without importing it
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / 'datasets' / 'data' / 'digits.csv.gz'
        if path.is_file():
            table = np.loadtxt(path, delimiter=',')  # one row per image: 64 pixels, then the label
            return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(int)
    from sklearn.datasets import load_digits
    digits = load_digits()
    return digits.images, digits.target


# --- torchvision ------------------------------------------------------------------------------------------

def _timm_torchvision_adapter(name: str, timm_name: str) -> None:
    """Register a dataset that timm's ``create_dataset('torch/...')`` reads: official train and test splits."""
    @register_adapter(name)
    def load(info: DatasetInfo, data_dir: Optional[str], download: bool, protocol: str) -> RawSplits:
        root = _dataset_root(info, data_dir, download)
        _require_files(info, root, download)
        train, test = (
            _upstream(info, root, download, lambda split=split: create_dataset(
                timm_name, root=root, split=split, download=download))
            for split in ('train', 'test'))
        return RawSplits(train=train, test=test)


_timm_torchvision_adapter('cifar10', 'torch/cifar10')
_timm_torchvision_adapter('cifar100', 'torch/cifar100')
_timm_torchvision_adapter('mnist', 'torch/mnist')


@register_adapter('svhn')
def _load_svhn(info: DatasetInfo, data_dir: Optional[str], download: bool, protocol: str) -> RawSplits:
    from torchvision.datasets import SVHN  # timm's create_dataset has no SVHN entry
    _require_package(info, 'scipy.io', 'scipy')
    root = _dataset_root(info, data_dir, download)
    _require_files(info, root, download)
    parts = {
        split: _upstream(info, root, download, lambda split=split: SVHN(root, split=split, download=download))
        for split in ('train', 'test', 'extra')}
    if protocol == 'paper':
        # The paper pools train + test + extra (630,420 images) in this order before its seeded split.
        return RawSplits(train=ConcatDataset([parts['train'], parts['test'], parts['extra']]))
    # SVHN's extra images are published as additional training data.
    return RawSplits(train=ConcatDataset([parts['train'], parts['extra']]), test=parts['test'])


@register_adapter('pcam')
def _load_pcam(info: DatasetInfo, data_dir: Optional[str], download: bool, protocol: str) -> RawSplits:
    from torchvision.datasets import PCAM
    _require_package(info, 'h5py', 'h5py')
    root = _dataset_root(info, data_dir, download)
    _require_files(info, root, download)
    train, val, test = (
        _upstream(info, root, download, lambda split=split: PCAM(root, split=split, download=download))
        for split in ('train', 'val', 'test'))
    return RawSplits(train=train, val=val, test=test)


# --- Fashion-MNIST (IDX files) ----------------------------------------------------------------------------

_FASHION_MNIST_SIZE = (28, 28)
_FASHION_MNIST_SPLITS = (('train', 'train'), ('test', 't10k'))  # split -> file prefix


@register_adapter('fashion_mnist')
def _load_fashion_mnist(info: DatasetInfo, data_dir: Optional[str], download: bool, protocol: str) -> RawSplits:
    if data_dir:
        root = os.path.abspath(os.path.expanduser(data_dir))
    elif os.path.isdir(FASHION_MNIST_SYSTEM_DIR):
        root = FASHION_MNIST_SYSTEM_DIR
        _logger.info('No --data-dir given: reading %s from %s (the Debian package dataset-fashion-mnist).',
                     info.title, root)
    else:
        source = SOURCES[info.name]
        raise DatasetNotFoundError(
            f'{info.title} needs --data-dir (data_dir=...): the folder that holds its files, laid out as '
            f'{source.layout}. {source.how_to_get}')
    torchvision_raw = os.path.join(root, 'FashionMNIST', 'raw')
    found = {folder: _fashion_mnist_files(folder) for folder in (root, torchvision_raw)}
    complete = next((files for files in found.values() if all(files.values())), None)
    if complete is None and download and data_dir:
        # torchvision fetches the four upstream archives (md5-checked) and unzips them into FashionMNIST/raw.
        os.makedirs(root, exist_ok=True)
        _upstream(info, root, download, lambda: create_dataset(
            'torch/fashion_mnist', root=root, split='train', download=True))
        found[torchvision_raw] = _fashion_mnist_files(torchvision_raw)
        complete = found[torchvision_raw] if all(found[torchvision_raw].values()) else None
    if complete is None:
        partial = next(((folder, files) for folder, files in found.items() if any(files.values())), None)
        if partial is None:
            raise _not_found(info, root, 'no train-images-idx3-ubyte(.gz) here or in FashionMNIST/raw/')
        folder, files = partial
        missing = [name for name, path in files.items() if path is None]
        more = f' and {len(missing) - 1} more of its files' if len(missing) > 1 else ''
        raise _not_found(info, root, f'{folder} lacks {missing[0]} (plain or .gz){more}')
    splits = {}
    for split, prefix in _FASHION_MNIST_SPLITS:
        images_path, labels_path = complete[f'{prefix}-images-idx3-ubyte'], complete[f'{prefix}-labels-idx1-ubyte']
        images = _read_idx(images_path, IDX_IMAGES)
        labels = _read_idx(labels_path, IDX_LABELS)
        if images.shape[1:] != _FASHION_MNIST_SIZE:
            raise _idx_error(images_path, f'holds {images.shape[1]}x{images.shape[2]} images, not 28x28')
        if len(images) != len(labels):
            raise _idx_error(labels_path, f'holds {len(labels)} labels for the {len(images)} images of '
                                          f'{os.path.basename(images_path)}')
        if len(labels) and labels.max() >= info.num_classes:
            raise _idx_error(labels_path, f'holds label {labels.max()}, outside 0..{info.num_classes - 1}')
        # The arrays torchvision's FashionMNIST holds (uint8 images, int64 labels), served as (PIL 'L', int).
        splits[split] = ArrayImageDataset(images, labels.astype(np.int64))
    return RawSplits(**splits)


def _fashion_mnist_files(folder: str) -> Dict[str, Optional[str]]:
    """Each Fashion-MNIST file name -> its path in ``folder`` (the unzipped file if present, else the .gz), or None."""
    found: Dict[str, Optional[str]] = {}
    for name in _FASHION_MNIST_FILES:
        found[name] = next(
            (os.path.join(folder, n) for n in (name, name + '.gz') if os.path.isfile(os.path.join(folder, n))), None)
    return found


def _idx_error(path: str, problem: str) -> DatasetNotFoundError:
    if os.path.dirname(path) == FASHION_MNIST_SYSTEM_DIR:
        fix = 'reinstall the Debian package: sudo apt-get install --reinstall dataset-fashion-mnist'
    else:
        fix = ('delete it and run again with --download to fetch the files with torchvision, or install the Debian '
               'package dataset-fashion-mnist and use its folder')
    return DatasetNotFoundError(f'Fashion-MNIST file {path} {problem}. Get it again: {fix}.')


def _read_idx(path: str, magic: int) -> np.ndarray:
    try:
        return read_idx(path, magic)
    except IdxError as error:
        raise _idx_error(path, str(error)) from error


# --- MedMNIST ---------------------------------------------------------------------------------------------

def _load_medmnist(info: DatasetInfo, data_dir: Optional[str], download: bool, protocol: str) -> RawSplits:
    _require_package(info, 'medmnist', 'medmnist')
    import medmnist
    root = _dataset_root(info, data_dir, download)
    _require_files(info, root, download)
    dataset_class = getattr(medmnist, medmnist.INFO[info.name]['python_class'])
    splits = {}
    for split in ('train', 'val', 'test'):
        # size 28 as in the paper (the transform resizes to 64); the file is fetched (and md5-checked) once.
        upstream = _upstream(info, root, download, lambda split=split: dataset_class(
            split=split, root=root, size=28, download=download and split == 'train'))
        # medmnist serves labels as (1,) arrays and checks split sizes against the full release; serve its
        # arrays as plain (PIL image, int) pairs instead.
        splits[split] = ArrayImageDataset(upstream.imgs, upstream.labels)
    return RawSplits(**splits)


register_adapter('tissuemnist')(_load_medmnist)
register_adapter('bloodmnist')(_load_medmnist)


# --- Tiny ImageNet ----------------------------------------------------------------------------------------

@register_adapter('tiny_imagenet')
def _load_tiny_imagenet(info: DatasetInfo, data_dir: Optional[str], download: bool, protocol: str) -> RawSplits:
    root = _dataset_root(info, data_dir, download)
    folder = next((d for d in (root, os.path.join(root, 'tiny-imagenet-200'))
                   if os.path.isfile(os.path.join(d, 'wnids.txt'))), None)
    if folder is None:
        if download:
            return _load_tiny_imagenet_hub(info, root)
        raise _not_found(info, root, 'no wnids.txt here or in tiny-imagenet-200/')
    _require_files(info, folder, download=False)
    class_to_idx = _tiny_imagenet_classes(folder)

    from torchvision.datasets.folder import make_dataset
    try:  # train/<wnid>/images/*.JPEG: torchvision's folder walk, with the class index of each wnid fixed
        train = make_dataset(os.path.join(folder, 'train'), class_to_idx, extensions=('.jpeg',))
    except FileNotFoundError as error:
        raise DatasetNotFoundError(
            f'Tiny ImageNet in {folder} is incomplete: {error} '
            f'Expected layout: {SOURCES[info.name].layout.replace("<data_dir>", root)}.') from error

    # val/images/*.JPEG with val_annotations.txt: file <tab> wnid <tab> box coordinates.
    annotations = os.path.join(folder, 'val', 'val_annotations.txt')
    images_dir = os.path.join(folder, 'val', 'images')
    present = set(os.listdir(images_dir))
    val, problems = [], []
    with open(annotations, encoding='utf-8') as f:
        for line_number, line in enumerate(f, 1):
            fields = line.strip().split('\t')
            if not line.strip():
                continue
            if len(fields) < 2 or fields[1] not in class_to_idx or fields[0] not in present:
                problems.append(f'line {line_number}: {line.strip()!r}')
                continue
            val.append((os.path.join(images_dir, fields[0]), class_to_idx[fields[1]]))
    if problems:
        raise DatasetNotFoundError(
            f'{len(problems)} entries of {annotations} name a missing image or an unknown wnid '
            f'(first: {problems[0]}). Unzip tiny-imagenet-200.zip again.')
    # The official val split has labels; the official test split does not, so val plays the test split.
    return RawSplits(train=ImageFileDataset(train), test=ImageFileDataset(val))


def _tiny_imagenet_classes(folder: str) -> Dict[str, int]:
    with open(os.path.join(folder, 'wnids.txt'), encoding='utf-8') as f:
        wnids = {line.strip() for line in f if line.strip()}
    if wnids != set(TINY_IMAGENET_WNIDS):
        unknown, absent = sorted(wnids - set(TINY_IMAGENET_WNIDS)), sorted(set(TINY_IMAGENET_WNIDS) - wnids)
        raise ValueError(
            f'{folder}/wnids.txt lists {len(wnids)} classes that differ from Tiny ImageNet\'s 200 '
            f'(unknown: {unknown[:5]}, absent: {absent[:5]}). For another image collection use --dataset folder.')
    return {wnid: index for index, wnid in enumerate(TINY_IMAGENET_WNIDS)}


def _load_tiny_imagenet_hub(info: DatasetInfo, root: str) -> RawSplits:
    try:
        import datasets  # noqa: F401  (timm's hfds reader needs it)
    except ImportError as error:
        raise ImportError(
            f'Reading Tiny ImageNet from the Hugging Face Hub ({info.hf_dataset}) needs the datasets package: '
            f'pip install datasets (or pip install "timm-gradattn[datasets]"). Or, without it, '
            f'{_TINY_IMAGENET_ZIP.replace("<data_dir>", root)}.') from error
    # The Hub copy numbers classes in wnids.txt order; the class map (wnid -> index) renumbers them in
    # the sorted order the rest of the project uses.
    class_map = {wnid: index for index, wnid in enumerate(TINY_IMAGENET_WNIDS)}
    splits = {}
    for split, hub_split in (('train', 'train'), ('test', 'valid')):
        dataset = create_dataset(f'hfds/{info.hf_dataset}', root=root, split=hub_split, class_map=class_map)
        reader = dataset.reader
        names = reader.dataset.features[reader.label_key].names
        if not set(names) <= set(class_map):
            raise ValueError(
                f'The Hub dataset {info.hf_dataset} names its classes {names[:3]}..., not Tiny ImageNet wnids; '
                f'use the folder layout instead: {_TINY_IMAGENET_ZIP.replace("<data_dir>", root)}.')
        splits[split] = dataset
    return RawSplits(train=splits['train'], test=splits['test'])


# --- PAD-UFES-20 ------------------------------------------------------------------------------------------

@register_adapter('pad_ufes_20')
def _load_pad_ufes_20(info: DatasetInfo, data_dir: Optional[str], download: bool, protocol: str) -> RawSplits:
    root = _dataset_root(info, data_dir, download)
    metadata = _find_file(root, 'metadata.csv')
    if metadata is None:
        raise _not_found(info, root, 'no metadata.csv here or in a sub-folder')
    with open(metadata, newline='', encoding='utf-8') as f:
        rows = list(csv.DictReader(f))
    columns = set(rows[0]) if rows else set()
    needed = {'patient_id', 'img_id', 'diagnostic'}
    if not needed <= columns:
        raise ValueError(
            f'{metadata} lacks the column(s) {sorted(needed - columns)} (it has {sorted(columns)}); '
            f'use the metadata.csv published with PAD-UFES-20.')
    images = _index_images(root)
    missing = [row['img_id'] for row in rows if row['img_id'] not in images]
    if missing:
        raise _not_found(
            info, root,
            f'{len(missing)} of the {len(rows)} images listed in {metadata} are missing (first: {missing[:3]})')
    label_of = {code: index for index, code in enumerate(info.label_names)}
    unknown = sorted({row['diagnostic'] for row in rows} - set(label_of))
    if unknown:
        raise ValueError(f'{metadata} has diagnostic codes {unknown} outside {info.label_names}.')
    samples = [(images[row['img_id']], label_of[row['diagnostic']]) for row in rows]
    # One patient can contribute several lesions and images; keeping each patient in one split stops the
    # model from being tested on patients it was trained on (the reference split per image).
    patients = [row['patient_id'] for row in rows]
    return RawSplits(train=ImageFileDataset(samples), groups=patients)


def _index_images(root: str) -> Dict[str, str]:
    """File name -> path of every image below ``root``."""
    found: Dict[str, str] = {}
    for folder, _, files in os.walk(root, followlinks=True):
        for name in files:
            if os.path.splitext(name)[1].lower() in _IMAGES:
                found.setdefault(name, os.path.join(folder, name))
    return found
