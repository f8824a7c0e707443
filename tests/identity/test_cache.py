"""Tests for the on-disk embedding cache: keys, namespaces, shards, interruption, two writers, corrupt files."""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dtback.identity import cache as cache_module
from dtback.identity.cache import EmbeddingCache, cache_namespace, content_hash
from dtback.io import is_temporary

ENCODER = "test-encoder"
SETTINGS = {"image_size": 112, "crop": "face_box_1.3"}


def temp_files(folder: Path) -> list[Path]:
    """The temporary files a writer left in ``folder`` (dtback.io names: ``.<name>.tmp-<pid>-<hex>``)."""
    return sorted(p for p in folder.iterdir() if is_temporary(p))


def make_entry(seed: int) -> dict[str, torch.Tensor]:
    """One entry shaped like real identity embeddings: several shapes and dtypes."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "face": torch.randn(512, generator=gen),
        "body_pooled": torch.randn(768, generator=gen).to(torch.float16),
        "body_tokens": torch.randn(4, 16, generator=gen).to(torch.bfloat16),
        "face_box": torch.tensor([seed, seed + 1, seed + 10, seed + 12], dtype=torch.int64),
        "has_face": torch.tensor(seed % 2 == 0),
    }


def key_of(index: int) -> str:
    """A stand-in content hash (64 hex digits) for entry ``index``."""
    return f"{index:064x}"


def assert_entry_equal(got: dict[str, torch.Tensor] | None, want: dict[str, torch.Tensor]) -> None:
    assert got is not None
    assert sorted(got) == sorted(want)
    for field, tensor in want.items():
        assert got[field].dtype == tensor.dtype, field
        assert got[field].shape == tensor.shape, field
        assert torch.equal(got[field], tensor), field


def open_cache(folder: Path, **kwargs) -> EmbeddingCache:
    return EmbeddingCache(folder, ENCODER, SETTINGS, **kwargs)


# ------------------------------------------------------------------------------------------------ keys


def test_content_hash_is_by_content_not_path(tmp_path: Path) -> None:
    data = bytes(range(256)) * 5000  # > 1 MiB, so the chunked read takes more than one chunk
    first, copy = tmp_path / "a.jpg", tmp_path / "renamed.png"
    first.write_bytes(data)
    copy.write_bytes(data)
    edited = tmp_path / "edited.jpg"
    edited.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))

    assert content_hash(first) == content_hash(copy)
    assert content_hash(first) != content_hash(edited)
    assert len(content_hash(first)) == 64
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert content_hash(empty) == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_namespace_changes_with_encoder_or_any_setting() -> None:
    base = cache_namespace(ENCODER, SETTINGS)
    assert base == cache_namespace(ENCODER, dict(reversed(list(SETTINGS.items()))))  # order does not matter
    assert len(base) == 16
    assert base != cache_namespace("other-encoder", SETTINGS)
    assert base != cache_namespace(ENCODER, {**SETTINGS, "image_size": 224})
    assert base != cache_namespace(ENCODER, {**SETTINGS, "crop": "person_box"})
    assert base != cache_namespace(ENCODER, {**SETTINGS, "extra": None})
    assert cache_namespace(ENCODER, {"size": (1, 2)}) == cache_namespace(ENCODER, {"size": [1, 2]})


def test_namespace_rejects_unserialisable_setting_by_name() -> None:
    with pytest.raises(TypeError, match="'device'"):
        cache_namespace(ENCODER, {"device": torch.device("cpu")})


# ------------------------------------------------------------------------------------------------ round trip


def test_round_trip_many_shapes_and_dtypes(tmp_path: Path) -> None:
    entries = {key_of(i): make_entry(i) for i in range(7)}
    cache = open_cache(tmp_path, shard_size=3)
    for key, entry in entries.items():
        assert cache.put(key, entry)
    # 7 puts with shard_size 3: two shards written automatically, one entry still buffered but visible.
    assert len(cache.shards) == 2
    assert len(cache) == 7
    for key, entry in entries.items():
        assert key in cache
        assert_entry_equal(cache.get(key), entry)
    assert cache.flush() is not None
    assert len(cache.shards) == 3
    assert cache.get(key_of(99)) is None
    assert key_of(99) not in cache
    for key, entry in entries.items():
        assert_entry_equal(cache.get(key), entry)


def test_put_copies_tensors_and_skips_known_keys(tmp_path: Path) -> None:
    cache = open_cache(tmp_path)
    face = torch.zeros(3)
    assert cache.put(key_of(1), {"face": face})
    face += 5  # the caller reusing its buffer must not change what was cached
    assert cache.put(key_of(1), {"face": torch.ones(3)}) is False
    cache.flush()
    assert cache.put(key_of(1), {"face": torch.ones(3)}) is False
    assert torch.equal(cache.get(key_of(1))["face"], torch.zeros(3))
    assert len(cache.shards) == 1


def test_persists_across_instances_with_metadata(tmp_path: Path) -> None:
    entries = {key_of(i): make_entry(i) for i in range(5)}
    with open_cache(tmp_path) as cache:
        for i, (key, entry) in enumerate(entries.items()):
            cache.put(key, entry, meta={"source": f"img{i}.jpg", "faces": i})
    again = open_cache(tmp_path)
    assert sorted(again.keys()) == sorted(entries)
    assert len(again) == 5
    for i, (key, entry) in enumerate(entries.items()):
        assert_entry_equal(again.get(key), entry)
        assert again.get_meta(key) == {"source": f"img{i}.jpg", "faces": i}
    assert again.get_meta(key_of(42)) is None
    encoder = (tmp_path / again.namespace / "encoder.json").read_text()
    assert '"encoder_id": "test-encoder"' in encoder and '"image_size": 112' in encoder


def test_open_reads_headers_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with open_cache(tmp_path, shard_size=2) as cache:
        for i in range(4):
            cache.put(key_of(i), make_entry(i))
    loaded: list[str] = []
    original = cache_module.safe_open

    class CountingOpen:
        def __init__(self, *args, **kwargs):
            self.inner = original(*args, **kwargs)

        def __enter__(self):
            handle = self.inner.__enter__()
            real_get = handle.get_tensor

            class Proxy:
                def __getattr__(self, name):
                    return getattr(handle, name)

                def get_tensor(self, name):
                    loaded.append(name)
                    return real_get(name)

            return Proxy()

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

    monkeypatch.setattr(cache_module, "safe_open", CountingOpen)
    fresh = open_cache(tmp_path)
    assert len(fresh) == 4
    assert loaded == []
    fresh.get(key_of(2))
    assert sorted(loaded) == sorted(f"{key_of(2)}/{field}" for field in make_entry(2))


def test_entries_not_visible_across_namespaces(tmp_path: Path) -> None:
    with open_cache(tmp_path) as cache:
        cache.put(key_of(1), make_entry(1))
    other_setting = EmbeddingCache(tmp_path, ENCODER, {**SETTINGS, "image_size": 224})
    other_encoder = EmbeddingCache(tmp_path, "another-encoder", SETTINGS)
    assert other_setting.namespace != cache.namespace != other_encoder.namespace
    for other in (other_setting, other_encoder):
        assert len(other) == 0
        assert other.get(key_of(1)) is None
    assert len(open_cache(tmp_path)) == 1
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "cwd") == sorted(  # cwd: conftest's working folder
        [cache.namespace, other_setting.namespace, other_encoder.namespace]
    )


def test_bad_keys_and_entries_are_rejected_with_names(tmp_path: Path) -> None:
    cache = open_cache(tmp_path)
    with pytest.raises(ValueError, match="'a/b'"):
        cache.put("a/b", {"face": torch.zeros(1)})
    with pytest.raises(ValueError, match="no tensors"):
        cache.put(key_of(1), {})
    with pytest.raises(TypeError, match="'face'"):
        cache.put(key_of(1), {"face": [0.0, 1.0]})
    with pytest.raises(TypeError, match="metadata"):
        cache.put(key_of(1), {"face": torch.zeros(1)}, meta={"path": Path("x")})
    assert len(cache) == 0
    with pytest.raises(ValueError, match="shard_size"):
        open_cache(tmp_path, shard_size=0)


# ------------------------------------------------------------------------------------------------ interruption


def test_failed_replace_leaves_no_entry_and_keeps_buffer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with open_cache(tmp_path) as cache:
        cache.put(key_of(0), make_entry(0))
    folder = cache.folder
    shard_before = {p.name: p.read_bytes() for p in folder.glob("shard-*")}

    writer = open_cache(tmp_path)
    writer.put(key_of(1), make_entry(1))

    def killed(src, dst):
        raise KeyboardInterrupt("simulated kill between write and rename")

    monkeypatch.setattr(cache_module.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        writer.flush()
    monkeypatch.undo()

    assert {p.name: p.read_bytes() for p in folder.glob("shard-*")} == shard_before  # old shard untouched
    assert temp_files(folder) == []  # the temp file was removed
    fresh = open_cache(tmp_path)
    assert fresh.keys() == [key_of(0)]
    assert fresh.skipped == {}

    # The buffered entry survived the failed flush; the next flush writes it.
    assert writer.flush() is not None
    fresh.refresh()
    assert sorted(fresh.keys()) == [key_of(0), key_of(1)]
    assert_entry_equal(fresh.get(key_of(1)), make_entry(1))


def test_leftover_temp_files_are_ignored_and_stale_ones_cleaned(tmp_path: Path) -> None:
    with open_cache(tmp_path) as cache:
        cache.put(key_of(0), make_entry(0))
    folder = cache.folder
    # What a kill mid-write leaves: a half-written temp file next to the shards.
    fresh_tmp = folder / ".shard-00000000000000000001-1-abc.safetensors.0001.tmp"
    stale_tmp = folder / ".shard-00000000000000000002-1-def.safetensors.0002.tmp"
    fresh_tmp.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"half")
    stale_tmp.write_bytes(b"\x10\x00\x00\x00")
    two_hours_ago = time.time() - 7200
    os.utime(stale_tmp, (two_hours_ago, two_hours_ago))

    reopened = open_cache(tmp_path)
    assert reopened.keys() == [key_of(0)]
    assert reopened.skipped == {}
    assert fresh_tmp.exists()  # might belong to a live writer in another process
    assert not stale_tmp.exists()

    with reopened:
        reopened.put(key_of(1), make_entry(1))
    assert len(open_cache(tmp_path)) == 2


def test_context_manager_flushes_on_exception(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="encoder crashed"):
        with open_cache(tmp_path) as cache:
            cache.put(key_of(0), make_entry(0))
            cache.put(key_of(1), make_entry(1))
            raise RuntimeError("encoder crashed on image 3")
    fresh = open_cache(tmp_path)
    assert sorted(fresh.keys()) == [key_of(0), key_of(1)]
    assert_entry_equal(fresh.get(key_of(1)), make_entry(1))


# ------------------------------------------------------------------------------------------------ corrupt shards


def test_corrupt_and_foreign_shards_are_skipped_with_a_counted_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with open_cache(tmp_path) as cache:
        cache.put(key_of(0), make_entry(0))
    folder = cache.folder
    good = next(folder.glob("shard-*.safetensors"))
    garbage = folder / "shard-00000000000000000001-1-garbage.safetensors"
    garbage.write_bytes(os.urandom(300))
    truncated = folder / "shard-00000000000000000002-1-truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    foreign = folder / "shard-00000000000000000003-1-foreign.safetensors"
    save_file({"weight": torch.zeros(2)}, str(foreign))

    with caplog.at_level(logging.WARNING, logger="dtback.identity.cache"):
        fresh = open_cache(tmp_path)
    assert fresh.keys() == [key_of(0)]
    assert_entry_equal(fresh.get(key_of(0)), make_entry(0))
    assert set(fresh.skipped) == {garbage, truncated, foreign}
    assert "not a dtback-embedding-cache shard" in fresh.skipped[foreign]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 3
    for path in (garbage, truncated, foreign):
        assert sum(str(path) in message for message in warned) == 1
    # A refresh does not warn again about shards it already skipped.
    caplog.clear()
    assert fresh.refresh() == 0
    assert caplog.records == []


def test_shard_damaged_after_open_is_skipped_on_get(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache = open_cache(tmp_path)
    cache.put(key_of(0), make_entry(0))
    shard = cache.flush()
    with open_cache(tmp_path) as second:
        second.put(key_of(0), make_entry(0))  # already known: not stored again
        second.put(key_of(1), make_entry(1))
    reader = open_cache(tmp_path)
    shard.write_bytes(b"garbage" * 10)
    with caplog.at_level(logging.WARNING, logger="dtback.identity.cache"):
        assert reader.get(key_of(0)) is None
    assert shard in reader.skipped
    assert key_of(0) not in reader
    assert_entry_equal(reader.get(key_of(1)), make_entry(1))
    assert any(str(shard) in r.getMessage() for r in caplog.records)


def damaged_cache(folder: Path) -> tuple[Path, Path]:
    """A cache of entries 0 and 1 in two shards, the first cut short (a full disk, an interrupted copy); returns the
    damaged shard and the good one."""
    with open_cache(folder, shard_size=1) as cache:
        cache.put(key_of(0), make_entry(0))
        cache.put(key_of(1), make_entry(1))
    damaged, good = cache.shards
    damaged.write_bytes(damaged.read_bytes()[:-100])
    return damaged, good


def test_a_damaged_shard_is_set_aside_once_and_the_next_run_is_quiet(tmp_path: Path, caplog) -> None:
    damaged, good = damaged_cache(tmp_path)
    torn = damaged.read_bytes()
    with caplog.at_level(logging.WARNING, logger="dtback.identity.cache"):
        first = open_cache(tmp_path)
    (warning,) = [r.getMessage() for r in caplog.records]
    assert warning.startswith(f"embedding cache: skipping {damaged}: unreadable shard: ")
    assert warning.endswith(f"; renamed to {damaged.name}.damaged (damaged shards set aside: 1): later runs do not "
                            "read it, and its entries are computed anew")
    assert first.set_aside == [damaged.with_name(damaged.name + ".damaged")]
    assert damaged.with_name(damaged.name + ".damaged").read_bytes() == torn and not damaged.exists()  # kept aside
    assert key_of(0) not in first and first.keys() == [key_of(1)]
    first.put(key_of(0), make_entry(0))  # computed anew
    first.flush()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dtback.identity.cache"):
        second = open_cache(tmp_path)  # was the same warning on every run, the entry never written again
    assert caplog.records == [] and second.skipped == {} and second.set_aside == []
    assert_entry_equal(second.get(key_of(0)), make_entry(0))


def test_a_shard_another_process_set_aside_first_is_not_counted(tmp_path: Path, monkeypatch, caplog) -> None:
    # Two ranks or two runs sharing the cache both found it damaged; the other renamed it between our read and ours.
    damaged, _ = damaged_cache(tmp_path)
    real = cache_module.move_aside

    def the_other_first(path: Path) -> Path:
        real(path)
        return real(path)

    monkeypatch.setattr(cache_module, "move_aside", the_other_first)
    with caplog.at_level(logging.WARNING, logger="dtback.identity.cache"):
        cache = open_cache(tmp_path)
    assert caplog.records[0].getMessage().endswith("; another process set it aside first")
    assert cache.set_aside == [] and cache.keys() == [key_of(1)]
    assert sorted(p.name for p in cache.folder.glob("shard-*")) == sorted([_.name, damaged.name + ".damaged"])


def test_a_shard_that_cannot_be_renamed_aside_is_still_skipped(tmp_path: Path, monkeypatch, caplog) -> None:
    damaged, _ = damaged_cache(tmp_path)

    def read_only(path: Path) -> Path:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(cache_module, "move_aside", read_only)
    with caplog.at_level(logging.WARNING, logger="dtback.identity.cache"):
        cache = open_cache(tmp_path)
    assert caplog.records[0].getMessage().endswith("; it cannot be renamed aside (Permission denied): skipped again "
                                                   "on every run until it is removed")
    assert damaged in cache.skipped and damaged.exists() and cache.keys() == [key_of(1)]


def test_shards_unreadable_for_now_or_of_another_version_are_never_renamed(tmp_path: Path, monkeypatch) -> None:
    damaged, good = damaged_cache(tmp_path)
    damaged.write_bytes(good.read_bytes())  # whole again
    real = cache_module.safe_open

    def no_permission(path, **kwargs):
        if Path(path) == damaged:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, **kwargs)

    monkeypatch.setattr(cache_module, "safe_open", no_permission)
    namespace = open_cache(tmp_path).namespace
    save_file({f"{key_of(5)}/face": torch.zeros(3)}, str(damaged.parent / "shard-future.safetensors"),
              metadata={"format": cache_module.FORMAT_NAME, "version": "99", "namespace": namespace})
    cache = open_cache(tmp_path)
    assert set(cache.skipped) == {damaged, damaged.parent / "shard-future.safetensors"} and cache.set_aside == []
    assert not list(damaged.parent.glob("*.damaged"))  # a newer dtback's shard, a permission to fix: left in place


# ------------------------------------------------------------------------------------------------ two processes

WORKER_SOURCE = textwrap.dedent(
    """
    import os
    from pathlib import Path

    import torch

    from dtback.identity.cache import EmbeddingCache


    def value(key: int) -> dict:
        gen = torch.Generator().manual_seed(key)
        return {"face": torch.randn(8, generator=gen), "box": torch.tensor([key, key + 1], dtype=torch.int32)}


    def write(folder: str, encoder_id: str, settings: dict, keys: list, start_event) -> None:
        start_event.wait(30)
        with EmbeddingCache(Path(folder), encoder_id, settings, shard_size=16) as cache:
            for key in keys:
                cache.put(f"{key:064x}", value(key))


    def write_then_die(folder: str, encoder_id: str, settings: dict, keys: list) -> None:
        # The process is killed after the shard's bytes are on disk but before the rename: no cleanup runs.
        os.replace = lambda src, dst: os._exit(9)
        cache = EmbeddingCache(Path(folder), encoder_id, settings)
        for key in keys:
            cache.put(f"{key:064x}", value(key))
        cache.flush()
    """
)


@pytest.fixture
def worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A module holding the child-process functions, importable by name so that spawned children find it."""
    module_dir = tmp_path / "worker_module"
    module_dir.mkdir()
    (module_dir / "dtback_cache_worker.py").write_text(WORKER_SOURCE)
    monkeypatch.syspath_prepend(str(module_dir))
    import dtback_cache_worker

    yield dtback_cache_worker
    sys.modules.pop("dtback_cache_worker", None)


