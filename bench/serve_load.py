"""Load on a real `mmx serve` process: N concurrent streaming chat requests (greedy) against the same requests sent
one at a time. Checks that every request completes and that its text equals the sequential run; reports
requests/s, generated tokens/s, time to first token and end-to-end latency percentiles.

    python bench/serve_load.py                 # 64 concurrent requests, 64 new tokens each
    python bench/serve_load.py --requests 16 --max-tokens 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from lightning import machine, table, tiny_hybrid_config

import mmx
from mmx.chat import builtin_template, train_bpe_tokenizer
from mmx.chat.tokenizer import M2_SPECIAL_TOKENS

CORPUS = [
    "Lightning attention keeps one state per sequence, so decoding costs the same at any context length. ",
    "A softmax layer every eight layers restores precise recall; the key-value cache grows with the context. ",
    "The engine batches every running request into one forward pass per step and admits new ones as others finish. ",
    "Tool calls are parsed from XML, typed by the JSON schema of the tool, and streamed as argument fragments. ",
]


def build_checkpoint(tmp: str) -> str:
    path = os.path.join(tmp, "tiny-hybrid")
    config = mmx.MiniMaxConfig.from_dict(tiny_hybrid_config())
    mmx.MiniMaxForCausalLM(config).init_weights(seed=0, std=0.1).save_pretrained(path)
    tokenizer = train_bpe_tokenizer(
        CORPUS * 50,
        1024,
        M2_SPECIAL_TOKENS,
        bos_token="]~!b[",
        eos_token="[e~[",
        chat_template=builtin_template("minimax_m2"),
    )
    tokenizer.save_pretrained(path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def body(i: int, max_tokens: int, stream: bool) -> dict:
    words = " ".join(CORPUS[i % len(CORPUS)].split()[: 5 + i % 11])
    return {
        "model": "tiny-hybrid",
        "messages": [{"role": "user", "content": f"Request {i}: {words}"}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": stream,
        "logprobs": True,
        "top_logprobs": 2,
        "return_token_ids": True,
    }


async def one_stream(client: httpx.AsyncClient, url: str, payload: dict) -> dict:
    start = time.perf_counter()
    first = None
    text, reasoning, logprobs, ids = "", "", [], []
    async with client.stream("POST", f"{url}/v1/chat/completions", json=payload, timeout=600) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            delta = chunk["choices"][0]["delta"] if chunk.get("choices") else {}
            piece = (delta.get("content") or "") + (delta.get("reasoning_content") or "")
            if piece and first is None:
                first = time.perf_counter() - start
            text += delta.get("content") or ""
            reasoning += delta.get("reasoning_content") or ""
            if chunk.get("choices") and chunk["choices"][0].get("logprobs"):
                logprobs += chunk["choices"][0]["logprobs"]["content"]
            if chunk.get("choices") and "token_ids" in chunk["choices"][0]:
                ids = chunk["choices"][0]["token_ids"]
    return {"ttft": first, "latency": time.perf_counter() - start, "ids": ids, "logprobs": logprobs}


def same_or_tie(streamed: list[int], reference: list[int], logprobs: list[dict], tolerance: float = 1e-4) -> str:
    """ "same"; "tie" if the first differing token is where the reference's top two were within ``tolerance`` in
    log-probability (float rounding of a different batch decided it); else "different"."""
    for j, (a, b) in enumerate(zip(streamed, reference)):
        if a != b:
            top = logprobs[j]["top_logprobs"]
            return "tie" if len(top) == 2 and top[0]["logprob"] - top[1]["logprob"] < tolerance else "different"
    return "same" if len(streamed) == len(reference) else "different"


def pct(values: list[float], q: float) -> float:
    data = sorted(values)
    return data[min(len(data) - 1, int(q * len(data)))]


async def run(url: str, n: int, max_tokens: int) -> tuple[list[dict], float]:
    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n + 4)
    async with httpx.AsyncClient(limits=limits) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(one_stream(client, url, body(i, max_tokens, True)) for i in range(n)))
        return results, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    print(f"# bench/serve_load.py {' '.join(sys.argv[1:])}\n\n{machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        path = build_checkpoint(tmp)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        command = [
            sys.executable,
            "-m",
            "mmx.cli.main",
            "serve",
            path,
            "--port",
            str(port),
            "--dtype",
            "float32",
            "--max-num-seqs",
            str(args.requests),
            "--max-model-len",
            "1024",
            "--log-level",
            "warning",
        ]
        server = subprocess.Popen(command, env={**os.environ, "MMX_LOG_LEVEL": "WARNING"})
        try:
            for _ in range(600):
                try:
                    if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.2)
            sequential = []
            seq_start = time.perf_counter()
            for i in range(args.requests):
                out = httpx.post(f"{url}/v1/chat/completions", json=body(i, args.max_tokens, False), timeout=600).json()
                sequential.append((out["choices"][0]["token_ids"], out["choices"][0]["logprobs"]["content"]))
            seq_time = time.perf_counter() - seq_start
            results, elapsed = asyncio.run(run(url, args.requests, args.max_tokens))
            metrics = httpx.get(f"{url}/metrics").text
        finally:
            server.terminate()
            server.wait(timeout=30)
    completed = sum(1 for r in results if r["ttft"] is not None)
    verdicts = [same_or_tie(r["ids"], ids, lps) for r, (ids, lps) in zip(results, sequential)]
    identical, ties = verdicts.count("same"), verdicts.count("tie")
    ttft = [r["ttft"] for r in results if r["ttft"] is not None]
    latency = [r["latency"] for r in results]
    tokens = args.requests * args.max_tokens
    p50, p99 = (pct(ttft, q) * 1e3 for q in (0.5, 0.99))
    l50, l99 = (pct(latency, q) for q in (0.5, 0.99))
    rows = [
        [
            args.requests,
            args.max_tokens,
            f"{completed}/{args.requests}",
            f"{identical}/{args.requests} (+{ties} at a tie)",
            f"{args.requests / elapsed:.2f}",
            f"{tokens / elapsed:.0f}",
            f"{tokens / seq_time:.0f}",
            f"{p50:.0f} / {p99:.0f}",
            f"{l50:.2f} / {l99:.2f}",
        ]
    ]
    print(f"\n## {args.requests} concurrent streaming chat requests (tiny hybrid M1, fp32, greedy)\n")
    header = ["requests", "new tokens each", "completed", "identical to sequential", "requests/s", "tokens/s"]
    header += ["tokens/s one at a time", "TTFT p50 / p99 (ms)", "latency p50 / p99 (s)"]
    print(table(header, rows))
    failures = [
        line for line in metrics.splitlines() if line.startswith(("mmx_requests_failed", "mmx_engine_requests_ab"))
    ]
    print(f"\nmean TTFT {statistics.mean(ttft) * 1e3:.0f} ms; server counters: {failures}")
    if completed != args.requests or identical + ties != args.requests:
        sys.exit(1)


if __name__ == "__main__":
    main()
