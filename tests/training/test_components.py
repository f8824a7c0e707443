"""Training pieces on their own: losses, ArcFace warp, batches, checkpoints (atomic, disk full, keep-last-K)."""

from __future__ import annotations

import errno
import math
import random

import numpy as np
import pytest
import torch
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

from dtback.config import TrainingConfig
from dtback.training import checkpoint as ckpt
from dtback.training import checkpoint_load as vet
from dtback.training.batches import draw_pair_references, epoch_batches
from dtback.identity.crops import ARCFACE_TEMPLATE, similarity_transform, warp_to_template
from dtback.training.losses import flow_matching_loss, noisy_latents, person_weights, predict_x0, sample_sigmas


def test_sigmas_are_in_range_and_shift_up_with_resolution():
    cfg = TrainingConfig()
    small = sample_sigmas(cfg, 4096, 64, torch.Generator().manual_seed(0))
    large = sample_sigmas(cfg, 4096, 4096, torch.Generator().manual_seed(0))
    assert 0 < small.min() and small.max() < 1 and (large >= small).all() and large.mean() > small.mean() + 0.05
    plain = sample_sigmas(TrainingConfig(resolution_shift=False, timestep_sampling="uniform"), 20000, 4096,
                          torch.Generator().manual_seed(0))
    assert abs(float(plain.mean()) - 0.5) < 0.01


def test_flux2_sigmas_shift_as_its_pipelines_sample_at_that_many_steps():
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    uniform = TrainingConfig(timestep_sampling="uniform")
    u = sample_sigmas(TrainingConfig(timestep_sampling="uniform", resolution_shift=False), 64, 64,
                      torch.Generator().manual_seed(0))
    for steps in (4, 50):
        shift = math.exp(compute_empirical_mu(64, steps))
        expected = shift / (shift + (1 / u - 1))
        got = sample_sigmas(uniform, 64, 64, torch.Generator().manual_seed(0), empirical_mu_steps=steps)
        assert torch.allclose(got, expected, atol=1e-6)
    # FLUX.2 at 64 tokens samples far noisier than FLUX.1's calculate_shift would, and fewer steps shift it more
    flux1 = sample_sigmas(uniform, 64, 64, torch.Generator().manual_seed(0))
    few = sample_sigmas(uniform, 64, 64, torch.Generator().manual_seed(0), empirical_mu_steps=4)
    many = sample_sigmas(uniform, 64, 64, torch.Generator().manual_seed(0), empirical_mu_steps=50)
    assert float(many.mean()) > float(flux1.mean()) + 0.1 and (few >= many).all()


def test_flow_matching_identities():
    g = torch.Generator().manual_seed(0)
    x0, noise, sigma = torch.randn(3, 16, 8, generator=g), torch.randn(3, 16, 8, generator=g), torch.rand(3, generator=g)
    noisy = noisy_latents(x0, noise, sigma)
    velocity = noise - x0
    assert torch.allclose(flow_matching_loss(velocity, x0, noise), torch.zeros(3))
    assert torch.allclose(predict_x0(noisy, velocity, sigma), x0, atol=1e-6)
    assert torch.allclose(flow_matching_loss(velocity + 1, x0, noise), torch.ones(3))


def test_person_weights_cover_the_box_patches_and_keep_the_loss_scale():
    # 64 px image: 8 x 8 latent, 4 x 4 packed tokens of 16 px. Box over pixels x 16..40, y 0..20 -> columns 1-2, rows 0-1.
    boxes = torch.tensor([[16.0, 0.0, 40.0, 20.0], [0.0, 0.0, 64.0, 64.0]])
    weights = person_weights(boxes, (8, 8), 5.0)
    assert weights.shape == (2, 16)
    grid = weights[0].view(4, 4)
    inside = torch.zeros(4, 4, dtype=torch.bool)
    inside[0:2, 1:3] = True
    assert torch.allclose(grid[inside], grid[inside][0]) and torch.allclose(grid[~inside], grid[~inside][0])
    assert torch.allclose(grid[inside][0] / grid[~inside][0], torch.tensor(5.0))
    assert torch.allclose(weights.mean(dim=1), torch.ones(2))  # a box over everything: uniform weights
    assert torch.allclose(weights[1], torch.ones(16))
    # An error only outside the person counts less than the same error only inside.
    x0, noise = torch.zeros(1, 16, 4), torch.zeros(1, 16, 4)
    outside_error, inside_error = torch.zeros(1, 16, 4), torch.zeros(1, 16, 4)
    outside_error[0, ~inside.flatten()] = 1.0
    inside_error[0, inside.flatten()] = 1.0
    w = weights[:1]
    assert flow_matching_loss(outside_error, x0, noise, w) < flow_matching_loss(inside_error, x0, noise, w)


