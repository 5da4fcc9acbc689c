"""What a half-precision K/V cache (``kv_cache_dtype``) costs in accuracy and saves in memory.

The same 1,024-token sequences are scored with float32, bfloat16 and float16 K/V (prompt log-probs, prefilled in
chunks of 128 tokens, so that most tokens attend to K/V read back from the cache): the gap of every next-token
log-prob to the float32 run, how often the top-1 token agrees, and the KV bytes per token. Batch-1 decode speed of
each, measured in the same run.

    python bench/kv_cache_dtype.py
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

from lightning import machine, table, tiny_hybrid_config

import mmx
from mmx.embedded import embedded_model_path
from mmx.engine import LLMEngine, SamplingParams
from mmx.engine.cache import CacheLayout
from mmx.model.weights import load_model

DTYPES = ("float32", "bfloat16", "float16")


def models() -> list[tuple[str, mmx.MiniMaxForCausalLM]]:
    out = []
    path = embedded_model_path()
    if path is not None:
        out.append(("mmx-tiny", load_model(path)))
    hybrid = tiny_hybrid_config()
    out.append(("tiny hybrid M1", mmx.MiniMaxForCausalLM(mmx.MiniMaxConfig.from_dict(hybrid)).init_weights(seed=0)))
    m2 = dict(hybrid, layer_types=["full_attention"] * 8)
    out.append(("tiny, all softmax", mmx.MiniMaxForCausalLM(mmx.MiniMaxConfig.from_dict(m2)).init_weights(seed=0)))
    return [(name, model.eval()) for name, model in out]


def sequences(model, count: int, length: int) -> list[list[int]]:
    """Text the model wrote itself: sampled at T=1 from short random prompts."""
    engine = LLMEngine(model, max_model_len=length + 8, enable_prefix_caching=False)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, model.config.vocab_size, (8,), generator=gen).tolist() for _ in range(count)]
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, SamplingParams(temperature=1.0, seed=i, max_tokens=length - 8))
    out = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                out[int(o.request_id)] = prompts[int(o.request_id)] + o.outputs[0].token_ids
    return [out[i] for i in range(count)]


def score(model, dtype: str, seqs: list[list[int]]) -> list[list[tuple[float, int]]]:
    """Per sequence, per position: (log-prob of the actual next token, top-1 token id)."""
    engine = LLMEngine(
        model, max_model_len=1100, max_num_batched_tokens=128, kv_cache_dtype=dtype, enable_prefix_caching=False
    )
    result = []
    for i, seq in enumerate(seqs):
        engine.add_request(str(i), seq, SamplingParams(max_tokens=1, prompt_logprobs=1))
        final = None
        while engine.has_unfinished_requests():
            for o in engine.step():
                final = o if o.finished else final
        entries = final.prompt_logprobs[1:]
        result.append([(e.logprob, e.top[0][0]) for e in entries])
    return result


def decode_speed(model, dtype: str, tokens: int = 128) -> float:
    engine = LLMEngine(model, max_model_len=1200, kv_cache_dtype=dtype, enable_prefix_caching=False)
    prompt = [3 + i % (model.config.vocab_size - 3) for i in range(1000)]
    engine.add_request("w", prompt, SamplingParams(max_tokens=tokens, ignore_eos=True))
    engine.step()  # the prefill
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    return tokens / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sequences", type=int, default=4)
    p.add_argument("--length", type=int, default=1024)
    args = p.parse_args()
    print(f"machine: {machine()}\n")
    rows = []
    for name, model in models():
        seqs = sequences(model, args.sequences, args.length)
        reference = score(model, "float32", seqs)
        for dtype in DTYPES:
            got = reference if dtype == "float32" else score(model, dtype, seqs)
            gaps = [abs(a[0] - b[0]) for ra, rb in zip(reference, got) for a, b in zip(ra, rb)]
            agree = [a[1] == b[1] for ra, rb in zip(reference, got) for a, b in zip(ra, rb)]
            per_token = CacheLayout.bytes_per_block(model.config, 1, getattr(torch, dtype))
            speed = statistics.median(decode_speed(model, dtype) for _ in range(3))
            rows.append(
                [
                    name,
                    dtype,
                    f"{max(gaps):.2e}",
                    f"{statistics.mean(gaps):.2e}",
                    f"{100 * sum(agree) / len(agree):.2f}%",
                    per_token,
                    f"{speed:.0f}",
                ]
            )
            print(" | ".join(str(c) for c in rows[-1]), flush=True)
    print()
    print(
        table(
            [
                "model",
                "kv_cache_dtype",
                "max abs logprob gap",
                "mean abs logprob gap",
                "top-1 agreement",
                "KV bytes / token",
                "batch-1 decode tok/s at 1K",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
