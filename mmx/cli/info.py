"""``mmx info MODEL``: the architecture and parameter counts of a preset or checkpoint, without loading weights."""

from __future__ import annotations

import argparse
import os

from mmx.config import MiniMaxConfig
from mmx.presets import PRESETS


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="show a model's architecture and parameter counts (no weights loaded)")
    p.add_argument("model", help=f"checkpoint directory or preset ({', '.join(PRESETS)})")


def describe(config: MiniMaxConfig) -> str:
    import torch

    from mmx.model.modeling import MiniMaxForCausalLM
    from mmx.model.params import format_count

    with torch.device("meta"):
        counts = MiniMaxForCausalLM(config).parameter_counts()
    return (
        config.summary()
        + f"\nparameters     {format_count(counts['total'])} total, {format_count(counts['active'])} active per token"
        + f" ({format_count(counts['active_with_embeddings'])} with embeddings)"
    )


def run(args: argparse.Namespace) -> int:
    if os.path.isdir(args.model):
        config = MiniMaxConfig.from_pretrained(args.model)
    else:
        config = MiniMaxConfig.from_preset(args.model)
    print(describe(config))
    return 0
