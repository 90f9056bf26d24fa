"""An image folder's pixels: more than 8 bits scaled by one rule, grey palettes read as grey, and decode-once that
holds no more than the transforms need, counts what it holds and serves the tensors per-epoch decoding gives."""
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data.readers.img_extensions import add_img_extensions, get_img_extensions, set_img_extensions

from timm_gradattn.data import (
    ImageFileDataset, build_datasets, dataset_info, folder, held_bytes_bound, load_image, sample_geometry)


def write_folder(root, images):
    """``images``: {class name: [pixel arrays]}, written as ``root/<class>/<i>.<ext>`` by PIL (uint16: 16-bit PNG,
    float32: float TIFF, uint8: PNG)."""
    for name, arrays in images.items():
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i, pixels in enumerate(arrays):
            ext = '.tif' if pixels.dtype == np.float32 else '.png'
            Image.fromarray(pixels).save(os.path.join(root, name, f'{i:04d}{ext}'))
    return str(root)


def levels(splits):
    """The 8-bit levels the model is fed in every split, from tensors normalised with mean 0 and std 1."""
    return sorted({level for dataset in (splits.train, splits.val, splits.test) for i in range(len(dataset))
                   for level in (dataset[i][0] * 255).round().unique().tolist()})


@pytest.fixture
def tiff_folders():
    """timm reads .png/.jpg/.jpeg folders; a float TIFF folder needs timm's extension list to name .tif."""
    saved = get_img_extensions()
    add_img_extensions('.tif')
    yield
    set_img_extensions(saved)


# --- More than 8 bits per pixel: one rule for the folder, never clipped at 255 ------------------------------------
@pytest.mark.parametrize('values, peak, expected', (
    ((1000, 4095), 4095, (62, 255)),         # 12-bit data in 16-bit PNGs: scaled by 4095, a dark image stays dark
    ((1000, 65535), 65535, (4, 255)),        # the full 16 bits
))
def test_16_bit_images_are_scaled_by_the_folders_bit_depth(tmp_path, values, peak, expected):
    root = write_folder(tmp_path / 'xray', {f'class_{c}': [np.full((20, 20), v, np.uint16)] * 4
                                            for c, v in enumerate(values)})
    assert Image.open(os.path.join(root, 'class_0', '0000.png')).mode == 'I;16'
    splits = build_datasets('folder', root, mean=[0.0], std=[1.0], augment='none')
    assert splits.info.in_chans == 1
    assert levels(splits) == list(expected)
    # The scaling line; the line that says what the images are read as comes once the input is decided.
    assert f'integer pixels 0-{peak} as 0-255 ({peak.bit_length()}-bit' in splits.notes[0]


def test_float_images_are_read_as_0_to_1_or_their_sampled_range(tmp_path, tiff_folders):
    root = write_folder(tmp_path / 'unit', {'class_0': [np.full((20, 20), 0.25, np.float32)] * 4,
                                            'class_1': [np.full((20, 20), 1.0, np.float32)] * 4})
    assert Image.open(os.path.join(root, 'class_0', '0000.tif')).mode == 'F'
    splits = build_datasets('folder', root, mean=[0.0], std=[1.0], augment='none')
    assert levels(splits) == [64, 255]
    assert 'float pixels 0 to 1 as 0-255' in splits.notes[0]
    wide = write_folder(tmp_path / 'wide', {'class_0': [np.full((20, 20), 1.0, np.float32)] * 4,
                                            'class_1': [np.full((20, 20), 4.0, np.float32)] * 4})
    splits = build_datasets('folder', wide, mean=[0.0], std=[1.0], augment='none')
    assert levels(splits) == [64, 255]
    assert 'float pixels 0 to 4 as 0-255' in splits.notes[0]


