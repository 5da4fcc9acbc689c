"""Prefix caching on agent-shaped traffic: concurrent sessions of tool-loop turns over a shared system prompt.

Every turn resends the whole conversation: the system prompt (shared by all sessions), the previous turns, the
model's last reply, and a tool result of 50-200 tokens. The same sessions run twice in one process, with prefix
caching on and off, on the same model: prompt tokens computed (fed to the model), time to first token per turn, and
wall time; snapshot memory at the end.

    python bench/prefix_cache.py                       # mmx-tiny and the tiny hybrid M1 bench config
    python bench/prefix_cache.py --reply-tokens 16-48  # replies of varied length: the sessions drift apart
    python bench/prefix_cache.py --models mmx-tiny --sessions 4 --turns 3    # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
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
from mmx.engine import AsyncLLM, LLMEngine, SamplingParams
from mmx.model.weights import load_model

END = 2  # the message end (mmx-tiny's EOS; the bench config is given the same)


def load(name: str, tmp: str) -> mmx.MiniMaxForCausalLM:
    if name == "mmx-tiny":
        path = embedded_model_path()
        if path is None:
            raise SystemExit("the embedded mmx-tiny model is not installed")
        return load_model(path)
    config = mmx.MiniMaxConfig.from_dict(tiny_hybrid_config())
    return mmx.MiniMaxForCausalLM(config).init_weights(seed=0).eval()


def words(gen: torch.Generator, n: int, vocab: int) -> list[int]:
    ids = torch.randint(3, vocab, (n,), generator=gen).tolist()
    return [t if t != END else END + 1 for t in ids]


class Session:
    """One agent: its conversation so far and the tool results it will get (fixed by its seed)."""

    def __init__(self, system: list[int], index: int, turns: int, vocab: int, replies: tuple[int, int]):
        gen = torch.Generator().manual_seed(1000 + index)
        self.prompt = [*system, *words(gen, 24, vocab), END, 5]  # the user's task, then the assistant's header
        self.tools = [words(gen, int(torch.randint(50, 201, (1,), generator=gen)), vocab) for _ in range(turns)]
        self.reply_tokens = [int(torch.randint(replies[0], replies[1] + 1, (1,), generator=gen)) for _ in range(turns)]


async def run_session(engine: AsyncLLM, session: Session, index: int, turns: int, out: dict) -> None:
    prompt = session.prompt
    for turn in range(turns):
        params = SamplingParams(temperature=0, max_tokens=session.reply_tokens[turn], ignore_eos=True)
        start = time.perf_counter()
        first = None
        async for output in engine.generate(prompt, params, f"s{index}-t{turn}"):
            if first is None and output.outputs[0].new_token_ids:
                first = time.perf_counter() - start
            final = output
        out["ttft"].append(first)
        out["cached"] += final.num_cached_tokens
        out["prompt"] += len(prompt)
        reply = final.outputs[0].token_ids
        out["replies"][index, turn] = reply
        prompt = [*prompt, *reply, END, 6, *session.tools[turn], END, 5]


def count_prompt_tokens_fed(engine: LLMEngine) -> list[int]:
    """Wrap the scheduler so that it counts prompt tokens fed to the model (prefill work, recomputation included)."""
    fed = [0]
    schedule = engine.scheduler.schedule

    def counting():
        plan = schedule()
        for seq in plan.decode:
            fed[0] += seq.num_computed_tokens < len(seq.prompt_token_ids)
        for seq, n in plan.prefill:
            fed[0] += max(0, min(n, len(seq.prompt_token_ids) - seq.num_computed_tokens))
        return plan

    engine.scheduler.schedule = counting
    return fed


def measure(model, caching: bool, args, vocab: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    system = [*words(gen, args.system_tokens - 3, vocab), END, 4]  # the system message, then a turn opens
    low, _, high = args.reply_tokens.partition("-")
    replies = (int(low), int(high or low))
    sessions = [Session(system, i, args.turns, vocab, replies) for i in range(args.sessions)]
    engine = LLMEngine(
        model,
        eos_token_ids=[END],
        max_model_len=args.max_model_len,
        max_num_seqs=args.sessions,
        cache_memory_gb=args.cache_gb or None,
        enable_prefix_caching=caching,
        max_num_batched_tokens=args.max_num_batched_tokens,
    )
    engine.warm_up()  # the compiled decode graphs, before the clock starts (a server does the same)
    fed = count_prompt_tokens_fed(engine)
    runner = AsyncLLM(engine)
    out = {"ttft": [], "cached": 0, "prompt": 0, "replies": {}}

    async def main():
        await asyncio.gather(*(run_session(runner, s, i, args.turns, out) for i, s in enumerate(sessions)))

    start = time.perf_counter()
    asyncio.run(main())
    out["wall"] = time.perf_counter() - start
    runner.shutdown()
    out["fed"] = fed[0]
    prefix = engine.prefix_cache
    out["snapshots"] = prefix.num_snapshots_held if prefix else 0
    out["snapshot_bytes"] = prefix.snapshot_bytes if prefix else 0
    out["snapshot_capacity"] = prefix.num_snapshots if prefix else 0
    out["preemptions"] = engine.scheduler.num_preemptions
    return out


def pct(values: list[float], q: float) -> float:
    data = sorted(values)
    return data[min(len(data) - 1, round(q * (len(data) - 1)))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="mmx-tiny,tiny-hybrid")
    p.add_argument("--sessions", type=int, default=16)
    p.add_argument("--turns", type=int, default=10)
    p.add_argument("--system-tokens", type=int, default=2048)
    p.add_argument("--reply-tokens", default="32", help="tokens per reply: N, or LOW-HIGH drawn per turn")
    p.add_argument("--max-model-len", type=int, default=8192)
    p.add_argument(
        "--cache-gb", type=float, default=1.0, help="the cache's size; 0: the engine's default (from the sessions)"
    )
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="tokens per step (the engine's default)")
    args = p.parse_args()
    print(f"machine: {machine()}\n")
    print(
        f"{args.sessions} concurrent sessions x {args.turns} turns, {args.system_tokens}-token shared system prompt, "
        f"{args.reply_tokens}-token greedy replies, tool results of 50-200 tokens, "
        f"{args.max_num_batched_tokens} tokens per step\n"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            model = load(name, tmp)
            vocab = model.config.vocab_size
            off = measure(model, False, args, vocab)
            on = measure(model, True, args, vocab)
            same = off["replies"] == on["replies"]
            for label, r in (("off", off), ("on", on)):
                rows.append(
                    [
                        name,
                        label,
                        r["prompt"],
                        r["fed"],
                        r["cached"],
                        f"{1000 * statistics.median(r['ttft']):.0f}",
                        f"{1000 * pct(r['ttft'], 0.99):.0f}",
                        f"{r['wall']:.1f}",
                        f"{r['snapshots']} / {r['snapshot_capacity']}, {r['snapshot_bytes'] / 2**20:.1f} MiB",
                        r["preemptions"],
                    ]
                )
            print(
                f"{name}: prompt tokens computed {off['fed'] / max(1, on['fed']):.1f}x fewer, TTFT p50 "
                f"{statistics.median(off['ttft']) / statistics.median(on['ttft']):.1f}x lower, p99 "
                f"{pct(off['ttft'], 0.99) / pct(on['ttft'], 0.99):.1f}x, wall {off['wall'] / on['wall']:.1f}x; "
                f"replies identical with and without caching: {same}",
                flush=True,
            )
    print()
    print(
        table(
            [
                "model",
                "prefix caching",
                "prompt tokens sent",
                "prompt tokens computed",
                "reported cached",
                "TTFT p50 ms",
                "TTFT p99 ms",
                "wall s",
                "snapshots held / capacity, memory",
                "preemptions",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
