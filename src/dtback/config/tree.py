"""The whole tree: one section per room (``data``, ``identity``, ``model``, ``training``, ``output``) and the
rules that span sections."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import Field, model_validator

from dtback.config.data import DataConfig
from dtback.config.identity import IdentityConfig
from dtback.config.model import ModelConfig
from dtback.config.section import MAX_SEED, _Section
from dtback.config.training import COMPILE_WITH_QUANTIZATION, TrainingConfig
from dtback.config.yaml_core import _QuotingDumper
from dtback.io import is_inside, write_text


class OutputConfig(_Section):
    """Where a run writes checkpoints and reports."""

    output_dir: Path = Field(Path("checkpoints/identity_preserving"), description="Run folder.")


class Config(_Section):
    """The whole configuration tree."""

    seed: int = Field(42, ge=0, le=MAX_SEED,
                      description="Seeds character selection, the split, pair sampling and training.")
    data: DataConfig = Field(default_factory=DataConfig)
    identity: IdentityConfig = Field(default_factory=IdentityConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    @model_validator(mode="after")
    def _run_outside_data(self) -> "Config":
        # The run's curves and samples are PNGs: inside data_dir they would be scanned as a character of their own.
        # is_inside answers for a looping data_dir too: the scan reports the loop, not a RuntimeError here
        if is_inside(self.output.output_dir, self.data.data_dir):
            raise ValueError(f"output.output_dir={self.output.output_dir} is inside data.data_dir="
                             f"{self.data.data_dir}: the run's own images would be read as a character; put the run "
                             "outside the dataset")
        cache = self.identity.cache_dir
        if cache is not None and is_inside(cache, self.data.data_dir):  # its folders would be scanned as characters
            raise ValueError(f"identity.cache_dir={cache} is inside data.data_dir={self.data.data_dir}: the scan "
                             "would read the cache's folders as characters; put the cache outside the dataset")
        return self

    @model_validator(mode="after")
    def _compile_with_int8(self) -> "Config":
        # torch 2.13 with torchao 0.18: AOT autograd refuses a graph with aliased outputs (FLUX's norms chunk one
        # projection into views) once torchao's int8 weights are among its inputs, so the first step would stop
        # with an inductor traceback (benchmarks/README, training step).
        if self.training.compile and self.model.base_quantization is not None:
            raise ValueError(f"training.compile=true with model.base_quantization={self.model.base_quantization}: "
                             f"{COMPILE_WITH_QUANTIZATION}; turn one of them off: compile speeds the bfloat16 base, "
                             "int8 saves memory")
        return self

    def cache_dir(self) -> Path:
        """The embedding cache folder: ``identity.cache_dir``, else ``<output_dir>/cache``."""
        return Path(self.identity.cache_dir) if self.identity.cache_dir is not None else self.output.output_dir / "cache"

    def to_yaml(self) -> str:
        return yaml.dump(self.model_dump(mode="json"), Dumper=_QuotingDumper, sort_keys=False)

    def save(self, path: Path) -> None:
        write_text(path, self.to_yaml())  # atomic: a reader sees the old config or the new one
