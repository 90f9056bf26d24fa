"""Your own images: the 'folder' dataset, its automatic split and its errors."""
import logging
import os

import pytest
import torch

from data_fixtures import label_value, write_image, write_image_folder
from timm_gradattn.data import (
    DatasetNotFoundError, UnreadableImageError, build_datasets, check_image_folder)
from timm_gradattn.data.datasets import split_lengths
from timm_gradattn.data.info import IMAGENET_MEAN


def level_of(image: torch.Tensor, info) -> torch.Tensor:
    mean = torch.tensor(info.mean).view(-1, 1, 1)
    std = torch.tensor(info.std).view(-1, 1, 1)
    return (image * std + mean) * 255


def assert_labels_match_images(dataset, info):
    for index in range(len(dataset)):
        image, label = dataset[index]
        assert torch.allclose(level_of(image, info), torch.tensor(float(label_value(label))), atol=1.5), index


def test_flat_folder_is_split_70_15_15_reproducibly(tmp_path):
    write_image_folder(str(tmp_path), classes=3, per_class=8, class_names=['cat', 'dog', 'emu'])
    splits = build_datasets('folder', str(tmp_path))
    assert list(splits.sizes().values()) == split_lengths(24, (0.7, 0.15, 0.15))
    info = splits.info
    assert (info.name, info.num_classes, info.label_names) == ('folder', 3, ('cat', 'dog', 'emu'))
    assert info.input_size == (3, 224, 224) and info.mean == IMAGENET_MEAN and info.train_augment == 'folder'
    assert_labels_match_images(splits.val, info)
    assert_labels_match_images(splits.test, info)

    again = build_datasets('folder', str(tmp_path))
    assert (again.train.indices, again.val.indices) == (splits.train.indices, splits.val.indices)
    assert build_datasets('folder', str(tmp_path), seed=1).train.indices != splits.train.indices


def test_requested_input_size_and_channels_are_recorded(tmp_path):
    write_image_folder(str(tmp_path), classes=2, per_class=10)
    splits = build_datasets('folder', str(tmp_path), img_size=48, in_chans=1)
    assert splits.info.input_size == (1, 48, 48)
    assert len(splits.info.mean) == 1  # ImageNet statistics averaged for grey input
    assert splits.train[0][0].shape == (1, 48, 48)
    assert_labels_match_images(splits.val, splits.info)


def test_split_folders_are_used_and_class_indices_follow_train(tmp_path):
    write_image_folder(str(tmp_path), classes=3, per_class=5, splits={'train': 5})
    write_image_folder(str(tmp_path), classes=3, per_class=2, splits={'val': 2})
    # test/ has only the last class: it must keep index 2, not become class 0
    write_image(str(tmp_path / 'test' / 'class_2' / 'a.png'), 32, label=2)
    for protocol in ('paper', 'official'):
        splits = build_datasets('folder', str(tmp_path), protocol=protocol)
        assert splits.sizes() == {'train': 15, 'val': 6, 'test': 1}
    assert splits.test[0][1] == 2
    assert_labels_match_images(splits.test, splits.info)
    unaugmented = build_datasets('folder', str(tmp_path), augment='none')
    assert_labels_match_images(unaugmented.train, unaugmented.info)


def test_missing_test_folder_is_carved_from_train(tmp_path):
    write_image_folder(str(tmp_path), classes=2, per_class=10, splits={'train': 10, 'valid': 2})
    splits = build_datasets('folder', str(tmp_path))
    assert splits.sizes()['val'] == 4
    assert splits.sizes()['train'] + splits.sizes()['test'] == 20 and splits.sizes()['test'] > 0


def test_unreadable_image_is_named_on_load(tmp_path):
    write_image_folder(str(tmp_path), classes=2, per_class=4)
    bad = tmp_path / 'class_1' / 'broken.png'
    bad.write_bytes(b'this is not a png file')
    splits = build_datasets('folder', str(tmp_path))  # a damaged file that is not empty passes the quick check
    with pytest.raises(UnreadableImageError, match='broken.png'):
        for dataset in (splits.train, splits.val, splits.test):
            for index in range(len(dataset)):
                dataset[index]
    with pytest.raises(ValueError, match='broken.png'):
        check_image_folder(str(tmp_path), verify=True)


def test_empty_file_is_caught_upfront(tmp_path):
    write_image_folder(str(tmp_path), classes=2, per_class=4)
    (tmp_path / 'class_0' / 'empty.jpg').write_bytes(b'')
    with pytest.raises(ValueError, match='empty.jpg'):
        build_datasets('folder', str(tmp_path))


def test_non_image_files_are_ignored_with_a_warning(tmp_path, caplog):
    write_image_folder(str(tmp_path), classes=2, per_class=10)
    (tmp_path / 'class_0' / 'notes.txt').write_text('hello')
    with caplog.at_level(logging.WARNING):
        summary = check_image_folder(str(tmp_path))
    assert summary.counts == {'class_0': 10, 'class_1': 10} and summary.ignored[0].endswith('notes.txt')
    assert 'notes.txt' in caplog.text


@pytest.mark.parametrize('problem,error,match', [
    ('one_class', ValueError, 'at least 2'),
    ('empty_class', ValueError, 'hold no images'),
    ('nested', ValueError, 'nested'),
    ('unknown_val_class', ValueError, 'no counterpart'),
    ('val_without_train', DatasetNotFoundError, 'no train/'),
    ('missing', DatasetNotFoundError, 'does not exist'),
    ('too_few_images', ValueError, 'split of folder is empty'),
])
def test_folder_problems_are_explained(tmp_path, problem, error, match):
    root = tmp_path / 'data'
    if problem == 'one_class':
        write_image_folder(str(root), classes=1, per_class=10)
    elif problem == 'empty_class':
        write_image_folder(str(root), classes=2, per_class=10)
        os.makedirs(root / 'class_9')
    elif problem == 'nested':
        write_image_folder(str(root), classes=2, per_class=10)
        write_image(str(root / 'class_0' / 'more' / 'x.png'), 32, label=0)
    elif problem == 'unknown_val_class':
        write_image_folder(str(root), classes=2, per_class=4, splits={'train': 4})
        write_image(str(root / 'val' / 'class_7' / 'x.png'), 32, label=0)
    elif problem == 'val_without_train':
        write_image_folder(str(root), classes=2, per_class=4, splits={'val': 4})
    elif problem == 'too_few_images':
        write_image_folder(str(root), classes=2, per_class=1)
    with pytest.raises(error, match=match):
        build_datasets('folder', str(root))


def test_folder_needs_a_data_dir():
    with pytest.raises(DatasetNotFoundError, match='--data-dir'):
        build_datasets('folder')


def test_splits_batch_and_pickle_for_worker_processes(tmp_path):
    import pickle
    from torch.utils.data import DataLoader
    write_image_folder(str(tmp_path), classes=2, per_class=10)
    splits = build_datasets('folder', str(tmp_path), img_size=32)
    images, labels = next(iter(DataLoader(splits.train, batch_size=4, shuffle=True)))
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32 and labels.dtype == torch.int64
    copy = pickle.loads(pickle.dumps(splits.val))  # spawn-started DataLoader workers receive a pickled copy
    assert torch.equal(copy[0][0], splits.val[0][0]) and copy[0][1] == splits.val[0][1]
