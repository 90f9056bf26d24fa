"""Train and eval transforms for every dataset, built from the facts in ``info``.

Images reach the transforms as PIL images (never as normalised tensors), so normalisation happens
exactly once, at the end. The GradAttn reference implementation normalised CIFAR-10 and FashionMNIST
training images twice (a normalised tensor sent back through ToPILImage wraps modulo 256); building
every pipeline as PIL -> augment -> tensor -> normalise rules that out.
"""
from typing import Optional, Sequence

from torchvision import transforms as T

from .info import DatasetInfo

AUGMENTATIONS = ('none', 'digits', 'cifar', 'fashion', 'medmnist', 'pad_ufes', 'folder')


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
    raise ValueError(f'Unknown augmentation {name!r}; choose one of {AUGMENTATIONS}.')


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
    img_size = img_size or info.img_size
    in_chans = in_chans or info.in_chans
    mean = tuple(mean or info.mean)
    std = tuple(std or info.std)
    if in_chans not in (1, 3):
        raise ValueError(f'in_chans={in_chans} is not supported for images; use 1 (greyscale) or 3 (RGB).')
    if len(mean) != in_chans:
        if len(mean) == 1:  # one grey statistic serves every channel of a grey image converted to RGB
            mean, std = mean * in_chans, std * in_chans
        else:
            raise ValueError(
                f'mean/std have {len(mean)} values but the model takes {in_chans} channels; '
                f'pass --mean/--std with {in_chans} values.')
    steps = [T.Grayscale(1) if in_chans == 1 else T.Lambda(_to_rgb)]
    steps.append(T.Resize((img_size, img_size)))
    if train:
        steps += _augmentation(augment or info.train_augment, img_size)
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(steps)


def _to_rgb(img):
    return img if img.mode == 'RGB' else img.convert('RGB')
