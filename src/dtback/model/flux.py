"""The FLUX base: real FLUX.1 from a diffusers folder or hub id, or the simple model built in code.

Both are a diffusers ``FluxPipeline`` (``FluxTransformer2DModel``, ``AutoencoderKL``, ``CLIPTextModel`` +
``CLIPTokenizer``, ``T5EncoderModel`` + ``T5TokenizerFast``, ``FlowMatchEulerDiscreteScheduler``) loaded through
``FluxPipeline.from_pretrained``: the simple model is built with small configs and random weights, saved once in
diffusers format, and from then on loaded exactly like real FLUX. That is the one code path.

The simple model's tokenizers are built from an in-memory vocabulary (whole words for common caption words, single
characters as the fallback), so nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from pathlib import Path
from typing import Any, Callable

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

from dtback import devices
from dtback.config import ModelConfig
from dtback.errors import ConfigError, MissingModelError
from dtback.io import replace_folder, safetensors_problem
from dtback.model.flux2 import build_simple_flux2_pipeline
from dtback.model.simple_parts import CAPTION_WORDS, FLUX_SCHEDULER, SIMPLE_VAE, merge_words  # noqa: F401

logger = logging.getLogger(__name__)

# diffusers renamed from_pretrained's torch_dtype to dtype (the old name warns from 0.37 on).
DTYPE_KWARG = "dtype" if importlib.util.find_spec("diffusers.utils.deprecation_utils") else "torch_dtype"

MODEL_INDEX = "model_index.json"
PIPELINE_CLASSES = {"flux1": "FluxPipeline", "flux2": "Flux2Pipeline", "flux2_klein": "Flux2KleinPipeline"}
REAL_MAX_SEQUENCE_LENGTH = 512
SIMPLE_MAX_SEQUENCE_LENGTH = 32

# Hidden 128 (4 heads x 32), 2 double + 4 single blocks: ~3M parameters, trains on a laptop CPU in minutes.
SIMPLE_TRANSFORMER: dict[str, Any] = dict(
    patch_size=1,
    in_channels=16,  # 2x2 packed latents of a 4-channel VAE
    num_layers=2,
    num_single_layers=4,
    attention_head_dim=32,
    num_attention_heads=4,
    joint_attention_dim=64,  # T5 d_model
    pooled_projection_dim=64,  # CLIP hidden size
    guidance_embeds=False,  # trained from scratch with caption dropout: true CFG, not distilled guidance
    axes_dims_rope=(8, 12, 12),  # sums to attention_head_dim
)

def _bpe_pieces(word: str) -> list[str]:
    return list(word[:-1]) + [word[-1] + "</w>"]


def build_simple_tokenizers(words: list[str] = CAPTION_WORDS) -> tuple[CLIPTokenizer, T5TokenizerFast]:
    """CLIP (BPE) and T5 (unigram) tokenizers over ``words`` with a per-character fallback for any other word."""
    letters = "abcdefghijklmnopqrstuvwxyz0123456789"
    vocab: dict[str, int] = {}
    for piece in ["<|startoftext|>", "<|endoftext|>", *letters, *(c + "</w>" for c in letters), ",</w>", ".</w>"]:
        vocab.setdefault(piece, len(vocab))
    merges = merge_words(vocab, (_bpe_pieces(word) for word in dict.fromkeys(words)))
    clip = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    unigram = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    unigram += [("▁" + w, -1.0) for w in dict.fromkeys(words)] + [(c, -5.0) for c in letters + ",."]
    t5 = T5TokenizerFast(vocab=unigram, model_max_length=REAL_MAX_SEQUENCE_LENGTH)
    return clip, t5


def build_simple_pipeline(seed: int = 0, vae: AutoencoderKL | None = None,
                          transformer: dict[str, Any] | None = None) -> FluxPipeline:
    """The simple model with random weights (deterministic by ``seed``); ``vae`` replaces the random VAE (the
    transformer then takes 2x2 packs of its latent channels); ``transformer`` overrides keys of
    :data:`SIMPLE_TRANSFORMER` (the world base's recipe makes a wider one)."""
    fit = {"in_channels": 4 * vae.config.latent_channels} if vae is not None else {}
    transformer_config = {**SIMPLE_TRANSFORMER, **fit, **(transformer or {})}
    clip_tokenizer, t5_tokenizer = build_simple_tokenizers()
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        flux = FluxTransformer2DModel(**transformer_config)
        if vae is None:
            vae = AutoencoderKL(**SIMPLE_VAE)
        clip = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(clip_tokenizer), hidden_size=SIMPLE_TRANSFORMER["pooled_projection_dim"],
            intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
            projection_dim=SIMPLE_TRANSFORMER["pooled_projection_dim"],
            bos_token_id=clip_tokenizer.bos_token_id, eos_token_id=clip_tokenizer.eos_token_id,
            pad_token_id=clip_tokenizer.pad_token_id,
        ))
        t5 = T5EncoderModel(T5Config(
            vocab_size=len(t5_tokenizer), d_model=SIMPLE_TRANSFORMER["joint_attention_dim"], d_ff=128, d_kv=16,
            num_layers=2, num_heads=4, relative_attention_num_buckets=8, pad_token_id=t5_tokenizer.pad_token_id,
            eos_token_id=t5_tokenizer.eos_token_id,
        ))
    finally:
        torch.random.set_rng_state(generator_state)
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER),
        vae=vae,
        text_encoder=clip.eval(),
        tokenizer=clip_tokenizer,
        text_encoder_2=t5.eval(),
        tokenizer_2=t5_tokenizer,
        transformer=flux,
    )


