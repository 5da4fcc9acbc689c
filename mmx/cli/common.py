"""Flags and helpers shared by the subcommands that run a model."""

from __future__ import annotations

import argparse
from dataclasses import MISSING, fields

# resolve_model lives in mmx.embedded, where the RL trainer (which must not import the CLI) gets it too; the
# subcommands import it from here.
from mmx.embedded import resolve_model as resolve_model
from mmx.engine.args import EngineArgs


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
        default = f.default_factory() if f.default is MISSING else f.default
        if kind is bool:
            g.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        else:
            g.add_argument(flag, type=kind, default=default, choices=f.metadata.get("choices"))


def engine_kwargs(ns: argparse.Namespace) -> dict:
    return {f.name: getattr(ns, f.name) for f in fields(EngineArgs)}