def test_process_killed_mid_write_leaves_only_a_temp_file(tmp_path: Path, worker) -> None:
    folder = tmp_path / "cache"
    with EmbeddingCache(folder, ENCODER, SETTINGS) as cache:
        cache.put(f"{7:064x}", worker.value(7))
    shard_before = {p.name: p.read_bytes() for p in cache.folder.glob("shard-*")}

    proc = multiprocessing.get_context("spawn").Process(
        target=worker.write_then_die, args=(str(folder), ENCODER, SETTINGS, [1, 2, 3])
    )
    proc.start()
    proc.join(120)
    assert proc.exitcode == 9

    assert len(temp_files(cache.folder)) == 1  # the torn write, under a temp name only
    assert {p.name: p.read_bytes() for p in cache.folder.glob("shard-*")} == shard_before
    fresh = open_cache(folder)
    assert fresh.keys() == [f"{7:064x}"]
    assert fresh.skipped == {}
    with fresh:
        fresh.put(f"{1:064x}", worker.value(1))
    assert_entry_equal(open_cache(folder).get(f"{1:064x}"), worker.value(1))
    # Once the temp file is stale (older than an hour), the next open removes it.
    (torn,) = temp_files(cache.folder)
    two_hours_ago = time.time() - 7200
    os.utime(torn, (two_hours_ago, two_hours_ago))
    assert len(open_cache(folder)) == 2
    assert not torn.exists()


