"""Where the embedded mmx-tiny model lives (a checkpoint shipped inside the package), and the default model of
every entry point that takes an optional one (the CLI subcommands, the RL trainer)."""

from __future__ import annotations

import os

EMBEDDED_DIR = os.path.join(os.path.dirname(__file__), "assets", "mmx-tiny")


def embedded_model_path() -> str | None:
    return EMBEDDED_DIR if os.path.exists(os.path.join(EMBEDDED_DIR, "config.json")) else None


def resolve_model(name: str | None) -> str:
    """The model to run: the argument, else the embedded mmx-tiny model shipped with the package."""
    if name:
        return name
    path = embedded_model_path()
    if path is None or not os.path.isdir(path):
        raise FileNotFoundError("no MODEL given and the embedded mmx-tiny model is not installed")
    return path