def save_pipeline_atomic(pipeline: FluxPipeline, folder: Path) -> Path:
    """``save_pretrained`` into a temporary sibling folder, then swapped in: a killed save leaves no half folder."""
    with replace_folder(folder) as tmp:
        pipeline.save_pretrained(tmp, safe_serialization=True)
    return Path(folder)


FINGERPRINT_BYTES = 1 << 20  # read from each end of each transformer weight file


def base_content_id(folder: Path) -> str:
    """A content fingerprint of the FLUX base in ``folder`` (a diffusers pipeline folder), cheap for any size:
    sha256 over ``transformer/config.json`` and, for each transformer weight or index file (sorted), its name,
    size and first and last MiB. Another run's base, or the same run's base from another step, differs in the
    weights' bytes. An adapter records it (``spec.extra.base_content_id``) to be bound to its base."""
    transformer = Path(folder) / "transformer"
    config = transformer / "config.json"
    if not config.is_file():
        raise MissingModelError(f"FLUX base {folder} has no transformer/config.json: not a diffusers FluxPipeline folder")
    digest = hashlib.sha256(config.read_bytes())
    for weights in sorted(transformer.glob("*.safetensors*")):
        size = weights.stat().st_size
        digest.update(f"\n{weights.name}:{size}\n".encode())
        with open(weights, "rb") as handle:
            digest.update(handle.read(FINGERPRINT_BYTES))
            if size > 2 * FINGERPRINT_BYTES:
                handle.seek(size - FINGERPRINT_BYTES)
            digest.update(handle.read(FINGERPRINT_BYTES))
    return digest.hexdigest()


def damaged_weights(folder: Path) -> tuple[Path, str] | None:
    """The first safetensors file under ``folder`` (a base pipeline folder) that does not read whole, and why
    (:func:`dtback.io.safetensors_problem`, from headers and sizes alone); None when every one does."""
    for weights in sorted(Path(folder).rglob("*.safetensors")):
        problem = safetensors_problem(weights)
        if problem is not None:
            return weights, problem
    return None


def local_base_folder(source: str) -> Path | None:
    """The folder ``source`` names: itself when it is a folder, else a hub id's snapshot in the local Hugging Face
    cache (no network); None when it is neither."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download  # noqa: PLC0415

    try:
        return Path(snapshot_download(source, local_files_only=True))
    except (OSError, ValueError):  # not a hub id, or not downloaded: the caller says which it needed
        return None


def resolve_dtype(cfg: ModelConfig, device: str | torch.device = "cpu") -> torch.dtype:
    """``model.dtype``; ``auto``: bfloat16 for real FLUX on a GPU (its native dtype), float32 for the simple model
    or on a CPU (:func:`dtback.devices.resolve_dtype`)."""
    return devices.resolve_dtype(cfg.dtype, device, low_precision_ok=not cfg.use_simple_model)


def max_sequence_length(cfg: ModelConfig) -> int:
    """T5 prompt length: the config's, else 512 for real FLUX and 32 for the simple model."""
    if cfg.max_sequence_length is not None:
        return cfg.max_sequence_length
    return SIMPLE_MAX_SEQUENCE_LENGTH if cfg.use_simple_model else REAL_MAX_SEQUENCE_LENGTH


def simple_model_dir(cfg: ModelConfig, output_dir: Path) -> Path:
    return Path(cfg.simple_model_dir) if cfg.simple_model_dir is not None else Path(output_dir) / "simple_base"


def base_source(cfg: ModelConfig, output_dir: Path) -> str:
    """The folder or hub id :func:`load_base` reads."""
    return str(simple_model_dir(cfg, output_dir)) if cfg.use_simple_model else cfg.pretrained_model


def load_base(cfg: ModelConfig, output_dir: Path, seed: int = 0, device: str | torch.device = "cpu",
              local_files_only: bool = True, initial: Callable[[], FluxPipeline] | None = None) -> FluxPipeline:
    """Load the FLUX base as a ``FluxPipeline`` in :func:`resolve_dtype`, on the CPU, with nothing trainable.

    The simple model is first made by ``initial()`` (default: :func:`initial_simple_pipeline` without the identity
    world; :func:`dtback.backends.load_base` resolves ``world``) and saved to its folder when that folder holds no
    ``model_index.json``. Real FLUX must be a local diffusers folder or a hub id already in the Hugging Face cache.
    """
    dtype = resolve_dtype(cfg, device)
    if cfg.use_simple_model:
        folder = simple_model_dir(cfg, output_dir)
        if not (folder / MODEL_INDEX).is_file():
            made = initial() if initial is not None else initial_simple_pipeline(cfg, seed,
                                                                                 folder_vae(cfg.simple_vae, cfg.base))
            save_pipeline_atomic(made, folder)
        source = str(folder)
    else:
        source = cfg.pretrained_model
    pipeline = _from_pretrained(source, dtype, local_files_only, cfg.base)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):  # FLUX.2 has one text encoder
        component = getattr(pipeline, name, None)
        if component is not None:
            component.requires_grad_(False).eval()
    return pipeline


