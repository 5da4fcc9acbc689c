"""Matrix products at decode sizes: the BLAS (row-major and column-major weights) against the dot products a
compiled decode step generates (mmx.model.linear.dot_rows), and the MoE experts the same two ways.

    python bench/decode_gemv.py [--threads 1,2] [--rows 1,2,4,8,16,32]
    python bench/decode_gemv.py --sizes 1,4,16,32,64,128 [--rows 1,8,16] [--threads 2]

The weights are the tiny hybrid M1's (8 layers: qkv 256->768, gate and out 256->256, two of four experts
256->1024->256; LM head 256->2048): about 36 MB of float32 per token, more than the L3 cache here, as in a real
decode step. Each variant runs over all of them in turn; best of 3 rounds of 30 repetitions, rounds alternating
between variants.

``--sizes`` instead sweeps the size of one weight (MiB of float32, 4:1 rows to columns): the compiled dot products
against the BLAS (column-major) at each row count, over enough copies of the weight (160 MiB) that every call reads
it from memory, as a real decode step does. This is where the dot products stop paying when each row re-reads W
(mmx.model.linear.STREAMED_WEIGHT_MAX_BYTES).
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from mmx.model.linear import dot_rows
from mmx.model.moe import grouped_moe

LAYERS, HIDDEN, EXPERTS, WIDTH, TOP_K, VOCAB = 8, 256, 4, 512, 2, 2048


def best_time(runs: dict[str, Callable[[], object]], rounds: int = 3, reps: int = 30) -> dict[str, float]:
    best = dict.fromkeys(runs, float("inf"))
    for fn in runs.values():
        fn()
    for _ in range(rounds):
        for name, fn in runs.items():
            start = time.perf_counter()
            for _ in range(reps):
                fn()
            best[name] = min(best[name], (time.perf_counter() - start) / reps)
    return best


def size_sweep(sizes_mib: list[int], rows_list: list[int], threads_list: list[int]) -> None:
    import torch._dynamo

    torch._dynamo.config.recompile_limit = 4 * len(sizes_mib) * len(rows_list)  # one graph per shape, none eager
    compiled = torch.compile(dot_rows, dynamic=False)
    print("| threads | weight (MiB) | rows | BLAS column-major (us) | compiled dot products (us) | dots / BLAS |")
    print("|---|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    for mib in sizes_mib:
        cols = 1 << (((mib << 18).bit_length() - 1) // 2 - 1)  # out = 4 x in, out x in = mib MiB of float32
        out = (mib << 18) // cols
        copies = max(2, (160 << 20) // (out * cols * 4))
        weights = [torch.randn(out, cols, generator=gen) for _ in range(copies)]
        column = [w.t().contiguous().t() for w in weights]
        for threads in threads_list:
            torch.set_num_threads(threads)
            for rows in rows_list:
                x = torch.randn(rows, cols, generator=gen)
                runs = {"blas": cycling(F.linear, x, column), "dots": cycling(compiled, x, weights)}
                with torch.inference_mode():
                    t = best_time(runs, reps=10)
                ratio = t["dots"] / t["blas"]
                print(f"| {threads} | {mib} | {rows} | {t['blas'] * 1e6:,.0f} | {t['dots'] * 1e6:,.0f} | {ratio:.2f} |")


def cycling(fn: Callable, x: torch.Tensor, weights: list[torch.Tensor]) -> Callable[[], object]:
    """``fn(x, w)`` over the weights in turn, one per call."""
    turn = itertools.cycle(weights)
    return lambda: fn(x, next(turn))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", default="1,2")
    p.add_argument("--rows", default="1,2,4,8,16,32")
    p.add_argument("--sizes", help="sweep one weight's size instead (MiB, comma-separated)")
    args = p.parse_args()
    if args.sizes:
        ints = lambda text: [int(v) for v in text.split(",")]  # noqa: E731
        size_sweep(ints(args.sizes), ints(args.rows), ints(args.threads))
        return
    gen = torch.Generator().manual_seed(0)
    shapes = [(3 * HIDDEN, HIDDEN), (HIDDEN, HIDDEN), (HIDDEN, HIDDEN)] * LAYERS + [(VOCAB, HIDDEN)]
    dense = [torch.randn(shape, generator=gen) for shape in shapes]
    column = [w.t().contiguous().t() for w in dense]
    gate_up = [torch.randn(EXPERTS, 2 * WIDTH, HIDDEN, generator=gen) for _ in range(LAYERS)]
    down = [torch.randn(EXPERTS, HIDDEN, WIDTH, generator=gen) for _ in range(LAYERS)]
    gate_up_col = [w.transpose(1, 2).contiguous().transpose(1, 2) for w in gate_up]
    down_col = [w.transpose(1, 2).contiguous().transpose(1, 2) for w in down]

    def dots(x: torch.Tensor, *ws: torch.Tensor) -> list[torch.Tensor]:
        return [dot_rows(x, w) for w in ws]

    def experts_dots(x, ids, mix, gate_ups, downs):
        out = []
        for gu, dn in zip(gate_ups, downs):
            gate, up = dot_rows(x[:, None, :], gu[ids]).chunk(2, dim=-1)
            y = dot_rows(F.silu(gate) * up, dn[ids])
            out.append((y * mix[..., None]).sum(1))
        return out

    def variants(x: torch.Tensor, ids: torch.Tensor, mix: torch.Tensor) -> dict[str, Callable[[], object]]:
        return {
            "row": lambda: [F.linear(x, w) for w in dense],
            "col": lambda: [F.linear(x, w) for w in column],
            "dots": lambda: compiled_dots(x, *dense),
            "grouped": lambda: [grouped_moe(x, ids, mix, gu, dn, F.silu) for gu, dn in zip(gate_up_col, down_col)],
            "expert_dots": lambda: compiled_experts(x, ids, mix, gate_up, down),
        }

    compiled_dots = torch.compile(dots, dynamic=False)
    compiled_experts = torch.compile(experts_dots, dynamic=False)
    mb = sum(w.numel() for w in dense) * 4 / 1e6
    print(f"linear maps: {mb:.1f} MB of float32 weights; experts: {TOP_K} of {EXPERTS} per token, {LAYERS} layers")
    print(
        "| threads | rows | linear: BLAS row-major (ms) | BLAS column-major | compiled dot products |"
        " experts: grouped GEMM, column-major (ms) | compiled dot products |"
    )
    print("|---|---|---|---|---|---|---|")
    with torch.inference_mode():
        for threads in [int(t) for t in args.threads.split(",")]:
            torch.set_num_threads(threads)
            for rows in [int(r) for r in args.rows.split(",")]:
                x = torch.randn(rows, HIDDEN, generator=gen)
                ids = torch.stack([torch.randperm(EXPERTS, generator=gen)[:TOP_K] for _ in range(rows)])
                mix = torch.rand(rows, TOP_K, generator=gen)
                t = best_time(variants(x, ids, mix))
                cells = [f"{t[k] * 1e3:.2f}" for k in ("row", "col", "dots", "grouped", "expert_dots")]
                print(f"| {threads} | {rows} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
