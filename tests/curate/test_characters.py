"""The builder's character files: contact sheet captions."""

from __future__ import annotations

from dtback.curate.characters import CAPTION_CHARS, tile_caption


def test_tile_captions_keep_the_end_of_the_file_name():
    assert tile_caption(3, "a_1b2c3d4e.jpg") == "3 a_1b2c3d4e.jpg"
    long = tile_caption(12, "IMG_20190704_holiday_0412_3fa2b1c0.jpg")
    assert long == "12 ~0412_3fa2b1c0.jpg" and len(long) == CAPTION_CHARS
