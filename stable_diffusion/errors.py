"""User-facing errors: the CLI prints their message and exits non-zero, without a traceback."""


class SDBenchError(Exception):
    """Base class for errors caused by user input (files, options, values)."""


class ConfigError(SDBenchError):
    """An unknown preset or an inconsistent configuration."""


class CheckpointError(SDBenchError):
    """A checkpoint file that is missing, corrupt, unsafe or of another architecture."""


class InputError(SDBenchError):
    """A bad generation or sweep option (steps, guidance, image size, ratios, ...)."""


def first_line(error: BaseException) -> str:
    """An exception's first message line (its type name when it has no message): for one-line reports."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
