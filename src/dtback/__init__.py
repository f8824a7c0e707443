"""dtback: train identity preservation (face and body) into FLUX."""

__version__ = "0.1.0"