def test_load_image_without_a_folder_rule_scales_16_bits_and_floats_in_full(tmp_path):
    write_folder(tmp_path, {'a': [np.array([[0, 32768, 65535]], np.uint16), np.array([[0, 0.5, 1]], np.float32)]})
    assert np.asarray(load_image(str(tmp_path / 'a' / '0000.png'))).tolist() == [[0, 128, 255]]
    assert np.asarray(load_image(str(tmp_path / 'a' / '0001.tif'))).tolist() == [[0, 128, 255]]


def test_grey_palette_images_count_as_grey(tmp_path):
    ramp = np.tile(np.arange(0, 200, 10, dtype=np.uint8), (20, 1))
    paths = []
    for name, palette in (('grey', [v for i in range(256) for v in (i, i, i)]),
                          ('colour', [v for i in range(256) for v in (i, 255 - i, 0)])):
        image = Image.fromarray(ramp).convert('P')
        image.putpalette(palette)
        paths.append(str(tmp_path / f'{name}.png'))
        image.save(paths[-1])
    assert Image.open(paths[0]).mode == 'P'
    assert sample_geometry(paths[:1]).in_chans == 1 and sample_geometry(paths).in_chans == 3
    assert load_image(paths[0]).mode == 'L' and np.array_equal(np.asarray(load_image(paths[0])), ramp)


# --- Decode once: held at the transforms' size, counted, the same tensors -----------------------------------------
def noise_images(mode, sizes, seed=0):
    rng = np.random.default_rng(seed)
    shape = (lambda w, h: (h, w)) if mode == 'L' else (lambda w, h: (h, w, 3))
    return [rng.integers(0, 256, shape(w, h), dtype=np.uint8) for w, h in sizes]


# 300-px photos, one of fewer pixels than 224x224 but more than 64x64 (held as it is at 224, resized at 64), one
# smaller than 64x64 (held as it is at both).
PHOTO_SIZES = ((300, 300), (300, 220), (250, 180), (40, 50))


@pytest.mark.parametrize('mode, in_chans', (('L', 1), ('RGB', 3), ('L', 3), ('RGB', 1)))
@pytest.mark.parametrize('img_size', (224, 64))
def test_preloaded_images_give_the_tensors_of_per_epoch_decoding(tmp_path, monkeypatch, mode, in_chans, img_size):
    root = write_folder(tmp_path / 'photos', {f'class_{c}': noise_images(mode, PHOTO_SIZES, seed=c) for c in range(2)})
    held = build_datasets('folder', root, img_size=img_size, in_chans=in_chans)
    monkeypatch.setattr(folder, 'PRELOAD_BYTES', 0)
    from_files = build_datasets('folder', root, img_size=img_size, in_chans=in_chans)
    assert held.train.base.in_memory and not from_files.train.base.in_memory
    for split in ('train', 'val', 'test'):
        for index in range(len(getattr(held, split))):
            torch.manual_seed(index)  # the same crop and flip for both
            expected = getattr(from_files, split)[index][0]
            torch.manual_seed(index)
            assert torch.equal(getattr(held, split)[index][0], expected), (split, index)
    for image in held.train.base._images:  # grey held grey, one byte per channel, never above the model's input
        assert image.dtype == np.uint8 and image.ndim == (2 if mode == 'L' or in_chans == 1 else 3)
        assert image.shape[0] * image.shape[1] <= img_size ** 2


def test_counted_bytes_are_the_held_images_bytes_and_within_the_bound(tmp_path):
    root = write_folder(tmp_path / 'photos', {f'class_{c}': noise_images('RGB', PHOTO_SIZES, seed=c) for c in range(2)})
    for in_chans in (1, 3):
        splits = build_datasets('folder', root, img_size=64, in_chans=in_chans)
        dataset = splits.train.base
        served = sum(len(dataset[i][0].tobytes()) for i in range(len(dataset)))
        pixels = 2 * (3 * 64 * 64 + 40 * 50)  # per class: three images resized to 64x64, one kept at 40x50
        assert dataset.held_bytes == served == in_chans * pixels
        assert dataset.held_bytes <= held_bytes_bound([path for path, _ in dataset.samples], in_chans, 64)
        counted = re.search(r'([\d.,]+) MiB in each process', splits.notes[-1]).group(1)
        assert counted == f'{dataset.held_bytes / 2 ** 20:,.1f}'