def test_similarity_transform_recovers_a_known_warp():
    angle, scale, shift = 0.3, 1.7, np.array([5.0, -3.0])
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    src = ARCFACE_TEMPLATE
    dst = (scale * rotation @ src.T).T + shift
    matrix = similarity_transform(src, dst)
    np.testing.assert_allclose(matrix[:, :2], scale * rotation, atol=1e-5)
    np.testing.assert_allclose(matrix[:, 2], shift, atol=1e-4)


def test_warp_to_template_is_identity_on_an_aligned_face_and_differentiable():
    pixels = torch.rand(2, 3, 112, 112, requires_grad=True)
    landmarks = torch.from_numpy(np.stack([ARCFACE_TEMPLATE] * 2))
    out = warp_to_template(pixels, landmarks, 112)
    assert torch.allclose(out[:, :, 2:-2, 2:-2], pixels[:, :, 2:-2, 2:-2], atol=1e-4)
    out.sum().backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0
    shifted = warp_to_template(pixels.detach(), landmarks + 10, 112)  # face 10 px right/down: content moves back
    assert torch.allclose(shifted[:, :, 20:90, 20:90], pixels.detach()[:, :, 30:100, 30:100], atol=1e-4)


class _Store:
    def __init__(self):
        self.bucket = torch.tensor([0, 0, 1, 1, 0, 1, 0, 0])
        self.character = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])

    def images_of(self, character):
        return torch.nonzero(self.character == character).flatten().tolist()


def test_epoch_batches_are_deterministic_single_bucket_and_cover_every_target():
    store = _Store()
    members = list(range(8))
    first = epoch_batches(store, members, 2, seed=1, epoch=0)
    assert first == epoch_batches(store, members, 2, seed=1, epoch=0)
    assert first != epoch_batches(store, members, 2, seed=1, epoch=1)
    assert sorted(i for batch in first for i in batch) == members
    assert all(len({int(store.bucket[i]) for i in batch}) == 1 for batch in first)


def test_references_are_other_images_of_the_same_character():
    store = _Store()
    for target in range(8):
        refs = draw_pair_references(store, target, 1, 3, seed=0, epoch=0)
        assert refs and target not in refs
        assert {int(store.character[r]) for r in refs} == {int(store.character[target])}
        assert refs == draw_pair_references(store, target, 1, 3, seed=0, epoch=0)


class _Adapter:
    def adapter_state_dict(self):
        return {}

    def save_pretrained(self, path, state=None):
        path.mkdir(parents=True)
        (path / "adapter_config.json").write_text("{}")


def _save(run_dir, progress, trainable, optimizer, scheduler, ema, keep):
    snapshot = ckpt.take_snapshot(_Adapter(), trainable, optimizer, ema)
    return ckpt.save_checkpoint(run_dir, progress, _Adapter(), snapshot, scheduler, keep)


def _training_objects(seed=0):
    torch.manual_seed(seed)
    layer = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=2, num_training_steps=20)
    ema = EMAModel(list(layer.parameters()), decay=0.9)
    return layer, optimizer, scheduler, ema


def _train(layer, optimizer, scheduler, ema, steps):
    for _ in range(steps):
        layer(torch.randn(5, 4)).square().mean().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        ema.step(list(layer.parameters()))


