"""Safe decoding: every real-world file class becomes RGB or a skip with its reason."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image, features

from dtback.data.images import ImageSkip, SkipReason, claimed_format, decode, load_rgb, probe_image, shown
from helpers import write_image, write_noise

BIG = 10**8


def reason_of(path, max_pixels=BIG) -> SkipReason:
    with pytest.raises(ImageSkip) as info:
        load_rgb(path, max_pixels)
    assert info.value.path == path
    return info.value.reason


@pytest.mark.parametrize(
    ("name", "fmt"),
    [("jpeg_named.png", "JPEG"), ("webp_named.jpg", "WEBP"), ("png_named.jpeg", "PNG"), ("no_extension", "JPEG")],
)
def test_format_is_read_from_content_not_extension(tmp_path, name, fmt):
    path = write_image(tmp_path / name, size=(40, 30), color=(10, 200, 10), fmt=fmt)
    image, detected = decode(path, BIG)
    assert detected == fmt
    assert image.mode == "RGB" and image.size == (40, 30)
    r, g, b = image.getpixel((20, 15))
    assert g > 150 and r < 60 and b < 60


def test_exif_orientation_is_applied(tmp_path):
    # Stored 40x20 with the left half red; orientation 6 means "rotate 90 degrees clockwise to display".
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    stored.save(path, format="JPEG", exif=exif, quality=95)
    image = load_rgb(path, BIG)
    assert image.size == (20, 40)
    top, bottom = image.getpixel((10, 5)), image.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60, top  # the stored left (red) half is now on top
    assert bottom[2] > 200 and bottom[0] < 60, bottom
    assert probe_image(path, BIG)[:2] == (20, 40)


@pytest.mark.parametrize(
    ("mode", "fmt"), [("L", "PNG"), ("1", "PNG"), ("P", "PNG"), ("CMYK", "JPEG"), ("RGBA", "PNG"), ("LA", "PNG"), ("RGB", "TIFF")]
)
def test_modes_convert_to_rgb(tmp_path, mode, fmt):
    path = write_image(tmp_path / f"img_{mode}.img", size=(16, 16), color=(255, 255, 255), fmt=fmt, mode=mode)
    image = load_rgb(path, BIG)
    assert image.mode == "RGB"
    assert min(image.getpixel((8, 8))) >= 250


def test_grayscale_becomes_three_equal_channels(tmp_path):
    path = tmp_path / "gray.png"
    Image.new("L", (8, 8), 77).save(path)
    assert load_rgb(path, BIG).getpixel((3, 3)) == (77, 77, 77)


def test_transparency_is_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (0, 0, 5, 10))
    path = tmp_path / "cutout.png"
    rgba.save(path)
    image = load_rgb(path, BIG)
    assert image.getpixel((8, 5)) == (255, 255, 255)  # transparent: white, not the hidden red
    assert image.getpixel((2, 5)) == (0, 0, 255)


def test_palette_transparency_is_composited_on_white(tmp_path):
    palette = Image.new("P", (10, 10), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    path = tmp_path / "palette.png"
    palette.save(path, transparency=1)
    assert load_rgb(path, BIG).getpixel((5, 5)) == (255, 255, 255)


def test_cmyk_colour_survives(tmp_path):
    path = tmp_path / "print.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path, format="JPEG", quality=95)  # pure red in CMYK
    r, g, b = load_rgb(path, BIG).getpixel((8, 8))
    assert r > 200 and g < 60 and b < 60


def test_sixteen_bit_is_rescaled_not_clipped(tmp_path):
    values = np.array([[0, 32768, 65535, 1000]], dtype=np.uint16)
    path = tmp_path / "scan16.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    image = load_rgb(path, BIG)
    assert [image.getpixel((x, 0))[0] for x in range(4)] == [0, 128, 255, 4]


def test_float_image_in_unit_range(tmp_path):
    path = tmp_path / "float.tif"
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), mode="F").save(path)
    image = load_rgb(path, BIG)
    assert [image.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_pixel_limit_skips_before_decoding(tmp_path):
    path = write_image(tmp_path / "small.png", size=(20, 20))
    assert load_rgb(path, 400).size == (20, 20)
    assert reason_of(path, max_pixels=399) is SkipReason.TOO_MANY_PIXELS


def test_decompression_bomb_is_skipped(tmp_path):
    # 8000x8000 zeros compress to a small file but would decode to 64 Mpx; the default limit is 50 Mpx.
    path = tmp_path / "bomb.png"
    Image.new("1", (8000, 8000)).save(path)
    assert path.stat().st_size < 100_000
    assert reason_of(path, max_pixels=50_000_000) is SkipReason.TOO_MANY_PIXELS


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "AVIF"])
@pytest.mark.parametrize("kept", [0.5, 0.05])
def test_truncated_files_are_skipped(tmp_path, fmt, kept):
    if fmt == "AVIF" and not features.check("avif"):
        pytest.skip("Pillow was built without AVIF")
    path = write_noise(tmp_path / f"half.{fmt.lower()}", fmt=fmt)
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * kept)])
    assert reason_of(path) is (SkipReason.CORRUPT if (fmt, kept) == ("GIF", 0.05) else SkipReason.TRUNCATED)


def test_a_file_that_starts_as_an_image_but_does_not_open_is_corrupt_not_a_non_image(tmp_path):
    # A GIF cut inside its colour table, an ICO cut inside its directory: Pillow reports both as "cannot identify";
    # their first bytes say what they are, so they are damaged images, not stray documents.
    for fmt, keep in (("GIF", 600), ("ICO", 30)):
        path = write_noise(tmp_path / f"cut.{fmt.lower()}", fmt=fmt)
        path.write_bytes(path.read_bytes()[:keep])
        with pytest.raises(ImageSkip) as caught:
            decode(path, 10**8)
        assert caught.value.reason is SkipReason.CORRUPT
        assert caught.value.detail == f"starts as a {fmt} file but does not open: damaged"


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    assert reason_of(path) is SkipReason.ZERO_BYTE


@pytest.mark.parametrize(("name", "content"), [("notes.jpg", b"hello, not a picture\n"),
                                               ("data.bin", np.random.default_rng(1).bytes(300))])
def test_non_image_files(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    assert reason_of(path) is SkipReason.NOT_AN_IMAGE


@pytest.mark.parametrize("text", [b"P1 hello, a caption\n", b"P2 notes", b"Python notes\n", b"Pfizer, 2021\n",
                                  b"P1 2 apples\n", b"BMW car photo, parked by the sea\n"])
def test_a_text_that_starts_like_a_netpbm_or_bmp_signature_is_not_an_image(tmp_path, text):
    # Pillow's checks for PPM ("P" + one of "0123456fy") and BMP ("BM") take these for images, whose header then
    # fails: a caption or a note saved under an image's name was counted as a corrupt or truncated image.
    path = tmp_path / "caption.jpg"
    path.write_bytes(text)
    with pytest.raises(ImageSkip) as caught:
        decode(path, BIG)
    assert (caught.value.reason, caught.value.detail) == (SkipReason.NOT_AN_IMAGE,
                                                          "content is not a recognised image format")
    assert claimed_format(path) is None  # so dataset inspect lists a README.txt beside the bundles, not as an image


def test_netpbm_and_bmp_images_keep_their_signature_even_plain_text_or_cut_short(tmp_path):
    plain = tmp_path / "plain.pbm"
    plain.write_bytes(b"P1\n# two by two\n2 2\n0 1\n1 0\n")  # netpbm's own text form is an image
    assert decode(plain, BIG)[0].size == (2, 2) and claimed_format(plain) == "PPM"
    for name, data in (("cut.ppm", b"P6\n"), ("cut.bmp", b"BM"), ("head.ppm", b"P5 32 32\n255\n")):
        (tmp_path / name).write_bytes(data)
        assert claimed_format(tmp_path / name) == ("BMP" if name.endswith("bmp") else "PPM")
        assert reason_of(tmp_path / name) in (SkipReason.CORRUPT, SkipReason.TRUNCATED)
    bmp = write_noise(tmp_path / "noise.bmp", fmt="BMP")
    bmp.write_bytes(bmp.read_bytes()[:40])
    assert claimed_format(bmp) == "BMP" and reason_of(bmp) is SkipReason.TRUNCATED


def test_damaged_pixel_data_is_corrupt(tmp_path):
    # A complete PNG whose compressed pixel data was overwritten (a bad disk sector): full length, broken content.
    path = write_noise(tmp_path / "damaged.png", fmt="PNG")
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(64)
    path.write_bytes(bytes(data))
    assert reason_of(path) is SkipReason.CORRUPT


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads files regardless of mode")
def test_unreadable_file(tmp_path):
    path = write_image(tmp_path / "locked.png")
    path.chmod(0)
    try:
        assert reason_of(path) is SkipReason.UNREADABLE
    finally:
        path.chmod(0o644)


def test_missing_file_is_unreadable(tmp_path):
    assert reason_of(tmp_path / "gone.png") is SkipReason.UNREADABLE


def test_permission_error_is_unreadable(tmp_path, monkeypatch):
    # Runs as root too (where chmod 0 does not stop reading): the decoder's PermissionError maps to `unreadable`.
    path = write_image(tmp_path / "locked.png")

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(Image, "open", refuse)
    assert reason_of(path) is SkipReason.UNREADABLE


def test_shown_names_fit_on_one_line():
    assert shown("al\nice\r\t\x1b[31m\x7f\x85\u2028.png") == "al\\nice\\r\\t\\x1b[31m\\x7f\\x85\\u2028.png"
    assert shown(os.fsdecode(b"caf\xe9/x\n")) == "caf\\xe9/x\\n"
    assert shown("Zoë 名前 a b.png") == "Zoë 名前 a b.png"  # printable names are left as they are
    assert shown(shown("a\nb")) == "a\\nb"


def _heic(path, stored: Image.Image, orientation: int | None = None):
    """``stored`` saved as HEIC through pillow-heif (what an iPhone writes), with an EXIF orientation if given."""
    pillow_heif = pytest.importorskip("pillow_heif")
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    # pillow-heif's own writer: the test does not depend on its Pillow plugin being registered (dtback's job)
    pillow_heif.from_pillow(stored).save(path, quality=95, exif=exif.tobytes())
    return path


def test_an_iphone_heic_photo_is_read_upright(tmp_path):
    # Stored 64x32 with the left half red, orientation 6 ("rotate 90 clockwise to display"), as a phone held upright
    stored = Image.new("RGB", (64, 32), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 32, 32))
    path = _heic(tmp_path / "IMG_0001.HEIC", stored, orientation=6)
    image, fmt = decode(path, BIG)
    assert fmt == "HEIF" and image.mode == "RGB" and image.size == (32, 64)
    top, bottom = image.getpixel((16, 8)), image.getpixel((16, 56))
    assert top[0] > 200 and top[2] < 60, top  # the stored left (red) half is on top, as for a JPEG
    assert bottom[2] > 200 and bottom[0] < 60, bottom


@pytest.mark.parametrize("kept", [0.5, 0.999])
def test_a_heic_cut_short_is_truncated_even_where_libheif_decodes_it(tmp_path, kept):
    # libheif decodes a HEIC missing its last bytes into a picture with a damaged bottom, without an error
    path = _heic(tmp_path / "cut.heic", Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 48, 3),
                                                                                          dtype=np.uint8)))
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * kept)])
    with pytest.raises(ImageSkip) as info:
        load_rgb(path, BIG)
    assert info.value.reason is SkipReason.TRUNCATED and "\n" not in str(info.value)


def test_a_heic_without_pillow_heif_says_what_to_install(tmp_path, monkeypatch):
    path = _heic(tmp_path / "IMG_0002.HEIC", Image.new("RGB", (32, 32), (200, 10, 10)))
    monkeypatch.setattr(Image, "ID", [name for name in Image.ID if name != "HEIF"])  # an install without the plugin
    with pytest.raises(ImageSkip) as info:
        load_rgb(path, BIG)
    assert info.value.reason is SkipReason.NOT_AN_IMAGE and "pip install pillow-heif" in info.value.detail
