"""Prefill with the one-pass row kernels (``mmx.ops.fused_rows``: RMSNorm, QK-norm with rotary, silu(gate) * up)
against the torch ops they replace (``MMX_FUSED_ROWS=0``), in one engine, alternating prompt by prompt.

    python bench/fused_rows.py [--models m2,hybrid,mmx-tiny] [--prefill 4096] [--rounds 8]

Two cases per model (models as in bench/compiled_decode.py): one prompt of --prefill tokens, and 16 prompts of 128
tokens admitted together (a server burst's prefill); each request generates one token, so the time is the prefill.
Fresh random prompts every run (nothing from the prefix cache). Medians of --rounds; the ratio is kernels / torch.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from compiled_decode import build
from lightning import machine

from mmx.engine import LLMEngine, SamplingParams
from mmx.ops import fused_rows


def prefill_ms(engine: LLMEngine, prompts: int, length: int, seed: int) -> float:
    gen = torch.Generator().manual_seed(seed)
    vocab = engine.model.config.vocab_size
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    start = time.perf_counter()
    for i in range(prompts):
        engine.add_request(f"{seed}-{i}", torch.randint(3, vocab, (length,), generator=gen).tolist(), params)
    while engine.has_unfinished_requests():
        engine.step()
    return (time.perf_counter() - start) * 1e3


def use_kernels(on: bool) -> None:
    os.environ["MMX_FUSED_ROWS"] = "1" if on else "0"
    fused_rows.reset()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="m2,hybrid,mmx-tiny")
    p.add_argument("--prefill", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(machine())
    print(f"threads {args.threads}; medians of {args.rounds} rounds, the two ways alternating\n")
    print("| model | prefill | torch ops (ms) | fused kernels (ms) | ratio |")
    print("|---|---|---|---|---|")
    seeds = iter(range(1_000_000))
    for name in args.models.split(","):
        engine = LLMEngine(build(name), max_model_len=args.prefill + 16, max_num_seqs=16)
        for prompts, length in ((1, args.prefill), (16, 128)):
            times: dict[bool, list[float]] = {True: [], False: []}
            for r in range(args.rounds + 1):
                for on in (True, False) if r % 2 else (False, True):
                    use_kernels(on)
                    ms = prefill_ms(engine, prompts, length, next(seeds))
                    if r:  # the first round warms both ways up
                        times[on].append(ms)
            plain, fused = statistics.median(times[False]), statistics.median(times[True])
            label = f"{length} tokens" if prompts == 1 else f"{prompts} x {length} tokens"
            print(f"| {name} | {label} | {plain:.0f} | {fused:.0f} | {fused / plain:.2f} |", flush=True)
        del engine
    use_kernels(True)


if __name__ == "__main__":
    main()
