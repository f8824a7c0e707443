"""dtback.io, the one atomic writer: a reader sees the old file (or folder) or the new one, never half of one."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from dtback import io


class Boom(Exception):
    pass


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """An empty folder of its own (``tmp_path`` also holds the suite's working folder)."""
    folder = tmp_path / "io"
    folder.mkdir()
    return folder


def _age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_failed_write_inside_atomic_path_keeps_the_old_file_and_leaves_no_temp(root: Path) -> None:
    target = root / "result.bin"
    target.write_bytes(b"old contents")
    with pytest.raises(Boom):
        with io.atomic_path(target) as tmp:
            assert tmp.parent == target.parent and io.is_temporary(tmp)
            tmp.write_bytes(b"half of the new")
            raise Boom
    assert target.read_bytes() == b"old contents"
    assert sorted(p.name for p in root.iterdir()) == ["result.bin"]


def test_interrupt_inside_atomic_path_removes_the_temp_too(root: Path) -> None:
    target = root / "result.bin"
    with pytest.raises(KeyboardInterrupt):
        with io.atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise KeyboardInterrupt
    assert list(root.iterdir()) == []


def test_atomic_path_replaces_the_file_and_makes_its_folder(root: Path) -> None:
    target = root / "new" / "folder" / "image.png"
    with io.atomic_path(target) as tmp:
        tmp.write_bytes(b"first")
    assert target.read_bytes() == b"first"
    with io.atomic_path(target, fsync=False) as tmp:
        assert not tmp.exists()  # a fresh name, never the target itself
        tmp.write_bytes(b"second")
    assert target.read_bytes() == b"second"
    assert [p.name for p in target.parent.iterdir()] == ["image.png"]


def test_write_bytes_and_text(root: Path) -> None:
    assert io.write_bytes(root / "a.bin", b"\x00\xff") == root / "a.bin"
    assert (root / "a.bin").read_bytes() == b"\x00\xff"
    io.write_text(root / "b.txt", "héllo\n", fsync=False)
    assert (root / "b.txt").read_bytes() == "héllo\n".encode("utf-8")


def test_write_json_round_trips(root: Path) -> None:
    data = {"b": [1, 2.5, None, True], "a": {"nested": "ü"}, "empty": {}}
    path = io.write_json(root / "sub" / "data.json", data)
    text = path.read_text(encoding="utf-8")
    assert json.loads(text) == data
    assert text.endswith("}\n") and not text.endswith("\n\n")
    io.write_json(path, data, indent=None, sort_keys=True)
    assert path.read_text(encoding="utf-8") == json.dumps(data, sort_keys=True) + "\n"
    assert [p.name for p in path.parent.iterdir()] == ["data.json"]


def test_write_json_that_cannot_serialise_keeps_the_old_file(root: Path) -> None:
    path = io.write_json(root / "data.json", {"ok": 1})
    with pytest.raises(TypeError):
        io.write_json(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"ok": 1}
    assert [p.name for p in root.iterdir()] == ["data.json"]


def test_replace_folder_swaps_the_folder_whole(root: Path) -> None:
    folder = root / "model"
    folder.mkdir()
    (folder / "old.bin").write_bytes(b"old")
    (folder / "keep").mkdir()
    with io.replace_folder(folder) as tmp:
        assert tmp.is_dir() and list(tmp.iterdir()) == [] and io.is_temporary(tmp)
        assert (folder / "old.bin").read_bytes() == b"old"  # untouched while the new one is written
        (tmp / "weights.bin").write_bytes(b"new")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "config.json").write_text("{}")
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) == ["sub", "sub/config.json", "weights.bin"]
    assert (folder / "weights.bin").read_bytes() == b"new"
    assert [p.name for p in root.iterdir()] == ["model"]  # no temporary or moved-aside folder left


def test_replace_folder_keeps_the_old_folder_when_the_block_raises(root: Path) -> None:
    folder = root / "model"
    folder.mkdir()
    (folder / "old.bin").write_bytes(b"old")
    with pytest.raises(Boom):
        with io.replace_folder(folder) as tmp:
            (tmp / "weights.bin").write_bytes(b"half")
            raise Boom
    assert [p.name for p in folder.iterdir()] == ["old.bin"]
    assert (folder / "old.bin").read_bytes() == b"old"
    assert [p.name for p in root.iterdir()] == ["model"]


def test_replace_folder_creates_a_new_folder(root: Path) -> None:
    folder = root / "a" / "b"
    with io.replace_folder(folder) as tmp:
        (tmp / "x").write_text("x")
    assert (folder / "x").read_text() == "x"
    with pytest.raises(Boom):
        with io.replace_folder(root / "never") as tmp:
            raise Boom
    assert not (root / "never").exists()
    assert sorted(p.name for p in root.iterdir()) == ["a"]


def test_temporary_names_are_unique_hidden_siblings(root: Path) -> None:
    target = root / "file.json"
    names = {io.temporary_name(target) for _ in range(200)}
    assert len(names) == 200
    for name in names:
        assert name.parent == root
        assert name.name.startswith(".file.json" + io.TMP_MARK)
        assert str(os.getpid()) in name.name
        assert io.is_temporary(name)


def test_is_temporary_only_for_io_names() -> None:
    assert io.is_temporary(Path(".x.json.tmp-12-abcdef01"))
    assert not io.is_temporary(Path("x.json"))
    assert not io.is_temporary(Path(".hidden"))
    assert not io.is_temporary(Path("notes.tmp-1"))  # not hidden: a user's file
    assert not io.is_temporary(Path(".gitignore"))


