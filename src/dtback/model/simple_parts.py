"""What the simple models of every FLUX family share (:mod:`dtback.model.flux`, :mod:`dtback.model.flux2`): the
VAE's blocks, the scheduler's settings, the caption words their in-memory tokenizers keep whole, and how those
tokenizers' BPE merges are built."""

from __future__ import annotations

from typing import Any, Iterable

# Four blocks: downsampling x8, like FLUX's VAE; 4 latent channels instead of 16.
SIMPLE_VAE: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[32, 64, 64, 64],
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=16,
    sample_size=128,
    use_quant_conv=False,
    use_post_quant_conv=False,
    scaling_factor=1.0,
    shift_factor=0.0,
)

# FLUX.1's scheduler settings: resolution-dependent shift of the sigmas.
FLUX_SCHEDULER: dict[str, Any] = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)

CAPTION_WORDS = """
a an the of in on at with and or to from by near under over behind front side left right up down
photo picture image portrait person man woman people character someone standing sitting walking running jumping
posing waving looking facing turned raised lowered arms arm hands hand legs one both head body full close shot view
indoor outdoor inside outside street city park forest beach mountain mountains room studio office garden field
desert snow sky sea river lake road bridge house building wall window door kitchen cafe restaurant shop market
day night morning evening sunset sunrise light lighting dark bright dim soft warm cold sunny cloudy rainy
background scene plain grey gray blue green red white black yellow orange purple pink brown
small large big tall short far center centre middle corner top bottom edge
camera cool daylight lit living out overcast sides stretched sunshine
""".split()


def merge_words(vocab: dict[str, int], words: Iterable[list[str]]) -> list[tuple[str, str]]:
    """BPE merges that join each word's pieces left to right into one token (added to ``vocab``)."""
    merges: list[tuple[str, str]] = []
    for pieces in words:
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            if pair not in merges:
                merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
            pieces = [pair[0] + pair[1], *pieces[2:]]
    return merges
