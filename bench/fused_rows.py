"""Prefill with the one-pass kernels (``mmx.ops.fused_rows``: RMSNorm, QK-norm with rotary, silu(gate) * up, causal
attention) against the torch ops they replace (``MMX_FUSED_ROWS=0``), in one engine, alternating prompt by prompt;
and the attention kernel alone against torch's CPU flash kernel.

    python bench/fused_rows.py [--models m2,hybrid,mmx-tiny] [--prefill 4096] [--rounds 8]
    python bench/fused_rows.py --attention [--lengths 512,2048,4096] [--rounds 8]

Prefill: two cases per model (models as in bench/compiled_decode.py), one prompt of --prefill tokens, and 16 prompts
of 128 tokens admitted together (a server burst's prefill); each request generates one token, so the time is the
prefill. Fresh random prompts every run (nothing from the prefix cache). Attention: causal self-attention of one
prompt (q, k, v split off [1, T, heads * D] projections, as the model has them), tiny M2's heads (4 on 2 K/V heads
of 64) and M2's head size (8 on 2 of 128), ``F.scaled_dot_product_attention(is_causal=True, enable_gqa=True)``
against ``fused_rows.attention``, and a chunk of half the length after the first half cached (torch: the engine's
two flash calls merged by log-sum-exp). Medians of --rounds; ratios are kernel / torch.
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

import torch.nn.functional as F
from compiled_decode import build
from lightning import machine

from mmx.engine import LLMEngine, SamplingParams
from mmx.model import cache
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


def median_times(ways: dict[str, object], rounds: int) -> dict[str, float]:
    """Median seconds of each way, the ways alternating; the first round warms them up."""
    times: dict[str, list[float]] = {name: [] for name in ways}
    for r in range(rounds + 1):
        for name, fn in ways.items():
            start = time.perf_counter()
            fn()
            if r:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def attention_rows(h: int, g: int, d: int, t: int, rounds: int) -> None:
    gen = torch.Generator().manual_seed(t)
    q = torch.randn(1, t, h, d, generator=gen).transpose(1, 2)
    k, v = (torch.randn(1, t, g, d, generator=gen).transpose(1, 2) for _ in range(2))
    scale, half = d**-0.5, t // 2
    whole = {
        "torch": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True),
        "kernel": lambda: fused_rows.attention(q, k, v, scale, 0),
    }
    second = {
        "torch": lambda: cache._continue_with_lse(q[:, :, half:], k, v, scale, half),
        "kernel": lambda: fused_rows.attention(q[:, :, half:], k, v, scale, half),
    }
    for label, ways, flops in (
        (f"{t}", whole, 2 * 2 * h * t * t / 2 * d),
        (f"{t - half} after {half}", second, 2 * 2 * h * (t - half) * (half + (t - half) / 2) * d),
    ):
        m = median_times(ways, rounds)
        a, b = m["torch"], m["kernel"]
        rate = flops / b / 1e9
        print(f"| {h} x {g} x {d} | {label} | {a * 1e3:.1f} | {b * 1e3:.1f} | {b / a:.2f} | {rate:.0f} |", flush=True)


def attention_table(lengths: list[int], rounds: int) -> None:
    print("| heads x K/V heads x head size | tokens | torch (ms) | kernel (ms) | ratio | kernel GFLOP/s |")
    print("|---|---|---|---|---|---|")
    for h, g, d in ((4, 2, 64), (8, 2, 128)):
        for t in lengths:
            attention_rows(h, g, d, t, rounds)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="m2,hybrid,mmx-tiny")
    p.add_argument("--prefill", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--attention", action="store_true", help="the attention kernel alone against torch's")
    p.add_argument("--lengths", default="512,2048,4096")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(machine())
    print(f"threads {args.threads}; medians of {args.rounds} rounds, the two ways alternating\n")
    if args.attention:
        attention_table([int(x) for x in args.lengths.split(",")], args.rounds)
        return
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
