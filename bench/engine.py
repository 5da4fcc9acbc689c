"""Engine benchmarks on the tiny hybrid M1 config (bench/lightning.py: 8 layers, 6 lightning + 2 softmax, hidden 256,
4 experts top-2); every baseline is measured in the same run.

    python bench/engine.py                              # everything (about 10 minutes on 2 cores)
    python bench/engine.py --sections batch1,concurrent --quick

Sections:
  batch1      one request, 32-token prompt, 256 new tokens: mmx LLM vs transformers generate
  concurrent  64 requests, 256-token prompts, 128 new tokens: mmx continuous batching vs transformers generate on one
              left-padded batch of 64
  context     decode time per token after a 1K and a 64K-token prompt
  memory      peak resident memory of a process serving one sequence of 1K ... 64K tokens, hybrid vs all-softmax
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from lightning import machine, table, tiny_hybrid_config

import mmx
from mmx.engine import SamplingParams
from mmx.llm import LLM
from mmx.utils.memory import tune_allocator


def checkpoint(tmp: str, all_softmax: bool = False, max_positions: int = 70000) -> str:
    config = dict(tiny_hybrid_config(), max_position_embeddings=max_positions)
    if all_softmax:
        config["layer_types"] = ["full_attention"] * 8
    path = os.path.join(tmp, "softmax" if all_softmax else "hybrid")
    if not os.path.exists(path):
        mmx.MiniMaxForCausalLM(mmx.MiniMaxConfig.from_dict(config)).init_weights(seed=0).save_pretrained(path)
    return path


def prompts(n: int, length: int, vocab: int = 2048, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (length,), generator=g).tolist() for _ in range(n)]


def hf_model(path: str):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_generate(model, batch: list[list[int]], new_tokens: int) -> float:
    """Seconds for transformers to generate ``new_tokens`` for every prompt, as one left-padded batch."""
    width = max(len(p) for p in batch)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in batch])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    return time.perf_counter() - start


def mmx_generate(llm: LLM, batch: list[list[int]], new_tokens: int) -> float:
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate(batch, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    assert all(len(o.token_ids) == new_tokens for o in outs)
    return elapsed


def section_batch1(args, tmp) -> None:
    path = checkpoint(tmp)
    new = 64 if args.quick else 256
    batch = prompts(1, 32)
    llm = LLM(path, max_model_len=1024, max_num_seqs=4, dtype="float32")
    hf = hf_model(path)
    mmx_generate(llm, batch, 8)  # warm up
    ours = min(mmx_generate(llm, batch, new) for _ in range(3))
    theirs = min(hf_generate(hf, batch, new) for _ in range(2))
    rows = [["1", new, f"{new / ours:.0f}", f"{new / theirs:.0f}", f"{theirs / ours:.2f}x"]]
    print("\n## Batch-1 decode (fp32; new tokens/s)\n")
    print(table(["requests", "new tokens", "mmx", "transformers generate", "mmx / transformers"], rows))


def section_concurrent(args, tmp) -> None:
    path = checkpoint(tmp)
    n, new = (16, 32) if args.quick else (64, 128)
    batch = prompts(n, 256)
    llm = LLM(path, max_model_len=1024, max_num_seqs=n, max_num_batched_tokens=4096, dtype="float32")
    hf = hf_model(path)
    mmx_generate(llm, batch[:2], 4)
    ours = mmx_generate(llm, batch, new)
    theirs = hf_generate(hf, batch, new)
    total = n * new
    rows = [["uniform", n, "256", str(new), f"{total / ours:.0f}", f"{total / theirs:.0f}", f"{theirs / ours:.2f}x"]]
    print(rows[-1], flush=True)
    # Ragged: mixed prompt and output lengths. transformers pads every prompt to the longest and decodes every row
    # until the longest output is done; the engine admits, finishes and frees each request on its own.
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(16, 513, (n,), generator=g).tolist()
    outputs = torch.randint(8, 2 * new + 1, (n,), generator=g).tolist()
    ragged = [p[:length] for p, length in zip(prompts(n, 512, seed=2), lengths)]
    start = time.perf_counter()
    llm.generate(
        ragged, [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in outputs], use_tqdm=False
    )
    ours = time.perf_counter() - start
    theirs = hf_generate(hf, ragged, max(outputs))
    total = sum(outputs)
    rows.append(
        ["ragged", n, "16-512", f"8-{2 * new}", f"{total / ours:.0f}", f"{total / theirs:.0f}", f"{theirs / ours:.2f}x"]
    )
    print(rows[-1], flush=True)
    print(f"\n## {n} concurrent requests (fp32; requested tokens generated per second over the whole run)\n")
    header = ["workload", "requests", "prompt", "new tokens", "mmx", "transformers generate (one padded batch)"]
    print(table([*header, "mmx / transformers"], rows))


def section_context(args, tmp) -> None:
    lengths = [1024, 8192] if args.quick else [1024, 16384, 65536]
    rows = []
    for name, all_softmax in (("hybrid", False), ("all softmax", True)):
        rows += _context_rows(name, checkpoint(tmp, all_softmax), lengths)
    print("\n## Decode time per token against context (fp32, batch 1)\n")
    print(table(["model", "context tokens", "ms per token", "vs 1K"], rows))


def _context_rows(name: str, path: str, lengths: list[int]) -> list[list]:
    llm = LLM(path, max_model_len=max(lengths) + 256, max_num_seqs=2, max_num_batched_tokens=8192, dtype="float32")
    engine = llm.engine
    rows, base = [], None
    for length in lengths:
        engine.add_request("ctx", prompts(1, length)[0], SamplingParams(temperature=0, max_tokens=65, ignore_eos=True))
        while not engine.requests["ctx"].seqs[0].output_token_ids:
            engine.step()  # prefill (in chunks) and the first token
        start = time.perf_counter()
        steps = 0
        while engine.has_unfinished_requests():
            engine.step()
            steps += 1
        per_token = (time.perf_counter() - start) / steps
        base = base or per_token
        rows.append([name, length, f"{per_token * 1e3:.2f}", f"{per_token / base:.2f}x"])
        print(rows[-1], flush=True)
    return rows


MEMORY_PROBE = """
import sys, torch
from mmx.engine import SamplingParams
from mmx.llm import LLM
from mmx.utils.memory import tune_allocator
def status(field):
    return int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1]) * 1024
