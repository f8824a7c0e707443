"""dtback: train identity preservation (face and body) into FLUX."""

import logging
import re

__version__ = "0.1.0"


class _QuietImportNoise(logging.Filter):
    """Drops the records of one dependency's logger whose message matches one of ``patterns``: messages printed when
    the dependency is imported, about code dtback does not run. Every other record of that logger passes."""

    def __init__(self, patterns: tuple[str, ...]):
        super().__init__()
        self.patterns = [re.compile(pattern) for pattern in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(pattern.search(message) for pattern in self.patterns)


# Logger → what it prints at import and why dtback's users need not see it. transformers and diffusers import
# torchao and bitsandbytes (the `memory` extra) whenever they are installed, so without these every command that loads
# a model would start with ~20 lines of them, memory mode or not.
IMPORT_NOISE = {
    # transformers 5: CLIP/Siglip image processors fall back to their PIL versions without torchvision; dtback
    # preprocesses images in torch itself, so the fallback is what it wants.
    "transformers.utils.import_utils": (r"requires torchvision \(not installed\); falling back to",),
    # torchao's prebuilt kernels for other Pythons and GPUs (mxfp8, cutlass sm90a); int8 weight-only uses none.
    "torchao": (r"^Failed to load \S*_C\w*\.\S*\.so: ",),
    # torchao's Triton matmul kernels; on a GPU torch brings Triton, on the CPU int8 weight-only does not use them.
    "torchao.kernel.intmm": (r"Detected no triton",),
    # torchao registers its enums with torch's pytree, which now tells library authors this is no longer needed.
    "torch.utils._pytree": (r"is an Enum subclass and is now natively supported by torch\.compile",),
    # bitsandbytes' 4-bit CPU matmul from the kernels hub; 8-bit AdamW (training.optimizer) does not use it.
    "bitsandbytes.backends.cpu.ops": (r"^Failed to load CPU gemm_4bit_forward from kernels-community",),
    # diffusers' safe globals for loading torchao-quantized diffusers checkpoints; dtback quantizes the base itself.
    "diffusers.quantizers.torchao.torchao_quantizer": (r"^Unable to import `torchao` Tensor objects",),
}
for _name, _patterns in IMPORT_NOISE.items():
    logging.getLogger(_name).addFilter(_QuietImportNoise(_patterns))
