"""The ``mmx`` command line: subcommands, the demo, and errors without tracebacks."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mmx.cli.main import main
from mmx.embedded import embedded_model_path


def test_help_lists_subcommands(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    assert "info" in out and "demo" in out


def test_info_on_preset_and_checkpoint(capsys, tmp_path):
    assert main(["info", "minimax-m2"]) == 0
    out = capsys.readouterr().out
    assert "228.69B total, 9.80B active" in out and "SSSS" in out
    from tests.conftest import tiny_model

    tiny_model("tiny-m1").save_pretrained(tmp_path)
    assert main(["info", str(tmp_path)]) == 0
    assert "LLLS" in capsys.readouterr().out


def test_bad_model_is_a_clean_error(capsys):
    assert main(["info", "no-such-model"]) == 1
    err = capsys.readouterr().err
    assert "unknown preset 'no-such-model'" in err and "Traceback" not in err


@pytest.mark.skipif(embedded_model_path() is None, reason="the embedded mmx-tiny model is not installed")
def test_demo_solves_problems_through_the_whole_stack():
    out = subprocess.run(
        [sys.executable, "-m", "mmx.cli.main", "demo", "--problems", "2"], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "layers LSLS (L lightning, S softmax), MoE 4 experts top-2" in text
    assert text.count("with the calculator tool:") == 2 and text.count("without tools:") == 2
    assert 'tool call calculator({"expression": ' in text and "thinking" in text and "answer" in text
    assert "tokens generated in" in text and "tokens/s" in text
    # every answer names the item the question counts (the demo grades number and item)
    assert "the item (expected" not in text and "solved 2/2 with the tool" in text


def _checkpoint_with_tokenizer(tmp_path, tokenizer):
    from tests.conftest import tiny_model

    tiny_model("tiny-m2").save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    return str(tmp_path)


def test_generate_raw_and_chat(tmp_path, tiny_tokenizer, capsys):
    import json

    path = _checkpoint_with_tokenizer(tmp_path, tiny_tokenizer)
    assert (
        main(
            [
                "generate",
                path,
                "--prompt",
                "Weather in",
                "--max-tokens",
                "5",
                "--cache-memory-gb",
                "0.01",
                "--max-model-len",
                "512",
            ]
        )
        == 0
    )
    assert "--- 'Weather in' [length, 5 tokens]" in capsys.readouterr().out
    assert (
        main(["generate", path, "--prompt", "hi", "--chat", "--json", "--max-tokens", "4", "--max-model-len", "256"])
        == 0
    )
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["tokens"] == 4 and set(record) >= {"reasoning", "content", "tool_calls"}


def test_chat_session(tmp_path, tiny_tokenizer, monkeypatch, capsys):
    import io

    path = _checkpoint_with_tokenizer(tmp_path, tiny_tokenizer)
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n/reset\nagain\n/exit\n"))
    assert main(["chat", path, "--max-tokens", "6", "--max-model-len", "256"]) == 0
    out = capsys.readouterr().out
    assert "minimax_m2 format" in out and out.count("you>") == 4


def test_chat_gives_mmx_tiny_its_calculator(monkeypatch, capsys):
    """With no MODEL, `mmx chat` offers mmx-tiny its calculator tool and runs the calls; --no-calculator offers none."""
    import io

    if embedded_model_path() is None:
        pytest.skip("the embedded mmx-tiny model is not installed")
    question = "Kim has 71 cards. Kim gives away 12. How many cards does Kim have now?\n/exit\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(question))
    assert main(["chat", "--max-tokens", "192", "--max-model-len", "1024"]) == 0
    out = capsys.readouterr().out
    assert "tools: calculator" in out and "tool call" in out and "tool result\x1b[0m 59" in out
    assert "Kim has 59 cards now." in out
    monkeypatch.setattr("sys.stdin", io.StringIO(question))
    assert main(["chat", "--no-calculator", "--max-tokens", "192", "--max-model-len", "1024"]) == 0
    out = capsys.readouterr().out
    assert "tools:" not in out and "tool call" not in out and "cards" in out


def test_help_does_not_import_torch():
    """`mmx --help` and every `mmx SUBCOMMAND --help` must stay instant: no torch import."""
    script = """
import sys
from mmx.cli.main import SUBCOMMANDS, build_parser, main

build_parser()
for argv in (["--help"], ["--version"], *([name, "--help"] for name in SUBCOMMANDS)):
    try:
        main(argv)
    except SystemExit as e:
        assert e.code == 0, (argv, e.code)
heavy = sorted(m for m in ("torch", "mmx.engine.llm_engine", "mmx.model") if m in sys.modules)
assert not heavy, heavy
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "usage: mmx" in out.stdout and "serve a model over the OpenAI and Anthropic HTTP APIs" in out.stdout


def test_subcommand_help_lines_match_their_modules():
    """`mmx --help` shows the help lines of mmx.cli.main.SUBCOMMANDS; each must be the one its module registers."""
    import argparse
    import importlib

    from mmx.cli.main import SUBCOMMANDS, build_parser

    for name, (module, help_line) in SUBCOMMANDS.items():
        real = argparse.ArgumentParser(prog="x")
        importlib.import_module(module).add_parser(real.add_subparsers(metavar="COMMAND"))
        table = argparse.ArgumentParser(prog="x")
        table.add_subparsers(metavar="COMMAND").add_parser(name, help=help_line)
        assert real.format_help() == table.format_help(), name
    # the subcommand being run gets its real arguments, the others only their help line
    args = build_parser("generate").parse_args(["generate", "m", "--prompt", "hi"])
    assert args.command == "generate" and args.prompt == ["hi"]
