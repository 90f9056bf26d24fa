"""The dataset adapters read each upstream on-disk format (written here, tiny) into the paper's splits."""
import hashlib
import os
import sys

import numpy as np
import pytest
import torch

from data_fixtures import (
    label_value, skip_torchvision_md5, write_cifar10, write_fashion_mnist, write_medmnist, write_pad_ufes,
    write_pcam, write_svhn, write_tiny_imagenet, write_tiny_imagenet_hub_copy)
from timm_gradattn.data import (
    ADAPTERS, DATASETS, SOURCES, TINY_IMAGENET_WNIDS, DatasetNotFoundError, build_datasets, paper_split)
from timm_gradattn.data.datasets import split_lengths

PAPER = (0.70, 0.15, 0.15)


@pytest.fixture
def md5_skipped(monkeypatch):
    skip_torchvision_md5(monkeypatch)


def denormalise(tensor: torch.Tensor, info) -> torch.Tensor:
    mean = torch.tensor(info.mean).view(-1, 1, 1)
    std = torch.tensor(info.std).view(-1, 1, 1)
    return tensor * std + mean


def assert_label_coded(dataset, info, code=label_value, tolerance=2.5):
    """Every (eval-transformed) image carries its own label: its grey level is ``code(label)``."""
    for index in range(len(dataset)):
        image, label = dataset[index]
        assert image.shape == info.input_size
        assert 0 <= label < info.num_classes
        level = denormalise(image, info) * 255
        assert torch.allclose(level, torch.full_like(level, code(label)), atol=tolerance), (index, label)


def test_every_known_dataset_has_a_loader_and_a_source():
    assert set(DATASETS) <= set(ADAPTERS)
    assert set(DATASETS) - {'digits'} == set(SOURCES)


def test_cifar10_paper_pools_train_and_test(tmp_path, md5_skipped):
    written = write_cifar10(str(tmp_path))
    n = written['train'] + written['test']
    splits = build_datasets('cifar10', str(tmp_path))
    assert list(splits.sizes().values()) == split_lengths(n, PAPER)
    # the reference's random_split(seed 42) over the pooled train + test indices
    assert splits.train.indices == paper_split(n, PAPER, 42)[0]
    assert splits.info.input_size == (3, 32, 32)
    assert_label_coded(splits.val, splits.info)
    assert_label_coded(splits.test, splits.info)


def test_cifar10_official_keeps_the_test_batch(tmp_path, md5_skipped):
    written = write_cifar10(str(tmp_path))
    splits = build_datasets('cifar10', str(tmp_path), protocol='official')
    assert splits.sizes()['test'] == written['test']
    assert splits.sizes()['train'] + splits.sizes()['val'] == written['train']
    # val carved from the official train split by random_split (seed 42), as before: not by class
    assert splits.val.indices == paper_split(written['train'], (0.85, 0.15), 42)[1]
    assert_label_coded(splits.test, splits.info)


def test_cifar10_checksum_mismatch_is_reported_not_skipped(tmp_path):
    # Without the test-only md5 bypass torchvision rejects the hand-written files; the message says what to do.
    write_cifar10(str(tmp_path))
    with pytest.raises(DatasetNotFoundError, match='damaged'):
        build_datasets('cifar10', str(tmp_path))


def test_svhn_pools_train_test_extra_and_maps_label_10_to_digit_0(tmp_path, md5_skipped):
    written = write_svhn(str(tmp_path))
    n = sum(written.values())
    splits = build_datasets('svhn', str(tmp_path))
    assert list(splits.sizes().values()) == split_lengths(n, PAPER)
    labels = [splits.train[i][1] for i in range(len(splits.train))]
    assert min(labels) == 0 and max(labels) <= 9
    assert_label_coded(splits.val, splits.info)
    assert_label_coded(splits.test, splits.info)

    official = build_datasets('svhn', str(tmp_path), protocol='official')
    assert official.sizes()['test'] == written['test']
    assert official.sizes()['train'] + official.sizes()['val'] == written['train'] + written['extra']


def test_fashion_mnist_reads_idx_files_as_one_channel(tmp_path):
    written = write_fashion_mnist(str(tmp_path))
    splits = build_datasets('fashion_mnist', str(tmp_path))
    assert list(splits.sizes().values()) == split_lengths(sum(written.values()), PAPER)
    assert splits.train[0][0].shape == (1, 28, 28)
    assert_label_coded(splits.test, splits.info)
    official = build_datasets('fashion_mnist', str(tmp_path), protocol='official')
    assert official.sizes()['test'] == written['test']


