"""User-facing errors: the CLI prints them as one line, without a traceback."""


class DipsenError(Exception):
    """An error caused by the user's input (a file, a value, a run folder)."""


class DataError(DipsenError):
    """A data file is missing, corrupt or not in the expected format. The message names the file."""


class ConfigError(DipsenError):
    """A configuration value or file is invalid. The message names the value; ``key`` is its field, if one."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key
