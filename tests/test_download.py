"""dtback download against local stand-ins for the hub: a fake hub over HTTP, a closed port, a server that never
answers. Nothing leaves the machine."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from dtback.cli import EXIT_BAD_INPUT, EXIT_MISSING, main
from dtback.download import MANIFEST, DownloadError, GatedModelError, check_target, download_target, make_targets

SHA = "0123456789abcdef0123456789abcdef01234567"
BODY_FILES = {"config.json": b'{"model_type": "dinov2"}', "model.safetensors": b"w" * 3000,
              "preprocessor_config.json": b"{}", "pytorch_model.bin": b"never fetched"}


class FakeHub(BaseHTTPRequestHandler):
    """Enough of the hub's API for model_info and snapshot_download of one repo; or a gated refusal."""

    gated = False

    def log_message(self, *args) -> None:
        return None  # keep pytest output clean

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for key, value in {"Content-Length": str(len(body)), **headers}.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(body)

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        if self.gated:
            body = json.dumps({"error": "Access to model black-forest-labs/FLUX.1-dev is restricted."}).encode()
            return self._send(401, body, {"X-Error-Code": "GatedRepo", "X-Error-Message": "gated",
                                          "Content-Type": "application/json"})
        path = self.path.split("?")[0]
        if path.startswith("/api/models/") and "/tree/" in path:
            tree = [{"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                    for name, data in BODY_FILES.items()]
            return self._send(200, json.dumps(tree).encode(), {"Content-Type": "application/json"})
        if path.startswith("/api/models/"):
            siblings = [{"rfilename": name, "size": len(data),
                         "lfs": {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 130}
                         if name.endswith(".safetensors") else None} for name, data in BODY_FILES.items()]
            body = json.dumps({"id": "facebook/dinov2-small", "sha": SHA, "siblings": siblings}).encode()
            return self._send(200, body, {"Content-Type": "application/json"})
        name = path.split(f"/resolve/{SHA}/", 1)[-1]
        if name not in BODY_FILES:
            return self._send(404, b"", {"X-Error-Code": "EntryNotFound"})
        data = BODY_FILES[name]
        self._send(200, data, {"X-Repo-Commit": SHA, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                               "Content-Type": "application/octet-stream"})


@pytest.fixture(autouse=True)
def online_against_local_stand_ins(monkeypatch):
    """The suite runs with hub offline mode on (tests/conftest.py); these tests talk to servers on 127.0.0.1 only,
    so they turn it off for themselves, whatever the user's environment says."""
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def fake_hub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _url(server) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


def test_download_fetches_the_patterns_writes_the_manifest_and_verifies(fake_hub, tmp_path):
    body = make_targets(only=["body"])[0]
    report = download_target(body, tmp_path, timeout=5, sha256=True, endpoint=_url(fake_hub))
    assert report.complete and report.files == 3, report.problems()
    folder = tmp_path / "dinov2-small"
    assert (folder / "model.safetensors").read_bytes() == BODY_FILES["model.safetensors"]
    assert not (folder / "pytorch_model.bin").exists()  # not in the patterns: nothing to unpickle
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["revision"] == SHA and manifest["files"]["model.safetensors"]["size"] == 3000
    (folder / "model.safetensors").write_bytes(b"w" * 2999 + b"x")  # same size, other bytes
    assert check_target(body, tmp_path).complete  # sizes only
    assert check_target(body, tmp_path, sha256=True).wrong_hash == ["model.safetensors"]
    (folder / "model.safetensors").write_bytes(b"w" * 100)
    assert check_target(body, tmp_path).wrong_size == ["model.safetensors"]


def test_gated_repo_gets_the_token_and_licence_message(fake_hub, tmp_path):
    FakeHub.gated = True
    try:
        flux = make_targets(only=["flux"])[0]
        with pytest.raises(GatedModelError) as err:
            download_target(flux, tmp_path, timeout=5, endpoint=_url(fake_hub))
    finally:
        FakeHub.gated = False
    message = str(err.value)
    assert "black-forest-labs/FLUX.1-dev is a gated model" in message
    assert "accept the licence" in message and "huggingface-cli login" in message and "HF_TOKEN" in message


def test_no_network_fails_in_seconds_with_a_message(tmp_path):
    with socket.socket() as probe:  # a port nobody listens on: connection refused at once
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{port}", "OMP_NUM_THREADS": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "scripts/download_models.py", "--only", "body", "--models-dir",
                           str(tmp_path), "--timeout", "2"], env=env, capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[1])
    elapsed = time.perf_counter() - start
    assert done.returncode == EXIT_BAD_INPUT, done.stderr
    assert "cannot reach the Hugging Face hub" in done.stderr and f"127.0.0.1:{port}" in done.stderr
    assert elapsed < 20, elapsed  # interpreter start included; the hub part is below


