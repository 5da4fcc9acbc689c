"""Logging for mmx: one format, level from ``MMX_LOG_LEVEL`` (default INFO)."""

from __future__ import annotations

import logging
import os
import sys

_ROOT = "mmx"
_configured = False


def _configure() -> None:
    global _configured
    if _configured:
        return
    _configured = True
    root = logging.getLogger(_ROOT)
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
    root.setLevel(os.environ.get("MMX_LOG_LEVEL", "INFO").upper())
    root.propagate = True


def get_logger(name: str) -> logging.Logger:
    _configure()
    return logging.getLogger(name if name.startswith(_ROOT) else f"{_ROOT}.{name}")
