"""Decode through the engine, eager against the two compilers of the decode step, on the bench models, in one run.

    python bench/compiled_decode.py [--models mmx-tiny,hybrid,m2] [--batches 1,4,16] [--threads 2]

For each model and batch size B: B requests of 16-token prompts decode 128 tokens each (greedy, ignore_eos); the
figure is decode tokens per second over the steps after every request has its first token (prefill excluded).
The eager engine (``enforce_eager=True``, column-major weights) and the compiled ones (``decode_compiler``
"inductor": torch.compile in the process; "aot": AOTInductor in a child process, the CPU's default) run
alternately, 3 rounds, medians. The compiled engines' graphs are built first (``LLMEngine.warm_up``) and their
build (or cache load) time is reported.
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
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))

from build_llamacpp import _m2_config
from lightning import machine, tiny_hybrid_config

import mmx
from mmx.embedded import embedded_model_path
from mmx.engine import LLMEngine, SamplingParams
from mmx.model.weights import load_model


def build(name: str) -> mmx.MiniMaxForCausalLM:
    if name == "mmx-tiny":
        return load_model(embedded_model_path(), dtype="float32")
    config = tiny_hybrid_config() if name == "hybrid" else _m2_config(2048)
    return mmx.MiniMaxForCausalLM(mmx.MiniMaxConfig.from_dict(config)).init_weights(seed=0, std=0.05)


def decode_rate(engine: LLMEngine, batch: int, new_tokens: int, seed: int) -> float:
    gen = torch.Generator().manual_seed(seed)
    params = SamplingParams(temperature=0, max_tokens=new_tokens + 1, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"{seed}-{i}", torch.randint(3, 500, (16,), generator=gen).tolist(), params)
    while any(not seq.output_token_ids for r in engine.requests.values() for seq in r.seqs):
        engine.step()
    start, tokens = time.perf_counter(), 0
    while engine.has_unfinished_requests():
        tokens += sum(len(out.outputs[0].new_token_ids) for out in engine.step())
    return tokens / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="mmx-tiny,hybrid,m2")
    p.add_argument("--batches", default="1,4,16")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    print(machine())
    print(f"threads {args.threads}; {args.tokens} decode tokens per request; medians of {args.rounds} rounds\n")
    print("| model | batch | eager (tokens/s) | inductor | aot | inductor / eager | aot / inductor | built in |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        settings = dict(max_model_len=1024, max_num_seqs=max(batches))
        engines = {"eager": LLMEngine(build(name), enforce_eager=True, **settings)}
        built = []
        for compiler in ("inductor", "aot"):
            engine = LLMEngine(build(name), enforce_eager=False, decode_compiler=compiler, **settings)
            engine.warm_up()
            graph = engine.decode_graph
            ok = graph.failed is None and graph.compiler == compiler
            built.append(f"{compiler} {graph.compile_seconds:.0f} s" if ok else f"{compiler} failed or fell back")
            engines[compiler] = engine
        for batch in batches:
            rates: dict[str, list[float]] = {kind: [] for kind in engines}
            for engine in engines.values():
                decode_rate(engine, batch, 8, 0)  # first steps of a fresh engine
            for r in range(args.rounds):
                for kind, engine in engines.items():
                    rates[kind].append(decode_rate(engine, batch, args.tokens, r + 1))
            e, i, a = (statistics.median(rates[kind]) for kind in ("eager", "inductor", "aot"))
            rates_cells = f"{e:,.0f} | {i:,.0f} | {a:,.0f} | {i / e:.2f}x | {a / i:.2f}x"
            print(f"| {name} | {batch} | {rates_cells} | {', '.join(built)} |", flush=True)


if __name__ == "__main__":
    main()
