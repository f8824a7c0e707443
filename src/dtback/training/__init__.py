"""Training: features cached once, flow matching + identity losses, accelerate loop, checkpoints, validation."""
