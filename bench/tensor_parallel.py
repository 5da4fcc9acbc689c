"""Tensor parallelism on the CPU: what one rank holds and reads when it loads, and decode speed against one process.

1. Loading: a 0.5B-parameter M2-shaped checkpoint (bf16, 1 GB) is loaded in a fresh process, whole and as each rank
   of 2 (tensor parallel, then expert parallel); each process reports its weight bytes and its peak resident memory
   above the interpreter with torch imported (measured in the same process before loading).
2. Decode: the tiny hybrid bench config, greedy, batch 1 and 16, one process against 2 ranks (gloo), alternating.
3. Latency of one gloo all-reduce of a [1, 256] float32 tensor between 2 processes (what each collective of a
   sharded decode step waits).

    python bench/tensor_parallel.py
    python bench/tensor_parallel.py --skip-load --skip-decode    # the all-reduce latency only
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch
from lightning import machine, table, tiny_hybrid_config

from mmx import LLM, MiniMaxConfig, MiniMaxForCausalLM, SamplingParams

LOAD_CONFIG = dict(
    hidden_size=1024, intermediate_size=512, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4,
    head_dim=64, num_local_experts=32, num_experts_per_tok=4, vocab_size=32000,
)  # fmt: skip

# Run in a fresh interpreter: the peak resident memory of loading one rank (or the whole model).
LOAD_ONE = """
import json, sys, torch
from mmx.parallel.group import ParallelGroup
from mmx.parallel.loading import load_shard
from mmx.model.modeling import MiniMaxForCausalLM
def high_water():  # VmHWM: this process's peak resident set (ru_maxrss would carry the parent's over the fork)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
base = high_water()
path, rank, size, ep = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
if size == 1:
    model = MiniMaxForCausalLM.from_pretrained(path)
else:
    model = load_shard(path, ParallelGroup(rank, size, ep))
held = sum(t.nbytes for t in {id(t): t for t in [*model.parameters(), *model.buffers()]}.values())
peak = high_water()
print(json.dumps({"weights": held, "peak_above_base": (peak - base) * 1024}))
"""


def build_checkpoint(tmp: str) -> str:
    config = MiniMaxConfig.from_preset("tiny-m2", **LOAD_CONFIG)
    model = MiniMaxForCausalLM(config).init_weights(seed=0).to(torch.bfloat16)
    path = os.path.join(tmp, "m2-0.5b")
    model.save_pretrained(path)
    del model
    return path


def measure_load(path: str) -> list[list]:
    rows = []
    for label, size, ep in (("one process", 1, False), ("tensor parallel 2", 2, False), ("expert parallel 2", 2, True)):
        for rank in range(size):
            out = subprocess.run(
                [sys.executable, "-c", LOAD_ONE, path, str(rank), str(size), "1" if ep else "0"],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            got = json.loads(out.stdout.strip().splitlines()[-1])
            mib = 2**20
            rows.append([
                label, f"{rank}/{size}", f"{got['weights'] / mib:.0f}", f"{got['peak_above_base'] / mib:.0f}",
                f"{got['peak_above_base'] / got['weights']:.2f}",
            ])  # fmt: skip
    return rows


ALL_REDUCE = """
import sys, time, torch, torch.distributed as dist
rank, port = int(sys.argv[1]), sys.argv[2]
torch.set_num_threads(1)
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
x = torch.zeros(1, 256)
for _ in range(100): dist.all_reduce(x)
t = time.perf_counter()
for _ in range(1000): dist.all_reduce(x)
if rank == 0: print((time.perf_counter() - t) / 1000 * 1e6)
dist.destroy_process_group()
"""


def all_reduce_us() -> float:
    from mmx.parallel.group import free_port

    port = str(free_port())
    other = subprocess.Popen([sys.executable, "-c", ALL_REDUCE, "1", port])
    out = subprocess.run([sys.executable, "-c", ALL_REDUCE, "0", port], capture_output=True, text=True, check=True)
    other.wait()
    return float(out.stdout.strip())


def report_all_reduce(repeats: int) -> None:
    runs = [all_reduce_us() for _ in range(repeats)]
    print(f"gloo all-reduce of [1, 256] float32, 2 processes: {statistics.median(runs):.0f} us (median of {repeats})")


def decode_rate(path: str, batch: int, tp: int, steps: int) -> float:
    llm = LLM(path, max_model_len=512, cache_memory_gb=0.1, tensor_parallel_size=tp, enforce_eager=True)
    try:
        prompts = [[(7 * i + j) % 2000 + 3 for j in range(32)] for i in range(batch)]
        params = SamplingParams(max_tokens=steps, temperature=0, ignore_eos=True)
        llm.generate(prompts, SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)  # warm
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        return batch * steps / (time.perf_counter() - start)
    finally:
        llm.engine.shutdown()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--skip-load", action="store_true")
    p.add_argument("--skip-decode", action="store_true")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=64)
    args = p.parse_args()
    print(f"machine: {machine()}\n")
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_load:
            path = build_checkpoint(tmp)
            print("loading a 0.5B-parameter M2-shaped bf16 checkpoint (MiB; peak resident memory above python+torch)")
            print(table(["load", "rank", "weights held", "peak RSS", "peak / weights"], measure_load(path)))
            print()
        if args.skip_decode:
            report_all_reduce(args.repeats)
            return
        config = MiniMaxConfig.from_dict(tiny_hybrid_config())
        hybrid = os.path.join(tmp, "hybrid")
        MiniMaxForCausalLM(config).init_weights(seed=0).save_pretrained(hybrid)
        rows = []
        for batch in (1, 16):
            rates = {1: [], 2: []}
            for _ in range(args.repeats):
                for tp in (1, 2):
                    rates[tp].append(decode_rate(hybrid, batch, tp, args.steps))
            one, two = statistics.median(rates[1]), statistics.median(rates[2])
            rows.append([batch, f"{one:.0f}", f"{two:.0f}", f"{two / one:.2f}x"])
        print("decode, tiny hybrid M1 bench config, fp32, eager, tokens/s (median of alternating runs)")
        print(table(["batch", "one process", "2 ranks (gloo)", "2 ranks / one"], rows))
        print()
        report_all_reduce(args.repeats)


if __name__ == "__main__":
    main()
