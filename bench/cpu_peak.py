"""What the CPU's float32 arithmetic allows a prefill: the rate of a large matrix product and of causal attention
(torch's kernels, best of a few runs), to set a model's prefill FLOPs against.

A prefill of T tokens costs 2 x active parameters x T FLOPs in its weight products, plus 4 x heads x head_dim x
T^2 / 2 per softmax layer in attention (scores and mixing over the causal half).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def best_seconds(fn, runs: int) -> float:
    fn()
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--size", type=int, default=2048, help="the square matrix product's size")
    p.add_argument("--tokens", type=int, default=4096, help="causal attention's length (4 heads of 64)")
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    a, b = torch.randn(args.size, args.size), torch.randn(args.size, args.size)
    seconds = best_seconds(lambda: a @ b, args.runs)
    print(f"float32 matrix product {args.size}^3: {2 * args.size**3 / seconds / 1e9:.0f} GFLOP/s")
    q, k, v = (torch.randn(1, 4, args.tokens, 64) for _ in range(3))
    seconds = best_seconds(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), args.runs)
    flops = 4 * 4 * 64 * args.tokens**2 / 2
    rate = flops / seconds / 1e9
    print(f"causal attention, 4 heads x {args.tokens} x 64: {seconds * 1e3:.1f} ms, {rate:.0f} GFLOP/s")


if __name__ == "__main__":
    main()
