"""Caption sidecars: the text file beside an image that describes it.

Three names are read, because each convention is common: ``<stem>.txt`` (``0001.txt`` for ``0001.jpg``: dtback's
world and builder, kohya), ``<name>.txt`` (``0001.jpg.txt``: several taggers) and ``<stem>.caption`` (kohya's and
EveryDream's other caption extension). The first that exists in that order wins: ``<stem>.txt`` is the documented
layout, so a dataset that has several reads as it did before; when their texts differ the scan says so once, naming
the files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dtback.io import is_inside

# A caption file beyond this is not a caption (a log, a pasted document): the text encoders would truncate it anyway,
# after the tokenizer had printed it whole into the log.
MAX_CAPTION_BYTES = 16_384
CAPTION_SUFFIX = ".caption"


@dataclass(frozen=True)
class Caption:
    """The caption of one image: its text (None: no usable sidecar), the file it came from, why that file was not
    usable (``problem``, counted as ``bad_caption``), and a later sidecar of other text left unread (``shadowed``)."""

    text: str | None = None
    file: Path | None = None
    problem: str | None = None
    shadowed: Path | None = None


def caption_files(image_path: Path) -> list[Path]:
    """The sidecars that exist for ``image_path``, in order of precedence: ``<stem>.txt``, ``<name>.txt``,
    ``<stem>.caption``."""
    names = (image_path.with_suffix(".txt"), image_path.with_name(image_path.name + ".txt"),
             image_path.with_suffix(CAPTION_SUFFIX))
    return [path for path in names if path.is_file()]


def read_caption(image_path: Path, root: Path) -> Caption:
    """The caption of ``image_path`` from its sidecar (see the module docstring for which one), never reading text
    that a symlink brings from outside ``root`` (the scan counts such a link as ``symlink_outside_root``)."""
    files = [path for path in caption_files(image_path)
             if not (path.is_symlink() and not is_inside(path, root))]
    if not files:
        return Caption()
    chosen = files[0]
    text, problem = _read(chosen)
    shadowed = None
    if problem is None:
        shadowed = next((other for other in files[1:] if _read(other) != (text, None)), None)
    return Caption(text=text, file=chosen, problem=problem, shadowed=shadowed)


def _read(path: Path) -> tuple[str | None, str | None]:
    """(stripped text or None when blank, None) or (None, why the file cannot be a caption)."""
    try:
        if path.stat().st_size > MAX_CAPTION_BYTES:
            return None, (f"over {MAX_CAPTION_BYTES} bytes, far beyond what a text encoder reads (T5: 512 tokens); "
                          "the caption template is used")
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        return None, f"{err}; the caption template is used"
    return (text or None), None
