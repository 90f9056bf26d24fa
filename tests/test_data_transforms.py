"""Transforms normalise exactly once: guards against the reference's double-normalisation defect."""
import numpy as np
import pytest
import torch
from PIL import Image

from torchvision import transforms as T

from timm_gradattn.data import AUGMENTATIONS, DATASETS, build_transform, resolve_info
from timm_gradattn.data.transforms import ToNormalizedTensor

torch.manual_seed(0)


def noise_image(size: int, channels: int, seed: int = 0) -> Image.Image:
    shape = (size, size) if channels == 1 else (size, size, 3)
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8))


def denormalise(tensor, info):
    return tensor * torch.tensor(info.std).view(-1, 1, 1) + torch.tensor(info.mean).view(-1, 1, 1)


@pytest.mark.parametrize('name', sorted(DATASETS))
def test_an_image_at_the_mean_normalises_to_zero(name):
    info = DATASETS[name]
    levels = np.round(np.asarray(info.mean) * 255).astype(np.uint8)
    pixels = np.broadcast_to(levels, (info.img_size, info.img_size, len(levels))).copy()
    image = Image.fromarray(pixels[..., 0] if info.in_chans == 1 else pixels)
    output = build_transform(info, train=False)(image)
    assert output.shape == info.input_size
    assert output.abs().max() <= 0.5 / 255 / min(info.std) + 1e-6  # only the rounding to 8 bits is left


@pytest.mark.parametrize('name', sorted(DATASETS))
def test_without_augmentation_train_equals_eval(name):
    info = DATASETS[name]
    image = noise_image(info.img_size // 2, info.in_chans)
    train = build_transform(info, train=True, augment='none')(image)
    assert torch.equal(train, build_transform(info, train=False)(image))


@pytest.mark.parametrize('recipe', AUGMENTATIONS)
def test_augmented_train_images_are_valid_images(recipe):
    info = resolve_info(DATASETS['cifar10'], augment=recipe)
    image = noise_image(32, 3)
    train_transform = build_transform(info, train=True)
    eval_pixels = denormalise(build_transform(info, train=False)(image), info)
    grown = 4 if recipe == 'cnntention_mnist' else 0  # the CNNtention authors trained on larger crops than they tested
    for _ in range(5):
        pixels = denormalise(train_transform(image), info)
        # a second normalisation (or a wrap-around through ToPILImage) would leave [0, 1] by far
        assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
        assert pixels.shape[-2:] == tuple(side + grown for side in eval_pixels.shape[-2:])
        assert abs(pixels.mean() - eval_pixels.mean()) < 0.15  # same picture, moved or recoloured a little


def test_cifar_augmentation_is_a_padded_crop_or_its_mirror_of_the_eval_image():
    info = DATASETS['cifar10']
    image = noise_image(32, 3, seed=3)
    eval_pixels = denormalise(build_transform(info, train=False)(image), info)
    padded = torch.nn.functional.pad(eval_pixels, (4, 4, 4, 4))  # RandomCrop pads with black
    train_transform = build_transform(info, train=True)
    for _ in range(8):
        pixels = denormalise(train_transform(image), info)
        candidates = [
            view for dy in range(9) for dx in range(9)
            for crop in [padded[:, dy:dy + 32, dx:dx + 32]] for view in (crop, crop.flip(-1))]
        assert min((pixels - c).abs().max() for c in candidates) < 1e-5


def test_grey_images_become_three_identical_channels_for_rgb_datasets():
    info = DATASETS['tissuemnist']
    output = build_transform(info, train=False)(noise_image(28, 1))
    pixels = denormalise(output, info)
    assert output.shape == (3, 64, 64)
    assert torch.allclose(pixels[0], pixels[1], atol=1e-6) and torch.allclose(pixels[0], pixels[2], atol=1e-6)


def test_overrides_are_resolved_into_the_info():
    info = resolve_info(DATASETS['fashion_mnist'], img_size=64, in_chans=3)
    assert info.input_size == (3, 64, 64) and info.mean == (0.2860,) * 3
    grey = resolve_info(DATASETS['cifar10'], in_chans=1)
    assert grey.input_size == (1, 32, 32) and grey.mean == pytest.approx((np.mean(DATASETS['cifar10'].mean),))
    assert resolve_info(DATASETS['cifar10'], split=(0.8, 0.1, 0.1)).split == (0.8, 0.1, 0.1)


@pytest.mark.parametrize('overrides,match', [
    (dict(in_chans=2), 'in_chans=2'),
    (dict(in_chans=1, mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2)), '3 values but the model takes 1'),
    (dict(mean=(0.5, 0.5, 0.5), std=(0.2,)), 'same number'),
    (dict(augment='mixup'), 'Unknown augmentation'),
    (dict(split=(0.7, 0.2, 0.2)), 'summing to 1'),
])
def test_bad_overrides_are_explained(overrides, match):
    with pytest.raises(ValueError, match=match):
        resolve_info(DATASETS['cifar10'], **overrides)


@pytest.mark.parametrize('mode,mean,std', [('L', (0.3053,), (0.376,)),
                                           ('RGB', (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
def test_to_normalized_tensor_equals_torchvision_to_tensor_then_normalize(mode, mean, std):
    rng = np.random.default_rng(0)
    shape = (24, 40) if mode == 'L' else (24, 40, 3)  # not square: height and width must not swap
    image = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)
    ours = ToNormalizedTensor(mean, std)(image)
    reference = T.Normalize(mean, std)(T.ToTensor()(image))
    assert ours.shape == reference.shape == (len(mean), 24, 40) and ours.is_contiguous()
    assert torch.equal(ours, reference)


def test_to_normalized_tensor_explains_what_it_cannot_take():
    with pytest.raises(ValueError, match="mode 'I;16'"):
        ToNormalizedTensor((0.5,), (0.5,))(Image.new('I;16', (4, 4)))
    with pytest.raises(ValueError, match='3-channel image for a 1-channel mean'):
        ToNormalizedTensor((0.5,), (0.5,))(Image.new('RGB', (4, 4)))
    with pytest.raises(ValueError, match='std non-zero'):
        ToNormalizedTensor((0.5,), (0.0,))
