"""User-facing errors: bad input that a person can fix.

Raise a subclass of ``RauError`` with a message that names the file and the problem; the CLI prints it as
``error: <message>`` and exits with status 2, never with a traceback.
"""


class RauError(Exception):
    """Base class for errors caused by the user's input (files, configs, arguments)."""


class DataError(RauError):
    """An image, label map, manifest or dataset on disk is missing, corrupt or inconsistent."""


class ConfigError(RauError):
    """A config file or argument has a wrong field or value."""
