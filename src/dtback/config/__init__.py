"""Typed configuration: one pydantic model tree loaded from YAML, plus ``--set key=value`` overrides.

The tree has one section per room (``data``, ``identity``, ``model``, ``training``, ``output``) and a top-level
``seed``. The seed project's flat keys (``learning_rate``, ``data_dir``, ...) keep their names: in a YAML file they
may be written at the top level (the seed's layout) or inside their section, and ``--set learning_rate=1e-4`` works
as well as ``--set training.learning_rate=1e-4``.

Every problem is reported before any work starts, as ``<source>: <key.path>: <what is wrong> (got <value>)``,
where the source is the YAML file or the ``--set`` argument that supplied the value.

Where things live: :mod:`~dtback.config.section` (rules every key shares), one module per section
(:mod:`~dtback.config.data`, :mod:`~dtback.config.identity`, :mod:`~dtback.config.model`,
:mod:`~dtback.config.training`), :mod:`~dtback.config.tree` (the whole tree, :class:`Config`),
:mod:`~dtback.config.yaml_core` (YAML read and written) and :mod:`~dtback.config.load` (file + overrides -> tree).
"""

from dtback.config.data import WORLD_FACES, BuildConfig, DataConfig, WorldConfig
from dtback.config.identity import IdentityConfig
from dtback.config.load import REMOVED_KEYS, RENAMED_KEYS, SEED_KEY_PATHS, SEED_KEYS, describe_keys, load_config
from dtback.config.model import ModelConfig, head_choices
from dtback.config.section import FLUX_PIXEL_MULTIPLE, MAX_SEED
from dtback.config.training import COMPILE_WITH_QUANTIZATION, TrainingConfig
from dtback.config.tree import Config, OutputConfig
from dtback.config.yaml_core import DuplicateKeyError
from dtback.errors import ConfigError

__all__ = [
    "COMPILE_WITH_QUANTIZATION",
    "FLUX_PIXEL_MULTIPLE",
    "MAX_SEED",
    "REMOVED_KEYS",
    "RENAMED_KEYS",
    "SEED_KEYS",
    "SEED_KEY_PATHS",
    "WORLD_FACES",
    "BuildConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "DuplicateKeyError",
    "IdentityConfig",
    "ModelConfig",
    "OutputConfig",
    "TrainingConfig",
    "WorldConfig",
    "describe_keys",
    "head_choices",
    "load_config",
]