path, length = sys.argv[1], int(sys.argv[2])
tune_allocator()
llm = LLM(path, max_model_len=length + 64, max_num_seqs=1, max_num_batched_tokens=4096, dtype="bfloat16",
          cache_memory_gb=None)
engine = llm.engine
cache_bytes = sum(t.numel() * t.element_size() for t in [*engine.cache.keys.values(), *engine.cache.values.values(),
                                                         *engine.cache.states.values()])
g = torch.Generator().manual_seed(0)
llm.generate([torch.randint(0, 2048, (length,), generator=g).tolist()],
             SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
print(status("VmHWM:"), cache_bytes)
"""


def section_memory(args, tmp) -> None:
    from mmx.engine.cache import CacheLayout

    lengths = [1024, 8192] if args.quick else [1024, 8192, 32768, 65536]
    rows = []
    for name, all_softmax in (("hybrid (6 lightning + 2 softmax)", False), ("all softmax (8 layers)", True)):
        path = checkpoint(tmp, all_softmax)
        config = mmx.MiniMaxConfig.from_pretrained(path)
        for length in lengths:
            out = subprocess.run(
                [sys.executable, "-c", MEMORY_PROBE, path, str(length)], capture_output=True, text=True, check=True
            )
            peak, _ = (int(x) for x in out.stdout.split())
            need = -(-length // 16) * CacheLayout.bytes_per_block(
                config, 16, torch.bfloat16
            ) + CacheLayout.bytes_per_slot(config)
            rows.append([name, length, f"{need / 2**20:.1f}", f"{peak / 2**20:.0f}"])
            print(rows[-1], flush=True)
    print("\n## Memory against context length (bf16 weights and KV, one sequence)\n")
    print(table(["model", "context tokens", "cache for the sequence (MiB)", "process peak RSS (MiB)"], rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="batch1,concurrent,context,memory")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    tune_allocator()
    torch.manual_seed(0)
    print(f"# bench/engine.py {' '.join(sys.argv[1:])}\n\n{machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.sections.split(","):
            globals()[f"section_{name}"](args, tmp)
    print(json.dumps({"done": True}))


if __name__ == "__main__":
    main()
