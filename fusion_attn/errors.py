"""The project's error types: each names what is wrong, so a tool can exit with a useful message."""


class FusionAttnError(Exception):
    """Base of every error this package raises on bad input."""


class MalformedMessageError(FusionAttnError, ValueError):
    """A sensor message that cannot become a frame (wrong length, unknown encoding, missing field, ...)."""


class CheckpointError(FusionAttnError):
    """A checkpoint that is corrupt, truncated, or does not match the model config."""


class ConfigError(FusionAttnError, ValueError):
    """A configuration value that is out of range or unknown."""


class BagError(FusionAttnError):
    """A recording that cannot be read (missing, truncated, no usable topic)."""


class BackendUnavailable(FusionAttnError):
    """An inference backend that cannot run here (no TensorRT, no GPU, an engine that cannot be built)."""
