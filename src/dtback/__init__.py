"""dtback: train identity preservation (face and body) into FLUX."""

import logging

__version__ = "0.1.0"


class _QuietTorchvisionFallback(logging.Filter):
    """transformers 5 warns on import that ``CLIPImageProcessor``/``SiglipImageProcessor`` fall back to their PIL
    versions without torchvision. dtback preprocesses images in torch itself, so the fallback is what it wants; the
    two lines only alarmed users at the start of every command."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed); falling back to" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_QuietTorchvisionFallback())
