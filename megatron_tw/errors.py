"""The project's user-facing error type (a leaf: every layer may raise it)."""


class ConfigError(ValueError):
    """A flag combination or input file that cannot work; the message names the flag or file
    and the fix. Entry points print it as one line (``<tool>: error: <message>``)."""
