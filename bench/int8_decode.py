"""Decode speed with int8 weights (``quantization="int8"``) against float32, in the same run, through the engine:
mmx-tiny (the embedded model) and the tiny hybrid M1 bench config (random weights).

    python bench/int8_decode.py                      # batch 1 and 16 concurrent requests
    python bench/int8_decode.py --batch 1 --rounds 3 --new-tokens 64

Each request: a 32-token prompt, ``--new-tokens`` greedy tokens with ignore_eos. Rounds alternate the two engines;
each figure is the median over rounds of requested tokens per second (prefill of the short prompt included).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from lightning import machine, table, tiny_hybrid_config

import mmx
from mmx.embedded import embedded_model_path
from mmx.engine import SamplingParams
from mmx.llm import LLM
from mmx.utils.memory import tune_allocator


def checkpoints(tmp: str) -> dict[str, str]:
    hybrid = os.path.join(tmp, "hybrid")
    config = mmx.MiniMaxConfig.from_dict(tiny_hybrid_config())
    mmx.MiniMaxForCausalLM(config).init_weights(seed=0).save_pretrained(hybrid)
    found = {"tiny hybrid M1": hybrid}
    if embedded_model_path() is not None:
        found = {"mmx-tiny": embedded_model_path(), **found}
    return found


def weight_bytes(llm: LLM) -> int:
    """Bytes of the decoder layers' tensors (what quantisation changes; embeddings and LM head are left alone)."""
    layers = llm.engine.model.model.layers
    return sum(t.numel() * t.element_size() for t in [*layers.parameters(), *layers.buffers()])


def tokens_per_second(llm: LLM, prompts: list[list[int]], new_tokens: int) -> float:
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    assert all(len(o.outputs[0].token_ids) == new_tokens for o in outs)
    return len(prompts) * new_tokens / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", default="1,16", help="comma-separated numbers of concurrent requests")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tune_allocator()
    print(f"machine: {machine()}\n")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in checkpoints(tmp).items():
            engines = {
                q: LLM(path, dtype="float32", quantization=q, max_model_len=1024, max_num_seqs=16, cache_memory_gb=0.25)
                for q in (None, "int8")
            }
            vocab = engines[None].engine.config.vocab_size
            g = torch.Generator().manual_seed(0)
            for batch in (int(b) for b in args.batch.split(",")):
                prompts = [torch.randint(0, vocab, (32,), generator=g).tolist() for _ in range(batch)]
                for llm in engines.values():
                    tokens_per_second(llm, prompts, 8)  # warm up
                speed: dict[str | None, list[float]] = {None: [], "int8": []}
                for _ in range(args.rounds):
                    for q, llm in engines.items():
                        speed[q].append(tokens_per_second(llm, prompts, args.new_tokens))
                fp32, int8 = statistics.median(speed[None]), statistics.median(speed["int8"])
                row = [name, batch, f"{fp32:.0f}", f"{int8:.0f}", f"{int8 / fp32:.2f}x"]
                row += [f"{weight_bytes(engines[None]) / 1e6:.1f}", f"{weight_bytes(engines['int8']) / 1e6:.1f}"]
                print(row, flush=True)
                rows.append(row)
    print("\n## Decode with int8 weights (greedy tokens/s; median over alternating rounds)\n")
    header = ["model", "requests", "fp32", "int8", "int8 / fp32", "layer weights fp32 (MB)", "int8 (MB)"]
    print(table(header, rows))


if __name__ == "__main__":
    main()