def test_two_processes_write_concurrently(tmp_path: Path, worker) -> None:
    shared = list(range(10_000, 10_050))
    # Each process puts 200 keys: 150 of its own and the 50 shared ones (in opposite orders) -> 350 distinct.
    keys_a = list(range(0, 150)) + shared
    keys_b = list(range(1_000, 1_150)) + shared[::-1]
    folder = tmp_path / "cache"
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    procs = [
        ctx.Process(target=worker.write, args=(str(folder), ENCODER, SETTINGS, keys, start))
        for keys in (keys_a, keys_b)
    ]
    for proc in procs:
        proc.start()
    start.set()
    for proc in procs:
        proc.join(120)
    assert [proc.exitcode for proc in procs] == [0, 0]

    fresh = open_cache(folder)
    assert fresh.skipped == {}
    # Each writer flushed its own shards of 16: at least 10 each for its 150 own keys.
    assert len(fresh.shards) >= 20
    expected = sorted(f"{key:064x}" for key in set(keys_a) | set(keys_b))
    assert len(keys_a) == len(keys_b) == 200
    assert len(expected) == 350
    assert sorted(fresh.keys()) == expected
    assert len(fresh) == 350
    for key in set(keys_a) | set(keys_b):
        assert_entry_equal(fresh.get(f"{key:064x}"), worker.value(key))
    assert temp_files(fresh.folder) == []


