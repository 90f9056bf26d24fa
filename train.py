#!/usr/bin/env python3
"""Train a timm classifier: the zoo's models (GradAttn, CNNtention, Attention Shortcuts) or any timm model.

    python train.py                                   # the default model on digits, a few CPU minutes
    python train.py --model resnet18 --dataset cifar10 --data-dir data --download --recipe paper
    accelerate launch --multi_gpu --num_processes 2 train.py --dataset cifar10 --data-dir data
    python train.py --resume output/train/<experiment>

Settings: ``python train.py --help``, ``timm_gradattn/cli.py`` and ``timm_gradattn/settings.py``; the loop:
``timm_gradattn/engine.py``.
"""
import sys

from timm_gradattn.cli import run_entry_point


def main(argv=None) -> int:
    """The command line; a problem with what was asked for is one line on stderr and exit code 2."""
    return run_entry_point('train.py', _train, argv)


def _train(argv):
    from timm_gradattn.settings import resolve_train_settings
    settings = resolve_train_settings(argv)
    from timm_gradattn.engine import train  # after the settings, so --help and bad flags answer at once
    return train(settings)


if __name__ == '__main__':
    sys.exit(main())
