"""Ahead-of-time decode graphs with and without inductor's memory planning, through the engine, in one process.

    python bench/aot_memory.py [--cases m2:1,m2-int8:1,hybrid:1,mmx-tiny:1,mmx-tiny:16] [--rounds 5]

Each case is MODEL[-int8]:BATCH (models as in bench/compiled_decode.py). Two engines of the case are built, one
with the default (each intermediate buffer of a step allocated on its own) and one with MMX_AOT_MEMORY_PLANNING=1
(one allocation per step), each graph in a cache folder of its own; then B requests of 16-token prompts decode
--tokens tokens each (greedy) on one engine and then the other, alternately, --rounds times. The figure is the
median decode step time (prefill excluded).
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

VARIANTS = {"one allocation each": "0", "one allocation per step": "1"}


def engine(model: str, quantization: str | None, batch: int, planning: str, cache: str) -> LLMEngine:
    os.environ["MMX_AOT_MEMORY_PLANNING"] = planning
    os.environ["MMX_AOT_CACHE"] = os.path.join(cache, planning)
    built = LLMEngine(
        build(model), quantization=quantization, decode_compiler="aot", max_model_len=1024, max_num_seqs=max(batch, 2)
    )
    built.warm_up()
    return built


def step_ms(llm: LLMEngine, batch: int, tokens: int, seed: int) -> float:
    return batch / decode_rate(llm, batch, tokens, seed) * 1e3  # every step decodes one token of each request


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default="m2:1,m2-int8:1,hybrid:1,mmx-tiny:1,mmx-tiny:16")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=150)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(machine())
    print(f"threads {args.threads}; {args.tokens} decode tokens per request; medians of {args.rounds} rounds\n")
    print("| model | batch | " + " | ".join(f"{name} (ms a step)" for name in VARIANTS) + " | ratio |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as cache:
        for case in args.cases.split(","):
            name, batch = case.split(":")
            model, quant = (name.removesuffix("-int8"), "int8") if name.endswith("-int8") else (name, None)
            engines = {v: engine(model, quant, int(batch), flag, cache) for v, flag in VARIANTS.items()}
            times: dict[str, list[float]] = {v: [] for v in VARIANTS}
            for r in range(args.rounds):
                for v, llm in engines.items():
                    times[v].append(step_ms(llm, int(batch), args.tokens, r))
            before, after = (statistics.median(times[v]) for v in VARIANTS)
            print(f"| {name} | {batch} | {before:.3f} | {after:.3f} | {after / before:.2f} |", flush=True)


if __name__ == "__main__":
    main()
