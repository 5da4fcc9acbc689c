"""What the idle server's heap trim (mmx.engine.async_engine, ``release_free_memory(collect=False)``) costs and gives
back: bursts of 16 requests (128-token prompts, 32 tokens each) through the engine, then one trim; ms of the trim
and resident MiB before and after it.

Checkpoints are the bench ones that ``scripts/build_llamacpp.py`` writes (``~/.cache/mmx/llama.cpp/checkpoints``).
"""

from __future__ import annotations

import argparse
import os
import random
import time

import torch

from mmx import LLM, SamplingParams
from mmx.utils.memory import release_free_memory, tune_allocator


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoints", default="mmx-tiny,m2-16m")
    p.add_argument("--bursts", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    tune_allocator()
    torch.set_num_threads(args.threads)
    root = os.path.expanduser("~/.cache/mmx/llama.cpp/checkpoints")
    print("| checkpoint | burst | trim (ms) | RSS before (MiB) | RSS after (MiB) |")
    print("|---|---|---|---|---|")
    for name in args.checkpoints.split(","):
        engine = LLM(os.path.join(root, name), dtype="float32").engine
        rng = random.Random(0)
        for burst in range(args.bursts):
            params = SamplingParams(max_tokens=32, ignore_eos=True)
            for i in range(16):
                engine.add_request(f"{burst}-{i}", [rng.randrange(500) for _ in range(128)], params)
            while engine.has_unfinished_requests():
                engine.step()
            before = rss_mib()
            start = time.perf_counter()
            release_free_memory(collect=False)
            ms = (time.perf_counter() - start) * 1e3
            print(f"| {name} | {burst + 1} | {ms:.1f} | {before:.0f} | {rss_mib():.0f} |", flush=True)


if __name__ == "__main__":
    main()
