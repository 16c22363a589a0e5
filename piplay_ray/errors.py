"""Errors about the user's input that the message fully explains: the CLI prints them without a traceback.

(`config.ConfigError` is the config file's own; it is caught beside these.)
"""

from __future__ import annotations


class UserInputError(ValueError):
    """Bad input the user can fix (a data file, a cluster too small for the config); the message says how."""