def test_the_bound_counts_every_image_not_the_median(tmp_path, monkeypatch):
    # 55 % thumbnails and 45 % photos: the median image is a thumbnail, the memory is in the photos.
    sizes = [(32, 32)] * 11 + [(300, 300)] * 9
    root = write_folder(tmp_path / 'mixed', {f'class_{c}': noise_images('RGB', sizes, seed=c) for c in range(2)})
    paths = sorted(str(p) for p in (tmp_path / 'mixed').rglob('*.png'))
    geometry = sample_geometry(paths)
    assert (geometry.width, geometry.height) == (32, 32)
    bound = held_bytes_bound(paths, 3, 224)
    assert bound == 3 * 2 * (11 * 32 * 32 + 9 * 224 * 224)
    assert bound > 10 * len(paths) * 3 * geometry.width * geometry.height  # what the median estimated
    monkeypatch.setattr(folder, 'PRELOAD_BYTES', bound - 1)  # every image together just does not fit
    splits = build_datasets('folder', root, img_size=224)
    assert not splits.train.base.in_memory and 'decoded from the files in every epoch' in splits.notes[-1]
    monkeypatch.setattr(folder, 'PRELOAD_BYTES', bound)
    assert build_datasets('folder', root, img_size=224).train.base.in_memory


@pytest.mark.slow
def test_a_folder_of_2223_grey_300px_images_at_224px_is_decoded_once(tmp_path):
    # Full-size RGB (600 MB) passed the old 512 MiB budget; held as 1x224x224 they take 106 MiB.
    image = Image.fromarray(np.tile(np.arange(300, dtype=np.uint8), (300, 1)))
    for i in range(2223):
        path = tmp_path / 'scans' / f'class_{i % 2}' / f'{i:04d}.png'
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
    splits = build_datasets('folder', str(tmp_path / 'scans'), img_size=224)
    assert splits.info.input_size == (1, 224, 224) and splits.train.base.in_memory
    assert splits.train.base.held_bytes == 2223 * 224 * 224
    note = splits.notes[-1]
    assert '2,223 images decoded once into memory' in note and '106.4 MiB in each process' in note


def count_preloads(monkeypatch):
    """The (in_chans, img_size) of every ``ImageFileDataset.preload`` call from now on."""
    decoded = []
    preload = ImageFileDataset.preload
    monkeypatch.setattr(ImageFileDataset, 'preload', lambda self, *size: decoded.append(size) or preload(self, *size))
    return decoded


def test_a_folders_facts_are_read_without_decoding_it(tmp_path, monkeypatch):
    root = write_folder(tmp_path / 'scans', {f'class_{c}': noise_images('L', [(40, 40)] * 6, seed=c) for c in range(2)})
    decoded = count_preloads(monkeypatch)
    info = dataset_info('folder', root)
    assert (info.num_classes, info.input_size, decoded) == (2, (1, 40, 40), [])
    assert dataset_info('cifar10').input_size == (3, 32, 32)


@pytest.mark.slow
def test_evaluate_decodes_a_folder_once(tmp_path, monkeypatch):
    from timm_gradattn.evaluate import main
    root = write_folder(tmp_path / 'scans', {f'class_{c}': noise_images('L', [(40, 40)] * 6, seed=c) for c in range(2)})
    decoded = count_preloads(monkeypatch)
    results = main(['--model', 'resnet18', '--dataset', 'folder', '--data-dir', root, '--split', 'test', '-j', '0',
                    '--output', str(tmp_path / 'eval')])
    assert decoded == [(1, 40)] and results['preprocessing']['in_chans'] == 1
