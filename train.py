#!/usr/bin/env python3
"""Train a timm classifier: GradAttn, its SE/CBAM baselines or any timm model.

    python train.py                                   # gradattn_resnet18_rope on digits, a few CPU minutes
    python train.py --model resnet18 --dataset cifar10 --data-dir data --download --recipe paper
    accelerate launch --multi_gpu --num_processes 2 train.py --dataset cifar10 --data-dir data
    python train.py --resume output/train/<experiment>

Settings: ``python train.py --help`` and ``timm_gradattn/config.py``; the loop: ``timm_gradattn/engine.py``.
"""
import sys

from timm_gradattn.config import UserError, parse_args


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        from timm_gradattn.engine import train  # after parsing, so --help and bad flags answer at once
        train(args)
    except UserError as error:
        print(f'train.py: error: {error}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
