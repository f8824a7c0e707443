"""FLUX.2 bases ([klein] and [dev]) in diffusers, and a simple FLUX.2 [klein] model built in code (issue 20).

What differs from FLUX.1 (:mod:`dtback.model.flux`), and where the rest of dtback meets it:

- **text**: one encoder (Qwen3 for [klein], Mistral for [dev]); the hidden states of three of its layers are stacked
  per token (``joint_attention_dim`` = 3 x its width); no pooled embedding. Text tokens get positions on the fourth
  rope axis. :func:`encode_flux2_captions`.
- **latents**: ``AutoencoderKLFlux2`` (32 channels on the real model); 2 x 2 latent patches are normalised by the
  VAE's batch-norm running statistics (no ``scaling_factor``/``shift_factor``). dtback keeps latents unpatchified,
  ``(B, C, h, w)`` and already normalised, so its packing (``FluxPipeline._pack_latents``), flow-matching loss and
  person weights work unchanged: :func:`encode_flux2_latents`, :func:`decode_flux2_latents`.
- **transformer**: ``Flux2Transformer2DModel``; modulation shared by all blocks; its single blocks return one joint
  text + image tensor (the identity hooks split it: :mod:`dtback.model.adapters`).

The simple models are FLUX.2's pipelines with small configs, random weights and a byte-level tokenizer built in
memory (whole tokens for the caption words, bytes for anything else), saved in diffusers format and loaded with
``from_pretrained`` like the real ones: [klein] (``Flux2KleinPipeline``, a Qwen3 text encoder, true CFG, not
distilled) and [dev] (``Flux2Pipeline``, a Mistral 3 text encoder, guidance-distilled). Each text encoder has as many
layers as the pipeline's default stacked layers need (27 and 30), so no call passes other layers. The [dev]
tokenizer's chat template keeps the user's text only: FLUX.2 [dev]'s long system message would fill the simple
model's 32 prompt tokens.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel
from tokenizers import pre_tokenizers
from diffusers import Flux2Pipeline
from transformers import (
    Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig, Qwen2TokenizerFast, Qwen3Config,
    Qwen3ForCausalLM,
)

from dtback.model.simple_parts import CAPTION_WORDS, FLUX_SCHEDULER, SIMPLE_VAE, merge_words

TEXT_LAYERS = (9, 18, 27)  # Flux2KleinPipeline's default text_encoder_out_layers
DEV_TEXT_LAYERS = (10, 20, 30)  # Flux2Pipeline's
SIMPLE_TEXT_WIDTH = 32

# Hidden 128 (4 heads x 32), 2 double + 4 single blocks, like the simple FLUX.1 model.
SIMPLE_FLUX2_TRANSFORMER: dict[str, Any] = dict(
    patch_size=1,
    in_channels=16,  # 2x2 patches of a 4-channel VAE
    num_layers=2,
    num_single_layers=4,
    attention_head_dim=32,
    num_attention_heads=4,
    joint_attention_dim=len(TEXT_LAYERS) * SIMPLE_TEXT_WIDTH,
    timestep_guidance_channels=64,
    axes_dims_rope=(8, 8, 8, 8),  # (t, h, w, l), sums to attention_head_dim
    guidance_embeds=False,  # [klein] base: true CFG
)

# The simple FLUX.1 VAE's blocks; FLUX.2 normalises by batch-norm statistics instead of scaling and shift.
SIMPLE_FLUX2_VAE: dict[str, Any] = {key: value for key, value in SIMPLE_VAE.items()
                                    if key not in ("scaling_factor", "shift_factor")}

# Qwen3's chat markup, as much of it as Flux2KleinPipeline's prompt encoding uses.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Mistral's instruction markup around the user's text parts; the system message is left out (see the module doc).
DEV_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}[INST]{% for part in message['content'] %}"
    "{{ part['text'] }}{% endfor %}[/INST]{% endif %}{% endfor %}"
)


def build_simple_qwen_tokenizer(words: list[str] = CAPTION_WORDS) -> Qwen2TokenizerFast:
    """A byte-level BPE tokenizer (Qwen's kind): every byte is a token, so no text is unknown, and each caption word
    (with its leading space) merges into one token."""
    vocab = {symbol: i for i, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges = merge_words(vocab, (["Ġ", *word] for word in dict.fromkeys(words)))  # Ġ: the space before a word
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    return Qwen2TokenizerFast(vocab=vocab, merges=merges, chat_template=CHAT_TEMPLATE, model_max_length=512,
                              unk_token=None, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                              additional_special_tokens=["<|im_start|>", "<|im_end|>"])


def build_simple_flux2_pipeline(seed: int = 0, vae: AutoencoderKLFlux2 | None = None,
                                transformer: dict[str, Any] | None = None,
                                dev: bool = False) -> Flux2KleinPipeline | Flux2Pipeline:
    """The simple FLUX.2 [klein] model (``dev``: [dev]) with random weights (deterministic by ``seed``); ``vae``
    replaces the random VAE; ``transformer`` overrides keys of :data:`SIMPLE_FLUX2_TRANSFORMER`."""
    tokenizer = build_simple_qwen_tokenizer()
    if dev:
        tokenizer.chat_template = DEV_CHAT_TEMPLATE
    text = dict(vocab_size=len(tokenizer), hidden_size=SIMPLE_TEXT_WIDTH, intermediate_size=64, num_attention_heads=2,
                num_key_value_heads=1, head_dim=16, max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        flux2 = Flux2Transformer2DModel(**{**SIMPLE_FLUX2_TRANSFORMER, "guidance_embeds": dev, **(transformer or {})})
        if vae is None:
            vae = AutoencoderKLFlux2(**SIMPLE_FLUX2_VAE)
        if dev:  # Mistral 3 with the smallest vision tower its config accepts (text only is ever used)
            text_encoder = Mistral3ForConditionalGeneration(Mistral3Config(
                text_config=MistralConfig(**text, num_hidden_layers=max(DEV_TEXT_LAYERS)),
                vision_config=PixtralVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                  num_attention_heads=2, head_dim=8, patch_size=4, image_size=32),
                image_token_index=tokenizer.pad_token_id, spatial_merge_size=1,
            ))
        else:
            text_encoder = Qwen3ForCausalLM(Qwen3Config(**text, num_hidden_layers=max(TEXT_LAYERS),
                                                        tie_word_embeddings=True))
    finally:
        torch.random.set_rng_state(generator_state)
    parts = dict(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER), vae=vae.eval(),
                 text_encoder=text_encoder.eval(), tokenizer=tokenizer, transformer=flux2)
    return Flux2Pipeline(**parts) if dev else Flux2KleinPipeline(**parts, is_distilled=False)


def _latent_statistics(vae: AutoencoderKLFlux2, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(like.device, like.dtype)
    return mean, std


def encode_flux2_latents(vae: AutoencoderKLFlux2, pixels: torch.Tensor) -> torch.Tensor:
    """``pixels (B, 3, H, W)`` in [-1, 1] -> normalised latents ``(B, C, H/8, W/8)``: the VAE's mode, its 2 x 2
    patches normalised by the batch-norm running statistics (as ``Flux2KleinPipeline`` encodes images), then put
    back in place."""
    latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode()
    patches = Flux2KleinPipeline._patchify_latents(latents)
    mean, std = _latent_statistics(vae, patches)
    return Flux2KleinPipeline._unpatchify_latents((patches - mean) / std)


def decode_flux2_latents(vae: AutoencoderKLFlux2, latents: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`encode_flux2_latents`: normalised latents ``(B, C, h, w)`` -> pixels ``(B, 3, 8h, 8w)``
    ≈ [-1, 1]; differentiable (the identity losses decode the prediction through it)."""
    patches = Flux2KleinPipeline._patchify_latents(latents.to(vae.dtype))
    mean, std = _latent_statistics(vae, patches)
    raw = Flux2KleinPipeline._unpatchify_latents(patches * std + mean)
    return vae.decode(raw, return_dict=False)[0]


def encode_flux2_captions(pipeline: Flux2KleinPipeline | Flux2Pipeline, captions: list[str],
                          max_sequence_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(prompt_embeds (N, L, 3 x width), text_ids (N, L, 4))`` through the pipeline's own prompt encoding."""
    with torch.no_grad():
        return pipeline.encode_prompt(captions, device=pipeline.text_encoder.device,
                                      max_sequence_length=max_sequence_length)


def text_ids(length: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """FLUX.2's text positions ``(L, 4)``: (t, h, w, l) = (0, 0, 0, token index), as its pipelines give them."""
    index = torch.arange(length, device=device, dtype=torch.float32)
    return torch.stack([torch.zeros_like(index)] * 3 + [index], dim=1)


def image_ids(flux1_ids: torch.Tensor) -> torch.Tensor:
    """FLUX.2's image positions ``(N, 4)`` = (t, h, w, l) = (0, h, w, 0) from FLUX.1's ``(N, 3)`` = (0, h, w)."""
    return torch.nn.functional.pad(flux1_ids, (0, 1))
