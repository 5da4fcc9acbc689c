"""Decode step time through the engine with an environment setting one way and the other, in one process.

The machine's speed drifts by tens of percent between minutes, so a setting is compared only against itself in
the same minutes: two engines of each case are built, one per value of the variable, each with its decode graphs
in a cache folder of its own, and they decode alternately. Used by bench/aot_memory.py and bench/expert_rows.py.

A case is MODEL[-int8]:BATCH (models as in bench/compiled_decode.py): BATCH requests of 16-token prompts decode
--tokens tokens each (greedy); the figure is the median decode step time over --rounds rounds (prefill excluded).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))

from compiled_decode import build, decode_rate
from lightning import machine

from mmx.engine import LLMEngine


def engine(model: str, quantization: str | None, batch: int, variable: str, value: str, cache: str) -> LLMEngine:
    os.environ[variable] = value
    os.environ["MMX_AOT_CACHE"] = os.path.join(cache, value)
    built = LLMEngine(
        build(model), quantization=quantization, decode_compiler="aot", max_model_len=1024, max_num_seqs=max(batch, 2)
    )
    built.warm_up()
    return built


def step_ms(llm: LLMEngine, batch: int, tokens: int, seed: int) -> float:
    return batch / decode_rate(llm, batch, tokens, seed) * 1e3  # every step decodes one token of each request


def parser(doc: str, cases: str) -> argparse.ArgumentParser:
    """The arguments :func:`compare` reads (a bench may add its own)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--cases", default=cases)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=150)
    p.add_argument("--rounds", type=int, default=5)
    return p


def compare(args: argparse.Namespace, variable: str, variants: dict[str, str]) -> None:
    """The table of ``variants`` (column title -> value of ``variable``) over ``args.cases``, the first variant the
    baseline of the ratio."""
    torch.set_num_threads(args.threads)
    print(machine())
    print(f"threads {args.threads}; {args.tokens} decode tokens per request; medians of {args.rounds} rounds\n")
    print("| model | batch | " + " | ".join(f"{name} (ms a step)" for name in variants) + " | ratio |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as cache:
        for case in args.cases.split(","):
            name, batch = case.split(":")
            model, quant = (name.removesuffix("-int8"), "int8") if name.endswith("-int8") else (name, None)
            engines = {v: engine(model, quant, int(batch), variable, value, cache) for v, value in variants.items()}
            times: dict[str, list[float]] = {v: [] for v in variants}
            for r in range(args.rounds):
                for v, llm in engines.items():
                    times[v].append(step_ms(llm, int(batch), args.tokens, r))
            before, after = (statistics.median(times[v]) for v in variants)
            print(f"| {name} | {batch} | {before:.3f} | {after:.3f} | {after / before:.2f} |", flush=True)
