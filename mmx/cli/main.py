"""The ``mmx`` command: one module per subcommand, each with ``add_parser(subparsers)`` and ``run(args)``."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# subcommand -> (module in mmx.cli, its one-line help). Most subcommand modules import torch at the top, so the
# help lines live here: `mmx --help` lists every subcommand without importing any of them, and only the module of
# the subcommand being run (or asked for its own --help) is imported. Keep each line equal to the help= its module's
# add_parser passes (tests/test_cli.py checks).
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "info": ("mmx.cli.info", "show a model's architecture and parameter counts (no weights loaded)"),
    "plan": ("mmx.cli.plan", "weight and cache memory per device of a model split over devices"),
    "generate": ("mmx.cli.generate", "generate text from prompts"),
    "chat": ("mmx.cli.chat", "chat with a model in the terminal"),
    "serve": ("mmx.cli.serve", "serve a model over the OpenAI and Anthropic HTTP APIs"),
    "demo": ("mmx.cli.demo", "mmx-tiny solves arithmetic word problems, with and without a calculator tool"),
    "train": ("mmx.cli.train", "pretrain or fine-tune (SFT) a model"),
    "tokenizer": ("mmx.cli.tokenizer", "tokenizer tools"),
    "rl": ("mmx.cli.rl", "reinforcement learning with CISPO, GRPO or DAPO"),
    "agent": ("mmx.cli.agent", "run an agent with file, shell, Python and delegate tools"),
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


def find_command(argv: list[str]) -> str | None:
    """The subcommand named on the command line, if any: the first token that is not an option (the top-level
    parser has only --help and --version, neither of which takes a value)."""
    for token in argv:
        if not token.startswith("-"):
            return token if token in SUBCOMMANDS else None
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``mmx`` parser. Only ``command``'s module is imported, to add its real arguments; every other subcommand
    gets a placeholder with its help line, which is all that `mmx --help` shows and argparse never parses into."""
    parser = argparse.ArgumentParser(prog="mmx", description="MiniMax-M1 / MiniMax-M2 in PyTorch")
    parser.add_argument("--version", action="version", version=f"mmx {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_line) in SUBCOMMANDS.items():
        if name == command:
            importlib.import_module(module).add_parser(sub)
        else:
            sub.add_parser(name, help=help_line)
    return parser


def _version() -> str:
    from mmx import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    from mmx.utils.memory import tune_allocator

    tune_allocator()  # a CLI process is long-lived: keep freed activation memory for reuse
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(find_command(argv))
    extra: list[str] = []
    if argv and argv[0] in CONFIG_COMMANDS:  # config-driven commands take free-form --key value overrides
        argv, extra = split_overrides(argv, CONFIG_COMMANDS[argv[0]])
    args = parser.parse_args(argv)
    args.extra = extra
    if args.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(SUBCOMMANDS[args.command][0])  # already imported by build_parser
    from mmx.errors import DiskFullError

    try:
        return int(module.run(args) or 0)
    except (FileNotFoundError, ValueError, DiskFullError) as e:  # bad input, or a full disk: say so, no traceback
        print(f"mmx {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
