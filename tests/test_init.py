"""dtback/__init__.py: the import-time messages of dependencies about code dtback does not run are dropped, narrowly."""

from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys

import pytest

from dtback import IMPORT_NOISE

# What each logger printed on import (torch 2.13, transformers 5.25, diffusers 0.42, torchao 0.18, bitsandbytes 0.50).
SEEN = {
    "transformers.utils.import_utils": "`CLIPImageProcessor` requires torchvision (not installed); falling back to "
                                       "`CLIPImageProcessorPil` for backward compatibility.",
    "torchao": "Failed to load /venv/lib/python3.11/site-packages/torchao/_C_mxfp8.cpython-310-x86_64-linux-gnu.so: "
               "Could not load this library: /venv/lib/python3.11/site-packages/torchao/_C_mxfp8.cpython-310-x86_64-"
               "linux-gnu.so",
    "torchao.kernel.intmm": "Warning: Detected no triton, on systems without Triton certain kernels will not work",
    "torch.utils._pytree": "<enum 'KernelPreference'> is an Enum subclass and is now natively supported by "
                           "torch.compile as an opaque value type. Calling register_constant() on Enum subclasses is "
                           "deprecated and will be an error in a future release.",
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community: Kernel repository "
                                     "'kernels-community/quantization-bitsandbytes' could not verify publisher trust "
                                     "status.",
    "diffusers.quantizers.torchao.torchao_quantizer": "Unable to import `torchao` Tensor objects. This may affect "
                                                      "loading checkpoints serialized with `torchao`",
}


def passes(name: str, message: str) -> bool:
    record = logging.LogRecord(name, logging.WARNING, __file__, 1, message, None, None)
    return bool(logging.getLogger(name).filter(record))


@pytest.mark.parametrize("name", sorted(SEEN))
def test_each_known_import_message_is_dropped_and_nothing_else_of_its_logger(name):
    assert sorted(IMPORT_NOISE) == sorted(SEEN)
    assert not passes(name, SEEN[name])
    assert passes(name, "Failed to quantize layer transformer_blocks.0.attn.to_q: out of memory")
    assert passes("dtback.model.memory", SEEN[name])  # the same words on dtback's own loggers are never dropped
    assert passes("torchao.quantization", SEEN[name])  # nor on another logger of the same library


@pytest.mark.skipif(importlib.util.find_spec("torchao") is None or importlib.util.find_spec("bitsandbytes") is None,
                    reason="the memory extra is not installed: pip install 'dtback[memory]'")
def test_importing_the_memory_extra_through_diffusers_prints_nothing():
    code = "import dtback, diffusers.pipelines.flux.pipeline_flux, torchao, bitsandbytes"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert result.stderr.splitlines() == []
