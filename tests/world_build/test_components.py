"""The world's component builds (``dtback.world_build``): each recipe runs on a few characters and steps, saves its
component, and the run-time loader of ``dtback.world`` reads it back; an outdated component is refused."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import AutoencoderKL

from dtback.errors import MissingModelError
from dtback.model.flux import SIMPLE_TRANSFORMER
from dtback.world.base import load_world_base
from dtback.world.encoders import WorldBodyEncoder, WorldFaceEncoder
from helpers import kill_when_half_done
from dtback.world.files import PACKAGED_WORLD_MODELS
from dtback.world.nets import Embedder, EmbedderConfig, load_net, save_net
from dtback.world.people import ATTRIBUTES
from dtback.world.reader import IdentityReader, ReaderConfig, ReaderNet
from dtback.world.vae import INFO_FILE, load_world_vae, world_vae_config
from dtback.world_build.base import BaseRecipe, build_world_base
from dtback.world_build.encoders import EncoderRecipe, build_body_component, build_face_components
from dtback.world_build.reader import ReaderRecipe, build_reader
from dtback.world_build.vae import VaeRecipe, build_world_vae

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TINY = world_vae_config(block_out_channels=(8, 8, 8, 8), norm_num_groups=4, sample_size=32)


@pytest.mark.slow
def test_vae_build_saves_and_from_pretrained_round_trips(tmp_path):
    recipe = VaeRecipe(characters=4, images_per_character=2, size=32, steps=2, batch=2, crop=32, eval_characters=2,
                       eval_images=1)
    figures = build_world_vae(tmp_path / "vae", recipe, config=TINY, progress=False)
    assert figures["scaling_factor"] > 0 and "held_out_psnr_db" in figures
    loaded = load_world_vae(tmp_path / "vae")
    assert isinstance(loaded, AutoencoderKL)
    assert loaded.config.scaling_factor == pytest.approx(figures["scaling_factor"])
    assert loaded.config.shift_factor == pytest.approx(figures["shift_factor"])
    again = AutoencoderKL.from_pretrained(tmp_path / "vae").eval()
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded.decode(loaded.encode(x).latent_dist.mode()).sample,
                           again.decode(again.encode(x).latent_dist.mode()).sample)
    info = json.loads((tmp_path / "vae" / INFO_FILE).read_text())
    (tmp_path / "vae" / INFO_FILE).write_text(json.dumps({**info, "world_version": -1}))
    with pytest.raises(MissingModelError, match="world version -1.*rebuild with `dtback world-components"):
        load_world_vae(tmp_path / "vae")


@pytest.mark.slow
def test_encoder_builds_run_and_round_trip_through_files(tmp_path):
    recipe = EncoderRecipe(characters=6, images_per_character=3, detector_steps=2, face_steps=2, body_steps=2,
                           batch=8, eval_characters=3, eval_images=2)
    darker = lambda images: (images.float() * 0.9).to(torch.uint8)  # stands in for a VAE round trip  # noqa: E731
    face_figures = build_face_components(tmp_path, recipe, progress=False, round_trip=darker)
    body_figures = build_body_component(tmp_path, recipe, progress=False)
    assert set(face_figures["held_out"]) == {"render", "decoded"}
    assert set(face_figures["held_out"]["decoded"]) == {"auc", "detection_rate", "mean_iou"}
    assert set(body_figures["held_out"]) == {"render"} and "auc" in body_figures["held_out"]["render"]
    face = WorldFaceEncoder.from_folder(tmp_path)
    body = WorldBodyEncoder.from_folder(tmp_path)
    crops = torch.rand(2, 3, 48, 48)
    assert face.torch_module()(crops).shape == (2, 128)
    assert body(torch.rand(2, 3, 64, 64)).tokens.shape == (2, 16, 128)
    net = Embedder(EmbedderConfig(size=16, widths=(4, 8), dim=8)).eval()
    save_net(net, tmp_path / "x", "tiny", {"note": 1})
    loaded, meta = load_net(tmp_path / "x", "tiny", Embedder)
    x = torch.rand(3, 3, 16, 16)
    assert torch.equal(net(x), loaded(x)) and meta["note"] == 1


@pytest.mark.slow
def test_reader_build_runs_and_round_trips(tmp_path):
    recipe = ReaderRecipe(characters=8, detector_steps=2, steps=2, batch=4, eval_characters=3, eval_images=1, size=64)
    figures = build_reader(tmp_path, recipe, progress=False, round_trip=lambda images: images // 2)
    assert set(figures["held_out_accuracy"]["render"]) == set(ATTRIBUTES)
    assert set(figures["held_out_accuracy"]["decoded"]) == set(ATTRIBUTES)
    loaded = IdentityReader.from_folder(tmp_path)
    assert loaded.name.startswith("world-reader:")
    net = ReaderNet(ReaderConfig(detector_size=32, detector_widths=(4,), face_size=16, face_widths=(4,), body_size=16,
                                 body_widths=(4, 8))).eval()
    save_net(net, tmp_path / "tiny", "reader", {})
    again, _ = load_net(tmp_path / "tiny", "reader", ReaderNet)
    x = torch.rand(2, 3, 32, 32)
    assert all(torch.equal(net(x)[k], again(x)[k]) for k in ATTRIBUTES)


@pytest.mark.slow
def test_base_build_runs_the_trainer_and_saves_a_loadable_base(tmp_path):
    # The real recipe with a few characters and steps, built from the VAE and encoders copied into its own
    # components folder (reached through data.world.components, no environment variable).
    folder = tmp_path / "components"
    folder.mkdir()
    for name in ("vae", "face_detector.json", "face_detector.safetensors", "face_encoder.json",
                 "face_encoder.safetensors", "body_encoder.json", "body_encoder.safetensors", "reader.json",
                 "reader.safetensors"):
        source = PACKAGED_WORLD_MODELS / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, folder / name)
    recipe = BaseRecipe(characters=12, images_per_character=3, steps=2, batch=4, warmup=1)
    figures = build_world_base(folder / "base", recipe, progress=False)
    assert figures["history"]["steps"] == 2 and figures["held_out"]["flow_loss"] > 0
    info = json.loads((folder / "base" / "world_base.json").read_text())
    assert info["recipe"]["characters"] == 12
    assert not (folder / "base" / "vae").exists()  # the world VAE ships once
    loaded = load_world_base(folder)
    assert loaded.transformer.config.num_layers == SIMPLE_TRANSFORMER["num_layers"]


def test_world_components_refuses_unknown_names_and_builds_on_the_vae(tmp_path):
    from dtback.errors import DtbackError
    from dtback.world_build.components import build_world_components

    with pytest.raises(DtbackError, match=r"unknown world components \['vea'\]"):
        build_world_components(tmp_path / "a", ["vea"])
    # The encoders learn from the VAE's round trips: without a VAE in the folder the build names the command.
    with pytest.raises(MissingModelError, match=f"dtback world-components --out {tmp_path / 'b'} --only vae"):
        build_world_components(tmp_path / "b", ["face"], progress=False)
    assert not (tmp_path / "b" / "components.json").exists()


# ------------------------------------------------------------------------------ bad arguments and damaged output


def test_an_out_that_is_a_file_or_inside_one_is_refused_before_any_work(tmp_path, monkeypatch):
    from dtback.cli import main
    from dtback.world_build import components

    monkeypatch.setattr(components, "_builders", lambda: pytest.fail("a component was built"))
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file", tmp_path / "file" / "sub"):
        assert main(["world-components", "--no-progress", "--out", str(out), "--only", "vae"]) == 2
    assert (tmp_path / "file").read_text() == "x"


def test_an_only_that_names_nothing_is_refused(tmp_path):
    from dtback.errors import DtbackError
    from dtback.world_build.components import build_world_components

    with pytest.raises(DtbackError, match="--only names no component"):
        build_world_components(tmp_path / "out", only=[])
    assert not (tmp_path / "out").exists()


def test_a_damaged_summary_is_set_aside_and_rewritten(tmp_path, monkeypatch, caplog):
    """components.json cut short by a kill (or edited by hand) is kept beside as components.json.damaged, named
    in a warning, and a new summary holds what this build measured."""
    from dtback.world.people import WORLD_VERSION
    from dtback.world_build import components

    (tmp_path / "components.json").write_text('{"world_version": ')
    monkeypatch.setattr(components, "_builders", lambda: {"vae": lambda folder, progress: {"psnr": 20.5}})
    summary = components.build_world_components(tmp_path, only=["vae"], progress=False)
    assert summary["components"]["vae"]["psnr"] == 20.5 and summary["world_version"] == WORLD_VERSION
    assert json.loads((tmp_path / "components.json").read_text())["components"]["vae"]["psnr"] == 20.5
    assert (tmp_path / "components.json.damaged").read_text() == '{"world_version": '
    assert "components.json" in caplog.text and "unreadable" in caplog.text


# ------------------------------------------------------------------------------------------------ a killed build

# `dtback world-components --only vae` in a child process: a tiny recipe, and diffusers' writer stops after its first
# file (flushed), as a kill inside save_pretrained leaves it; the child says so and waits to be killed.
KILLED_BUILD = """
import sys
from diffusers import AutoencoderKL
from dtback.cli import main
from dtback.world.vae import world_vae_config
from dtback.world_build import components, vae
def save(self, folder, *args, **kwargs):
    (folder / "config.json").write_text("{}")
    print("half", flush=True)
    sys.stdin.read()
