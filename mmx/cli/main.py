"""The ``mmx`` command: one module per subcommand, each with ``add_parser(subparsers)`` and ``run(args)``."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# subcommand -> module in mmx.cli; kept as names so `mmx --help` does not import torch-heavy modules it won't use
SUBCOMMANDS = {
    "info": "mmx.cli.info",
    "generate": "mmx.cli.generate",
    "chat": "mmx.cli.chat",
    "serve": "mmx.cli.serve",
    "demo": "mmx.cli.demo",
    "train": "mmx.cli.train",
    "tokenizer": "mmx.cli.tokenizer",
    "rl": "mmx.cli.rl",
    "agent": "mmx.cli.agent",
}


# config-driven subcommands -> their own flags and whether each takes a value ("optional": only an existing path)
CONFIG_COMMANDS = {
    "train": {"--resume": "optional", "--set": "required", "--export": "required"},
    "rl": {"--resume": "optional", "--set": "required"},
}


def split_overrides(argv: list[str], own: dict[str, str]) -> tuple[list[str], list[str]]:
    """Separate ``--key value`` config overrides from the subcommand's own flags, so that neither a value nor the
    config path can be mistaken for the other."""
    known, extra = [argv[0]], []
    i = 1
    while i < len(argv):
        token = argv[i]
        flag = token.split("=", 1)[0]
        if token in ("-h", "--help") or not token.startswith("--"):
            known.append(token)
        elif flag in own:
            known.append(token)
            takes = own[flag]
            has_value = "=" not in token and i + 1 < len(argv) and not argv[i + 1].startswith("--")
            if has_value and (takes == "required" or os.path.exists(argv[i + 1])):
                known.append(argv[i + 1])
                i += 1
        else:
            extra.append(token)
            if "=" not in token and i + 1 < len(argv):
                extra.append(argv[i + 1])
                i += 1
        i += 1
    return known, extra


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmx", description="MiniMax-M1 / MiniMax-M2 in PyTorch")
    parser.add_argument("--version", action="version", version=f"mmx {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in SUBCOMMANDS.values():
        importlib.import_module(module).add_parser(sub)
    return parser


def _version() -> str:
    from mmx import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    from mmx.utils.memory import tune_allocator

    tune_allocator()  # a CLI process is long-lived: keep freed activation memory for reuse
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if argv and argv[0] in CONFIG_COMMANDS:  # config-driven commands take free-form --key value overrides
        argv, extra = split_overrides(argv, CONFIG_COMMANDS[argv[0]])
    args = parser.parse_args(argv)
    args.extra = extra
    if args.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(SUBCOMMANDS[args.command])
    try:
        return int(module.run(args) or 0)
    except (FileNotFoundError, ValueError) as e:  # bad input: say what is wrong, no traceback
        print(f"mmx {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