def test_remove_stale_temporaries_removes_only_old_io_temporaries(root: Path) -> None:
    old_file = io.temporary_name(root / "a.json")
    old_file.write_text("torn")
    old_folder = io.temporary_name(root / "checkpoint-000004")
    (old_folder / "adapter").mkdir(parents=True)
    (old_folder / "adapter" / "w.bin").write_bytes(b"w")
    fresh = io.temporary_name(root / "b.json")  # a live writer's
    fresh.write_text("being written")
    hidden = root / ".hidden"
    hidden.write_text("a user's file")
    kept = root / "result.json"
    kept.write_text("{}")
    lookalike = root / "notes.tmp-1"
    lookalike.write_text("not ours")
    for path in (old_file, old_folder, hidden, kept, lookalike):
        _age(path, 7200)

    assert io.remove_stale_temporaries(root, older_than=3600) == 2
    assert sorted(p.name for p in root.iterdir()) == sorted([fresh.name, ".hidden", "result.json", "notes.tmp-1"])
    assert io.remove_stale_temporaries(root, older_than=3600) == 0
    _age(fresh, 7200)
    assert io.remove_stale_temporaries(root) == 1
    assert not fresh.exists() and hidden.read_text() == "a user's file"


def test_remove_stale_temporaries_on_a_missing_folder(root: Path) -> None:
    assert io.remove_stale_temporaries(root / "absent") == 0


def test_fsync_helpers_accept_files_and_folders(root: Path) -> None:
    path = root / "f"
    path.write_bytes(b"x")
    io.fsync_file(path)
    io.fsync_dir(root)
    io.fsync_dir(root / "absent")  # a folder that cannot be opened is a no-op


def test_is_inside_follows_symlinks_and_dots_and_compares_whole_names(root: Path, monkeypatch) -> None:
    data = root / "a" / "b"
    (data / "alice").mkdir(parents=True)
    (root / "a" / "bc").mkdir()
    os.symlink(data / "alice", root / "into_data")
    os.symlink(root / "a" / "bc", data / "out_link")
    assert io.is_inside(data / "alice" / "run", data) and io.is_inside(data, data)  # below it, and the same path
    assert io.is_inside(root / "a" / "x" / ".." / "b" / "new", data)  # `..` walked before comparing
    assert not io.is_inside(data / ".." / "bc", data)
    assert not io.is_inside(root / "a" / "bc", data)  # a sibling whose name starts alike is not inside
    assert not io.is_inside(root / "a" / "b2" / "run", root / "a" / "b")
    assert io.is_inside(root / "into_data" / "run", data)  # a symlink leading in
    assert not io.is_inside(data / "out_link" / "run", data)  # and one leading out
    assert not io.is_inside(data, data / "alice")  # a parent is not inside its child
    monkeypatch.chdir(root / "a")
    assert io.is_inside("b/alice", data) and io.is_inside(data / "alice", "b")  # relative to the working folder
    os.symlink("loop", root / "loop")  # a symlink loop answers, it does not raise
    assert not io.is_inside(root / "loop" / "x", data) and io.is_inside(root / "loop" / "x", root)


def test_a_safetensors_file_is_judged_whole_from_its_header_and_size(tmp_path):
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "weights.safetensors"
    save_file({"a": torch.ones(4), "b": torch.zeros(2, 3)}, path)  # 40 bytes of tensors after the header
    data = path.read_bytes()
    assert io.safetensors_problem(path) is None
    path.write_bytes(data[:-7])
    assert io.safetensors_problem(path) == f"truncated: {len(data) - 7} of its {len(data)} bytes"
    path.write_bytes(data + b"\0")
    assert io.safetensors_problem(path) == f"{len(data) + 1} bytes where its header says {len(data)}"
    path.write_bytes(data[:20])
    assert io.safetensors_problem(path).startswith("truncated or not a safetensors file: a header of")
    path.write_bytes((4).to_bytes(8, "little") + b"[1] ")
    assert io.safetensors_problem(path) == "not a safetensors file: its header is not the JSON table of tensors"


def test_move_aside_keeps_every_damaged_copy(tmp_path):
    first = tmp_path / "best_model.pt"
    first.write_text("one")
    assert io.move_aside(first) == tmp_path / "best_model.pt.damaged" and not first.exists()
    first.write_text("two")
    (tmp_path / "base").mkdir()
    assert io.move_aside(first) == tmp_path / "best_model.pt.damaged-2"
    assert io.move_aside(tmp_path / "base") == tmp_path / "base.damaged"
    assert [(tmp_path / name).read_text() for name in ("best_model.pt.damaged", "best_model.pt.damaged-2")] == [
        "one", "two"]


def test_files_written_here_get_the_usual_mode_not_safetensors_0600(tmp_path):
    import torch
    from safetensors.torch import save_file

    assert io.FILE_MODE == 0o666 & ~_umask()
    with io.atomic_path(tmp_path / "a.safetensors") as tmp:
        save_file({"w": torch.ones(2)}, str(tmp))  # created 0o600 by safetensors, whatever the umask
    with io.replace_folder(tmp_path / "adapter") as folder:
        save_file({"w": torch.ones(2)}, str(folder / "weights.safetensors"))
    modes = [os.stat(path).st_mode & 0o777 for path in (tmp_path / "a.safetensors",
                                                        tmp_path / "adapter" / "weights.safetensors")]
    assert modes == [io.FILE_MODE, io.FILE_MODE]


def _umask() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def test_a_hard_link_to_a_users_file_keeps_the_users_mode(tmp_path):
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(b"jpeg")
    os.chmod(photo, 0o640)
    with io.atomic_path(tmp_path / "dataset" / "photo.jpg") as tmp:
        os.link(photo, tmp)  # the builder links photos instead of copying them where it can
    assert os.stat(photo).st_mode & 0o777 == 0o640 and (tmp_path / "dataset" / "photo.jpg").read_bytes() == b"jpeg"
