"""Dataset layer: scan the <bundle>/<character>/<image> layout, decode safely, split by character, draw pairs."""

from dtback.data.layout import CharacterEntry, DatasetIndex, ImageEntry, scan_dataset
from dtback.data.pairs import caption_for, draw_references
from dtback.data.split import Split, split_characters

__all__ = [
    "CharacterEntry",
    "DatasetIndex",
    "ImageEntry",
    "Split",
    "caption_for",
    "draw_references",
    "scan_dataset",
    "split_characters",
]
