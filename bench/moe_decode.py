"""Time of one MoE block forward (router + experts) at decode sizes: the per-expert loop against the grouped-GEMM
path, in the same run, for the tiny hybrid M1 bench config (hidden 256, 4 experts top-2) and mmx-tiny (hidden 192,
4 experts top-2). Random weights; the two paths compute the same thing.

    python bench/moe_decode.py                       # T = 1 and 16, fp32 and bf16
    python bench/moe_decode.py --tokens 1,16,64,256 --dtypes float32

Rounds alternate the two paths; each figure is the median over rounds of the mean time per forward.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from lightning import machine, table, tiny_hybrid_config

import mmx.model.moe as moe
from mmx import MiniMaxConfig
from mmx.embedded import embedded_model_path
from mmx.model.moe import SparseMoeBlock

DEFAULT_MAX_PAIRS = moe.GROUPED_MAX_PAIRS


def configs() -> dict[str, MiniMaxConfig]:
    found = {"tiny hybrid M1": MiniMaxConfig.from_dict(tiny_hybrid_config())}
    path = embedded_model_path()
    if path is not None:
        with open(os.path.join(path, "config.json")) as f:
            found["mmx-tiny"] = MiniMaxConfig.from_dict(json.load(f))
    return found


def block_for(config: MiniMaxConfig, dtype: torch.dtype) -> SparseMoeBlock:
    block = SparseMoeBlock(config).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.15)
    block.experts.to(dtype)  # the router stays float32, as the model keeps it
    return block


def per_forward_us(block: SparseMoeBlock, x: torch.Tensor, grouped: bool, calls: int) -> float:
    moe.GROUPED_MAX_PAIRS = DEFAULT_MAX_PAIRS if grouped else 0
    start = time.perf_counter()
    for _ in range(calls):
        block(x)
    return (time.perf_counter() - start) / calls * 1e6


@torch.no_grad()
def measure(config: MiniMaxConfig, dtype: torch.dtype, tokens: int, rounds: int, calls: int) -> tuple[float, float]:
    block = block_for(config, dtype)
    x = torch.randn(tokens, config.hidden_size).to(dtype)
    for grouped in (False, True):  # warm up, and check the two paths agree
        per_forward_us(block, x, grouped, 5)
    moe.GROUPED_MAX_PAIRS = 0
    looped = block(x)
    moe.GROUPED_MAX_PAIRS = DEFAULT_MAX_PAIRS
    torch.testing.assert_close(block(x), looped, rtol=1e-2, atol=1e-5)
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(rounds):
        for grouped in (False, True):
            times[grouped].append(per_forward_us(block, x, grouped, calls))
    moe.GROUPED_MAX_PAIRS = DEFAULT_MAX_PAIRS
    return statistics.median(times[False]), statistics.median(times[True])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="1,16", help="comma-separated token counts T")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=50, help="forwards per round and path")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {machine()}\n")
    rows = []
    for name, config in configs().items():
        for dtype_name in args.dtypes.split(","):
            for tokens in (int(t) for t in args.tokens.split(",")):
                loop, grouped = measure(config, getattr(torch, dtype_name), tokens, args.rounds, args.calls)
                row = [name, dtype_name, tokens, f"{loop:.0f}", f"{grouped:.0f}", f"{loop / grouped:.2f}x"]
                print(row, flush=True)
                rows.append(row)
    print("\n## MoE block forward (microseconds; median over alternating rounds)\n")
    print(table(["model", "dtype", "tokens", "per-expert loop", "grouped GEMM", "speed-up"], rows))


if __name__ == "__main__":
    main()
