"""Flags and helpers shared by the subcommands that run a model."""

from __future__ import annotations

import argparse
import os
from dataclasses import fields

from mmx.engine.llm_engine import EngineArgs


def add_model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, help="checkpoint directory or Hub repo id (default: mmx-tiny)")


def _flag_type(annotation: str):
    for name, kind in (("bool", bool), ("int", int), ("float", float)):
        if str(annotation).startswith(name):
            return kind
    return str


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    for f in fields(EngineArgs):
        flag = "--" + f.name.replace("_", "-")
        kind = _flag_type(f.type)
        if kind is bool:
            g.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            g.add_argument(flag, type=kind, default=f.default)


def engine_kwargs(ns: argparse.Namespace) -> dict:
    return {f.name: getattr(ns, f.name) for f in fields(EngineArgs)}


def resolve_model(name: str | None) -> str:
    """The model to run: the argument, else the embedded mmx-tiny model shipped with the package."""
    if name:
        return name
    from mmx.embedded import embedded_model_path

    path = embedded_model_path()
    if path is None or not os.path.isdir(path):
        raise FileNotFoundError("no MODEL given and the embedded mmx-tiny model is not installed")
    return path


def detect_style(tokenizer, config) -> str:
    """The output format to parse: from the chat template's tool syntax, else from the architecture."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if "<minimax:tool_call>" in template:
        return "minimax_m2"
    if "<tool_calls>" in template:
        return "minimax_m1"
    return "minimax_m2" if config.architecture == "minimax_m2" else "minimax_m1"
