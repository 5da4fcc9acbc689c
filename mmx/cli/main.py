"""The ``mmx`` command: one module per subcommand, each with ``add_parser(subparsers)`` and ``run(args)``."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module in mmx.cli; kept as names so `mmx --help` does not import torch-heavy modules it won't use
SUBCOMMANDS = {
    "info": "mmx.cli.info",
    "generate": "mmx.cli.generate",
    "chat": "mmx.cli.chat",
    "serve": "mmx.cli.serve",
    "demo": "mmx.cli.demo",
}


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
    args = parser.parse_args(argv)
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
