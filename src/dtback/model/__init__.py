"""The FLUX base (real or simple), identity resamplers and cross-attention adapters."""
