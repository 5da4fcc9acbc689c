"""Prefill attention of fresh prompts of one length: one causal call per prompt (``causal_softmax``, as for prompts
of different lengths) against one batched call for the run (``mmx.engine.paged_batch._same_length_causal``), on the
same q, k, v, alternating in one process; ms for all the prompts of one layer, median of --rounds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mmx.engine.paged_batch import _same_length_causal
from mmx.model.cache import causal_softmax


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--lengths", default="128,512")
    p.add_argument("--heads", default="4x2", help="query heads x K/V heads")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    h, g = (int(x) for x in args.heads.split("x"))
    d, count, scale = args.head_dim, args.prompts, args.head_dim**-0.5
    print(f"{count} prompts, {h} query heads on {g} K/V heads of {d}, {args.threads} threads")
    print("| prompt tokens | per prompt (ms) | batched (ms) | ratio | max abs diff |")
    print("|---|---|---|---|---|")
    for n in (int(x) for x in args.lengths.split(",")):
        gen = torch.Generator().manual_seed(n)
        q = torch.randn(1, h, count * n, d, generator=gen)
        k, v = (torch.randn(1, g, count * n, d, generator=gen) for _ in range(2))

        def per_prompt(q=q, k=k, v=v, n=n) -> torch.Tensor:
            spans = [slice(i * n, (i + 1) * n) for i in range(count)]
            return torch.cat([causal_softmax(q[:, :, s], k[:, :, s], v[:, :, s], scale)[0] for s in spans], dim=1)

        def batched(q=q, k=k, v=v) -> torch.Tensor:
            return _same_length_causal(q, k, v, count, scale)

        diff = (per_prompt() - batched()).abs().max().item()
        times: dict[str, list[float]] = {"per": [], "batched": []}
        for _ in range(args.rounds):
            for name, fn in (("per", per_prompt), ("batched", batched)):
                start = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - start) * 1e3)
        per, bat = (statistics.median(times[k]) for k in ("per", "batched"))
        print(f"| {n} | {per:.2f} | {bat:.2f} | {bat / per:.2f} | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