def test_checkpoint_round_trip_resumes_identically(tmp_path):
    layer, optimizer, scheduler, ema = _training_objects()
    torch.manual_seed(1)
    _train(layer, optimizer, scheduler, ema, 3)
    progress = ckpt.Progress(step=3, epoch=1, batch=4, best_metric=0.5, best_step=2)
    folder = _save(tmp_path, progress, dict(layer.named_parameters()), optimizer, scheduler, ema, keep=2)
    drawn_after_save = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    torch.manual_seed(7)
    _train(layer, optimizer, scheduler, ema, 2)

    other, optimizer2, scheduler2, ema2 = _training_objects(seed=5)  # different initial weights
    assert vet.load_checkpoint(folder, dict(other.named_parameters()), optimizer2, scheduler2, ema2) == progress
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == drawn_after_save
    torch.manual_seed(7)
    _train(other, optimizer2, scheduler2, ema2, 2)
    for a, b in zip(layer.parameters(), other.parameters()):
        assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(ema.shadow_params, ema2.shadow_params))
    assert scheduler2.get_last_lr() == scheduler.get_last_lr()


def test_keep_last_k_and_latest(tmp_path):
    layer, optimizer, scheduler, ema = _training_objects()
    for step in (2, 4, 6, 8):
        _save(tmp_path, ckpt.Progress(step=step), dict(layer.named_parameters()), optimizer, scheduler, None, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-000006", "checkpoint-000008"]
    assert ckpt.latest_checkpoint(tmp_path).name == "checkpoint-000008"


def test_disk_full_leaves_no_torn_checkpoint_and_names_the_last_good_one(tmp_path, monkeypatch):
    layer, optimizer, scheduler, ema = _training_objects()
    trainable = dict(layer.named_parameters())
    good = _save(tmp_path, ckpt.Progress(step=1), trainable, optimizer, scheduler, ema, 3)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", full)
    with pytest.raises(ckpt.CheckpointError, match=r"No space left on device.*last good checkpoint is .*checkpoint-000001"):
        _save(tmp_path, ckpt.Progress(step=2), trainable, optimizer, scheduler, ema, 3)
    folder = tmp_path / ckpt.CHECKPOINTS
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint-000001"]
    assert (good / "state.json").is_file()


def test_fsdp_refuses_accelerates_own_fsdp_and_untested_memory_modes():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from dtback.config import ConfigError, load_config
    from dtback.training.trainer import check_distributed

    ranks = lambda n, kind=DistributedType.MULTI_CPU: SimpleNamespace(num_processes=n, distributed_type=kind)  # noqa: E731
    fsdp = ["training.distributed=fsdp", "model.use_simple_model=false"]
    check_distributed(load_config(None, fsdp), ranks(2))
    for extra, named in (("model.base_quantization=int8", "model.base_quantization"),
                         ("training.optimizer=adamw8bit", "adamw8bit"), ("model.lora_rank=4", "model.lora_rank")):
        cfg = load_config(None, [*fsdp, extra])
        with pytest.raises(ConfigError, match=named):
            check_distributed(cfg, ranks(2))
        check_distributed(cfg, ranks(1))  # one rank shards nothing: the memory modes work as usual
    with pytest.raises(ConfigError, match="distributed_type: FSDP.*training.distributed=fsdp"):
        check_distributed(load_config(None, []), ranks(2, DistributedType.FSDP))


def test_the_validation_grid_shows_a_reference_upright_and_a_vanished_one_grey(tmp_path, caplog):
    import logging
    from types import SimpleNamespace

    from PIL import Image

    from dtback.config import DataConfig
    from dtback.training.setup import RunParts

    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = 255  # left half white, as the camera held it
    stored = Image.fromarray(pixels).rotate(90, expand=True)  # the sensor's pixels: 40 high, 20 wide
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: turn 90 degrees clockwise to view
    stored.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    parts = SimpleNamespace(cfg=SimpleNamespace(data=DataConfig(data_dir=str(tmp_path))))
    shown = np.asarray(RunParts._reference_picture(parts, tmp_path / "phone.jpg"))
    assert shown.shape == (20, 40, 3)  # upright, as training read it (was 40 x 20: the stored pixels)
    assert shown[:, :15].mean() > 240 and shown[:, 25:].mean() < 15
    with caplog.at_level(logging.WARNING):
        grey = RunParts._reference_picture(parts, tmp_path / "gone.jpg")
    assert np.asarray(grey).mean() == 128 and "gone.jpg is no longer readable" in caplog.text
