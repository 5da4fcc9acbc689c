"""``mmx train CONFIG``: pretraining or SFT from a YAML / JSON config, with ``--key value`` overrides.

Under ``torchrun --nproc-per-node N -m mmx.cli.main train CONFIG`` every process runs this and the model is
sharded with FSDP2."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="pretrain or fine-tune (SFT) a model",
        description="Train from a YAML or JSON config. Any config key can be overridden: --lr 1e-3, --steps=500, "
        "or --set key=value (values are parsed as JSON when they can be).",
    )
    p.add_argument("config", nargs="?", default=None, help="YAML or JSON training config")
    p.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        help="continue from the latest checkpoint in out_dir (or from the checkpoint directory given)",
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--export", default=None, metavar="DIR", help="also write the final model and tokenizer here")


def overrides_from_flags(extra: list[str]) -> list[str]:
    """``--lr 1e-3 --steps=5`` -> ["lr=1e-3", "steps=5"]."""
    out, i = [], 0
    while i < len(extra):
        flag = extra[i]
        if not flag.startswith("--") or len(flag) < 3:
            raise ValueError(f"unexpected argument {flag!r}; config overrides look like --key value")
        key, sep, value = flag[2:].partition("=")
        if not sep:
            if i + 1 >= len(extra):
                raise ValueError(f"override {flag} needs a value")
            value, i = extra[i + 1], i + 1
        out.append(f"{key.replace('-', '_')}={value}")
        i += 1
    return out


def run(args: argparse.Namespace) -> int:
    from mmx.train.config import TrainConfig
    from mmx.train.loop import Trainer, export_model

    cfg = TrainConfig.load(args.config, [*args.set, *overrides_from_flags(getattr(args, "extra", []))])
    trainer = Trainer(cfg, resume=args.resume)
    try:
        history = trainer.train()
        if args.export:
            export_model(trainer, args.export)
        if trainer.env.is_main and history:
            last = history[-1]
            summary = f"done: step {last['step']}, loss {last['loss']:.4f}"
            if "eval_loss" in last:
                summary += f", eval loss {last['eval_loss']:.4f}"
            print(summary + f"; checkpoints and metrics in {cfg.out_dir}")
    finally:
        trainer.close()
    return 0
