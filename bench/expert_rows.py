"""The grouped expert kernel (mmx.ops.expert_rows) against what decode graphs ran before: dot products, grouped GEMM.

    python bench/expert_rows.py [--parts layer,engine,dense] [--cases m2:1,m2:16,m2-int8:1,m2-int8:16] [--rounds 5]
    python bench/expert_rows.py --parts layer --shape 16,3072,1536,8 --layers 1 --rows 1,4,16,32   # M2's experts

"layer": one MoE layer of tiny M2's shape (4 experts of 256 x 512, top-2; ``--shape`` sets another), the kernel
against the same experts written as dot products over the gathered weights (mmx.model.moe.mix_experts) and compiled
by torch.compile; with the weights of 1 layer (6 MiB, held in L3) and of 8 layers called in turn (50 MiB, streamed
from memory, as in a decode step); microseconds a layer, best of 5 x 30 calls. "engine": two engines of each case,
one with the kernel off (MMX_EXPERT_ROWS=0: dot products up to 16 sequences, torch's grouped GEMM or the int8
per-expert loop above) and one with it on, decoding alternately (bench/env_ab.py); ms a decode step. "dense": the
same for the dense products of 2-16 rows (MMX_DENSE_ROWS: dot products against mmx::dense_rows).
"""

from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))

from env_ab import compare, parser
from lightning import machine

from mmx.model.linear import dot_rows
from mmx.model.moe import mix_experts
from mmx.model.quantization import quantize_rows
from mmx.ops.expert_rows import expert_rows

SHAPE = "4,256,512,2"  # experts, hidden, inner, top-k: tiny M2's (M2 itself: 256,3072,1536,8)


def dot_products(x, ids, weights, gate_up, down, gate_up_scale=None, down_scale=None):
    def product(weight, scale):
        if scale is None:
            return lambda h: dot_rows(h, weight[ids])
        return lambda h: dot_rows(h, weight[ids]) * scale[ids].float()

    return mix_experts(
        x, ids, weights, product(gate_up, gate_up_scale), product(down, down_scale), torch.nn.functional.silu
    )


def layer_us(fn, x, ids, weights, layers) -> float:
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(30):
            for weights_of_layer in layers:
                fn(x, ids, weights, *weights_of_layer)
        best = min(best, (time.perf_counter() - start) / 30 / len(layers) * 1e6)
    return best


def layer_table(threads: int, shape: str, layer_counts: list[int], row_counts: list[int]) -> None:
    torch.set_num_threads(threads)
    experts, hidden, inner, top_k = (int(v) for v in shape.split(","))
    print(f"{experts} experts of {hidden} x {inner}, top-{top_k}")
    compiled = torch.compile(dot_products, dynamic=False)
    gen = torch.Generator().manual_seed(0)
    stacks = []
    for _ in range(max(layer_counts)):
        gate_up = torch.randn(experts, 2 * inner, hidden, generator=gen) * 0.05
        down = torch.randn(experts, hidden, inner, generator=gen) * 0.05
        (qg, sg), (qd, sd) = quantize_rows(gate_up, torch.bfloat16), quantize_rows(down, torch.bfloat16)
        stacks.append({"fp32": (gate_up, down), "int8": (qg, qd, sg, sd)})
    print("| weights | layers | rows | compiled dot products (us a layer) | grouped kernel | ratio |")
    print("|---|---|---|---|---|---|")
    for kind in ("fp32", "int8"):
        for count in layer_counts:
            layers = [stack[kind] for stack in stacks[:count]]
            for rows in row_counts:
                x = torch.randn(rows, hidden, generator=gen)
                ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(rows)])
                weights = torch.rand(rows, top_k, generator=gen)
                base = layer_us(compiled, x, ids, weights, layers)
                ours = layer_us(expert_rows, x, ids, weights, layers)
                print(f"| {kind} | {count} | {rows} | {base:.1f} | {ours:.1f} | {ours / base:.2f} |", flush=True)


if __name__ == "__main__":
    p = parser(__doc__, "m2:1,m2:16,m2-int8:1,m2-int8:16")
    p.add_argument("--parts", default="layer,engine")
    p.add_argument("--shape", default=SHAPE, help="the layer part's experts,hidden,inner,top-k")
    p.add_argument("--layers", default="1,8", help="the layer part's weight sets called in turn")
    p.add_argument("--rows", default="1,4,16", help="the layer part's row counts")
    args = p.parse_args()
    parts = args.parts.split(",")
    if "layer" in parts:
        print(machine())
        counts = [int(v) for v in args.layers.split(",")]
        layer_table(args.threads, args.shape, counts, [int(v) for v in args.rows.split(",")])
        print()
    if "engine" in parts:
        compare(args, "MMX_EXPERT_ROWS", {"kernel off": "0", "grouped kernel": "1"})
    if "dense" in parts:
        compare(args, "MMX_DENSE_ROWS", {"dense dot products": "0", "dense 4 x 4 blocks": "1"})
