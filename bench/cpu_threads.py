"""Why `mmx serve` loads its model on a thread that ends (mmx/utils/threads.py): torch's CPU ops under GNU OpenMP,
timed on the first thread to use OpenMP and on a second one, each case in a fresh process.

1. an add of two 200K-float tensors (microseconds);
2. an eager engine decode step of the tiny M2 bench config (hidden 256, 8 layers, random weights), batch 16 after
   128-token prompts (milliseconds): stepped on the main thread; loaded on the main thread and stepped on a second
   one (what `mmx serve` did); loaded on a passing thread and stepped on a second one (what it does now).

    python bench/cpu_threads.py
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from lightning import machine, table

ROOT = os.path.join(os.path.dirname(__file__), "..")

ADD = """
import sys, threading, time, torch
x, y = torch.randn(200_000), torch.randn(200_000)
def bench():
    for _ in range(100): torch.add(x, y)
    t = time.perf_counter()
    for _ in range(5000): torch.add(x, y)
    print((time.perf_counter() - t) / 5000 * 1e6)
if sys.argv[1] == "second":
    torch.add(x, y)  # the main thread starts its pool
    th = threading.Thread(target=bench); th.start(); th.join()
else:
    bench()
"""

STEP = """
import sys, threading, time, torch
sys.path.insert(0, "bench")
from lightning import tiny_hybrid_config
from mmx import MiniMaxConfig, MiniMaxForCausalLM
from mmx.engine import LLMEngine, SamplingParams
from mmx.utils.threads import in_passing_thread
def build():
    config = MiniMaxConfig.from_dict({**tiny_hybrid_config(), "layer_types": ["full_attention"] * 8})
    model = MiniMaxForCausalLM(config).init_weights(seed=0).eval()
    return LLMEngine(model, max_model_len=272, max_num_seqs=16, enforce_eager=True)
def run(engine, n, tag):
    for i in range(16):
        prompt = [(7 * i + j) % 2000 + 3 for j in range(128)]
        engine.add_request(f"{tag}{i}", prompt, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
    engine.step()
    t = time.perf_counter(); steps = 0
    while engine.has_unfinished_requests(): engine.step(); steps += 1
    return (time.perf_counter() - t) / steps * 1e3
def steps(engine):
    run(engine, 4, "w"); print(run(engine, 64, "m"))
case = sys.argv[1]
if case == "main":
    steps(build())
else:
    engine = build() if case == "second" else in_passing_thread(build)
    th = threading.Thread(target=steps, args=(engine,)); th.start(); th.join()
"""


def timed(code: str, case: str, repeats: int) -> float:
    runs = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", code, case], capture_output=True, text=True, check=True, cwd=ROOT)
        runs.append(float(out.stdout.strip().splitlines()[-1]))
    return statistics.median(runs)


def main() -> None:
    repeats = 3
    print(f"machine: {machine()}\n")
    rows = []
    for label, code, cases in (
        ("add of 200K floats (us)", ADD, [("first thread", "first"), ("second thread, main's pool alive", "second")]),
        (
            "M2 decode step, batch 16 (ms)",
            STEP,
            [
                ("main thread", "main"),
                ("loaded on main, stepped on a second thread", "second"),
                ("loaded on a passing thread, stepped on a second thread", "passing"),
            ],
        ),
    ):
        for name, case in cases:
            rows.append([label, name, f"{timed(code, case, repeats):.1f}"])
    print(table(["measure", "where", f"median of {repeats} fresh processes"], rows))


if __name__ == "__main__":
    main()