def pipeline_class(base: str) -> type:
    """The diffusers pipeline class of ``model.base``."""
    import diffusers  # noqa: PLC0415

    return getattr(diffusers, PIPELINE_CLASSES[base])


def initial_simple_pipeline(cfg: ModelConfig, seed: int, vae: AutoencoderKL | None) -> FluxPipeline:
    """The simple model a run starts from, as ``model.simple_base`` says: a diffusers folder, or random weights by
    ``seed`` (null); with ``vae`` (None: random weights). ``world`` is the identity world's, resolved by
    :func:`dtback.backends.initial_simple_pipeline`."""
    if cfg.simple_base is None:
        logger.info("building the simple %s model from random weights (seed %d)", cfg.base, seed)
        if cfg.base != "flux1":
            return build_simple_flux2_pipeline(seed, vae=vae, dev=cfg.base == "flux2")
        return build_simple_pipeline(seed, vae=vae)
    if cfg.simple_base == "world":
        raise ConfigError("model.simple_base=world is the identity world's base: load it through "
                          "dtback.backends.load_base, which knows the world components folder")
    folder = Path(cfg.simple_base).expanduser()
    if not (folder / MODEL_INDEX).is_file():
        raise MissingModelError(f"model.simple_base {folder} is not a diffusers FluxPipeline folder (no {MODEL_INDEX})")
    pipeline = pipeline_class(cfg.base).from_pretrained(folder, **({"vae": vae} if vae is not None else {}),
                                                        local_files_only=True, **{DTYPE_KWARG: torch.float32})
    return check_latent_channels(pipeline, f"model.simple_base {folder}")


def check_latent_channels(pipeline: FluxPipeline, source: str) -> FluxPipeline:
    """``pipeline`` when its FLUX.1 transformer takes 2x2 packs of its VAE's latent channels; a
    :class:`MissingModelError` naming ``source`` when the two were made for different VAEs (a 4-channel world base
    with a 16-channel world VAE would fail in the first forward with a bare shape error)."""
    transformer, vae = getattr(pipeline, "transformer", None), getattr(pipeline, "vae", None)
    if not isinstance(pipeline, FluxPipeline) or transformer is None or vae is None:
        return pipeline
    packed, channels = transformer.config.in_channels, vae.config.latent_channels
    if packed != 4 * channels:
        raise MissingModelError(
            f"{source}: its transformer takes {packed} packed latent channels (a {packed // 4}-channel VAE) but "
            f"its VAE has {channels}: rebuild the base against this VAE or choose the VAE it was trained with")
    return pipeline


def folder_vae(source: str | None, base: str = "flux1") -> AutoencoderKL | None:
    """The simple model's VAE from ``model.simple_vae`` when that is a diffusers folder (``AutoencoderKL``;
    ``AutoencoderKLFlux2`` for a FLUX.2 ``base``; None: random weights). ``world`` is resolved by
    :func:`dtback.backends.simple_vae`."""
    if source is None:
        return None
    if source == "world":
        raise ConfigError("model.simple_vae=world is the identity world's VAE: load it through dtback.backends")
    folder = Path(source)
    if not (folder / "config.json").is_file():
        raise MissingModelError(f"model.simple_vae {folder} is not a diffusers AutoencoderKL folder (no config.json)")
    if base != "flux1":
        from diffusers import AutoencoderKLFlux2  # noqa: PLC0415

        return AutoencoderKLFlux2.from_pretrained(folder)
    return AutoencoderKL.from_pretrained(folder)


def _from_pretrained(source: str, dtype: torch.dtype, local_files_only: bool, base: str = "flux1") -> FluxPipeline:
    path = Path(source).expanduser()
    hint = ("Download it first: `dtback download --only flux` (FLUX.1-dev; `--flux schnell` or a FLUX.2 name for "
            "another; FLUX.1-dev is gated: accept its licence on huggingface.co and log in with `hf auth login`), "
            "then point model.pretrained_model at the folder it prints.")
    if path.is_dir() and not (path / MODEL_INDEX).is_file():
        raise MissingModelError(f"FLUX folder {path} has no {MODEL_INDEX}: it is not a diffusers pipeline folder")
    if not path.exists() and (source.startswith((".", "/", "~")) or source.count("/") > 1):
        raise MissingModelError(f"FLUX folder {path} does not exist. {hint}")
    try:
        return pipeline_class(base).from_pretrained(source, **{DTYPE_KWARG: dtype}, local_files_only=local_files_only)
    except OSError as err:
        raise MissingModelError(
            f"FLUX base {source!r} is neither a diffusers folder nor in the local Hugging Face cache "
            f"({err.__class__.__name__}: {err}). {hint}"
        ) from err
