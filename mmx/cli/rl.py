"""``mmx rl CONFIG``: reinforcement learning on verifiable rewards (CISPO, GRPO, DAPO) with ``--key value``
overrides, e.g. ``mmx rl --loss dapo --steps 20`` (no CONFIG: every default, on mmx-tiny's arithmetic task)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "rl",
        help="reinforcement learning with CISPO, GRPO or DAPO",
        description="RL from a YAML or JSON config; any key can be overridden with --key value or --set key=value.",
    )
    p.add_argument("config", nargs="?", default=None, help="YAML or JSON RL config")
    p.add_argument("--resume", nargs="?", const="latest", default=None, help="continue from the latest checkpoint")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")


def run(args: argparse.Namespace) -> int:
    from mmx.cli.train import overrides_from_flags
    from mmx.rl.config import RLConfig
    from mmx.rl.trainer import RLTrainer

    cfg = RLConfig.load(args.config, [*args.set, *overrides_from_flags(getattr(args, "extra", []))])
    history = RLTrainer(cfg, resume=args.resume).train()
    if history:
        last = history[-1]
        parts = [f"{k} {last[k]:.3f}" for k in ("reward", "accuracy", "eval_accuracy") if last.get(k) is not None]
        print(f"done: step {last['step']}, " + ", ".join(parts) + f"; metrics and checkpoints in {cfg.out_dir}")
    return 0
