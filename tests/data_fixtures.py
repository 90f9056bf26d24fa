"""Tiny datasets written in each upstream on-disk format, for tests that must not download anything.

Every writer puts a handful of images where the real dataset's files would be and returns what it
wrote (counts per split). Images are "label-coded" where that helps: a flat colour whose value is
``label_value(label)``, so a test can check that an image arrives with its own label.
"""
import csv
import os
import pickle
import struct
from typing import Dict, Optional, Sequence

import numpy as np
from PIL import Image


def label_value(label: int) -> int:
    """The grey level a label-coded image of class ``label`` is painted with."""
    return 10 + 20 * int(label)


def _coded(label: int, size: int, channels: int) -> np.ndarray:
    shape = (size, size) if channels == 1 else (size, size, channels)
    return np.full(shape, label_value(label), dtype=np.uint8)


def write_image(path: str, size: int = 32, label: Optional[int] = None, mode: str = 'RGB', seed: int = 0) -> str:
    """One image file: label-coded when ``label`` is given, else seeded noise."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    channels = 1 if mode == 'L' else 3
    if label is not None:
        pixels = _coded(label, size, channels)
    else:
        shape = (size, size) if channels == 1 else (size, size, channels)
        pixels = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def write_image_folder(
        root: str,
        classes: int = 3,
        per_class: int = 8,
        size: int = 32,
        splits: Optional[Dict[str, int]] = None,
        class_names: Optional[Sequence[str]] = None,
        ext: str = '.png',
) -> str:
    """A class-per-sub-folder image folder: ``root/<class>/*`` or, with ``splits`` ({split: images per
    class}), ``root/<split>/<class>/*``. Images are label-coded by class index."""
    names = list(class_names or [f'class_{i}' for i in range(classes)])
    layout = {'': per_class} if splits is None else splits
    for split, count in layout.items():
        for index, name in enumerate(names):
            for i in range(count):
                write_image(os.path.join(root, split, name, f'{name}_{i:03d}{ext}'), size, label=index)
    return root


def write_cifar10(root: str, per_batch: int = 4, test: int = 6) -> Dict[str, int]:
    """cifar-10-batches-py with 5 training batches and a test batch, as pickled dicts (python version).

    torchvision checks these files against the real release's md5 sums; tests that load them patch
    that check (see ``skip_torchvision_md5``).
    """
    folder = os.path.join(root, 'cifar-10-batches-py')
    os.makedirs(folder, exist_ok=True)

    def batch(path, n, offset):
        labels = [(offset + i) % 10 for i in range(n)]
        data = np.stack([_coded(label, 32, 3).transpose(2, 0, 1).reshape(-1) for label in labels])
        with open(path, 'wb') as f:
            pickle.dump({'batch_label': os.path.basename(path), 'labels': labels, 'data': data}, f)

    for b in range(1, 6):
        batch(os.path.join(folder, f'data_batch_{b}'), per_batch, offset=b)
    batch(os.path.join(folder, 'test_batch'), test, offset=0)
    names = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck']
    with open(os.path.join(folder, 'batches.meta'), 'wb') as f:
        pickle.dump({'label_names': names, 'num_cases_per_batch': per_batch, 'num_vis': 3072}, f)
    return {'train': 5 * per_batch, 'test': test}


def write_svhn(root: str, sizes: Optional[Dict[str, int]] = None) -> Dict[str, int]:
    """{train,test,extra}_32x32.mat with X (32, 32, 3, N) and y (N, 1), digit 0 stored as 10 as in SVHN."""
    from scipy.io import savemat
    sizes = sizes or {'train': 10, 'test': 6, 'extra': 8}
    os.makedirs(root, exist_ok=True)
    for split, n in sizes.items():
        digits = np.arange(n) % 10
        images = np.stack([_coded(d, 32, 3) for d in digits], axis=-1)
        labels = np.where(digits == 0, 10, digits)[:, None]
        savemat(os.path.join(root, f'{split}_32x32.mat'), {'X': images, 'y': labels})
    return sizes


def _write_idx(path: str, array: np.ndarray) -> None:
    # IDX: two zero bytes, type 0x08 (unsigned byte), number of dimensions, big-endian int32 sizes, data.
    with open(path, 'wb') as f:
        f.write(bytes([0, 0, 0x08, array.ndim]))
        f.write(struct.pack(f'>{array.ndim}i', *array.shape))
        f.write(array.astype(np.uint8).tobytes())


def write_fashion_mnist(root: str, train: int = 12, test: int = 6) -> Dict[str, int]:
    """FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte, the unzipped IDX files."""
    folder = os.path.join(root, 'FashionMNIST', 'raw')
    os.makedirs(folder, exist_ok=True)
    for prefix, n in (('train', train), ('t10k', test)):
        labels = np.arange(n) % 10
        _write_idx(os.path.join(folder, f'{prefix}-images-idx3-ubyte'), np.stack([_coded(c, 28, 1) for c in labels]))
        _write_idx(os.path.join(folder, f'{prefix}-labels-idx1-ubyte'), labels)
    return {'train': train, 'test': test}


def write_pcam(root: str, sizes: Optional[Dict[str, int]] = None, size: int = 96) -> Dict[str, int]:
    """pcam/camelyonpatch_level_2_split_{train,valid,test}_{x,y}.h5: x (N, 96, 96, 3), y (N, 1, 1, 1)."""
    import h5py
    sizes = sizes or {'train': 8, 'valid': 4, 'test': 4}
    folder = os.path.join(root, 'pcam')
    os.makedirs(folder, exist_ok=True)
    for split, n in sizes.items():
        labels = np.arange(n) % 2
        with h5py.File(os.path.join(folder, f'camelyonpatch_level_2_split_{split}_x.h5'), 'w') as f:
            f['x'] = np.stack([_coded(c, size, 3) for c in labels])
        with h5py.File(os.path.join(folder, f'camelyonpatch_level_2_split_{split}_y.h5'), 'w') as f:
            f['y'] = labels.astype(np.uint8).reshape(n, 1, 1, 1)
    return sizes


def write_medmnist(root: str, flag: str, sizes: Optional[Dict[str, int]] = None, channels: int = 1) -> Dict[str, int]:
    """<flag>.npz as MedMNIST v2 ships it at 28 px: {split}_images (N, 28, 28[, 3]) and {split}_labels (N, 1)."""
    sizes = sizes or {'train': 14, 'val': 2, 'test': 4}
    os.makedirs(root, exist_ok=True)
    arrays = {}
    for split, n in sizes.items():
        labels = np.arange(n) % 8
        arrays[f'{split}_images'] = np.stack([_coded(c, 28, channels) for c in labels])
        arrays[f'{split}_labels'] = labels.reshape(n, 1).astype(np.uint8)
    np.savez_compressed(os.path.join(root, f'{flag}.npz'), **arrays)
    return sizes


def write_tiny_imagenet(root: str, wnids: Sequence[str], train_per_class: int = 2, val_per_class: int = 1) -> str:
    """tiny-imagenet-200/ with wnids.txt, train/<wnid>/images/*.JPEG (+ boxes file), val/images and
    val/val_annotations.txt. Images are 64 px and label-coded by the wnid's index in ``wnids``."""
    folder = os.path.join(root, 'tiny-imagenet-200')
    os.makedirs(os.path.join(folder, 'val', 'images'), exist_ok=True)
    with open(os.path.join(folder, 'wnids.txt'), 'w') as f:
        f.write('\n'.join(wnids) + '\n')
    annotations = []
    for index, wnid in enumerate(wnids):
        for i in range(train_per_class):
            write_image(os.path.join(folder, 'train', wnid, 'images', f'{wnid}_{i}.JPEG'), 64, label=index % 12)
        with open(os.path.join(folder, 'train', wnid, f'{wnid}_boxes.txt'), 'w') as f:
            f.write(f'{wnid}_0.JPEG\t0\t0\t63\t63\n')
        for i in range(val_per_class):
            name = f'val_{len(annotations)}.JPEG'
            write_image(os.path.join(folder, 'val', 'images', name), 64, label=index % 12)
            annotations.append(f'{name}\t{wnid}\t0\t0\t63\t63')
    with open(os.path.join(folder, 'val', 'val_annotations.txt'), 'w') as f:
        f.write('\n'.join(annotations) + '\n')
    return folder


def write_tiny_imagenet_hub_copy(folder: str, wnids_in_file_order: Sequence[str]) -> str:
    """A local stand-in for the Hub dataset zh-plus/tiny-imagenet: parquet shards of (image, label) with the
    classes numbered in wnids.txt order (as the Hub copy numbers them), 2 train and 1 valid image per class.

    ``datasets.load_dataset`` reads a local folder named like the Hub id before asking the Hub. Images are
    label-coded by the class index in *sorted* wnid order. Needs pyarrow (a dependency of ``datasets``).
    """
    import io
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq
    features = {'image': {'_type': 'Image'}, 'label': {'names': list(wnids_in_file_order), '_type': 'ClassLabel'}}
    sorted_wnids = sorted(wnids_in_file_order)
    os.makedirs(os.path.join(folder, 'data'), exist_ok=True)
    for split, per_class in (('train', 2), ('valid', 1)):
        images, labels = [], []
        for hub_label, wnid in enumerate(wnids_in_file_order):
            for i in range(per_class):
                png = io.BytesIO()
                Image.fromarray(_coded(sorted_wnids.index(wnid) % 12, 64, 3)).save(png, 'PNG')
                images.append({'bytes': png.getvalue(), 'path': f'{wnid}_{i}.png'})
                labels.append(hub_label)
        image_type = pa.struct([('bytes', pa.binary()), ('path', pa.string())])
        table = pa.table({'image': pa.array(images, image_type), 'label': pa.array(labels, pa.int64())})
        table = table.replace_schema_metadata({b'huggingface': json.dumps({'info': {'features': features}}).encode()})
        pq.write_table(table, os.path.join(folder, 'data', f'{split}-00000-of-00001.parquet'))
    with open(os.path.join(folder, 'README.md'), 'w') as f:
        f.write('---\nconfigs:\n- config_name: default\n  data_files:\n'
                '  - split: train\n    path: data/train-*\n  - split: valid\n    path: data/valid-*\n---\n')
    return folder


PAD_UFES_COLUMNS = (
    'patient_id', 'lesion_id', 'smoke', 'age', 'region', 'diameter_1', 'diameter_2', 'diagnostic', 'img_id',
    'biopsed')


def write_pad_ufes(root: str, patients: int = 20, seed: int = 0, size: int = 40) -> Dict[str, str]:
    """metadata.csv plus PNGs split over images/imgs_part_1 and imgs_part_2, 1-3 images per patient.

    Returns img_id -> patient_id.
    """
    rng = np.random.default_rng(seed)
    codes = ('ACK', 'BCC', 'MEL', 'NEV', 'SCC', 'SEK')
    rows, patient_of = [], {}
    for p in range(patients):
        patient = f'PAT_{100 + p}'
        for lesion in range(int(rng.integers(1, 4))):
            label = int(rng.integers(0, len(codes)))
            img_id = f'{patient}_{lesion}_{len(rows)}.png'
            part = 1 + len(rows) % 2
            write_image(os.path.join(root, 'images', f'imgs_part_{part}', img_id), size, label=label)
            rows.append({
                'patient_id': patient, 'lesion_id': lesion, 'smoke': 'False', 'age': 50 + p, 'region': 'FACE',
                'diameter_1': 5.0, 'diameter_2': 4.0, 'diagnostic': codes[label], 'img_id': img_id,
                'biopsed': 'True'})
            patient_of[img_id] = patient
    with open(os.path.join(root, 'metadata.csv'), 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=PAD_UFES_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return patient_of


def skip_torchvision_md5(monkeypatch) -> None:
    """Let torchvision accept the test-written CIFAR-10 / SVHN files, whose md5 sums differ from the release.

    Only the checksum is skipped: the check still fails for a missing file. torchvision's own test
    suite disables the same check while loading its fake datasets.
    """
    import torchvision.datasets.cifar
    import torchvision.datasets.svhn

    def file_exists(fpath, md5=None):
        return os.path.isfile(fpath)

    monkeypatch.setattr(torchvision.datasets.cifar, 'check_integrity', file_exists)
    monkeypatch.setattr(torchvision.datasets.svhn, 'check_integrity', file_exists)
