"""Where the embedded mmx-tiny model lives (a checkpoint shipped inside the package)."""

from __future__ import annotations

import os

EMBEDDED_DIR = os.path.join(os.path.dirname(__file__), "assets", "mmx-tiny")


def embedded_model_path() -> str | None:
    return EMBEDDED_DIR if os.path.exists(os.path.join(EMBEDDED_DIR, "config.json")) else None
