"""On-disk embedding cache: identity embeddings are computed once per image and read back ever after.

Entries are keyed by the sha256 of the image's bytes (:func:`content_hash`), so a renamed or copied image hits the
cache and an edited one misses. Every encoder + settings combination gets its own namespace folder
(:func:`cache_namespace`), so changing the model, the crop rule or the image size never returns stale embeddings.

Layout::

    folder/<namespace>/encoder.json                                  # encoder_id + settings, for people
    folder/<namespace>/shard-<time_ns>-<pid>-<uuid>.safetensors      # tensors "<key>/<field>", one file per flush
    folder/<namespace>/.shard-....safetensors.tmp-<pid>-<hex>        # a shard being written (ignored by readers)

Why shards and no index file: each writer only ever creates new files with unique names and moves them into place
(:func:`dtback.io.atomic_path`), so a kill leaves at worst a temp file (ignored, cleaned when stale) and two
processes never overwrite each other. Readers find entries by listing the folder and reading shard headers only;
tensors are loaded on :meth:`EmbeddingCache.get`. Shards are safetensors, so reading never unpickles anything.

A shard found damaged (cut short, not safetensors) is renamed aside once (``<name>.damaged``, kept) so later runs
neither read nor warn about it again, and its entries are computed anew. In a distributed run the ranks open their
caches one after the other, the main process first (:mod:`dtback.training.setup`), so only the first to see it
renames it; a process that finds it gone (another set it aside first) says so and counts nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import stat
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from dtback.errors import ConfigError, DtbackError
from dtback.io import (
    WRITE_ERRORS, atomic_path, is_temporary, move_aside, output_problem, write_failure, write_json,
)

log = logging.getLogger(__name__)

FORMAT_NAME = "dtback-embedding-cache"
FORMAT_VERSION = "1"
SHARD_PREFIX = "shard-"
SHARD_SUFFIX = ".safetensors"
TMP_SUFFIX = ".tmp"  # temp files of older versions (``.<name>.<uuid>.tmp``): still cleaned when stale
ENCODER_FILE = "encoder.json"
NAMESPACE_CHARS = 16
META_PREFIX = "meta/"
_HASH_CHUNK = 1 << 20
# A temp file this old belongs to a writer that was killed; a live writer finishes a shard in seconds.
DEFAULT_STALE_TMP_S = 3600.0
# Keys become the first part of tensor names "<key>/<field>", so they must not contain "/".
_KEY_PATTERN = re.compile(r"[A-Za-z0-9_.:-]+")
# What opening or reading a damaged shard can raise: safetensors' own error for bad headers/sizes, OSError for
# unreadable or vanished files, ValueError/UnicodeError for metadata that is not what we wrote.
_SHARD_READ_ERRORS = (SafetensorError, OSError, ValueError, UnicodeError)
# Those that say the file itself is damaged (an OSError may pass: a permission, a file another process moved).
_SHARD_DAMAGE = (SafetensorError, ValueError, UnicodeError)


class CacheWriteError(DtbackError, OSError):
    """A shard could not be written (a full disk, a folder made read-only): the message names the cache folder and
    the reason. The entries stay buffered, so a later :meth:`EmbeddingCache.flush` can still write them."""


def content_hash(path: Path) -> str:
    """Return the sha256 (64 lowercase hex digits) of the bytes of ``path``, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _describe_encoder(encoder_id: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON-able description of an encoder that the namespace hashes and ``encoder.json`` stores."""
    if not isinstance(encoder_id, str) or not encoder_id:
        raise ValueError(f"encoder_id must be a non-empty string, got {encoder_id!r}")
    for name, value in settings.items():
        try:
            json.dumps(value, sort_keys=True)
        except (TypeError, ValueError) as err:
            raise TypeError(
                f"encoder setting {name!r} = {value!r} of encoder {encoder_id!r} is not JSON-serialisable ({err}); "
                "pass plain numbers, strings, booleans, lists or dicts"
            ) from err
    # The round trip turns tuples into lists, so equal settings written either way describe the same encoder.
    return json.loads(json.dumps({"encoder_id": encoder_id, "settings": dict(settings)}, sort_keys=True))


def cache_namespace(encoder_id: str, settings: Mapping[str, Any]) -> str:
    """Return a short stable hash (16 hex digits) of the encoder id and its settings (JSON, sorted keys).

    Any change to the id or to one setting gives a different namespace, so cached embeddings never go stale.
    """
    description = _describe_encoder(encoder_id, settings)
    text = json.dumps(description, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:NAMESPACE_CHARS]


def _check_key(key: str) -> None:
    """Raise ``ValueError`` unless ``key`` can be a cache key (letters, digits, ``_ . : -``; no ``/``)."""
    if not isinstance(key, str) or not _KEY_PATTERN.fullmatch(key):
        raise ValueError(
            f"cache key {key!r} is invalid: use the content hash of the image (content_hash(path)); "
            "keys may hold letters, digits and '_.:-' only"
        )


def _prepare_tensors(key: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Check one entry and return private CPU copies of its tensors (the caller may reuse its own)."""
    if not tensors:
        raise ValueError(f"cache entry {key!r} has no tensors; an entry needs at least one field")
    prepared = {}
    for field, tensor in tensors.items():
        if not isinstance(field, str) or not field:
            raise ValueError(f"cache entry {key!r}: field name {field!r} must be a non-empty string")
        if not isinstance(tensor, torch.Tensor):
            kind = type(tensor).__name__
            raise TypeError(f"cache entry {key!r}: field {field!r} is a {kind}, expected a torch.Tensor")
        prepared[field] = tensor.detach().to("cpu").contiguous().clone()
    return prepared


def _write_atomic_json(path: Path, payload: Mapping[str, Any]) -> None:
    """Write ``payload`` as JSON to ``path`` atomically (:func:`dtback.io.write_json`: unique temp, fsync)."""
    write_json(path, dict(payload), indent=2, sort_keys=True)


def _is_cache_tmp(path: Path) -> bool:
    """A temp file of a cache writer: :mod:`dtback.io`'s (``.<name>.tmp-<pid>-<hex>``) or an older version's
    (``.<name>.<uuid>.tmp``)."""
    return is_temporary(path) or (path.name.startswith(".") and path.name.endswith(TMP_SUFFIX))


def new_shard_name() -> str:
    """A shard file name no other writer can pick: time (sorts oldest first), process id and a random uuid."""
    return f"{SHARD_PREFIX}{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:12]}{SHARD_SUFFIX}"


def remove_stale_tmp(folder: Path, older_than_s: float) -> int:
    """Delete temp files in ``folder`` older than ``older_than_s`` seconds (left by killed writers); return how many."""
    now = time.time()
    removed = 0
    for tmp in folder.glob(".*"):
        if not _is_cache_tmp(tmp):
            continue
        try:
            if tmp.is_file() and now - tmp.stat().st_mtime > older_than_s:
                tmp.unlink()
                removed += 1
        except FileNotFoundError:
            # Another process finished or cleaned this temp file between the listing and now: nothing to do.
            continue
    if removed:
        log.info("removed %d stale temp file(s) from %s", removed, folder)
    return removed


class EmbeddingCache:
    """Embeddings per image content hash for one encoder + settings, stored as safetensors shards.

    ``get(key)`` returns ``dict[str, Tensor]`` (any shapes and dtypes, as put) or ``None``. ``put`` buffers in
    memory; ``flush`` writes the buffer as a new shard, and happens by itself every ``shard_size`` entries and on
    leaving a ``with`` block (also when it is left by an exception, so finished work is kept).

    Damaged or foreign shard files are skipped with a warning; ``skipped`` maps each such file to the reason.
    Damaged ones are renamed aside (module docstring); ``set_aside`` lists their new paths.
    """

    def __init__(
        self,
        folder: Path,
        encoder_id: str,
        settings: Mapping[str, Any],
        shard_size: int = 512,
        stale_tmp_s: float = DEFAULT_STALE_TMP_S,
    ):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.encoder_id = encoder_id
        self.settings = dict(settings)
        self.namespace = cache_namespace(encoder_id, settings)
        self.root = Path(folder)
        self.folder = self.root / self.namespace
        self.shard_size = shard_size
        self.skipped: dict[Path, str] = {}
        self.set_aside: list[Path] = []
        self._index: dict[str, Path] = {}
        self._seen_shards: set[Path] = set()
        self._shard_names: dict[Path, dict[str, list[str]]] = {}
        self._buffer: dict[str, dict[str, torch.Tensor]] = {}
        self._buffer_meta: dict[str, str] = {}
        problem = output_problem(self.folder, "folder")
        if problem is not None:
            raise ConfigError(f"identity.cache_dir: {problem}")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._write_encoder_file()
        except OSError as err:  # a read-only or full file system: said once, naming the folder
            raise ConfigError(f"identity.cache_dir: cannot write {self.folder} ({err.strerror or err}); "
                              "choose a writable folder with free space") from err
        remove_stale_tmp(self.folder, stale_tmp_s)
        self.refresh()

    # ----------------------------------------------------------------------------------------------- reading

    def refresh(self) -> int:
        """Re-list the folder and index shards not seen yet (e.g. written by another process); return how many.

        Only shard headers are read. A shard that cannot be read is warned about, recorded in ``skipped`` and
        not tried again by this instance.
        """
        new = 0
        for shard in sorted(self.folder.glob(f"{SHARD_PREFIX}*{SHARD_SUFFIX}")):
            if shard in self._seen_shards:
                continue
            self._seen_shards.add(shard)
            keys = self._read_shard_keys(shard)
            if keys is None:
                continue
            for key in keys:
                # Same content in the same namespace gives the same value, so the first (oldest) shard wins.
                self._index.setdefault(key, shard)
            new += 1
        return new

    def _read_shard_keys(self, shard: Path) -> set[str] | None:
        """Return the entry keys stored in ``shard`` (header only), or ``None`` after recording why it is skipped."""
        try:
            # A FIFO would block the open until someone writes to it; a folder or a device is no shard either.
            if not stat.S_ISREG(os.stat(shard).st_mode):
                self._skip(shard, "not a regular file (a folder, FIFO, socket or device named like a shard)")
                return None
            with safe_open(shard, framework="pt") as handle:
                metadata = handle.metadata() or {}
                names = list(handle.keys())
        except _SHARD_READ_ERRORS as err:
            self._skip(shard, f"unreadable shard: {type(err).__name__}: {err}", isinstance(err, _SHARD_DAMAGE))
            return None
        if metadata.get("format") != FORMAT_NAME:
            self._skip(shard, f"not a {FORMAT_NAME} shard (metadata format={metadata.get('format')!r})")
            return None
        if metadata.get("version") != FORMAT_VERSION:
            self._skip(shard, f"written by cache format version {metadata.get('version')!r}; this dtback reads "
                              f"version {FORMAT_VERSION!r}")
            return None
        if metadata.get("namespace") != self.namespace:
            self._skip(shard, f"shard of namespace {metadata.get('namespace')!r}, expected {self.namespace!r}")
            return None
        grouped: dict[str, list[str]] = {}
        for name in names:
            grouped.setdefault(name.split("/", 1)[0], []).append(name)
        self._shard_names[shard] = grouped  # get() reads only its key's tensors instead of scanning every name
        return set(grouped)

    def _skip(self, shard: Path, reason: str, damaged: bool = False) -> None:
        """Record a shard that cannot be used, and warn with its path; a ``damaged`` one is renamed aside first."""
        self.skipped[shard] = reason
        log.warning("embedding cache: skipping %s: %s%s", shard, reason, self._set_aside(shard) if damaged else "")

    def _set_aside(self, shard: Path) -> str:
        """Rename the damaged ``shard`` aside (:func:`dtback.io.move_aside`); what became of it, for the warning."""
        try:
            aside = move_aside(shard)
        except FileNotFoundError:
            return "; another process set it aside first"
        except OSError as err:
            return (f"; it cannot be renamed aside ({write_failure(err)}): skipped again on every run until it is "
                    "removed")
        self.set_aside.append(aside)
        return (f"; renamed to {aside.name} (damaged shards set aside: {len(self.set_aside)}): later runs do not read "
                "it, and its entries are computed anew")

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        """Return the tensors stored for ``key`` (field → tensor, on CPU), or ``None`` when not cached."""
        if key in self._buffer:
            return {field: tensor.clone() for field, tensor in self._buffer[key].items()}
        shard = self._index.get(key)
        if shard is None:
            return None
        prefix = f"{key}/"
        try:
            with safe_open(shard, framework="pt") as handle:
                return {name[len(prefix):]: handle.get_tensor(name) for name in self._shard_names[shard][key]}
        except _SHARD_READ_ERRORS as err:
            self._drop_shard(shard, f"unreadable shard on get({key!r}): {type(err).__name__}: {err}", err)
            return self.get(key)

    def get_many(self, keys: Sequence[str]) -> dict[str, dict[str, torch.Tensor] | None]:
        """:meth:`get` for many keys (each once in the result), opening each shard once: a shard's header holds
        every entry's names, so reading 3,000 entries key by key parses it 3,000 times."""
        found: dict[str, dict[str, torch.Tensor] | None] = {}
        by_shard: dict[Path, list[str]] = {}
        for key in keys:
            if key in found:
                continue
            if key in self._buffer:
                found[key] = {field: tensor.clone() for field, tensor in self._buffer[key].items()}
            elif key in self._index:
                found[key] = None  # read below
                by_shard.setdefault(self._index[key], []).append(key)
            else:
                found[key] = None
        for shard, wanted in by_shard.items():
            try:
                with safe_open(shard, framework="pt") as handle:
                    for key in wanted:
                        found[key] = {name[len(key) + 1:]: handle.get_tensor(name)
                                      for name in self._shard_names[shard][key]}
            except _SHARD_READ_ERRORS as err:
                self._drop_shard(shard, f"unreadable shard on get_many: {type(err).__name__}: {err}", err)
                found.update(self.get_many(wanted))
        return found

    def get_meta(self, key: str) -> dict[str, Any] | None:
        """Return the JSON metadata put with ``key`` (``{}`` if none was given), or ``None`` when not cached."""
        if key in self._buffer:
            return json.loads(self._buffer_meta.get(key, "{}"))
        shard = self._index.get(key)
        if shard is None:
            return None
        try:
            with safe_open(shard, framework="pt") as handle:
                metadata = handle.metadata() or {}
        except _SHARD_READ_ERRORS as err:
            self._drop_shard(shard, f"unreadable shard on get_meta({key!r}): {type(err).__name__}: {err}", err)
            return self.get_meta(key)
        return json.loads(metadata.get(META_PREFIX + key, "{}"))

    def _drop_shard(self, shard: Path, reason: str, err: Exception) -> None:
        """Forget a shard that went bad after it was indexed (``err``: why); its keys fall back to other shards or
        miss."""
        self._skip(shard, reason, isinstance(err, _SHARD_DAMAGE))
        lost = [key for key, where in self._index.items() if where == shard]
        for key in lost:
            del self._index[key]
        # Another shard may hold some of the same keys (duplicates are allowed): index those again.
        for other in sorted(self._seen_shards - set(self.skipped)):
            keys = self._read_shard_keys(other) or set()
            for key in keys & set(lost):
                self._index.setdefault(key, other)

    def __contains__(self, key: object) -> bool:
        return key in self._buffer or key in self._index

    def __len__(self) -> int:
        return len(self._index) + sum(1 for key in self._buffer if key not in self._index)

    def keys(self) -> list[str]:
        """All cached keys: those on disk (as of the last :meth:`refresh`) and those still buffered."""
        return list(self._index) + [key for key in self._buffer if key not in self._index]

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    @property
    def shards(self) -> list[Path]:
        """Shard files in use by this instance (skipped ones excluded), oldest first."""
        return sorted(self._seen_shards - set(self.skipped))

    # ----------------------------------------------------------------------------------------------- writing

    def put(self, key: str, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any] | None = None) -> bool:
        """Buffer one entry; flush when the buffer holds ``shard_size`` entries.

        ``tensors`` maps field names (e.g. ``"face"``, ``"body_pooled"``, ``"body_tokens"``) to tensors of any
        shape and dtype; ``meta`` is small JSON-able data kept with the entry. Returns ``False`` (and stores
        nothing) when ``key`` is already cached: same content and encoder give the same embeddings.
        """
        _check_key(key)
        if key in self:
            return False
        self._buffer[key] = _prepare_tensors(key, tensors)
        if meta:
            try:
                self._buffer_meta[key] = json.dumps(dict(meta), sort_keys=True)
            except (TypeError, ValueError) as err:
                del self._buffer[key]
                raise TypeError(f"cache entry {key!r}: metadata {meta!r} is not JSON-serialisable ({err})") from err
        if len(self._buffer) >= self.shard_size:
            self.flush()
        return True

    def flush(self) -> Path | None:
        """Write the buffered entries as one new shard and return its path (``None`` if the buffer was empty).

        The shard is written to a temp file, fsynced and moved into place (:func:`dtback.io.atomic_path`), so it
        appears whole or not at all. If writing fails the buffer is kept, the temp file removed, and the error raised.
        """
        if not self._buffer:
            return None
        final = self.folder / new_shard_name()
        tensors = {f"{key}/{field}": t for key, entry in self._buffer.items() for field, t in entry.items()}
        metadata = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "namespace": self.namespace}
        metadata.update({META_PREFIX + key: text for key, text in self._buffer_meta.items()})
        try:
            with atomic_path(final) as tmp:  # unique per process and call: two writers never share a temp file
                save_file(tensors, str(tmp), metadata=metadata)
        except WRITE_ERRORS as err:
            raise CacheWriteError(
                f"embedding cache {self.folder}: cannot write a shard of {len(self._buffer)} entries "
                f"({write_failure(err)}); nothing was torn and the shards written before are kept. Free space or "
                "make the folder writable (identity.cache_dir), then run again: what those shards hold is not "
                "computed again"
            ) from err
        for key in self._buffer:
            self._index.setdefault(key, final)
        self._shard_names[final] = {key: [f"{key}/{field}" for field in entry] for key, entry in self._buffer.items()}
        self._seen_shards.add(final)
        log.debug("embedding cache: wrote %d entries to %s", len(self._buffer), final)
        self._buffer.clear()
        self._buffer_meta.clear()
        return final

    def close(self) -> None:
        """Flush what is buffered. The cache holds no open files, so this is all closing needs."""
        self.flush()

    def __enter__(self) -> EmbeddingCache:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        # Flush on errors too: the entries already buffered were computed correctly and are worth keeping.
        if exc_type is not None and self._buffer:
            log.info("embedding cache: flushing %d entries after %s", len(self._buffer), exc_type.__name__)
        self.flush()

    def _write_encoder_file(self) -> None:
        """Write ``encoder.json`` (encoder_id + settings) for people; warn if an existing one disagrees."""
        path = self.folder / ENCODER_FILE
        if path.is_dir() or (path.exists() and not path.is_file()):
            raise ConfigError(f"identity.cache_dir: {path} is not a file (a folder, FIFO or device where the cache "
                              "keeps its encoder description): move it away")
        description = _describe_encoder(self.encoder_id, self.settings)
        payload = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "namespace": self.namespace, **description}
        if path.exists():
            try:
                existing = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as err:
                log.warning("embedding cache: rewriting unreadable %s (%s)", path, err)
                existing = None
            if existing == payload:
                return
            if existing is not None:
                log.warning("embedding cache: %s disagrees with this encoder; rewriting it with %s", path, payload)
        _write_atomic_json(path, payload)

    def __repr__(self) -> str:
        return (
            f"EmbeddingCache(folder={str(self.folder)!r}, encoder_id={self.encoder_id!r}, entries={len(self)}, "
            f"shards={len(self.shards)}, buffered={len(self._buffer)}, skipped={len(self.skipped)})"
        )
