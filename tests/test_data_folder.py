"""Your own images: the 'folder' dataset, its automatic split and its errors."""
import logging
import os

import pytest
import torch

from data_fixtures import label_value, write_image, write_image_folder
from timm_gradattn.data import (
    DatasetNotFoundError, ImageFileDataset, UnreadableImageError, build_datasets, check_image_folder, folder,
    loader_workers, sample_geometry)
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
    # The images' own channels and size (32 px RGB), read from their headers.
    assert info.input_size == (3, 32, 32) and info.mean == IMAGENET_MEAN and info.train_augment == 'folder'
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
    # A damaged file that is not empty passes the quick check; reading the folder's headers (or decoding a small
    # folder once) names it, and so does a dataset that decodes it later.
    with pytest.raises(UnreadableImageError, match='broken.png'):
        build_datasets('folder', str(tmp_path))
    with pytest.raises(UnreadableImageError, match='broken.png'):
        ImageFileDataset([(str(bad), 1)])[0]
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


# --- The images set the default input; small folders are decoded once -------------------------------------------
def write_sized_folder(root, sizes, mode='RGB', per_class=6):
    """Two classes of label-coded images, the i-th image of each class ``sizes[i % len(sizes)]`` (w, h)."""
    from PIL import Image
    for label in range(2):
        for i in range(per_class):
            width, height = sizes[i % len(sizes)]
            path = os.path.join(root, f'class_{label}', f'{i:03d}.png')
            os.makedirs(os.path.dirname(path), exist_ok=True)
            color = {'L': label_value(label), 'LA': (label_value(label), 255)}.get(mode, (label_value(label),) * 3)
            Image.new(mode, (width, height), color=color).save(path)
    return str(root)


@pytest.mark.parametrize('sizes, mode, expected', (
    (((20, 20),), 'L', (1, 32, 32)),                              # digits-like: grey, raised to the 32 px floor
    (((64, 48), (64, 48), (80, 60)), 'RGB', (3, 64, 64)),        # the median longer side
    (((640, 480),), 'RGB', (3, 224, 224)),                       # photos: capped at timm's 224
    (((40, 40),), 'LA', (1, 40, 40)),                            # grey with alpha is still grey
))
def test_folder_input_size_comes_from_its_images(tmp_path, sizes, mode, expected):
    root = write_sized_folder(tmp_path / 'images', sizes, mode=mode)
    splits = build_datasets('folder', root)
    assert splits.info.input_size == expected
    assert splits.train[0][0].shape == expected  # what the model is fed
    kind = 'greyscale' if expected[0] == 1 else 'colour'
    assert f'{kind}, ' in splits.notes[0] and f'read as {expected[0]}x{expected[1]}x{expected[2]}' in splits.notes[0]


def test_flags_override_the_size_the_images_suggest(tmp_path):
    root = write_sized_folder(tmp_path / 'images', [(20, 20)], mode='L')
    assert build_datasets('folder', root, img_size=24, in_chans=3).info.input_size == (3, 24, 24)
    assert build_datasets('folder', root, img_size=48).info.input_size == (1, 48, 48)


def test_a_mix_of_grey_and_colour_images_is_read_as_colour(tmp_path):
    root = write_sized_folder(tmp_path / 'images', [(32, 32)], mode='L')
    write_image(os.path.join(root, 'class_0', 'colour.png'), size=32)
    assert sample_geometry(sorted(str(p) for p in (tmp_path / 'images').rglob('*.png'))).in_chans == 3


def test_small_folders_are_decoded_once_and_serve_the_same_images(tmp_path, monkeypatch):
    root = write_image_folder(str(tmp_path / 'images'), classes=2, per_class=6, size=16)
    preloaded = build_datasets('folder', root)
    assert preloaded.train.base.in_memory and 'decoded once into memory' in preloaded.notes[-1]
    monkeypatch.setattr(folder, 'PRELOAD_BYTES', 100)  # now too large to hold
    from_disk = build_datasets('folder', root)
    assert not from_disk.train.base.in_memory and 'decoded from the files in every epoch' in from_disk.notes[-1]
    for split in ('train', 'val', 'test'):
        for index in range(len(getattr(preloaded, split))):
            assert torch.equal(getattr(preloaded, split)[index][0], getattr(from_disk, split)[index][0])
    # Loader workers: none for images in memory (they would compete with torch's threads), 2 for files, or as given.
    assert loader_workers(None, preloaded.val, preloaded.test) == 0
    assert loader_workers(None, from_disk.val) == 2 and loader_workers(3, preloaded.val) == 3


def test_an_unreadable_sampled_header_names_the_file(tmp_path):
    bad = tmp_path / 'broken.png'
    bad.write_bytes(b'not an image')
    with pytest.raises(UnreadableImageError, match='broken.png'):
        sample_geometry([str(bad)])


def test_train_settings_leave_a_folders_size_and_workers_to_its_images(tmp_path):
    from timm_gradattn import factory
    from timm_gradattn.settings import resolve_train_settings
    root = write_sized_folder(tmp_path / 'images', [(20, 20)], mode='L')
    args = resolve_train_settings(['--data-dir', root])
    assert (args.img_size, args.in_chans, args.workers) == (None, None, None)
    data = factory.load_data(args)
    assert data.info.input_size == (1, 32, 32) and args.workers == 0  # 12 images of 20x20: held in memory
    # Flags win; so do --pretrained weights' cfg (here a local-dir export's config.json, trained at 3x48x48).
    assert factory.load_data(resolve_train_settings(['--data-dir', root, '--img-size', '40'])).info.input_size == (
        1, 40, 40)
    export = tmp_path / 'export'
    export.mkdir()
    (export / 'config.json').write_text('{"architecture": "resnet20", "pretrained_cfg": {"input_size": [3, 48, 48]}}')
    args = resolve_train_settings(['--data-dir', root, '--model', f'local-dir:{export}', '--pretrained'])
    assert factory.load_data(args).info.input_size == (3, 48, 48)
    assert factory.pretrained_input_size('resnet20.mnist') == (1, 28, 28)  # a registry tag's cfg


def test_workers_serve_training_and_evaluation_of_images_in_memory_runs_without_them(tmp_path, monkeypatch):
    from timm_gradattn import factory
    from timm_gradattn.settings import resolve_train_settings
    root = write_sized_folder(tmp_path / 'images', [(20, 20)], mode='L')
    for preload_bytes, eval_workers in ((None, 0), (100, 2)):  # decoded once; too large to hold: read from disk
        if preload_bytes:
            monkeypatch.setattr(folder, 'PRELOAD_BYTES', preload_bytes)
        args = resolve_train_settings(['--data-dir', root, '-j', '2'])
        train, val, test = factory.create_loaders(args, factory.load_data(args))
        assert (train.num_workers, val.num_workers, test.num_workers) == (2, eval_workers, eval_workers)
        assert val.persistent_workers == bool(eval_workers)
