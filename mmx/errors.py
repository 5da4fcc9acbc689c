"""Errors raised by more than one layer of mmx.

They live in a module that imports nothing from mmx, so that the modules raising them (the config reader, the
preset tables, the tokenizer loader, training checkpoints) depend on this one and not on each other, and the CLI can
catch them without importing any of those.
"""

from __future__ import annotations

import errno


class ConfigError(ValueError):
    """A config value mmx cannot honour; ``key`` names the offending config key."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"config key {key!r}: {message}")


class FileFormatError(ValueError):
    """A file of a checkpoint (tokenizer, tokenizer config, chat template, ...) that does not parse or holds the
    wrong kind of value; ``path`` names the file."""

    def __init__(self, path: str, message: str):
        self.path = path
        super().__init__(f"{path}: {message}")


class DiskFullError(OSError):
    """No space left on the device being written (ENOSPC); the message names what was being written, and where."""

    def __init__(self, message: str):
        super().__init__(message)
        self.errno = errno.ENOSPC
