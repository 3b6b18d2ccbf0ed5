"""Error types a user can act on. Each message says what was wrong, where, and what to do."""


class EvlError(Exception):
    """Base class for every error evl raises on purpose."""


class ConfigError(EvlError, ValueError):
    """A config file, key or value is wrong (unknown key, bad type, out of range)."""


class AnnotationError(EvlError, ValueError):
    """An annotation file or one of its rows cannot be parsed. Names file, row and field."""


class VideoDecodeError(EvlError):
    """A video cannot be opened or decoded. Names the file and the reason."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot decode video {self.path}: {reason}")


class NoDecodableClips(EvlError, ValueError):
    """None of the clips asked for could be decoded (each was skipped with a logged reason)."""


class CheckpointError(EvlError):
    """A checkpoint is missing, malformed, or does not match the model (lists the keys)."""
