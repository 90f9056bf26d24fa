"""Your own images: the 'folder' dataset, its automatic split and its errors."""
import collections
import logging
import os

import pytest
import torch

from data_fixtures import label_value, write_image, write_image_folder
from timm_gradattn.data import (
    DatasetNotFoundError, ImageFileDataset, UnreadableImageError, build_datasets, check_image_folder, folder,
    loader_workers, sample_geometry)
from timm_gradattn.data.datasets import class_split_lengths
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
    # By class: each class's 8 images 6 / 1 / 1 (5.6 / 1.2 / 1.2 rounded by largest remainder).
    assert list(splits.sizes().values()) == [3 * n for n in class_split_lengths(8, (0.7, 0.15, 0.15))] == [18, 3, 3]
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


# --- Splits carved here are split by class: every class in every split, in the same proportions ---------------------
SHAPES = ['circles', 'squares', 'triangles']


def class_counts(split):
    """{class index: images} of a split (a view of a folder's images), from its file list."""
    targets = [target for _, target in split.base.samples]
    return dict(sorted(collections.Counter(targets[i] for i in split.indices).items()))


def test_a_flat_folder_is_split_by_class(tmp_path):
    # 60 images, 20 a class: split over all files (seed 42), the test split held 7 circles, 2 squares and no triangle.
    write_image_folder(str(tmp_path), classes=3, per_class=20, size=16, class_names=SHAPES)
    splits = build_datasets('folder', str(tmp_path))
    assert [class_counts(split) for split in (splits.train, splits.val, splits.test)] == [
        {0: 14, 1: 14, 2: 14}, {0: 3, 1: 3, 2: 3}, {0: 3, 1: 3, 2: 3}]
    assert sorted(splits.train.indices + splits.val.indices + splits.test.indices) == list(range(60))
    assert f'{tmp_path.name}: 60 images split 70/15/15 by class into train / val / test (seed 42): 42 / 9 / 9.' \
        in splits.notes
    other_seed = build_datasets('folder', str(tmp_path), seed=1)  # the seed draws the images, not the proportions
    assert other_seed.test.indices != splits.test.indices and class_counts(other_seed.test) == class_counts(splits.test)


def test_splits_carved_from_train_are_split_by_class(tmp_path):
    # No test/: carved from train/, 17 / 3 of each class's 20.
    write_image_folder(str(tmp_path / 'no_test'), classes=3, per_class=20, size=16, splits={'train': 20, 'val': 4})
    splits = build_datasets('folder', str(tmp_path / 'no_test'))
    assert (class_counts(splits.train), class_counts(splits.test)) == ({0: 17, 1: 17, 2: 17}, {0: 3, 1: 3, 2: 3})
    assert 'no_test: 60 images split 85/15 by class into train / test (seed 42): 51 / 9.' in splits.notes
    # --val-fraction 0.2 carves val from train/ (test/ given), 16 / 4 of each class's 20.
    write_image_folder(str(tmp_path / 'no_val'), classes=3, per_class=20, size=16, splits={'train': 20, 'test': 5})
    splits = build_datasets('folder', str(tmp_path / 'no_val'), protocol='official', val_fraction=0.2)
    assert (class_counts(splits.train), class_counts(splits.val)) == ({0: 16, 1: 16, 2: 16}, {0: 4, 1: 4, 2: 4})


@pytest.mark.parametrize('images, lengths', [(3, [1, 1, 1]), (4, [2, 1, 1]), (8, [6, 1, 1]), (20, [14, 3, 3]),
                                             (101, [71, 15, 15])])
def test_each_class_is_split_in_proportion_with_one_image_in_every_split(images, lengths):
    assert class_split_lengths(images, (0.7, 0.15, 0.15)) == lengths
    assert all(sum(class_split_lengths(n, (0.7, 0.15, 0.15))) == n and min(class_split_lengths(n, (0.7, 0.15, 0.15)))
               >= 1 for n in range(3, 300))
    assert class_split_lengths(2, (0.85, 0.15)) == [1, 1]


def test_a_class_too_small_for_every_split_is_refused_with_the_fix(tmp_path):
    from timm_gradattn import factory
    from timm_gradattn.errors import UserError
    from timm_gradattn.settings import resolve_train_settings
    write_image_folder(str(tmp_path), classes=3, per_class=20, size=16, class_names=SHAPES)
    for extra in sorted(os.listdir(tmp_path / 'triangles'))[2:]:
        os.remove(tmp_path / 'triangles' / extra)
    message = (r"Class 'triangles' has 2 images, too few to be in each of the train, val and test splits\. Add images "
               r"to it \(at least 3\), or split the folder yourself into train/, val/ and test/ sub-folders\.")
    with pytest.raises(ValueError, match=message):
        build_datasets('folder', str(tmp_path))
    with pytest.raises(UserError, match=f"Dataset 'folder': {message}") as error:  # one line at the entry point
        factory.load_data(resolve_train_settings(['--data-dir', str(tmp_path)]))
    assert '\n' not in str(error.value)
    # Three images are enough: one in each split.
    write_image(str(tmp_path / 'triangles' / 'third.png'), 16, label=2)
    splits = build_datasets('folder', str(tmp_path))
    assert [class_counts(split)[2] for split in (splits.train, splits.val, splits.test)] == [1, 1, 1]


def test_a_class_with_few_images_in_a_split_is_one_warning_line(tmp_path):
    write_image_folder(str(tmp_path / 'small'), classes=3, per_class=20, size=16, class_names=SHAPES)
    warnings = [note for note in build_datasets('folder', str(tmp_path / 'small')).notes if note.startswith('Warning')]
    assert warnings == [
        'Warning: small has fewer than 5 images of a class in a split (val: circles 3, squares 3, triangles 3; '
        'test: circles 3, squares 3, triangles 3): each of those images moves its class\'s recall there by more than '
        '20 points. Add images for firmer figures.']
    write_image_folder(str(tmp_path / 'larger'), classes=2, per_class=34, size=16)  # 24 / 5 / 5 a class
    assert not [note for note in build_datasets('folder', str(tmp_path / 'larger')).notes if 'Warning' in note]


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
    ('too_few_images', ValueError, "Class 'class_0' has 1 image, too few to be in each of the train, val and test"),
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
    read_as = next(note for note in splits.notes if 'read as' in note)  # beside the lines on its split
    assert f'{kind}, ' in read_as and f'read as {expected[0]}x{expected[1]}x{expected[2]}' in read_as


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
    # Flags win; starting weights do not (here a local-dir export's config.json, trained at 3x48x48): the model is
    # adapted to the data, not the data to the model (tests/test_fine_tune.py).
    data = factory.load_data(resolve_train_settings(['--data-dir', root, '--img-size', '40', '--in-chans', '3']))
    assert data.info.input_size == (3, 40, 40)
    assert any('read as 3x40x40, as asked (the images alone give 1x32x32)' in note for note in data.notes)
    export = tmp_path / 'export'
    export.mkdir()
    (export / 'config.json').write_text('{"architecture": "resnet20", "pretrained_cfg": {"input_size": [3, 48, 48]}}')
    args = resolve_train_settings(['--data-dir', root, '--model', f'local-dir:{export}', '--pretrained'])
    assert factory.load_data(args).info.input_size == (1, 32, 32)


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
