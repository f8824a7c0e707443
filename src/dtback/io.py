"""One atomic writer for every file a user keeps: a reader sees the old file or the new one, never half of one.

Every write goes to a temporary name in the destination's folder (``.<name>.tmp-<pid>-<8 hex>``: hidden, unique per
process and call, recognisable by :data:`TMP_MARK`), is flushed and fsynced, then moved into place with
``os.replace`` and the folder entry fsynced. A failure (exception, Ctrl-C) removes the temporary file; a kill leaves
at worst a temporary file, which :func:`remove_stale_temporaries` cleans.

- :func:`write_bytes`, :func:`write_text`, :func:`write_json`: whole files from memory;
- :func:`atomic_path`: a temporary path for writers that take a file name (``PIL.Image.save``, ``save_file``);
- :func:`replace_folder`: a temporary folder for writers of folders (``save_pretrained``), swapped in whole.

And one reader, :func:`read_text_now`, for small text files a user names (prompts, settings) that never blocks.
And one answer to "is this path inside that folder", :func:`is_inside`, for every check that keeps one tree out of
another (a run out of its dataset, a write inside its output folder).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import stat
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

from safetensors import SafetensorError

TMP_MARK = ".tmp-"


def _file_mode() -> int:
    umask = os.umask(0o022)  # read by setting: os has no getter; put back at once (at import, one thread)
    os.umask(umask)
    return 0o666 & ~umask


# The mode a file gets when a program creates it here (0o644 under the usual umask 022). safetensors' writer
# creates its files 0o600 whatever the umask, so adapters, checkpoints and caches were unreadable to the rest of a
# team on shared storage; every file written through this module is given this mode before it is renamed in place.
FILE_MODE = _file_mode()


def usual_mode(path: Path) -> None:
    """Give the file ``path`` :data:`FILE_MODE`: a regular file this process just wrote, never a symlink's target
    nor a hard link (a builder's hard link shares its mode with the user's own photo, which is not ours to change)."""
    info = os.lstat(path)
    if stat.S_ISREG(info.st_mode) and info.st_nlink == 1 and stat.S_IMODE(info.st_mode) != FILE_MODE:
        os.chmod(path, FILE_MODE)


def temporary_name(path: Path) -> Path:
    """The temporary sibling of ``path`` that the writers here use."""
    path = Path(path)
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def is_temporary(path: Path) -> bool:
    return Path(path).name.startswith(".") and TMP_MARK in Path(path).name


def fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a folder; the rename itself already happened
    finally:
        os.close(fd)


def read_text_now(path: Path, encoding: str = "utf-8", max_bytes: int = 16 * 2**20) -> str:
    """``Path.read_text`` that never waits for a writer: a named pipe nobody writes to reads as empty (a plain
    ``open`` would block until someone opens it for writing), while a pipe that has a writer, such as the shell's
    ``<(command)``, is read to its end as usual; more than ``max_bytes`` (``/dev/zero``) is an OSError (EFBIG).
    OSError (missing file, a folder) and UnicodeDecodeError pass up."""
    nonblocking = getattr(os, "O_NONBLOCK", 0)
    fd = os.open(path, os.O_RDONLY | nonblocking)  # returns at once, writer or not
    with os.fdopen(fd, "rb") as handle:
        if nonblocking:
            os.set_blocking(fd, True)  # then read as usual: with no writer left, a read is end-of-file, not a wait
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise OSError(errno.EFBIG, f"more than {max_bytes} bytes: not a text file of settings or prompts", str(path))
    return data.decode(encoding)


@contextlib.contextmanager
def atomic_path(path: Path, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; when the block ends normally, the file written there replaces
    ``path`` (fsynced first when ``fsync``); otherwise it is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        yield tmp
        usual_mode(tmp)
        if fsync:
            fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        fsync_dir(path.parent)


def write_bytes(path: Path, data: bytes, fsync: bool = True) -> Path:
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: Path, text: str, fsync: bool = True) -> Path:
    return write_bytes(path, text.encode("utf-8"), fsync=fsync)


def write_json(path: Path, data: Any, indent: int | None = 1, fsync: bool = True, **dumps: Any) -> Path:
    """``data`` as JSON (UTF-8, a final newline) at ``path``, atomically."""
    return write_text(path, json.dumps(data, indent=indent, **dumps) + "\n", fsync=fsync)


@contextlib.contextmanager
def replace_folder(folder: Path) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``folder``; when the block ends normally it becomes ``folder`` (an
    existing one is moved aside first and removed after the swap), otherwise it is removed and ``folder`` is left
    as it was. Files inside are fsynced before the swap."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(folder)
    tmp.mkdir()
    try:
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file() and not file.is_symlink():
                usual_mode(file)
                fsync_file(file)
        old = None
        if folder.exists():
            old = temporary_name(folder)
            os.replace(folder, old)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(folder.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def output_problem(path: Path, kind: str) -> str | None:
    """Why ``path`` cannot become an output ``kind`` ("file" or "folder"), from what exists now (None: it can):
    it exists as the other kind, or the first of its parents that exists is not a folder. Callers raise it as
    their error before any work, so nothing is written beside it."""
    path = Path(path)
    if path.exists():
        is_dir = path.is_dir()
        if kind == "folder" and not is_dir:
            return f"{path} is a file, not a folder"
        if kind == "file" and is_dir:
            return f"{path} is a folder, not a file: name a file (e.g. {path / 'report.json'})"
        if kind == "file" and not path.is_file():
            return f"{path} is not a regular file (a FIFO, socket or device)"
        return None
    for parent in path.parents:
        if parent.exists():
            return None if parent.is_dir() else f"{path} is inside {parent}, which is a file, not a folder"
    return None


def is_inside(child: Path | str, parent: Path | str) -> bool:
    """Whether ``child`` is ``parent`` or lies below it, on disk: both are made absolute and their ``..`` and
    symlinks followed first (``os.path.realpath``, so a part that does not exist yet is taken as written, and a
    symlink loop answers instead of raising), then compared by whole names (``/a/bc`` is not inside ``/a/b``)."""
    return Path(os.path.realpath(child)).is_relative_to(os.path.realpath(parent))


# What a writer raises on a full disk or a read-only folder: OSError, or safetensors' own error type, which wraps it.
WRITE_ERRORS = (OSError, SafetensorError)


def write_failure(err: BaseException) -> str:
    """The reason in one of :data:`WRITE_ERRORS`, for a message: ``No space left on device``, not ``[Errno 28] ...``."""
    return err.strerror if isinstance(err, OSError) and err.strerror else str(err)


def move_aside(path: Path, suffix: str = ".damaged") -> Path:
    """Rename ``path`` (a file or folder found damaged) to ``<name><suffix>``, or ``<name><suffix>-2``... when that
    is taken: kept for the user, out of the way of what is written anew; never deleted. Returns the new path."""
    path = Path(path)
    aside, number = path.with_name(path.name + suffix), 1
    while aside.exists():
        number += 1
        aside = path.with_name(f"{path.name}{suffix}-{number}")
    os.replace(path, aside)
    return aside


def safetensors_problem(path: Path) -> str | None:
    """Why the safetensors file ``path`` cannot be read whole (None: it can), from its header and size alone: a file
    cut short (a full disk, an interrupted copy) says how many of its bytes are there."""
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            length = int.from_bytes(handle.read(8), "little")
            if size < 8 or length > size - 8:
                return f"truncated or not a safetensors file: a header of {length} bytes in a file of {size}"
            header = json.loads(handle.read(length))
        end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    except OSError as err:
        return f"unreadable ({err.strerror or err})"
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return "not a safetensors file: its header is not the JSON table of tensors"
    expected = 8 + length + end
    if size != expected:
        return f"truncated: {size} of its {expected} bytes" if size < expected else \
            f"{size} bytes where its header says {expected}"
    return None


def remove_stale_temporaries(folder: Path, older_than: float = 3600.0) -> int:
    """Remove this module's temporary files and folders directly in ``folder`` that are older than ``older_than``
    seconds (left by killed runs; a live writer's are newer). Returns how many were removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    removed, now = 0, time.time()
    for entry in folder.iterdir():
        if not is_temporary(entry):
            continue
        try:
            if now - entry.lstat().st_mtime < older_than:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed += 1
        except FileNotFoundError:
            continue  # another process cleaned it
    return removed
