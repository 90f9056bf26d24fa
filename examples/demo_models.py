"""Build every model of the zoo for one dataset tag and run a forward pass on random images.

    python examples/demo_models.py                 # CIFAR-10 configuration: 3 x 32 x 32, 10 classes
    python examples/demo_models.py --tag pcam      # any dataset: tiny_imagenet, mnist, cifar100, pad_ufes_20, ...

Random initialisation (no weights are downloaded); prints each model's parameter count and output shapes.
"""
import argparse

import torch

import timm
import timm_gradattn
from timm_gradattn import DATASETS
from timm_gradattn.models import model_tags


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--tag', default='cifar10', choices=sorted(DATASETS), help='dataset configuration')
    parser.add_argument('--batch-size', type=int, default=2)
    args = parser.parse_args()

    info = DATASETS[args.tag]
    images = torch.randn(args.batch_size, *info.input_size)
    print(f'{info.title}: input {tuple(images.shape)}, {info.num_classes} classes')
    print(f'{"model":<24} {"params":>12}  {"logits":<12} {"features (forward_features)"}')
    for name in timm_gradattn.MODEL_NAMES:
        if args.tag in model_tags(name):
            model = timm.create_model(f'{name}.{args.tag}').eval()
        else:  # each family has its own papers' tags; any model still builds for any dataset's shape
            model = timm.create_model(name, num_classes=info.num_classes, in_chans=info.in_chans).eval()
        with torch.no_grad():
            features = model.forward_features(images)
            logits = model.forward_head(features)
        params = sum(p.numel() for p in model.parameters())
        print(f'{name:<24} {params:>12,}  {str(tuple(logits.shape)):<12} {tuple(features.shape)}')


if __name__ == '__main__':
    main()
