"""Seed entry point: ``python train/run_training.py --config train/config.yaml [--set key=value ...]``.

A thin shim over ``dtback train``; see ``dtback train --help``.
"""

import sys

from dtback.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
