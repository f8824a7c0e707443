"""Safe image decoding: open by content, apply EXIF orientation, convert any mode to 8-bit RGB.

Real photo folders hold JPEGs named ``.png``, WebP named ``.jpg``, iPhone HEICs, 16-bit scans, CMYK prints,
transparent PNGs, half-copied files and the odd text file. :func:`load_rgb` turns each into an RGB image or raises :class:`ImageSkip`
with a reason from :class:`SkipReason`, so a scan can count it and move on.
"""

from __future__ import annotations

import errno
import re
import stat
import struct
import unicodedata
from enum import Enum
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

try:  # iPhones save photos as HEIC; Pillow reads HEIF only through pillow-heif's plugin (a dependency of dtback)
    from pillow_heif import register_heif_opener
except ImportError:  # an install without it: HEIC photos are then skipped, saying what to install
    register_heif_opener = None
else:
    register_heif_opener()


class SkipReason(str, Enum):
    """Why a file was not used. The values appear in reports and JSON."""

    HIDDEN = "hidden"
    SYMLINK_OUTSIDE_ROOT = "symlink_outside_root"
    BROKEN_SYMLINK = "broken_symlink"
    MISPLACED = "misplaced"
    ZERO_BYTE = "zero_byte"
    NOT_AN_IMAGE = "not_an_image"
    TRUNCATED = "truncated"
    CORRUPT = "corrupt"
    TOO_MANY_PIXELS = "too_many_pixels"
    UNREADABLE = "unreadable"
    BAD_CAPTION = "bad_caption"
    SYMLINK_LOOP = "symlink_loop"
    NOT_A_REGULAR_FILE = "not_a_regular_file"
    NAME_NOT_UTF8 = "name_not_utf8"
    DUPLICATE_FOLDER = "duplicate_folder"


class ImageSkip(Exception):
    """A file that cannot be used as an image; carries the reason and a human-readable detail."""

    def __init__(self, path: Path, reason: SkipReason, detail: str):
        super().__init__(f"{path}: {reason.value}: {detail}")
        self.path = path
        self.reason = reason
        self.detail = detail


# Decoders raise a zoo of exception types on malformed input; each is reported as a counted skip, never swallowed.
# RuntimeError covers Pillow's AVIF plugin ("Failed to decode image") and NotImplementedError, its subclass, the DDS
# plugin's unknown pixel formats.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, KeyError, TypeError, RuntimeError)


