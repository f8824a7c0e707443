"""Seed entry point: ``python inference/generate.py --model ... --reference ref.jpg --prompt "..." --output out/``.

A thin shim over ``dtback generate``; see ``dtback generate --help``.
"""

import sys

from dtback.cli import main

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
