"""The exceptions embedx raises for problems a user can fix.

Every message says what was expected, what was found and what to do.  The CLI
turns any ``EmbedxError`` into one line on stderr and exit code 1 (see
``embedx.cli.main``); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class EmbedxError(Exception):
    """Base class of every error embedx raises on purpose."""


class ConfigError(EmbedxError, ValueError):
    """An option or argument has a value embedx cannot use."""


class UnknownBackboneError(ConfigError):
    """A backbone name that is not in the registry (the message lists close names)."""


class WeightsNotFoundError(EmbedxError, FileNotFoundError):
    """Pretrained weights are not available offline."""


class ExportError(EmbedxError):
    """Exporting a torch model to ONNX failed or produced an unusable file."""


class ParityError(ExportError):
    """ONNX Runtime and torch disagree on the same input beyond tolerance."""


class OnnxModelError(EmbedxError):
    """An ONNX file that cannot be read, or a layer that does not exist in it."""


class DataError(EmbedxError):
    """An input data set (folder or manifest) that cannot be used as a whole."""


class ImageDecodeError(EmbedxError):
    """One image cannot be decoded; extraction records it and goes on."""


class CacheError(EmbedxError):
    """A feature cache that is unreadable, incomplete or of another schema."""


class CacheMismatchError(CacheError):
    """A cache built with other settings than the ones asked for."""


class CacheLockedError(CacheError):
    """Another process is writing the same cache."""


class HeadError(EmbedxError):
    """A classifier head used wrongly or loaded from a bad artifact."""


class NotFittedError(HeadError):
    """A head used before ``fit``."""


class FeatureMismatchError(HeadError):
    """Features of the wrong dimension or from another backbone than the head's."""


class BackendError(EmbedxError):
    """ONNX Runtime cannot run a model the way it was asked to (provider, precision)."""


class QuantizationError(BackendError):
    """int8 quantization failed or lost too much accuracy to be used."""


class ServeError(EmbedxError):
    """The HTTP server cannot start with the given model or options."""


class WriteError(EmbedxError):
    """An OSError while writing an artifact (a full disk, a read-only folder...): one line naming
    the file and the errno; the previous artifact, if any, is untouched."""
