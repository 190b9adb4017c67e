"""What a user can get wrong, as exceptions whose message is one sentence that says what to do.

``train.py`` prints that sentence and exits with code 2: no traceback. Anything else that escapes
is a bug (or a bug in user-written reward code) and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input, or a run that cannot go on; the message is one sentence."""


class ConfigError(UserError, ValueError):
    """Options out of range, or parts of a run that do not fit together (a tokenizer bigger than
    the vocabulary, rewards that need other data)."""


class CheckpointError(UserError, ValueError):
    """A checkpoint file is missing, unreadable, of the wrong kind, or cannot be written."""


class DataError(UserError, ValueError):
    """Input data that cannot be used; the message names where and what is wrong."""


class TokenizerError(UserError, RuntimeError):
    """A tokenizer that cannot be loaded."""


class TrainingError(UserError, RuntimeError):
    """A run that cannot go on: updates that keep failing, or a trained model that is broken."""


class EnvironmentStepError(UserError, RuntimeError):
    """A multi-turn environment that raised, answered with something other than text, or never
    said done; the message names the environment and the turn."""


def require(ok: bool, message: str) -> None:
    """Raise ``ConfigError(message)`` unless ``ok``: for checking options at startup."""
    if not ok:
        raise ConfigError(message)
