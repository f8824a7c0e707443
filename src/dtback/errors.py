"""Exceptions that end a command with a message for the user (no traceback): the CLI prints them and exits 2."""


class DtbackError(Exception):
    """Base class: the message names the file, key or value that is wrong and what would be right."""


class ConfigError(DtbackError):
    """The configuration (YAML file or ``--set`` override) is invalid."""


class DatasetError(DtbackError):
    """The dataset cannot be used (missing folder, nothing usable left, unknown validation character, ...)."""


class MissingModelError(DtbackError, FileNotFoundError):
    """A model folder or hub id is not available locally; the message says how to download it."""
