"""Labelled image grids: reference → generated samples over training, one PNG per validation step.

    ┌──────────────┬───────────┬───────────────┬──────────────────┐
    │              │ reference │ with identity │ without identity │   ← column labels (header band)
    ├──────────────┼───────────┼───────────────┼──────────────────┤
    │ val/char_0007│   cell    │     cell      │      cell        │   ← one row per character
    └──────────────┴───────────┴───────────────┴──────────────────┘

Every image is letterboxed into a ``cell``×``cell`` square; a row with fewer images is padded with blank cells.
Text uses PIL's built-in default font, so no font file is needed.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont, ImageOps

from dtback.viz.runlog import write_atomic

BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)
LETTERBOX = (40, 40, 40)  # bars around a non-square image inside its cell
BLANK = (225, 225, 225)  # a padding cell where a row has no image

Box = tuple[int, int, int, int]  # (left, top, right, bottom), right/bottom exclusive


@lru_cache(maxsize=8)
def grid_font(cell: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """PIL's default font at a size readable next to ``cell``-px images (the bitmap font without FreeType)."""
    return ImageFont.load_default(size=max(10, min(24, cell // 9)))


def _text_width(font, text: str) -> int:
    return int(round(font.getlength(text)))


def _line_height(font) -> int:
    left, top, right, bottom = font.getbbox("Ag/_|")
    return bottom + 3


def wrap_text(text: str, font, width: int) -> list[str]:
    """Split ``text`` into lines no wider than ``width`` px: at spaces first, then inside a word that is too long."""
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        current = ""
        for word in paragraph.split(" "):
            candidate = f"{current} {word}" if current else word
            if _text_width(font, candidate) <= width:
                current = candidate
                continue
            if current:
                lines.append(current)
            current = ""
            for char in word:
                if current and _text_width(font, current + char) > width:
                    lines.append(current)
                    current = ""
                current += char
        lines.append(current)
    return lines


@dataclass(frozen=True)
class GridLayout:
    """Pixel geometry of a grid: the size, the label areas and where cell ``(row, column)`` sits."""

    cell: int
    pad: int
    rows: int
    columns: int
    label_width: int  # left band holding the row labels (0 when every row label is empty)
    header_height: int  # top band holding the column labels (and the title, if any)
    title_height: int

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the whole grid image."""
        width = self.label_width + self.pad + self.columns * (self.cell + self.pad)
        height = self.header_height + self.pad + self.rows * (self.cell + self.pad)
        return width, height

    def cell_box(self, row: int, column: int) -> Box:
        """The ``cell``×``cell`` square of ``(row, column)``."""
        left = self.label_width + self.pad + column * (self.cell + self.pad)
        top = self.header_height + self.pad + row * (self.cell + self.pad)
        return left, top, left + self.cell, top + self.cell

    def column_label_box(self, column: int) -> Box:
        """The header area above ``column``."""
        left = self.cell_box(0, column)[0]
        return left, self.title_height, left + self.cell, self.header_height

    def row_label_box(self, row: int) -> Box:
        """The area left of ``row``."""
        top = self.cell_box(row, 0)[1]
        return 0, top, self.label_width, top + self.cell


def grid_layout(
    row_labels: Sequence[str], column_labels: Sequence[str], columns: int, cell: int = 128, title: str | None = None
) -> GridLayout:
    """The geometry :func:`make_grid` uses for these labels, ``columns`` columns and ``cell``-px cells."""
    font = grid_font(cell)
    pad = max(2, cell // 32)
    line = _line_height(font)
    # Row labels may be as wide as two cells; longer ones wrap.
    widest = max((_text_width(font, text) for label in row_labels for text in label.splitlines()), default=0)
    label_width = min(widest, 2 * cell) + 2 * pad if widest else 0
    header_lines = max((len(wrap_text(label, font, cell)) for label in column_labels if label), default=0)
    total_width = label_width + pad + columns * (cell + pad)
    title_lines = len(wrap_text(title, font, total_width - 2 * pad)) if title else 0
    title_height = title_lines * line + (pad if title else 0)
    header_height = title_height + (header_lines * line + pad if header_lines else 0)
    return GridLayout(cell, pad, len(row_labels), columns, label_width, header_height, title_height)


def _letterbox(image: Image.Image, cell: int) -> Image.Image:
    """``image`` scaled to fit a ``cell`` square, keeping its aspect ratio, centred on :data:`LETTERBOX` bars."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.new("RGB", rgba.size, BACKGROUND)
        image.paste(rgba, mask=rgba.getchannel("A"))
    else:
        image = image.convert("RGB")
    fitted = ImageOps.contain(image, (cell, cell), Image.Resampling.LANCZOS)
    square = Image.new("RGB", (cell, cell), LETTERBOX)
    square.paste(fitted, ((cell - fitted.width) // 2, (cell - fitted.height) // 2))
    return square


def _draw_lines(draw: ImageDraw.ImageDraw, lines: list[str], box: Box, font, center: bool) -> None:
    """Draw ``lines`` inside ``box``, vertically centred; horizontally centred or left-aligned."""
    line = _line_height(font)
    left, top, right, bottom = box
    y = top + max(0, (bottom - top - line * len(lines)) // 2)
    for text in lines:
        x = left + (right - left - _text_width(font, text)) // 2 if center else left
        draw.text((x, y), text, fill=TEXT, font=font)
        y += line


def make_grid(
    rows: Sequence[Sequence[Image.Image]],
    row_labels: Sequence[str],
    column_labels: Sequence[str],
    cell: int = 128,
    *,
    title: str | None = None,
) -> Image.Image:
    """A labelled RGB grid: ``rows[r][c]`` letterboxed into a ``cell``-px square at row ``r``, column ``c``.

    ``row_labels`` has one label per row (drawn on the left); ``column_labels`` heads the columns (drawn on top;
    it may be shorter than the widest row, and an empty list gives no header). Rows shorter than the widest row,
    or than ``column_labels``, are padded with blank cells, as is a ``None`` entry. ``title`` adds a line above
    the header. Any image mode is accepted; transparency is flattened onto white."""
    if len(rows) == 0:
        raise ValueError("make_grid: no rows to draw")
    if len(row_labels) != len(rows):
        raise ValueError(f"make_grid: {len(rows)} rows but {len(row_labels)} row labels")
    if cell < 8:
        raise ValueError(f"make_grid: cell must be at least 8 px (got {cell})")
    columns = max(max(len(row) for row in rows), len(column_labels), 1)
    layout = grid_layout(row_labels, column_labels, columns, cell, title)
    font = grid_font(cell)
    canvas = Image.new("RGB", layout.size, BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    if title:
        width = layout.size[0]
        lines = wrap_text(title, font, width - 2 * layout.pad)
        _draw_lines(draw, lines, (layout.pad, 0, width - layout.pad, layout.title_height), font, center=False)
    for column, label in enumerate(column_labels):
        if label:
            _draw_lines(draw, wrap_text(label, font, cell), layout.column_label_box(column), font, center=True)
    for row, (images, label) in enumerate(zip(rows, row_labels)):
        if label:
            left, top, right, bottom = layout.row_label_box(row)
            lines = wrap_text(label, font, right - left - 2 * layout.pad)
            _draw_lines(draw, lines, (left + layout.pad, top, right - layout.pad, bottom), font, center=False)
        for column in range(columns):
            box = layout.cell_box(row, column)
            if column < len(images) and images[column] is not None:
                canvas.paste(_letterbox(images[column], cell), box[:2])
            else:
                draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=BLANK)
    return canvas


def sample_grid_path(run_dir: Path, step: int) -> Path:
    """Where the sample grid of ``step`` lives: ``<run>/samples/step-000500.png``."""
    return Path(run_dir) / "samples" / f"step-{int(step):06d}.png"


def save_sample_grid(run_dir: Path, step: int, grid: Image.Image) -> Path:
    """Write ``grid`` as ``<run>/samples/step-XXXXXX.png`` atomically and return the path."""
    buffer = io.BytesIO()
    grid.save(buffer, format="PNG")
    return write_atomic(sample_grid_path(run_dir, step), buffer.getvalue())
