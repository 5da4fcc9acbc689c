"""oneDNN against MKL for float32 products on the CPU, the choice behind :func:`mmx.model.linear.linear`.

    python bench/onednn_linear.py [--threads 2] [--parts products,experts,prefill,blocks,kernels]

Part 1: ``x @ W.T`` for the bench models' weight shapes at 1 to 2048 rows, through ``F.linear`` (MKL), oneDNN
with the same plain weights called with the exact row count, and mmx's :func:`mmx.model.linear.onednn_linear`
(row blocks padded to a few sizes), alternately, medians of 300 calls; "taken" says whether
:func:`mmx.model.linear.linear` sends that product to oneDNN. Part 2: the MoE experts of a step (E experts,
top-k of T tokens) as torch's grouped GEMM and as the per-expert loop through :func:`mmx.model.linear.linear`.
Part 3: a 4096-token prefill through the engine on the bench models (mmx-tiny, the tiny hybrid, tiny M2; fp32),
with the oneDNN route off and on alternately (``mmx.model.linear.ONEDNN_LINEAR``), 3 rounds, medians.
Part 4 (blocks): the same prefill with oneDNN called in blocks of 256 rows only (as before) and in blocks of 256
rows times a power of two up to 8192 (:func:`mmx.model.linear.row_blocks`), alternately.
Part 5: resident memory added by 766 distinct row counts (100 to 2,396) of one 1024 x 256 weight, first through
:func:`mmx.model.linear.onednn_linear` (row blocks), then through oneDNN with exact row counts.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import mmx.model.linear as linear_mod
from mmx.model.linear import onednn_linear, onednn_pays
from mmx.model.moe import combine_per_expert, grouped_moe, swiglu


def median_us(fns: list[Callable[[], object]], calls: int = 300) -> list[float]:
    """Per-call medians of each function, calls interleaved so that drift hits all alike."""
    for f in fns:
        for _ in range(20):
            f()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(calls):
        for f, ts in zip(fns, times):
            start = time.perf_counter()
            f()
            ts.append(time.perf_counter() - start)
    return [statistics.median(ts) * 1e6 for ts in times]


def onednn(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


def products() -> None:
    print("| in x out | rows | MKL (us) | oneDNN (us) | MKL / oneDNN | mmx blocks (us) | MKL / blocks | taken |")
    print("|---|---|---|---|---|---|---|---|")
    for k, n in ((192, 192), (192, 768), (384, 192), (256, 256), (256, 1024), (512, 256), (256, 2048)):
        w = torch.randn(n, k)
        for rows in (1, 2, 4, 8, 16, 64, 100, 512, 2048):
            x = torch.randn(rows, k)
            torch.testing.assert_close(onednn(x, w), F.linear(x, w), rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(onednn_linear(x, w), F.linear(x, w), rtol=1e-4, atol=1e-4)
            mkl, dnn, blocks = median_us([partial(F.linear, x, w), partial(onednn, x, w), partial(onednn_linear, x, w)])
            taken = "yes" if onednn_pays(x, w) else "no"
            cells = [f"{k} x {n}", rows, f"{mkl:.1f}", f"{dnn:.1f}", f"{mkl / dnn:.2f}x", f"{blocks:.1f}"]
            print("| " + " | ".join(map(str, [*cells, f"{mkl / blocks:.2f}x", taken])) + " |")


def _expert(gate_up: torch.Tensor, down: torch.Tensor, expert: int, rows: torch.Tensor) -> torch.Tensor:
    return swiglu(rows, gate_up[expert], down[expert], F.silu)


def experts() -> None:
    print("\n| experts x (hidden, width), top-k | tokens | grouped GEMM (us) | per expert via linear (us) | ratio |")
    print("|---|---|---|---|---|")
    for e, d, i, k in ((4, 192, 384, 2), (4, 256, 512, 2), (32, 1024, 512, 4)):
        gate_up, down = torch.randn(e, 2 * i, d) * 0.05, torch.randn(e, d, i) * 0.05
        for tokens in (16, 32, 128, 512):
            x = torch.randn(tokens, d)
            ids = torch.stack([torch.randperm(e)[:k] for _ in range(tokens)])
            weights = torch.rand(tokens, k)

            loop = partial(combine_per_expert, x, ids, weights, e, partial(_expert, gate_up, down))
            grouped = partial(grouped_moe, x, ids, weights, gate_up, down, F.silu)
            torch.testing.assert_close(loop(), grouped(), rtol=1e-4, atol=1e-4)
            g, lp = median_us([grouped, loop], calls=100)
            print(f"| {e} x ({d}, {i}), top-{k} | {tokens} | {g:.0f} | {lp:.0f} | {g / lp:.2f}x |")


def prefill(toggle: Callable[[bool], None], labels: tuple[str, str], rounds: int = 3, tokens: int = 4096) -> None:
    """A ``tokens``-token prefill through the engine on the bench models with ``toggle(False)`` and ``toggle(True)``
    alternately; medians of ``rounds`` after one warm-up each."""
    from compiled_decode import build

    from mmx.engine import LLMEngine, SamplingParams
    from mmx.engine.args import EngineArgs

    print(f"\n| model | prefill tokens/s, {labels[0]} | {labels[1]} | ratio |")
    print("|---|---|---|---|")
    for name in ("mmx-tiny", "hybrid", "m2"):
        model = build(name)
        args = EngineArgs(max_num_seqs=2, max_model_len=tokens + 16, enable_prefix_caching=False)
        engine = LLMEngine(model, args, eos=None)
        prompt = torch.randint(3, model.config.vocab_size, (tokens,), generator=torch.Generator().manual_seed(0))
        rates: dict[bool, list[float]] = {False: [], True: []}
        for i in range(2 * rounds + 2):
            use = i % 2 == 1
            toggle(use)
            engine.add_request(f"p{i}", prompt.tolist(), SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
            start = time.perf_counter()
            while engine.has_unfinished_requests():
                engine.step()
            if i >= 2:  # the first of each is a warm-up
                rates[use].append(tokens / (time.perf_counter() - start))
        toggle(True)
        off, on = statistics.median(rates[False]), statistics.median(rates[True])
        print(f"| {name} | {off:,.0f} | {on:,.0f} | {on / off:.2f}x |")


LARGEST_BLOCK = linear_mod.LARGEST_BLOCK


def onednn_route(use: bool) -> None:
    linear_mod.ONEDNN_LINEAR = use and linear_mod._onednn_usable()


def large_blocks(use: bool) -> None:
    """Blocks up to LARGEST_BLOCK rows (mmx's), or blocks of ROW_BLOCK rows only (before)."""
    linear_mod.LARGEST_BLOCK = LARGEST_BLOCK if use else linear_mod.ROW_BLOCK


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def kernels() -> None:
    weight = torch.randn(1024, 256)
    print("\n| calls with 766 distinct row counts | RSS added (MiB) |")
    print("|---|---|")
    for name, fn in (("mmx blocks", onednn_linear), ("oneDNN, exact row counts", onednn)):
        before = _rss_mib()
        for rows in range(100, 2400, 3):
            fn(torch.randn(rows, 256), weight)
        print(f"| {name} | {_rss_mib() - before:.0f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--parts", default="products,experts,prefill,blocks,kernels")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    parts = args.parts.split(",")
    with torch.inference_mode():
        if "products" in parts:
            products()
        if "experts" in parts:
            experts()
    if "prefill" in parts:
        prefill(onednn_route, ("MKL", "oneDNN route"))
    if "blocks" in parts:
        prefill(large_blocks, ("oneDNN in 256-row blocks", "in blocks up to 8192 rows"))
    if "kernels" in parts:  # last: the exact row counts leave their kernels behind
        with torch.inference_mode():
            kernels()


if __name__ == "__main__":
    main()