@pytest.mark.parametrize('protocol', ['paper', 'official'])
def test_pcam_keeps_its_official_h5_splits(tmp_path, protocol):
    written = write_pcam(str(tmp_path))
    splits = build_datasets('pcam', str(tmp_path), protocol=protocol)
    assert splits.sizes() == {'train': written['train'], 'val': written['valid'], 'test': written['test']}
    assert_label_coded(splits.val, splits.info)
    assert {splits.train[i][1] for i in range(len(splits.train))} == {0, 1}


@pytest.mark.parametrize('flag,channels', [('tissuemnist', 1), ('bloodmnist', 3)])
def test_medmnist_npz_at_28px_becomes_64px_rgb(tmp_path, flag, channels):
    written = write_medmnist(str(tmp_path), flag, channels=channels)
    for protocol in ('paper', 'official'):
        splits = build_datasets(flag, str(tmp_path), protocol=protocol)
        assert splits.sizes() == written
    image, _ = splits.train[0]
    assert image.shape == (3, 64, 64)
    if channels == 1:  # grey converted to 3 identical channels
        pixels = denormalise(image, splits.info)
        assert torch.allclose(pixels[0], pixels[1], atol=1e-6) and torch.allclose(pixels[1], pixels[2], atol=1e-6)
    assert_label_coded(splits.test, splits.info)


@pytest.fixture(scope='module')
def tiny_imagenet_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp('tiny')
    write_tiny_imagenet(str(root), TINY_IMAGENET_WNIDS, train_per_class=2, val_per_class=1)
    return str(root)


def test_tiny_imagenet_paper_pools_train_and_official_val(tiny_imagenet_dir):
    splits = build_datasets('tiny_imagenet', tiny_imagenet_dir)
    assert list(splits.sizes().values()) == split_lengths(600, PAPER)
    assert splits.info.num_classes == 200 and len(splits.info.label_names) == 200
    assert splits.info.label_names[TINY_IMAGENET_WNIDS.index('n01443537')] == 'goldfish'
    # the fixture paints class i with label_value(i % 12): labels are indices into the sorted wnids
    assert_label_coded(splits.val, splits.info, code=lambda y: label_value(y % 12))


def test_tiny_imagenet_official_val_becomes_test(tiny_imagenet_dir):
    # the folder may also be given directly
    splits = build_datasets('tiny_imagenet', os.path.join(tiny_imagenet_dir, 'tiny-imagenet-200'), protocol='official')
    assert splits.sizes() == {'train': 340, 'val': 60, 'test': 200}
    assert sorted(splits.test[i][1] for i in range(200)) == list(range(200))
    assert_label_coded(splits.test, splits.info, code=lambda y: label_value(y % 12))


def test_tiny_imagenet_with_other_classes_is_refused(tmp_path):
    write_tiny_imagenet(str(tmp_path), ['n00000001', 'n00000002'], train_per_class=1)
    with pytest.raises(ValueError, match='--dataset folder'):
        build_datasets('tiny_imagenet', str(tmp_path))


def test_tiny_imagenet_missing_says_where_to_get_it(tmp_path):
    with pytest.raises(DatasetNotFoundError, match='tiny-imagenet-200.zip') as error:
        build_datasets('tiny_imagenet', str(tmp_path))
    assert '--download' in str(error.value)


def test_tiny_imagenet_hub_needs_the_datasets_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, 'datasets', None)  # as if `datasets` were not installed
    with pytest.raises(ImportError, match='pip install datasets'):
        build_datasets('tiny_imagenet', str(tmp_path), download=True)


def test_tiny_imagenet_hub_copy_is_renumbered_to_sorted_wnids(tmp_path, monkeypatch):
    pytest.importorskip('datasets')
    rng = np.random.default_rng(0)  # the Hub copy numbers classes in wnids.txt order, not sorted
    file_order = [TINY_IMAGENET_WNIDS[i] for i in rng.permutation(len(TINY_IMAGENET_WNIDS))]
    monkeypatch.chdir(tmp_path)  # a local folder named like the Hub id stands in for the Hub
    write_tiny_imagenet_hub_copy(str(tmp_path / DATASETS['tiny_imagenet'].hf_dataset), file_order)
    splits = build_datasets('tiny_imagenet', str(tmp_path / 'cache'), protocol='official', download=True)
    assert splits.sizes() == {'train': 340, 'val': 60, 'test': 200}
    assert_label_coded(splits.test, splits.info, code=lambda y: label_value(y % 12))


