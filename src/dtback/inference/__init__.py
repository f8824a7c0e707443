"""Inference: IdentityFluxPipeline and the generate command."""