AutoencoderKL.save_pretrained = save
recipe = vae.VaeRecipe(characters=4, images_per_character=2, size=32, steps=2, batch=2, crop=32, eval_characters=2,
                       eval_images=1)
tiny = world_vae_config(block_out_channels=(8, 8, 8, 8), norm_num_groups=4, sample_size=32)
components.build_world_vae = lambda folder, progress: vae.build_world_vae(folder, recipe, tiny, progress=progress)
main(["world-components", "--no-progress", "--only", "vae", "--out", sys.argv[1]])
"""


def tree(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_a_build_killed_while_saving_leaves_the_old_component_and_reruns_cleanly(tmp_path, monkeypatch):
    import os
    import time

    from dtback.io import TMP_MARK
    from dtback.world_build import components

    folder = tmp_path / "components"
    shutil.copytree(PACKAGED_WORLD_MODELS / "vae", folder / "vae")
    shutil.copy(PACKAGED_WORLD_MODELS / "components.json", folder / "components.json")
    before = tree(folder)
    kill_when_half_done(KILLED_BUILD, str(folder))
    (left,) = [p for p in folder.iterdir() if TMP_MARK in p.name]  # the half-saved VAE, hidden beside the old one
    assert left.name.startswith(".vae" + TMP_MARK) and left.is_dir()
    assert {k: v for k, v in tree(folder).items() if TMP_MARK not in k} == before  # the old component, untouched
    assert load_world_vae(folder / "vae").config.latent_channels == 4
    os.utime(left, (time.time() - 7200,) * 2)  # an hour later, the next build clears it and runs as usual
    monkeypatch.setattr(components, "_builders", lambda: {"vae": lambda folder, progress: {"psnr": 1.0}})
    summary = components.build_world_components(folder, only=["vae"], progress=False)
    assert summary["components"]["vae"]["psnr"] == 1.0 and not [p for p in folder.iterdir() if TMP_MARK in p.name]


def test_a_build_clears_what_a_killed_one_left_an_hour_ago_and_keeps_a_live_ones(tmp_path, monkeypatch):
    import os
    import time

    from dtback.world_build import components

    stale, live = tmp_path / ".vae.tmp-1-0000abcd", tmp_path / ".face_encoder.safetensors.tmp-2-0000abcd"
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    live.write_bytes(b"\0")
    os.utime(stale, (time.time() - 7200,) * 2)
    monkeypatch.setattr(components, "_builders", lambda: {"vae": lambda folder, progress: {"psnr": 1.0}})
    components.build_world_components(tmp_path, only=["vae"], progress=False)
    assert not stale.exists() and live.exists()