def test_get_many_reads_what_get_reads_opening_each_shard_once(tmp_path, monkeypatch):
    cache = open_cache(tmp_path, shard_size=4)
    for i in range(10):  # shards of 4, 4, and 2 entries still in the buffer
        cache.put(key_of(i), make_entry(i))
    assert len(cache.shards) == 2
    opened = []
    real_open = cache_module.safe_open

    def counting(path, *args, **kwargs):
        opened.append(Path(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(cache_module, "safe_open", counting)
    wanted = [key_of(i) for i in (9, 0, 5, 1, 0, 7, 3)] + [key_of(99)]  # buffered, repeated and missing keys too
    found = cache.get_many(wanted)
    assert sorted(opened) == sorted(cache.shards)  # one open per shard, not one per key
    assert set(found) == set(wanted) and found[key_of(99)] is None
    for i in (9, 0, 5, 1, 7, 3):
        assert_entry_equal(found[key_of(i)], make_entry(i))


def test_get_many_skips_a_shard_damaged_after_indexing(tmp_path, caplog):
    cache = open_cache(tmp_path, shard_size=2)
    for i in range(4):
        cache.put(key_of(i), make_entry(i))
    damaged = cache.shards[0]
    damaged.write_bytes(b"not a safetensors file")
    with caplog.at_level(logging.WARNING):
        found = cache.get_many([key_of(i) for i in range(4)])
    assert found[key_of(0)] is None and found[key_of(1)] is None  # lost with their shard, not a crash
    assert_entry_equal(found[key_of(2)], make_entry(2))
    assert damaged in cache.skipped and "unreadable shard on get_many" in caplog.text


# ------------------------------------------------------------------------------------- hostile cache folders


def test_a_fifo_or_folder_named_like_a_shard_is_skipped_not_waited_on(tmp_path: Path) -> None:
    """Opening a FIFO blocks until someone writes to it: a non-regular file is skipped before it is opened (in a
    child process with a time limit, so a regression fails instead of hanging the suite)."""
    import json
    import subprocess

    with open_cache(tmp_path) as cache:
        cache.put(key_of(0), make_entry(0))
    os.mkfifo(cache.folder / "shard-fifo.safetensors")
    (cache.folder / "shard-folder.safetensors").mkdir()
    (cache.folder / "shard-zero.safetensors").symlink_to("/dev/zero")
    code = textwrap.dedent(f"""
        import json
        from dtback.identity.cache import EmbeddingCache
        cache = EmbeddingCache({str(tmp_path)!r}, {ENCODER!r}, {SETTINGS!r})
        print(json.dumps({{"keys": cache.keys(), "skipped": {{p.name: r for p, r in cache.skipped.items()}}}}))
    """)
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:  # subprocess.run killed the child
        pytest.fail("opening the cache waited on a FIFO")
    assert done.returncode == 0, done.stderr[-2000:]
    fresh = json.loads(done.stdout.splitlines()[-1])
    assert fresh["keys"] == [key_of(0)]
    assert sorted(fresh["skipped"]) == ["shard-fifo.safetensors", "shard-folder.safetensors", "shard-zero.safetensors"]
    assert all("not a regular file" in reason for reason in fresh["skipped"].values())


def test_a_shard_of_another_cache_format_version_is_skipped(tmp_path: Path) -> None:
    cache = open_cache(tmp_path)
    save_file({f"{key_of(5)}/face": torch.zeros(3)}, str(cache.folder / "shard-future.safetensors"),
              metadata={"format": cache_module.FORMAT_NAME, "version": "99", "namespace": cache.namespace})
    fresh = open_cache(tmp_path)
    assert key_of(5) not in fresh and len(fresh) == 0
    reason = fresh.skipped[cache.folder / "shard-future.safetensors"]
    assert "version '99'" in reason and f"reads version {cache_module.FORMAT_VERSION!r}" in reason


@pytest.mark.parametrize("raised", ["oserror", "safetensors"])
def test_a_full_disk_is_one_error_naming_the_cache_and_keeps_the_entries(tmp_path, monkeypatch, raised) -> None:
    import errno

    from safetensors import SafetensorError

    from dtback.errors import DtbackError

    with open_cache(tmp_path) as cache:
        cache.put(key_of(0), make_entry(0))
    writer = open_cache(tmp_path)
    writer.put(key_of(1), make_entry(1))

    def full(tensors, path, metadata=None):
        Path(path).write_bytes(b"x" * 10)
        if raised == "safetensors":  # what safetensors' writer raises on a full disk (its I/O error, wrapped)
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache_module, "save_file", full)
    with pytest.raises(DtbackError) as caught:
        writer.flush()
    message = str(caught.value)
    assert str(writer.folder) in message and "No space left on device" in message and "1 entr" in message
    assert "\n" not in message
    monkeypatch.undo()
    assert temp_files(writer.folder) == []
    assert len(list(writer.folder.glob("shard-*"))) == 1  # the shard written before is untouched
    assert writer.flush() is not None  # the buffered entry was kept: written once there is room
    assert sorted(open_cache(tmp_path).keys()) == [key_of(0), key_of(1)]


def test_a_read_only_cache_folder_is_one_error_naming_it(tmp_path, monkeypatch) -> None:
    import errno

    from dtback.errors import ConfigError

    real_mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):
        if self.is_relative_to(tmp_path / "cache"):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(ConfigError, match=r"identity.cache_dir: cannot write .*cache.*Read-only file system"):
        open_cache(tmp_path / "cache")


def test_an_encoder_file_that_is_a_folder_is_named(tmp_path: Path) -> None:
    from dtback.errors import ConfigError

    cache = open_cache(tmp_path)
    (cache.folder / "encoder.json").unlink()
    (cache.folder / "encoder.json").mkdir()
    with pytest.raises(ConfigError, match=r"identity.cache_dir: .*encoder.json is not a file"):
        open_cache(tmp_path)
