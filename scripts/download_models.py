"""Seed entry point: download FLUX, the face model packs and the body backbone.

A thin shim over ``dtback download``; see ``dtback download --help``.
"""

import sys

from dtback.cli import main

if __name__ == "__main__":
    sys.exit(main(["download", *sys.argv[1:]]))
