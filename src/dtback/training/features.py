"""Everything a training step reads, computed once: VAE latents, text embeddings, identity embeddings and boxes.

The frozen parts of the pipeline (VAE, CLIP, T5, face and body encoders) run once per image or caption before
training, and their outputs are cached on disk (:class:`~dtback.identity.cache.EmbeddingCache`, safetensors keyed
by image content hash and model fingerprint), so a second run — or a resumed one — starts training immediately.
The :class:`FeatureStore` holds them in memory for the run.

Boxes are converted from the original image's pixels into the pixels of the training image (its bucket), where the
identity losses crop the decoded prediction.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from diffusers import AutoencoderKLFlux2
from tqdm.auto import tqdm

from dtback.config import DataConfig
from dtback.data.buckets import assign_bucket, bucket_transform, make_buckets, resize_to_bucket
from dtback.data.images import ImageSkip, SkipReason, load_rgb
from dtback.data.layout import CharacterEntry
from dtback.data.pairs import caption_for, to_tensor
from dtback.errors import DatasetError
from dtback.identity.crops import BodyCropRule, person_box
from dtback.identity.cache import EmbeddingCache, content_hash
from dtback.model.flux2 import decode_flux2_latents, encode_flux2_captions, encode_flux2_latents
from dtback.model.identity_flux import base_family

logger = logging.getLogger(__name__)

LATENT_DTYPE = torch.float16
TEXT_DTYPE = torch.float16
SMALL_MODEL_PARAMS = 200_000_000  # models below this size are fingerprinted by their weights, larger ones by config


def module_fingerprint(module: torch.nn.Module) -> str:
    """Identify a frozen model for cache namespaces: config + weights for small models (the simple model's
    components change when it is rebuilt), config + source path for large ones (hashing 10 GB would be slow)."""
    digest = hashlib.sha256()
    config = getattr(module, "config", None)
    config_dict = dict(config) if isinstance(config, dict) else (config.to_dict() if config is not None else {})
    config_dict = {k: v for k, v in config_dict.items() if not k.startswith("_") and k != "transformers_version"}
    digest.update(json.dumps(config_dict, sort_keys=True, default=str).encode())
    params = list(module.state_dict().items())
    if sum(t.numel() for _, t in params) <= SMALL_MODEL_PARAMS:
        for name, tensor in params:
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())  # 0-dim too
    else:
        digest.update(str(getattr(config, "_name_or_path", "")).encode())
    return f"{type(module).__name__}@{digest.hexdigest()[:16]}"


@dataclass
class FeatureStore:
    """Per-image features of the kept images (index ``i``) and per-caption text embeddings (index ``c``).

    ``latents[i] (C, h, w)``; ``caption[i]`` indexes ``prompt_embeds (U, S, Dt)`` / ``pooled_embeds (U, Dp)``,
    where caption 0 is the empty caption (caption dropout); ``face_embeds (N, Df)`` + ``face_valid (N,)`` +
    ``face_boxes (N, 4)`` + ``face_landmarks (N, 5, 2)`` in training-image pixels; ``body_pooled (N, Db)``,
    ``body_tokens (N, T, Db)``, ``body_valid (N,)``, ``body_boxes (N, 4)``. ``character[i]`` indexes
    ``characters``; ``bucket[i]`` indexes ``buckets``.
    """

    keys: list[str]
    characters: list[str]
    character: torch.Tensor
    bucket: torch.Tensor
    buckets: list[tuple[int, int]]
    latents: list[torch.Tensor]
    caption: torch.Tensor
    captions: list[str]
    prompt_embeds: torch.Tensor
    pooled_embeds: torch.Tensor | None  # FLUX.2 has no pooled text embedding
    face_embeds: torch.Tensor | None
    face_valid: torch.Tensor
    face_boxes: torch.Tensor
    face_landmarks: torch.Tensor
    body_pooled: torch.Tensor | None
    body_tokens: torch.Tensor | None
    body_valid: torch.Tensor
    body_boxes: torch.Tensor
    skipped: dict[str, str]
    contents: list[str] = field(default_factory=list)  # content hash of each image (the caches' key)
    family: str = "flux1"  # the base family whose latents and text these are (dtback.model.identity_flux.base_family)

    def __len__(self) -> int:
        return len(self.keys)

    def fingerprint(self) -> str:
        """sha256 over every kept image's place and content: another dataset (or the same names with other
        pictures) gives another fingerprint. A resumed run compares it with its checkpoint's."""
        digest = hashlib.sha256()
        for key, content in sorted(zip(self.keys, self.contents)):
            digest.update(f"{key}\0{content}\n".encode())
        return digest.hexdigest()[:16]

    def images_of(self, character: int) -> list[int]:
        return torch.nonzero(self.character == character).flatten().tolist()


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor) -> torch.Tensor:
    """``pixels (B, 3, H, W)`` in [-1, 1] → FLUX-normalised latents ``(B, C, H/8, W/8)`` (the posterior mean; a
    FLUX.2 VAE's latents normalised as :func:`dtback.model.flux2.encode_flux2_latents` does)."""
    if isinstance(vae, AutoencoderKLFlux2):
        return encode_flux2_latents(vae, pixels)
    param = next(vae.parameters())
    pixels = pixels.to(param.device, param.dtype).contiguous(memory_format=torch.channels_last)
    latents = vae.encode(pixels).latent_dist.mean.float()
    shift = vae.config.shift_factor or 0.0
    return (latents - shift) * vae.config.scaling_factor


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`encode_latents` (differentiable): ``(B, C, h, w)`` → pixels ``(B, 3, 8h, 8w)`` ≈ [-1, 1]."""
    if isinstance(vae, AutoencoderKLFlux2):
        return decode_flux2_latents(vae, latents)
    param = next(vae.parameters())
    shift = vae.config.shift_factor or 0.0
    latents = latents.to(param.dtype) / vae.config.scaling_factor + shift
    latents = latents.contiguous(memory_format=torch.channels_last)
    return vae.decode(latents).sample


@torch.no_grad()
def encode_captions(pipeline, captions: Sequence[str], max_sequence_length: int, batch_size: int = 32):
    """``(prompt_embeds (U, S, Dt), pooled (U, Dp))`` through the pipeline's own ``encode_prompt``; FLUX.2 has no
    pooled embedding (None)."""
    flux2 = base_family(pipeline.transformer.config) == "flux2"
    embeds, pooled = [], []
    for start in range(0, len(captions), batch_size):
        chunk = list(captions[start:start + batch_size])
        if flux2:
            prompt, _ = encode_flux2_captions(pipeline, chunk, max_sequence_length)
        else:
            prompt, pool, _ = pipeline.encode_prompt(prompt=chunk, prompt_2=None, device=pipeline.text_encoder_2.device,
                                                     max_sequence_length=max_sequence_length)
            pooled.append(pool.to("cpu", TEXT_DTYPE))
        embeds.append(prompt.to("cpu", TEXT_DTYPE))
    return torch.cat(embeds), torch.cat(pooled) if pooled else None


def _map_box(box: np.ndarray, transform: tuple[float, float, float], size: tuple[int, int]) -> np.ndarray:
    scale, left, top = transform
    mapped = np.array([box[0] * scale - left, box[1] * scale - top, box[2] * scale - left, box[3] * scale - top])
    return np.clip(mapped, 0, [size[0], size[1], size[0], size[1]]).astype(np.float32)


def build_feature_store(
    pipeline,
    characters: Sequence[CharacterEntry],
    data_cfg: DataConfig,
    face_cache: EmbeddingCache,
    body_cache: EmbeddingCache | None,
    cache_dir: Path,
    max_sequence_length: int,
    crop_rule: BodyCropRule = BodyCropRule(),
    progress: bool = True,
) -> FeatureStore:
    """Latents (cached), captions (cached) and identity features (read from the filled identity caches) of every
    image of ``characters``. Images that became unreadable, or lack an identity entry, are skipped and named in
    ``skipped``; the identity caches must have been filled first (``IdentityPrecomputer.run``). Latents are
    encoded in the VAE's own dtype, never under a run's bf16 autocast: on the world, bf16-encoded latents (errors up
    to 0.02) cost the embedded default 0.015 reader accuracy (benchmarks/README.md)."""
    buckets = make_buckets(data_cfg.input_size, data_cfg.max_aspect_ratio, data_cfg.bucketing)
    vae = pipeline.vae
    latent_cache = EmbeddingCache(cache_dir / "latents", module_fingerprint(vae), {"buckets": buckets})
    rows: list[dict] = []
    skipped: dict[str, str] = {}
    images = [(c, char, entry) for c, char in enumerate(characters) for entry in char.images]
    encoder = _LatentBatcher(vae, latent_cache)
    with latent_cache, tqdm(total=len(images), desc="latents", unit="img", disable=not progress) as bar:
        for first in range(0, len(images), READ_CHUNK):  # cache reads per chunk: each shard opened once per chunk
            chunk = []
            for c, char, entry in images[first:first + READ_CHUNK]:
                key = _hash_or_skip(entry, char, skipped)
                if key is None:
                    bar.update()
                    continue
                chunk.append((c, char, entry, key))
            keys = [key for *_, key in chunk]
            latent_keys = [_latent_key(key, buckets[assign_bucket(entry.width, entry.height, buckets)])
                           for (_, _, entry, key) in chunk]
            stored = {"face": face_cache.get_many(keys),
                      "body": body_cache.get_many(keys) if body_cache is not None else {},
                      "latent": latent_cache.get_many(latent_keys)}
            for (c, char, entry, key), latent_key in zip(chunk, latent_keys):
                row = _image_row(entry, char, c, key, data_cfg, buckets, encoder, stored["face"][key],
                                 stored["body"].get(key), body_cache is not None, stored["latent"][latent_key],
                                 crop_rule, skipped)
                if row is not None:
                    rows.append(row)
                bar.update()
        encoder.flush()
    if not rows:
        raise ValueError("no usable training images: every image was skipped (see the log)")
    check_entry_shapes(rows, {"face": face_cache, "body_pooled": body_cache, "body_tokens": body_cache})
    captions = [""] + sorted({row["caption"] for row in rows})
    prompt_embeds, pooled = _cached_text(pipeline, captions, cache_dir, max_sequence_length, progress)
    caption_index = {text: i for i, text in enumerate(captions)}
    has_face = face_cache is not None and any(row["face"] is not None for row in rows)
    face_dim = next((row["face"].shape[0] for row in rows if row["face"] is not None), 0)
    return FeatureStore(
        keys=[row["key"] for row in rows],
        characters=[char.key for char in characters],
        character=torch.tensor([row["character"] for row in rows]),
        bucket=torch.tensor([row["bucket"] for row in rows]),
        buckets=buckets,
        latents=[row["latent"] for row in rows],
        caption=torch.tensor([caption_index[row["caption"]] for row in rows]),
        captions=captions,
        prompt_embeds=prompt_embeds,
        pooled_embeds=pooled,
        face_embeds=torch.stack([row["face"] if row["face"] is not None else torch.zeros(face_dim) for row in rows])
        if has_face else None,
        face_valid=torch.tensor([row["face"] is not None for row in rows]),
        face_boxes=torch.stack([row["face_box"] for row in rows]),
        face_landmarks=torch.stack([row["landmarks"] for row in rows]),
        body_pooled=torch.stack([row["body_pooled"] for row in rows]) if body_cache is not None else None,
        body_tokens=torch.stack([row["body_tokens"] for row in rows]) if body_cache is not None else None,
        body_valid=torch.tensor([body_cache is not None for _ in rows]),
        body_boxes=torch.stack([row["body_box"] for row in rows]),
        skipped=skipped,
        contents=[row["content"] for row in rows],
        family=base_family(pipeline.transformer.config),
    )


def check_entry_shapes(rows: list[dict], caches: dict[str, EmbeddingCache | None]) -> None:
    """Every row's ``field`` tensor has the shape most rows have; an entry of another shape (a cache edited by hand,
    or damaged with a valid header) would otherwise stop training at its first batch with a shape error."""
    for name, cache in caches.items():
        shapes: dict[tuple[int, ...], list[str]] = {}
        for row in rows:
            if row.get(name) is not None:
                shapes.setdefault(tuple(row[name].shape), []).append(row["key"])
        if len(shapes) > 1:
            common = max(shapes, key=lambda shape: len(shapes[shape]))
            odd = [f"{key} {shape}" for shape, keys in shapes.items() if shape != common for key in keys]
            where = cache.folder if cache is not None else "the identity cache"
            raise DatasetError(f"{where}: {name} entries of another shape than {common}: {', '.join(odd[:3])}"
                               f"{' ...' if len(odd) > 3 else ''}; the cache is damaged or was edited: delete "
                               "that folder (it is rebuilt from the images)")


class _LatentBatcher:
    """Encodes images through the VAE in batches per bucket size; rows get their latent when their batch runs."""

    def __init__(self, vae, cache: EmbeddingCache, batch_size: int = 32):
        self.vae, self.cache, self.batch_size = vae, cache, batch_size
        self.pending: dict[tuple[int, int], list[tuple[str, torch.Tensor, dict]]] = {}

    def add(self, key: str, size: tuple[int, int], pixels: torch.Tensor, row: dict) -> None:
        queue = self.pending.setdefault(size, [])
        queue.append((key, pixels, row))
        if len(queue) >= self.batch_size:
            self._encode(size)

    def flush(self) -> None:
        for size in list(self.pending):
            self._encode(size)

    def _encode(self, size: tuple[int, int]) -> None:
        queue = self.pending.pop(size, [])
        if not queue:
            return
        latents = encode_latents(self.vae, torch.stack([pixels for _, pixels, _ in queue])).to("cpu", LATENT_DTYPE)
        for (key, _, row), latent in zip(queue, latents):
            row["latent"] = latent.clone()
            self.cache.put(key, {"latent": row["latent"]})


READ_CHUNK = 256  # images whose cache entries build_feature_store reads together


def _latent_key(key: str, size: tuple[int, int]) -> str:
    return f"{key}-{size[0]}x{size[1]}"


def _hash_or_skip(entry, char, skipped: dict[str, str]) -> str | None:
    """The content hash of ``entry``'s file, or None, with the reason in ``skipped``, when the file went away or
    became unreadable since the scan (removed, moved, permissions changed while the run set up)."""
    try:
        return content_hash(entry.path)
    except OSError as err:
        rel = f"{char.key}/{entry.path.name}"
        skipped[rel] = SkipReason.UNREADABLE.value
        logger.warning("%s: unreadable (%s); left out of training", rel, err.strerror or err)
        return None


def _image_row(entry, char, c, key, data_cfg, buckets, encoder, face, body, wants_body, cached, crop_rule, skipped):
    """One training row from the image's cached identity entries (``face``, ``body``) and latent (``cached``, or
    None: encoded by ``encoder``); None, with the reason in ``skipped``, when it cannot be used."""
    rel = f"{char.key}/{entry.path.name}"
    bucket = assign_bucket(entry.width, entry.height, buckets)
    size = buckets[bucket]
    if face is None or (wants_body and body is None):
        skipped[rel] = "no identity cache entry (unreadable when precomputed)"
        return None
    latent_key = _latent_key(key, size)
    pixels = None
    if cached is None:
        try:
            image = load_rgb(entry.path, data_cfg.max_image_pixels)
        except ImageSkip as skip:
            skipped[rel] = skip.reason.value
            logger.warning("%s: %s (%s); left out of training", rel, skip.reason.value, skip.detail)
            return None
        pixels = to_tensor(resize_to_bucket(image, size))
    transform = bucket_transform(entry.width, entry.height, size)
    has_face = int(face["num_faces"]) > 0
    face_box = face["box"].numpy() if has_face else None
    body_box = np.array(person_box((entry.width, entry.height), face_box, crop_rule), dtype=np.float32)
    scale, left, top = transform
    landmarks = face["landmarks"].numpy() * scale - np.array([left, top]) if has_face else np.zeros((5, 2))
    row = {
        "key": rel, "content": key, "character": c, "bucket": bucket,
        "latent": cached["latent"] if cached is not None else None,
        "caption": caption_for(entry, char, data_cfg.caption_template),
        "face": face["embedding"].float() if has_face else None,
        "face_box": torch.from_numpy(_map_box(face_box, transform, size) if has_face else np.zeros(4, np.float32)),
        "landmarks": torch.from_numpy(landmarks.astype(np.float32)),
        "body_box": torch.from_numpy(_map_box(body_box, transform, size)),
        "body_pooled": body["pooled"].float() if body is not None else None,
        "body_tokens": body["tokens"] if body is not None else None,
    }
    if pixels is not None:
        encoder.add(latent_key, size, pixels, row)  # fills row["latent"] when its batch is encoded
    return row


def _cached_text(pipeline, captions: list[str], cache_dir: Path, max_sequence_length: int, progress: bool):
    encoders = "+".join(module_fingerprint(encoder) for encoder in (pipeline.text_encoder,
                                                                     getattr(pipeline, "text_encoder_2", None)) if encoder)
    cache = EmbeddingCache(cache_dir / "text", encoders, {"max_sequence_length": max_sequence_length})
    keys = [hashlib.sha256(text.encode("utf-8")).hexdigest() for text in captions]
    missing = [i for i, key in enumerate(keys) if key not in cache]
    with cache:
        if missing:
            logger.info("encoding %d captions (%d cached)", len(missing), len(captions) - len(missing))
            chunks = range(0, len(missing), 32)
            for start in tqdm(chunks, desc="captions", unit="batch", disable=not progress):
                chunk = missing[start:start + 32]
                embeds, pooled = encode_captions(pipeline, [captions[i] for i in chunk], max_sequence_length)
                for row, i in enumerate(chunk):
                    cache.put(keys[i], {"prompt": embeds[row], **({"pooled": pooled[row]} if pooled is not None else {})})
        stored = cache.get_many(keys)
        entries = [stored[key] for key in keys]
    pooled = torch.stack([e["pooled"] for e in entries]) if "pooled" in entries[0] else None
    return torch.stack([e["prompt"] for e in entries]), pooled