_SPECIAL_KINDS = ((stat.S_ISFIFO, "FIFO (named pipe)"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                  (stat.S_ISBLK, "block device"))


def entry_problem(path: Path, folder_ok: bool = True) -> tuple[SkipReason, str] | None:
    """Why ``path`` must not be read (None: a regular file, or a folder when ``folder_ok``), from its name and a
    ``stat`` alone, never opening it: a name that is not UTF-8 (it breaks every JSON and report it would reach), a
    symlink loop, a FIFO, socket or device (opening a FIFO waits forever for a writer; a device never ends)."""
    if not is_utf8(path.name):
        return SkipReason.NAME_NOT_UTF8, (f"the name '{shown(path.name)}' is not valid UTF-8 (written as "
                                          "\\xNN here); rename it to use it")
    try:
        mode = path.stat().st_mode
    except OSError as err:
        if err.errno == errno.ELOOP:
            return SkipReason.SYMLINK_LOOP, f"symlink loop ({err.strerror}): it points back at itself"
        if err.errno == errno.ENOENT and path.is_symlink():
            return SkipReason.BROKEN_SYMLINK, f"points to missing {shown(path.resolve())}"
        return SkipReason.UNREADABLE, str(err)
    if stat.S_ISREG(mode) or (folder_ok and stat.S_ISDIR(mode)):
        return None
    if stat.S_ISDIR(mode):
        return SkipReason.NOT_A_REGULAR_FILE, "a folder where a file was expected"
    kind = next((name for test, name in _SPECIAL_KINDS if test(mode)), "special file")
    return SkipReason.NOT_A_REGULAR_FILE, f"a {kind}, not a regular file: never opened"


def is_utf8(name: str) -> bool:
    """Whether a file name read from the OS is valid UTF-8 (Python keeps other bytes as lone surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def shown(name: str | Path) -> str:
    """A file name or path as text that can be printed on one line and written to JSON: undecodable bytes become
    ``\\xNN``, and control characters (a newline, a carriage return, a terminal escape) are written as Python
    writes them in a string (``\\n``, ``\\r``, ``\\x1b``), so a name cannot break a message or repaint a terminal."""
    text = str(name).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    if text.isprintable():
        return text
    return "".join(repr(c)[1:-1] if unicodedata.category(c) in _UNPRINTED else c for c in text)


# Control characters, line and paragraph separators: each would end or rewrite the line a name is printed on.
_UNPRINTED = frozenset({"Cc", "Zl", "Zp"})


def load_rgb(path: Path, max_pixels: int) -> Image.Image:
    """Decode ``path`` fully and return an upright 8-bit RGB image.

    Raises :class:`ImageSkip` for zero-byte, unreadable, non-image, truncated, corrupt or oversized files.
    The format is detected from the content; the extension is ignored.
    """
    return decode(path, max_pixels)[0]


def probe_image(path: Path, max_pixels: int) -> tuple[int, int, str]:
    """Decode ``path`` fully (a header check misses truncation) and return its upright (width, height, format)."""
    image, fmt = decode(path, max_pixels)
    return image.width, image.height, fmt


def decode(path: Path, max_pixels: int) -> tuple[Image.Image, str]:
    """:func:`load_rgb` that also returns the format detected from the content (``JPEG``, ``PNG``, ``WEBP``...)."""
    problem = entry_problem(path, folder_ok=False)  # before any open(): a FIFO would block it forever
    if problem is not None:
        raise ImageSkip(path, *problem)
    try:
        size = path.stat().st_size
    except OSError as err:
        raise ImageSkip(path, SkipReason.UNREADABLE, str(err)) from None
    if size == 0:
        raise ImageSkip(path, SkipReason.ZERO_BYTE, "file is empty")
    opened = False
    try:
        with Image.open(path) as image:
            opened = True
            width, height = image.size
            if width * height > max_pixels:
                raise ImageSkip(
                    path, SkipReason.TOO_MANY_PIXELS, f"{width}x{height} exceeds max_image_pixels={max_pixels}"
                )
            image.load()
            fmt = image.format or "unknown"
            if fmt in _BMFF_FORMATS and _bmff_shorter_than_declared(path, size):
                # libheif decodes a HEIC missing its last bytes into a picture with a damaged bottom, without a word
                raise ImageSkip(path, SkipReason.TRUNCATED, f"a {fmt} file that ends inside one of its boxes (cut "
                                                            "short)")
            upright = ImageOps.exif_transpose(image)
            return to_rgb(upright), fmt
    except UnidentifiedImageError:
        # Pillow says "cannot identify" both for a text file and for an image cut short before its header ends (an
        # AVIF, a GIF inside its colour table): the first bytes tell the two apart.
        claimed = claimed_format(path)
        if claimed is None and _is_heif(path):
            raise ImageSkip(path, SkipReason.NOT_AN_IMAGE, "a HEIF/HEIC photo (an iPhone's format) and pillow-heif is "
                                                           "not installed: pip install pillow-heif") from None
        if claimed is None:
            raise ImageSkip(path, SkipReason.NOT_AN_IMAGE, "content is not a recognised image format") from None
        if _bmff_shorter_than_declared(path, size):
            raise ImageSkip(path, SkipReason.TRUNCATED, f"a {claimed} file that ends inside one of its boxes (cut "
                                                        "short)") from None
        raise ImageSkip(path, SkipReason.CORRUPT, f"starts as a {claimed} file but does not open: damaged") from None
    except Image.DecompressionBombError as err:
        raise ImageSkip(path, SkipReason.TOO_MANY_PIXELS, str(err)) from None
    except PermissionError as err:
        raise ImageSkip(path, SkipReason.UNREADABLE, str(err)) from None
    except DECODE_ERRORS as err:
        if not opened and claimed_format(path) is None:
            # A plugin took the first bytes for its signature and then choked on the header ("P1 hello" for a PPM):
            # a text, not a damaged image.
            raise ImageSkip(path, SkipReason.NOT_AN_IMAGE, "content is not a recognised image format") from None
        message = " ".join(str(err).split()) or type(err).__name__  # libheif's messages end in a newline
        truncated = ("truncated" in message.lower() or _riff_shorter_than_declared(path, size)
                     or _bmff_shorter_than_declared(path, size))
        reason = SkipReason.TRUNCATED if truncated else SkipReason.CORRUPT
        raise ImageSkip(path, reason, message) from None


def claimed_format(path: Path) -> str | None:
    """The image format whose signature the first bytes of ``path`` carry (Pillow's own check, ``PNG``, ``AVIF``...),
    or None when none does; says nothing about the rest of the file. Unreadable files claim nothing."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(_HEAD_BYTES)
    except OSError:
        return None
    prefix = head[:16]  # what Image.open hands each plugin's check
    Image.init()
    for name in Image.ID:
        accept = Image.OPEN[name][1]
        if accept is None:
            continue  # formats without a signature (TGA...) claim nothing from their first bytes
        try:
            verdict = accept(prefix)
        except DECODE_ERRORS:  # a check that reads past a short prefix: no signature there
            continue
        if not verdict or isinstance(verdict, str):  # a string: "this format, but support is not installed"
            continue
        if name in _HEADER_CHECKS and not _HEADER_CHECKS[name](head):
            continue
        return name
    return None


# Two-letter signatures that words start with ("P1 hello", "Python notes", "Pfizer" for netpbm, "BMW" for BMP): a
# note or caption saved under an image's name must be "not an image", not "a damaged PPM". For these the header's
# next fields must be there too; a file that ends before them may still be a cut-off image and keeps its claim.
_HEAD_BYTES = 512


def _netpbm_header(head: bytes) -> bool:
    """``P1``..``P6`` / ``Pf`` ..., whitespace, then width and height in decimal, comments (``# ...``) between."""
    rest = head[2:]
    if rest and rest[:1] not in b" \t\r\n":
        return False
    tokens = re.sub(rb"#[^\n]*(\n|$)", b" ", rest).split()
    return all(token.isdigit() for token in tokens[:2])


def _bmp_header(head: bytes) -> bool:
    """``BM``, file size, reserved, pixel offset, then the size of the DIB header (12 to 124 bytes in every BMP
    version); the letters of a text are a number in the hundreds of millions there."""
    return len(head) < 18 or 12 <= struct.unpack("<I", head[14:18])[0] <= 124


_HEADER_CHECKS = {"PPM": _netpbm_header, "BMP": _bmp_header}


_BMFF_FORMATS = frozenset({"HEIF", "AVIF"})  # Pillow's names of the ISO base media file formats it reads
# Major brands of HEIF still images and sequences (ISO/IEC 23008-12); AVIF's own brands are Pillow's.
_HEIF_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs", b"mif1", b"msf1"})


def _is_heif(path: Path) -> bool:
    """Whether ``path`` starts as a HEIF file: an ``ftyp`` box whose major brand is a HEIF one."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(12)
    except OSError:
        return False
    return head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS


def _bmff_shorter_than_declared(path: Path, size: int) -> bool:
    """AVIF and HEIF decoders report a cut-off file only as 'BMFF parsing failed': walk the top-level boxes (each a
    4-byte big-endian length, a 4-byte type) and see whether one runs past the end of the file."""
    with open(path, "rb") as handle:
        offset = 0
        for _ in range(10_000):  # real files hold a handful of top-level boxes; a loop of tiny ones is no AVIF
            if offset >= size:
                return False  # every box ends inside the file: damaged, not cut short
            handle.seek(offset)
            header = handle.read(16)
            if offset == 0 and header[4:8] != b"ftyp":
                return False
            if len(header) < 8:
                return True  # a box header cut off
            length = struct.unpack(">I", header[:4])[0]
            if length == 1:  # a 64-bit length follows the type
                if len(header) < 16:
                    return True
                length = struct.unpack(">Q", header[8:16])[0]
            if length == 0:
                return False  # "runs to the end of the file"
            if length < 8:
                return False  # not a box: damaged, not cut short
            if offset + length > size:
                return True
            offset += length
    return False


def _riff_shorter_than_declared(path: Path, size: int) -> bool:
    """WebP decoders report a cut-off file only as 'could not create decoder': compare the RIFF header's length."""
    with open(path, "rb") as handle:
        header = handle.read(12)
    if len(header) < 12 or header[:4] != b"RIFF" or header[8:12] != b"WEBP":
        return False
    return struct.unpack("<I", header[4:8])[0] + 8 > size


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB.

    Transparency is composited on white (cut-out photos usually sit on white); 16- and 32-bit integer and float
    images are rescaled from their full range instead of clipped, so a 16-bit scan does not turn white.
    """
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return _high_depth_to_rgb(image)
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _high_depth_to_rgb(image: Image.Image) -> Image.Image:
    values = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        # Float images are conventionally either [0, 1] or [0, 255].
        top = 1.0 if values.size and values.max() <= 1.0 else 255.0
    elif image.mode == "I" and values.size and values.max() > 65535:
        top = float(2**32 - 1)
    elif image.mode == "I" and values.size and values.max() <= 255:
        top = 255.0  # 8-bit data stored in a 32-bit container
    else:
        top = 65535.0
    gray = np.clip(np.rint(values / top * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")
