"""Exceptions that end a command with a message for the user (no traceback): the CLI prints them and exits 2."""


class DtbackError(Exception):
    """Base class: the message names the file, key or value that is wrong and what would be right."""


class ConfigError(DtbackError):
    """The configuration (YAML file or ``--set`` override) is invalid."""


class DatasetError(DtbackError):
    """The dataset cannot be used (missing folder, nothing usable left, unknown validation character, ...)."""


class MissingModelError(DtbackError, FileNotFoundError):
    """A model folder or hub id is not available locally; the message says how to download it."""


class OnnxConversionError(DtbackError, ValueError):
    """The ONNX file holds something :class:`OnnxModule` cannot run (an unsupported op, a dangling input, ...)."""


class AdapterMismatchError(DtbackError):
    """An adapter checkpoint does not fit the base transformer or is not a dtback adapter."""


class TrainingDiverged(DtbackError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class CheckpointError(DtbackError):
    """A checkpoint could not be written (disk full, permissions) or read."""


class NoFaceError(DtbackError):
    """A reference image has no detectable face and a face was required."""


class DownloadError(DtbackError):
    """A download could not start or finish; the message says why and what to do."""


class GatedModelError(DownloadError):
    """The hub refused a gated repository: no token, or the licence is not accepted."""


class VideoError(DtbackError):
    """A video that cannot be opened or decoded; ``frames`` says how many samples were produced before the error."""

    def __init__(self, path, detail: str, frames: int = 0):
        super().__init__(f"{path}: {detail}")
        self.path = path
        self.detail = detail
        self.frames = frames
