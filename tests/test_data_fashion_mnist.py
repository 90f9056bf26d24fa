"""Fashion-MNIST as users have it: the Debian package's folder of gzipped IDX files, or torchvision's layout.

The IDX files are written here, small (20 train + 10 test images of seeded noise), in each layout; the
reader trusts their headers and counts, so damaged files are told apart by what is wrong with them.
"""
import gzip
import logging
import os
import struct
from typing import Dict

import numpy as np
import pytest
import torch
from timm.data import create_dataset

from timm_gradattn.data import ADAPTERS, DATASETS, DatasetNotFoundError, RawSplits, build_datasets
from timm_gradattn.data import adapters
from timm_gradattn.data.datasets import split_lengths

INFO = DATASETS['fashion_mnist']
TRAIN, TEST = 20, 10
PREFIX = {'train': 'train', 'test': 't10k'}


def idx_bytes(array: np.ndarray, magic_type: int = 0x08) -> bytes:
    """IDX: two zero bytes, the element type (0x08: unsigned byte), the number of dimensions, big-endian
    int32 sizes, then the data."""
    return (bytes([0, 0, magic_type, array.ndim]) + struct.pack(f'>{array.ndim}I', *array.shape)
            + array.astype(np.uint8).tobytes())


def make_arrays(seed: int = 0) -> Dict[str, Dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {split: {'images': rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
                    'labels': rng.integers(0, 10, n, dtype=np.uint8)}
            for split, n in (('train', TRAIN), ('test', TEST))}


def write_idx_files(folder, arrays, zipped: bool) -> Dict[str, str]:
    """The four files of ``arrays`` in ``folder``; returns file name (without .gz) -> path written."""
    os.makedirs(folder, exist_ok=True)
    written = {}
    for split, prefix in PREFIX.items():
        for kind, dims in (('images', 'idx3'), ('labels', 'idx1')):
            name = f'{prefix}-{kind}-{dims}-ubyte'
            path = os.path.join(folder, name + ('.gz' if zipped else ''))
            data = idx_bytes(arrays[split][kind])
            with (gzip.open(path, 'wb') if zipped else open(path, 'wb')) as f:
                f.write(data)
            written[name] = path
    return written


LAYOUTS = {  # name -> (sub-folder of data_dir, gzipped)
    'debian_gzipped': ('', True),
    'flat_plain': ('', False),
    'torchvision_plain': ('FashionMNIST/raw', False),
    'torchvision_gzipped': ('FashionMNIST/raw', True),
}


@pytest.fixture
def arrays():
    return make_arrays()


def pixels(tensor: torch.Tensor) -> np.ndarray:
    """An eval-transformed image back in 0..255."""
    return (tensor * INFO.std[0] + INFO.mean[0]).mul(255).squeeze(0).numpy()


@pytest.mark.parametrize('layout', list(LAYOUTS))
def test_each_layout_loads_with_its_counts_and_pixels(tmp_path, arrays, layout):
    sub, zipped = LAYOUTS[layout]
    write_idx_files(tmp_path / sub, arrays, zipped)

    raw = ADAPTERS['fashion_mnist'](INFO, str(tmp_path), False, 'paper')
    for split in ('train', 'test'):
        dataset = getattr(raw, split)
        np.testing.assert_array_equal(dataset.images, arrays[split]['images'])
        np.testing.assert_array_equal(dataset.labels, arrays[split]['labels'])

    paper = build_datasets('fashion_mnist', data_dir=str(tmp_path))
    assert list(paper.sizes().values()) == split_lengths(TRAIN + TEST, (0.70, 0.15, 0.15))

    official = build_datasets('fashion_mnist', data_dir=str(tmp_path), protocol='official')
    assert official.sizes()['test'] == TEST
    assert official.sizes()['train'] + official.sizes()['val'] == TRAIN
    for index in range(TEST):
        image, label = official.test[index]
        assert image.shape == (1, 28, 28)
        assert label == arrays['test']['labels'][index]
        np.testing.assert_allclose(pixels(image), arrays['test']['images'][index], atol=1e-3)


def test_the_debian_folder_is_read_without_data_dir_and_says_so(tmp_path, arrays, monkeypatch, caplog):
    system = tmp_path / 'usr/share/datasets/fashion-mnist'
    write_idx_files(system, arrays, zipped=True)
    monkeypatch.setattr(adapters, 'FASHION_MNIST_SYSTEM_DIR', str(system))
    with caplog.at_level(logging.INFO, logger=adapters.__name__):
        splits = build_datasets('fashion_mnist', protocol='official')
    assert splits.sizes()['test'] == TEST
    notes = [r.getMessage() for r in caplog.records if r.name == adapters.__name__]
    assert len(notes) == 1 and str(system) in notes[0] and 'dataset-fashion-mnist' in notes[0]


def test_without_data_dir_or_the_package_the_error_gives_both_layouts_and_both_ways(tmp_path, monkeypatch):
    monkeypatch.setattr(adapters, 'FASHION_MNIST_SYSTEM_DIR', str(tmp_path / 'absent'))
    with pytest.raises(DatasetNotFoundError) as error:
        build_datasets('fashion_mnist')
    message = str(error.value)
    assert '\n' not in message
    for needed in ('--data-dir', 'labels-idx1}-ubyte.gz', 'FashionMNIST/raw/', 'apt-get install dataset-fashion-mnist',
                   '--download'):
        assert needed in message, needed


def test_old_torchvision_path_and_the_idx_reader_give_identical_splits(tmp_path, arrays):
    # What the loader returned before (torchvision's FashionMNIST through timm) against what it returns now,
    # on the same plain IDX files: same arrays, dtypes and items, so the same seeded splits.
    write_idx_files(tmp_path / 'FashionMNIST/raw', arrays, zipped=False)
    old = RawSplits(**{split: create_dataset('torch/fashion_mnist', root=str(tmp_path), split=split)
                       for split in ('train', 'test')})
    new = ADAPTERS['fashion_mnist'](INFO, str(tmp_path), False, 'paper')
    for split in ('train', 'test'):
        before, now = getattr(old, split), getattr(new, split)
        assert (before.data.dtype, before.targets.dtype) == (torch.uint8, torch.int64)
        assert (now.images.dtype, now.labels.dtype) == (np.uint8, np.int64)
        np.testing.assert_array_equal(before.data.numpy(), now.images)
        np.testing.assert_array_equal(before.targets.numpy(), now.labels)
        assert len(before) == len(now)
        for index in range(len(now)):
            (image_before, label_before), (image_now, label_now) = before[index], now[index]
            assert image_before.mode == image_now.mode == 'L'
            np.testing.assert_array_equal(np.asarray(image_before), np.asarray(image_now))
            assert type(label_before) is type(label_now) is int and label_before == label_now
    assert (old.val, old.groups, old.info) == (new.val, new.groups, new.info)


@pytest.mark.parametrize('protocol', ['paper', 'official'])
def test_build_datasets_splits_are_unchanged_from_the_torchvision_path(tmp_path, arrays, monkeypatch, protocol):
    write_idx_files(tmp_path / 'FashionMNIST/raw', arrays, zipped=False)
    now = build_datasets('fashion_mnist', str(tmp_path), protocol=protocol)

    def old_loader(info, data_dir, download, protocol):
        return RawSplits(**{split: create_dataset('torch/fashion_mnist', root=data_dir, split=split)
                            for split in ('train', 'test')})
    monkeypatch.setitem(ADAPTERS, 'fashion_mnist', old_loader)
    before = build_datasets('fashion_mnist', str(tmp_path), protocol=protocol)
    assert now.sizes() == before.sizes()
    for split in ('train', 'val', 'test'):
        assert getattr(now, split).indices == getattr(before, split).indices
    for split in ('val', 'test'):  # eval transforms are deterministic
        for index in range(len(getattr(now, split))):
            (a, la), (b, lb) = getattr(now, split)[index], getattr(before, split)[index]
            assert la == lb and torch.equal(a, b)


def test_plain_files_are_preferred_to_gz_beside_them_as_torchvision_leaves_them(tmp_path, arrays):
    raw = tmp_path / 'FashionMNIST/raw'
    write_idx_files(raw, arrays, zipped=True)
    write_idx_files(raw, arrays, zipped=False)
    with open(raw / 'train-images-idx3-ubyte.gz', 'wb') as f:
        f.write(b'not read')
    assert len(build_datasets('fashion_mnist', str(tmp_path), protocol='official').test) == TEST


def test_download_goes_through_torchvision_and_reads_what_it_fetched(tmp_path, arrays, monkeypatch):
    calls = []

    def fake_create_dataset(name, root, split, download):
        calls.append((name, split, download))
        write_idx_files(os.path.join(root, 'FashionMNIST', 'raw'), arrays, zipped=False)
    monkeypatch.setattr(adapters, 'create_dataset', fake_create_dataset)
    data_dir = tmp_path / 'new'
    splits = build_datasets('fashion_mnist', str(data_dir), download=True, protocol='official')
    assert calls == [('torch/fashion_mnist', 'train', True)]
    assert splits.sizes()['test'] == TEST
    build_datasets('fashion_mnist', str(data_dir), download=True)  # files present: nothing fetched again
    assert len(calls) == 1


def test_a_failed_download_says_what_to_do(tmp_path, monkeypatch):
    def offline(name, root, split, download):
        raise OSError('<urlopen error [Errno -3] Temporary failure in name resolution>')
    monkeypatch.setattr(adapters, 'create_dataset', offline)
    with pytest.raises(DatasetNotFoundError, match='network connection'):
        build_datasets('fashion_mnist', str(tmp_path), download=True)


def _truncate(path):
    with open(path, 'rb') as f:
        data = f.read()
    with open(path, 'wb') as f:
        f.write(data[:len(data) // 2])


def _rewrite(path, data: bytes, zipped: bool):
    with (gzip.open(path, 'wb') if zipped else open(path, 'wb')) as f:
        f.write(data)


def _damage(problem: str, written: Dict[str, str], zipped: bool) -> str:
    """Damage one file of a written set as ``problem`` says; returns the file named in the error."""
    images, labels = written['train-images-idx3-ubyte'], written['train-labels-idx1-ubyte']
    if problem == 'truncated':
        _truncate(images)
    elif problem == 'wrong magic':  # a labels file where the images belong
        _rewrite(images, idx_bytes(np.zeros(TRAIN, np.uint8)), zipped)
    elif problem == 'wrong size':
        _rewrite(images, idx_bytes(np.zeros((TRAIN, 32, 32), np.uint8)), zipped)
    elif problem == 'short data':  # a whole, valid gzip stream whose IDX data ends early
        _rewrite(images, idx_bytes(np.zeros((TRAIN, 28, 28), np.uint8))[:-5], zipped)
    elif problem == 'trailing bytes':
        _rewrite(images, idx_bytes(np.zeros((TRAIN, 28, 28), np.uint8)) + b'\0', zipped)
    elif problem == 'mismatched counts':
        _rewrite(labels, idx_bytes(np.zeros(TRAIN - 1, np.uint8)), zipped)
        return labels
    elif problem == 'label out of range':
        _rewrite(labels, idx_bytes(np.full(TRAIN, 10, np.uint8)), zipped)
        return labels
    elif problem == 'missing':
        os.remove(images)
        return os.path.basename(images).replace('.gz', '')
    return images


PROBLEMS = {  # problem -> what the message says
    'truncated': {False: 'is truncated: its header promises 20 x 28 x 28 = 15680 bytes of images', True: 'gzip'},
    'wrong magic': 'magic number 0x00000801, expected 0x00000803',
    'wrong size': '32x32 images, not 28x28',
    'short data': 'is truncated',
    'trailing bytes': 'has trailing bytes',
    'mismatched counts': 'holds 19 labels for the 20 images',
    'label out of range': 'label 10, outside 0..9',
    'missing': 'lacks train-images-idx3-ubyte (plain or .gz)',
}


@pytest.mark.parametrize('zipped', [True, False], ids=['gzipped', 'plain'])
@pytest.mark.parametrize('problem', list(PROBLEMS))
def test_a_damaged_or_missing_file_is_one_line_naming_it_and_the_problem(tmp_path, arrays, problem, zipped):
    written = write_idx_files(tmp_path, arrays, zipped)
    named = _damage(problem, written, zipped)
    with pytest.raises(DatasetNotFoundError) as error:
        build_datasets('fashion_mnist', str(tmp_path))
    message = str(error.value)
    expected = PROBLEMS[problem][zipped] if isinstance(PROBLEMS[problem], dict) else PROBLEMS[problem]
    assert '\n' not in message
    assert named in message and expected in message, message


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(adapters.FASHION_MNIST_SYSTEM_DIR),
                    reason=f'the Debian package dataset-fashion-mnist is not installed '
                           f'({adapters.FASHION_MNIST_SYSTEM_DIR} is absent)')
def test_the_installed_debian_package_holds_the_whole_dataset():
    for data_dir in (adapters.FASHION_MNIST_SYSTEM_DIR, None):
        raw = ADAPTERS['fashion_mnist'](INFO, data_dir, False, 'official')
        assert (len(raw.train), len(raw.test)) == (60_000, 10_000)
        assert raw.train.images.shape == (60_000, 28, 28)
        assert set(np.unique(raw.test.labels)) == set(range(10))
    splits = build_datasets('fashion_mnist', adapters.FASHION_MNIST_SYSTEM_DIR)
    assert list(splits.sizes().values()) == [49_000, 10_500, 10_500]
