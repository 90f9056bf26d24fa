"""Train and eval transforms for every dataset, built from the facts in ``info``.

Images reach the transforms as PIL images (never as normalised tensors), so normalisation happens
exactly once, at the end. The GradAttn reference implementation normalised CIFAR-10 and FashionMNIST
training images twice (a normalised tensor sent back through ToPILImage wraps modulo 256); building
every pipeline as PIL -> augment -> tensor -> normalise rules that out.
"""
import dataclasses
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from .info import DatasetInfo

AUGMENTATIONS = ('none', 'digits', 'cifar', 'fashion', 'medmnist', 'pad_ufes', 'folder', 'cnntention_mnist')


def _augmentation(name: str, img_size: int) -> list:
    if name == 'none':
        return []
    if name == 'digits':
        # Handwriting varies in slant and position; digits are not mirror-symmetric, so no flips.
        return [T.RandomAffine(degrees=10, translate=(0.1, 0.1))]
    if name == 'cifar':
        return [T.RandomCrop(img_size, padding=4), T.RandomHorizontalFlip()]
    if name == 'fashion':
        return [T.RandomHorizontalFlip(), T.RandomAffine(degrees=10, translate=(0.1, 0.1))]
    if name == 'medmnist':
        return [T.RandomRotation(10), T.RandomHorizontalFlip(), T.ColorJitter(brightness=0.1, contrast=0.1)]
    if name == 'pad_ufes':
        return [
            T.RandomResizedCrop(img_size, scale=(0.8, 1.0)), T.RandomHorizontalFlip(), T.RandomVerticalFlip(),
            T.RandomRotation(10), T.ColorJitter(0.2, 0.2, 0.2, 0.1)]
    if name == 'folder':
        return [T.RandomResizedCrop(img_size, scale=(0.8, 1.0)), T.RandomHorizontalFlip()]
    if name == 'cnntention_mnist':
        # The CNNtention authors' MNIST training images: flipped, padded by 4, cropped to 32 px from 28 px digits,
        # so training sees larger images than the test (fully convolutional models with a global pool only).
        return [T.RandomHorizontalFlip(), T.RandomCrop(img_size + 4, padding=4)]
    raise ValueError(f'Unknown augmentation {name!r}; choose one of {AUGMENTATIONS}.')


def resolve_info(
        info: DatasetInfo,
        img_size: Optional[int] = None,
        in_chans: Optional[int] = None,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
        augment: Optional[str] = None,
        split: Optional[Sequence[float]] = None,
) -> DatasetInfo:
    """The dataset's facts with the user's overrides applied: what the model will actually see.

    A one-value (grey) mean/std serves every channel when the images are read as RGB; an RGB mean/std
    that comes with the dataset is averaged when the images are read as grey (``in_chans=1``).
    """
    img_size = img_size or info.img_size
    in_chans = in_chans or info.in_chans
    if in_chans not in (1, 3):
        raise ValueError(f'in_chans={in_chans} is not supported for images; use 1 (greyscale) or 3 (RGB).')
    mean_values = tuple(float(m) for m in (mean or info.mean))
    std_values = tuple(float(s) for s in (std or info.std))
    if len(mean_values) != len(std_values):
        raise ValueError(f'mean {mean_values} and std {std_values} must have the same number of values.')
    if len(mean_values) != in_chans:
        if len(mean_values) == 1:
            mean_values, std_values = mean_values * in_chans, std_values * in_chans
        elif in_chans == 1 and mean is None and std is None:
            mean_values = (sum(mean_values) / len(mean_values),)
            std_values = (sum(std_values) / len(std_values),)
        else:
            raise ValueError(
                f'mean/std have {len(mean_values)} values but the model takes {in_chans} channels; give '
                f'mean= and std= {in_chans} values each (for an exported model: the mean and std in its config.json).')
    augment = augment or info.train_augment
    if augment not in AUGMENTATIONS:
        raise ValueError(f'Unknown augmentation {augment!r}; choose one of {AUGMENTATIONS}.')
    fractions = tuple(float(f) for f in (split or info.split))
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(
            f'split={fractions} must be three non-negative (train, val, test) fractions summing to 1, '
            f'e.g. 0.7 0.15 0.15.')
    return dataclasses.replace(
        info, input_size=(in_chans, img_size, img_size), mean=mean_values, std=std_values,
        train_augment=augment, split=fractions)


def build_transform(
        info: DatasetInfo,
        train: bool,
        augment: Optional[str] = None,
        img_size: Optional[int] = None,
        in_chans: Optional[int] = None,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
) -> T.Compose:
    """PIL image -> normalised float tensor (C, H, W) for the model.

    Args:
        info: The dataset's facts (input size, channels, mean/std, augmentation recipe).
        train: Apply the dataset's training augmentation.
        augment: Override the augmentation recipe ('none' switches it off).
        img_size: Override the model input side.
        in_chans: Override the channel count (1 = greyscale, 3 = RGB; images are converted).
        mean: Override the normalisation mean (one value per channel).
        std: Override the normalisation std.
    """
    info = resolve_info(info, img_size=img_size, in_chans=in_chans, mean=mean, std=std, augment=augment)
    steps = input_steps(info.in_chans, info.img_size)
    if train:
        steps += _augmentation(info.train_augment, info.img_size)
    steps.append(ToNormalizedTensor(info.mean, info.std))
    return T.Compose(steps)


def input_steps(in_chans: int, img_size: int) -> list:
    """The steps every pipeline, train or eval, starts with: the run's channels, then the model's square side.

    Neither is random, so a dataset may apply them ahead, once (``folder.ImageFileDataset.preload`` does); on an
    image already in the run's mode and at the model's side both hand it on unchanged (torchvision's resize
    returns an image of the target size as it is).
    """
    return [T.Lambda(_to_grey if in_chans == 1 else _to_rgb), T.Resize((img_size, img_size))]


class ToNormalizedTensor:
    """8-bit greyscale or RGB PIL image -> float tensor (C, H, W), normalised by ``mean`` and ``std``.

    The same numbers, to the bit, as ``T.Normalize(mean, std)(T.ToTensor()(img))`` (scale to [0, 1], then
    subtract and divide, in float32), in one call instead of two: on small images the per-call overhead of
    the two transforms is a large part of the per-image cost, which in-process loading pays every step.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        if len(mean) != len(std) or any(s == 0 for s in std):
            raise ValueError(f'mean {tuple(mean)} and std {tuple(std)} need one value per channel, std non-zero.')
        self.mean, self.std = tuple(mean), tuple(std)
        self._mean = torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1)
        self._std = torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        if img.mode not in ('L', 'RGB'):
            raise ValueError(f'ToNormalizedTensor takes 8-bit L or RGB images, got mode {img.mode!r}; convert the '
                             f'image first (the pipeline\'s Grayscale / RGB step does).')
        pixels = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True))
        pixels = pixels.view(img.size[1], img.size[0], len(img.getbands())).permute(2, 0, 1).contiguous()
        if pixels.shape[0] != len(self.mean):
            raise ValueError(f'a {pixels.shape[0]}-channel image for a {len(self.mean)}-channel mean {self.mean}.')
        return pixels.float().div_(255).sub_(self._mean).div_(self._std)

    def __repr__(self) -> str:
        return f'{type(self).__name__}(mean={self.mean}, std={self.std})'


def _to_grey(img):
    return img if img.mode == 'L' else img.convert('L')  # what T.Grayscale(1) does, without copying 'L' images


def _to_rgb(img):
    return img if img.mode == 'RGB' else img.convert('RGB')
