"""Errors that rloop raises for bad input or an impossible request.

Every message is one line that says what was wrong and how to fix it; the CLI prints it
and exits non-zero.
"""


class RloopError(Exception):
    """Base class: a problem the user can fix. The message is a single line."""


class ModelLoadError(RloopError):
    """A model could not be found or loaded."""


class UnsupportedArchitectureError(RloopError):
    """The model's architecture has no adapter."""


class PromptError(RloopError):
    """A prompt or prompt file is unusable (empty, too short for the window, bad format)."""


class ConfigError(RloopError):
    """An experiment setting is out of range (layer, window, head index, alpha, ...)."""


class RunStoreError(RloopError):
    """A run directory cannot be written or read."""
