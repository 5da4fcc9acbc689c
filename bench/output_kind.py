"""What copying whole samples into every output costs a long generation: the engine with ``output_kind``
CUMULATIVE (every output carries all tokens and log-probs so far) against DELTA (only the new ones), in one process.

    python bench/output_kind.py [--requests 16] [--tokens 6000] [--rounds 2]

mmx-tiny, fp32, greedy with ``logprobs=0``, ``--requests`` requests of ``--tokens`` tokens each; figures over the last
200 steps: the step's median time and the mean time in ``_Request.output`` (which builds each output). The two kinds
alternate, ``--rounds`` times each; medians over rounds.
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

from lightning import machine

from mmx.embedded import embedded_model_path
from mmx.engine import LLMEngine, RequestOutputKind, SamplingParams, llm_engine
from mmx.model.weights import load_model
from mmx.utils.threads import in_passing_thread

TAIL = 200


def timed_outputs() -> list[float]:
    """Patch _Request.output to add its time to the returned list (one entry per call)."""
    spent: list[float] = []
    build = llm_engine._Request.output

    def output(self):
        start = time.perf_counter()
        out = build(self)
        spent.append(time.perf_counter() - start)
        return out

    llm_engine._Request.output = output
    return spent


def run(engine: LLMEngine, kind: RequestOutputKind, requests: int, tokens: int, spent: list[float]) -> tuple:
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True, logprobs=0, output_kind=kind)
    for i in range(requests):
        engine.add_request(f"{kind.name}-{time.monotonic()}-{i}", list(range(3, 40 + i)), params)
    steps, step = [], 0
    while engine.has_unfinished_requests():
        if step == tokens - TAIL:
            spent.clear()
        start = time.perf_counter()
        engine.step()
        step += 1
        if step > tokens - TAIL:
            steps.append(time.perf_counter() - start)
    return statistics.median(steps), sum(spent) / len(steps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--tokens", type=int, default=6000)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    spent = timed_outputs()
    engine = in_passing_thread(
        lambda: LLMEngine(
            load_model(embedded_model_path(), dtype="float32"),
            max_num_seqs=args.requests,
            max_model_len=args.tokens + 200,
            enforce_eager=False,
        )
    )
    kinds = (RequestOutputKind.CUMULATIVE, RequestOutputKind.DELTA)
    results: dict[RequestOutputKind, list[tuple[float, float]]] = {kind: [] for kind in kinds}
    for _ in range(args.rounds):
        for kind in kinds:
            results[kind].append(run(engine, kind, args.requests, args.tokens, spent))
    print(machine())
    print(f"{args.requests} requests x {args.tokens} tokens, last {TAIL} steps, medians of {args.rounds} rounds\n")
    print("| output_kind | step (ms) | of which output() (ms) |")
    print("|---|---|---|")
    for kind, rows in results.items():
        step = statistics.median(r[0] for r in rows) * 1e3
        output = statistics.median(r[1] for r in rows) * 1e3
        print(f"| {kind.name} | {step:.2f} | {output:.3f} |")


if __name__ == "__main__":
    main()
