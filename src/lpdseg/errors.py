"""User-facing exceptions.

Every error a user can cause (bad file, bad config value, incompatible
checkpoint) is one of these, with a message that names the file/key/value and
says what to do. ``assert`` is kept for internal invariants only.
"""

from __future__ import annotations


class LpdsegError(Exception):
    """Base class of every error lpdseg reports to a user."""


class DataError(LpdsegError):
    """A data file or folder is missing, unreadable or malformed."""


class ConfigError(LpdsegError):
    """A config key or value is unknown or invalid."""


class CheckpointError(LpdsegError):
    """A checkpoint or weights file cannot be used with this model."""


class TrainingError(LpdsegError):
    """Training cannot go on (e.g. too many non-finite losses in a row)."""