def _patients(split, patient_of):
    return {patient_of[os.path.basename(split.base.samples[i][0])] for i in split.indices}


@pytest.mark.parametrize('seed', [42, 7])
def test_pad_ufes_20_is_split_by_patient(tmp_path, seed):
    patient_of = write_pad_ufes(str(tmp_path), patients=20)
    splits = build_datasets('pad_ufes_20', str(tmp_path), seed=seed)
    assert sum(splits.sizes().values()) == len(patient_of)
    train, val, test = (_patients(s, patient_of) for s in (splits.train, splits.val, splits.test))
    assert not (train & val or train & test or val & test)
    assert train | val | test == set(patient_of.values())
    assert 0.5 < len(splits.train) / len(patient_of) < 0.85  # whole patients, roughly 70 %
    assert_label_coded(splits.val, splits.info)
    # no official split: the official protocol splits by patient the same way
    official = build_datasets('pad_ufes_20', str(tmp_path), protocol='official', seed=seed)
    assert official.train.indices == splits.train.indices


def test_pad_ufes_20_found_below_an_unzipped_top_folder(tmp_path):
    write_pad_ufes(str(tmp_path / 'PAD-UFES-20'), patients=12)
    assert sum(build_datasets('pad_ufes_20', str(tmp_path)).sizes().values()) > 0


def test_pad_ufes_20_missing_images_and_metadata_are_named(tmp_path):
    patient_of = write_pad_ufes(str(tmp_path), patients=6)
    lost = sorted(patient_of)[0]
    for folder, _, files in os.walk(tmp_path):
        if lost in files:
            os.remove(os.path.join(folder, lost))
    with pytest.raises(DatasetNotFoundError, match=lost):
        build_datasets('pad_ufes_20', str(tmp_path))
    os.remove(tmp_path / 'metadata.csv')
    with pytest.raises(DatasetNotFoundError, match='mendeley'):
        build_datasets('pad_ufes_20', str(tmp_path))


@pytest.mark.parametrize('name', ['cifar10', 'svhn', 'fashion_mnist', 'pcam', 'tissuemnist', 'bloodmnist'])
def test_missing_dataset_is_not_downloaded_and_the_error_says_how(tmp_path, name):
    with pytest.raises(DatasetNotFoundError) as error:
        build_datasets(name, str(tmp_path))
    message = str(error.value)
    assert '--download' in message and str(tmp_path) in message
    assert os.path.basename(SOURCES[name].files[0]) in message  # names an expected file
    assert os.listdir(tmp_path) == []  # nothing fetched without download=True


def test_dataset_without_data_dir_asks_for_one():
    with pytest.raises(DatasetNotFoundError, match='--data-dir'):
        build_datasets('cifar10')


def test_digits_still_split_as_before():
    # The GradAttn reference's random_split(seed 42), index for index, under both protocols: committed study results
    # rest on it. Only an image folder is split by class.
    splits = build_datasets('digits')
    assert splits.sizes() == dict(zip(('train', 'val', 'test'), split_lengths(1797, PAPER)))
    assert np.isclose(sum(splits.info.split), 1)
    indices = [splits.train.indices, splits.val.indices, splits.test.indices]
    assert indices == paper_split(1797, PAPER, 42)
    assert [split[:6] for split in indices] == [
        [879, 1100, 1133, 553, 798, 1], [528, 1229, 1509, 1698, 861, 124], [48, 726, 1544, 1300, 532, 145]]
    assert hashlib.sha256(str(indices).encode()).hexdigest()[:16] == '6504a6dd638e63f6'
    official = build_datasets('digits', protocol='official')
    assert [official.train.indices, official.val.indices, official.test.indices] == indices


@pytest.mark.parametrize('name,module', [('pcam', 'h5py'), ('svhn', 'scipy.io'), ('bloodmnist', 'medmnist')])
def test_missing_reader_package_says_what_to_install(tmp_path, monkeypatch, name, module):
    monkeypatch.setitem(sys.modules, module, None)  # as if the package were not installed
    with pytest.raises(ImportError, match=f'pip install {module.split(".")[0]}'):
        build_datasets(name, str(tmp_path))
