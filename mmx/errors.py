"""Errors raised by more than one layer of mmx.

They live in a module that imports nothing from mmx, so that the modules raising them (the config reader, the
preset tables) depend on this one and not on each other.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value mmx cannot honour; ``key`` names the offending config key."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"config key {key!r}: {message}")