def test_a_hub_that_never_answers_times_out_after_the_timeout(tmp_path):
    with socket.socket() as silent:  # accepts connections (backlog) and never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        body = make_targets(only=["body"])[0]
        start = time.perf_counter()
        with pytest.raises(DownloadError, match="cannot reach the Hugging Face hub .* within 1 s"):
            download_target(body, tmp_path, timeout=1, endpoint=f"http://127.0.0.1:{silent.getsockname()[1]}")
        assert time.perf_counter() - start < 5


def test_check_reports_what_is_missing_without_network(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    flux = tmp_path / "FLUX.1-dev"
    (flux / "transformer").mkdir(parents=True)
    (flux / "model_index.json").write_text("{}")
    (flux / "transformer" / "config.json").write_text("{}")
    shards = [f"diffusion_pytorch_model-0000{i}-of-00002.safetensors" for i in (1, 2)]
    (flux / "transformer" / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": shards[0], "b": shards[1]}}))
    (flux / "transformer" / shards[0]).write_bytes(b"x")
    partial = flux / ".cache" / "huggingface" / "download" / "vae"
    partial.mkdir(parents=True)
    (partial / "abc.incomplete").write_bytes(b"half")
    assert main(["download", "--check", "--models-dir", str(tmp_path), "--only", "flux"]) == EXIT_MISSING
    err = capsys.readouterr().err
    assert f"flux: missing transformer/{shards[1]}" in err and f"missing transformer/{shards[0]}" not in err
    assert "flux: missing vae/diffusion_pytorch_model.safetensors" in err and "missing model_index.json" not in err
    assert "flux: partial download vae/abc.incomplete" in err
    report = check_target(make_targets(only=["flux"])[0], tmp_path)
    assert report.files == 3 and len(report.missing) == 8


def test_check_passes_on_a_complete_folder_and_prints_the_settings(tmp_path, capsys):
    face = tmp_path / "antelopev2"
    face.mkdir()
    for name in ("scrfd_10g_bnkps.onnx", "glintr100.onnx"):
        (face / name).write_bytes(b"onnx")
    assert main(["download", "--check", "--models-dir", str(tmp_path), "--only", "face"]) == 0
    assert f"--set identity.face_backend=insightface --set identity.face_model_dir={face}" in capsys.readouterr().err
    assert main(["download", "--check", "--only", "flux,faces"]) == EXIT_BAD_INPUT
    assert "--only flux,faces: choose from flux,face,body" in capsys.readouterr().err


def test_flux2_choices_fetch_one_text_encoder_and_set_the_family(tmp_path, capsys):
    """FLUX.2 has one text encoder (no text_encoder_2); a complete folder prints the settings that load it."""
    klein = tmp_path / "FLUX.2-klein-base-4B"
    for name in ("model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
                 "transformer/config.json", "vae/config.json"):
        (klein / name).parent.mkdir(parents=True, exist_ok=True)
        (klein / name).write_text("{}")
    assert main(["download", "--check", "--models-dir", str(tmp_path), "--only", "flux",
                 "--flux", "flux2-klein-base-4b"]) == 0
    assert (f"--set model.base=flux2_klein --set model.use_simple_model=false --set model.pretrained_model={klein}"
            in capsys.readouterr().err)
    from dtback.download import make_targets

    (dev,) = make_targets("flux2-dev", only=["flux"])
    assert dev.repo_id == "black-forest-labs/FLUX.2-dev" and "model.base=flux2" in dev.also_set
    assert not any("text_encoder_2" in pattern for pattern in dev.patterns)


def test_a_target_folder_that_is_a_file_is_refused_before_the_network(tmp_path, monkeypatch, capsys):
    """models/dinov2-small left as a file: refused naming it before the hub is asked (offline or not), and
    --check says so instead of listing every file as missing."""
    import dtback.download as download

    (tmp_path / "dinov2-small").write_text("x")
    monkeypatch.setattr(download, "remote_files", lambda *a, **k: pytest.fail("the hub was asked"))
    assert main(["download", "--models-dir", str(tmp_path), "--only", "body"]) == EXIT_BAD_INPUT
    assert main(["download", "--models-dir", str(tmp_path), "--only", "body", "--check"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.count(f"{tmp_path / 'dinov2-small'} is a file, not a folder") == 2
    assert (tmp_path / "dinov2-small").read_text() == "x"
