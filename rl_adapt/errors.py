"""Exceptions that the command line turns into one clear message and a non-zero exit."""
from __future__ import annotations

from pathlib import Path


class RLAdaptError(Exception):
    """Base class of every error the project raises on purpose (bad input, bad config, bad state)."""


class InputError(RLAdaptError):
    """A user-supplied file or folder is missing, unreadable or inconsistent.

    :param path: the offending file or folder.
    :param problem: what is wrong with it, in words a user can act on.
    """

    def __init__(self, path: str | Path | None, problem: str):
        self.path = None if path is None else Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path is not None else problem)


class ConfigError(RLAdaptError):
    """A configuration file or override is invalid (unknown key, wrong type, bad value)."""


class TrainingDiverged(RLAdaptError):
    """A loss or a parameter became NaN/Inf; the last good checkpoint is left intact."""
