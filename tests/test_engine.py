"""The engine against plain full-recompute generation, and its sampling, stopping, aborting and streaming."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import os
import time

import pytest
import torch

import mmx
from mmx.engine import AsyncLLM, LLMEngine, RequestOutputKind, SamplingParams
from mmx.engine.cache import CacheLayout
from mmx.llm import LLM
from mmx.model.generate import greedy_generate_recompute

from .conftest import tiny_model


def _budget_gb(config, dtype, blocks: int, slots: int, block_size: int) -> float:
    nbytes = blocks * CacheLayout.bytes_per_block(config, block_size, dtype) + slots * CacheLayout.bytes_per_slot(
        config
    )
    return nbytes / (1 << 30)


def _run_staggered(
    engine: LLMEngine, requests: list[tuple[list[int], int]], arrivals: list[int]
) -> dict[str, list[int]]:
    """Add request i at step arrivals[i]; run to completion; return token ids per request."""
    results, step, pending = {}, 0, list(range(len(requests)))
    while pending or engine.has_unfinished_requests():
        for i in [i for i in pending if arrivals[i] <= step]:
            prompt, max_tokens = requests[i]
            engine.add_request(f"r{i}", prompt, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
            pending.remove(i)
        for out in engine.step():
            if out.finished:
                results[out.request_id] = out.outputs[0].token_ids
        step += 1
    return results


@pytest.mark.parametrize("preset", ["tiny-m1", "tiny-m2"])
@pytest.mark.parametrize("long_context", [1024, 8], ids=["gathered-history", "viewed-history"])
def test_engine_greedy_equals_full_recompute(preset, long_context, monkeypatch):
    """16 requests of mixed lengths arriving at different steps, chunked prefill (budget 24 tokens per step) and a
    cache so small that sequences get preempted and recomputed: every output equals full-recompute greedy. Run
    with softmax histories gathered into the batch, and read in place where their blocks are contiguous."""
    monkeypatch.setattr("mmx.engine.paged_batch.LONG_CONTEXT", long_context)
    model = tiny_model(preset)
    gen = torch.Generator().manual_seed(7)
    requests = []
    for i in range(16):
        length = int(torch.randint(1, 60, (1,), generator=gen))
        prompt = torch.randint(0, 512, (length,), generator=gen).tolist()
        requests.append((prompt, 4 + i % 9))
    arrivals = [0, 0, 0, 1, 1, 2, 3, 3, 5, 8, 8, 9, 12, 15, 15, 20]
    block_size = 4
    engine = LLMEngine(
        model,
        max_model_len=96,
        max_num_seqs=6,
        max_num_batched_tokens=24,
        block_size=block_size,
        cache_memory_gb=_budget_gb(model.config, model.dtype, blocks=26, slots=6, block_size=block_size),
    )
    results = _run_staggered(engine, requests, arrivals)
    assert engine.scheduler.num_preemptions > 0, "the cache was meant to force preemption"
    for i, (prompt, max_tokens) in enumerate(requests):
        expected = greedy_generate_recompute(model, torch.tensor([prompt]), max_tokens)[0].tolist()
        assert results[f"r{i}"] == expected, f"request {i} (prompt {len(prompt)} tokens)"
    assert engine.cache.num_free_blocks == engine.cache.layout.num_blocks  # everything given back
    assert engine.cache.num_free_slots == engine.cache.layout.num_slots


@pytest.mark.parametrize("preset", ["tiny-m1", "tiny-m2"])
def test_prompts_of_one_length_prefilled_together_equal_recompute(preset, monkeypatch):
    """Fresh prompts of the same length side by side in one prefill attend in one batched causal call (runs of 4
    and 3, split by a prompt of another length); every output equals full-recompute greedy."""
    import mmx.engine.paged_batch as paged_batch

    runs = []
    batched = paged_batch._same_length_causal
    monkeypatch.setattr(
        paged_batch,
        "_same_length_causal",
        lambda q, k, v, count, scale: runs.append(count) or batched(q, k, v, count, scale),
    )
    model = tiny_model(preset)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 512, (n,), generator=gen).tolist() for n in (9, 9, 9, 9, 5, 9, 9, 9)]
    outs = LLM(model, max_model_len=64, block_size=4).generate(
        prompts, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False
    )
    assert sorted(set(runs)) == [3, 4]
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == greedy_generate_recompute(model, torch.tensor([prompt]), 6)[0].tolist()


def test_seeded_sampling_is_independent_of_the_batch():
    model = tiny_model("tiny-m1")
    prompt = list(range(10, 30))
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=1234, max_tokens=12, ignore_eos=True)
    alone = LLM(model, max_model_len=128).generate([prompt], params, use_tqdm=False)[0].token_ids
    others = [list(range(i, i + 7)) for i in range(40, 200, 20)]
    batch = [prompt, *others]
    noisy = [params] + [SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)] * len(others)
    together = LLM(model, max_model_len=128, max_num_batched_tokens=40).generate(batch, noisy, use_tqdm=False)
    assert together[0].token_ids == alone
    unseeded = [o.token_ids for o in together[1:]]
    assert len({tuple(t) for t in unseeded}) > 1


def test_logprobs_are_the_model_distribution():
    model = tiny_model("tiny-m2")
    prompt = [5, 9, 200, 31]
    out = LLM(model).generate(
        [prompt], SamplingParams(temperature=0, max_tokens=3, logprobs=2, ignore_eos=True), use_tqdm=False
    )[0]
    ids = torch.tensor([prompt + out.token_ids])
    with torch.no_grad():
        expected = model(ids)[0].log_softmax(-1)
    for step, entry in enumerate(out.outputs[0].logprobs):
        row = expected[len(prompt) - 1 + step]
        assert math.isclose(entry.logprob, row[entry.token_id].item(), abs_tol=1e-4)
        assert [t for t, _ in entry.top] == row.topk(2).indices.tolist()


def test_stops_lengths_and_n():
    model = tiny_model("tiny-m1")
    llm = LLM(model, max_model_len=64)
    free = llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)[0]
    stop_token = free.token_ids[3]
    first = free.token_ids.index(stop_token)
    out = llm.generate(
        [[1, 2, 3]], SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[stop_token]), use_tqdm=False
    )[0]
    assert out.token_ids == free.token_ids[: first + 1] and out.finish_reason == "stop"
    assert out.outputs[0].stop_reason == stop_token
    assert free.finish_reason == "length" and len(free.token_ids) == 10
    long = llm.generate(
        [list(range(60))], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True), use_tqdm=False
    )
    assert long[0].finish_reason == "length" and len(long[0].token_ids) == 4  # capped by max_model_len
    many = llm.generate(
        [[7, 8]], SamplingParams(n=3, temperature=1.0, max_tokens=6, seed=3, ignore_eos=True), use_tqdm=False
    )[0]
    assert [o.index for o in many.outputs] == [0, 1, 2] and all(len(o.token_ids) == 6 for o in many.outputs)


def test_early_truncation_of_confident_runs():
    """M1's RL rule: stop after N consecutive tokens each sampled with probability above a threshold."""
    import math

    llm = LLM(tiny_model("tiny-m1"), max_model_len=64)
    base = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    free = llm.generate([[1, 2, 3]], base, use_tqdm=False)[0]
    probs = [
        math.exp(x.logprob)
        for x in llm.generate([[1, 2, 3]], dataclasses.replace(base, logprobs=0), use_tqdm=False)[0].outputs[0].logprobs
    ]
    threshold = sorted(probs)[len(probs) // 2]  # about half the tokens are "confident" at this threshold
    params = dataclasses.replace(base, stop_after_confident_tokens=2, confident_probability=threshold)
    out = llm.generate([[1, 2, 3]], params, use_tqdm=False)[0]
    run, expected = 0, None
    for i, p in enumerate(probs):
        run = run + 1 if p > threshold else 0
        if run == 2:
            expected = i + 1
            break
    if expected is None:
        assert out.finish_reason == "length" and out.token_ids == free.token_ids
    else:
        assert out.finish_reason == "repetition" and out.token_ids == free.token_ids[:expected]
    never = dataclasses.replace(base, stop_after_confident_tokens=1, confident_probability=0.999999)
    assert llm.generate([[1, 2, 3]], never, use_tqdm=False)[0].finish_reason == "length"
    always = dataclasses.replace(base, stop_after_confident_tokens=3, confident_probability=1e-9)
    stopped = llm.generate([[1, 2, 3]], always, use_tqdm=False)[0]
    assert stopped.finish_reason == "repetition" and len(stopped.token_ids) == 3


def test_eos_min_tokens_and_bad_requests():
    model = tiny_model("tiny-m1", eos_token_id=17)
    engine = LLMEngine(model, max_model_len=64)
    with torch.no_grad():
        forced = model(torch.tensor([[3, 4]]))[0, -1]
    with torch.no_grad():
        model.lm_head.weight[17] += 100.0  # make EOS the likeliest token
    out = LLM(model, max_model_len=64).generate([[3, 4]], SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)
    assert out[0].token_ids == [17] and out[0].finish_reason == "stop"
    out = LLM(model, max_model_len=64).generate(
        [[3, 4]], SamplingParams(temperature=0, max_tokens=5, min_tokens=3), use_tqdm=False
    )
    assert 17 not in out[0].token_ids[:3] and forced is not None
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request("x", list(range(64)))
    with pytest.raises(ValueError, match="token ids"):
        engine.add_request("y", [1, 99999])
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=1.5)
    with pytest.raises(ValueError, match="tokenizer"):
        engine.add_request("z", "text needs a tokenizer")


def test_abort_frees_the_cache():
    model = tiny_model("tiny-m1")
    engine = LLMEngine(model, max_model_len=64, block_size=4)
    engine.add_request("a", list(range(20)), SamplingParams(max_tokens=30, ignore_eos=True))
    engine.add_request("b", list(range(20)), SamplingParams(max_tokens=30, ignore_eos=True))
    engine.step()
    engine.step()
    assert engine.cache.num_free_slots < engine.cache.layout.num_slots
    final = engine.abort_request("a")
    assert final.finished and final.finish_reason == "abort"
    assert engine.abort_request("a") is None
    engine.abort_request("b")
    assert not engine.has_unfinished_requests()
    assert engine.cache.num_free_blocks == engine.cache.layout.num_blocks
    assert engine.cache.num_free_slots == engine.cache.layout.num_slots


def test_text_prompts_stop_strings_and_multibyte(tiny_tokenizer):
    model = tiny_model("tiny-m2")
    llm = LLM(model, tokenizer=tiny_tokenizer, max_model_len=128)
    free = llm.generate(
        "Weather in Paris?", SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False
    )[0]
    assert free.text == tiny_tokenizer.decode(free.token_ids)
    if len(free.text) > 4:
        stop = free.text[2:4]
        cut = llm.generate(
            "Weather in Paris?",
            SamplingParams(temperature=0, max_tokens=24, stop=[stop], ignore_eos=True),
            use_tqdm=False,
        )[0]
        assert cut.finish_reason == "stop" and cut.outputs[0].stop_reason == stop
        assert cut.text == free.text[: free.text.find(stop)]


def test_async_streaming_and_client_abort():
    model = tiny_model("tiny-m1")
    engine = AsyncLLM(LLMEngine(model, max_model_len=64))

    async def collect(prompt, n):
        outs = []
        async for out in engine.generate(prompt, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)):
            outs.append(out)
        return outs

    async def leave_early():
        async for out in engine.generate([1, 2, 3], SamplingParams(max_tokens=50, ignore_eos=True)):
            if len(out.token_ids) >= 2:
                break

    async def main():
        results = await asyncio.gather(collect([1, 2, 3], 6), collect([4, 5], 9), leave_early())
        with pytest.raises(ValueError, match="empty"):
            await collect([], 3)
        return results

    try:
        first, second, _ = asyncio.run(main())
        # one output per step, unless the reader fell behind (then the queued ones come as one)
        assert [t for o in first for t in o.outputs[0].new_token_ids] == first[-1].token_ids and first[-1].finished
        assert len(first[-1].token_ids) == 6
        assert second[-1].token_ids == greedy_generate_recompute(model, torch.tensor([[4, 5]]), 9)[0].tolist()
        for _ in range(50):  # the abort lands between steps
            if not engine.engine.has_unfinished_requests():
                break
            asyncio.run(asyncio.sleep(0.02))
        assert not engine.engine.has_unfinished_requests()
        assert engine.stats.requests_aborted == 1 and engine.stats.requests_failed == 1
    finally:
        engine.shutdown()


@pytest.mark.parametrize("kind", [RequestOutputKind.CUMULATIVE, RequestOutputKind.DELTA])
def test_a_reader_that_falls_behind_gets_the_queued_outputs_as_one(kind):
    """While the event loop is busy, the engine goes on stepping; the reader then gets one output carrying every
    new token and log-prob since its last one, and the stream still adds up to the whole completion."""
    model = tiny_model("tiny-m2")
    engine = AsyncLLM(LLMEngine(model, max_model_len=64))
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=1, output_kind=kind)

    async def lagging():
        outs = []
        async for out in engine.generate([5, 6, 7], params):
            outs.append(out)
            if len(outs) == 1:
                time.sleep(0.5)  # blocks the loop: the engine's next outputs queue up meanwhile
        return outs

    try:
        outs = asyncio.run(lagging())
    finally:
        engine.shutdown()
    expected = greedy_generate_recompute(model, torch.tensor([[5, 6, 7]]), 12)[0].tolist()
    assert len(outs) < 12 and max(len(o.outputs[0].new_token_ids) for o in outs) > 1
    assert [t for o in outs for t in o.outputs[0].new_token_ids] == expected
    logprobs = [e for o in outs for e in o.outputs[0].new_logprobs]
    assert len(logprobs) == 12
    if kind == RequestOutputKind.DELTA:  # token_ids and logprobs are the new ones too
        assert all(o.outputs[0].token_ids == o.outputs[0].new_token_ids for o in outs)
        assert [e for o in outs for e in o.outputs[0].logprobs] == logprobs
    else:
        assert outs[-1].outputs[0].token_ids == expected and outs[-1].outputs[0].logprobs == logprobs


def test_output_kinds():
    """CUMULATIVE: everything so far in every output; DELTA: only what is new; FINAL_ONLY: one output at the end,
    with everything. The same tokens and log-probs in all three."""
    model = tiny_model("tiny-m1")

    def outputs(kind):
        engine = LLMEngine(model, max_model_len=64)
        for i in range(2):
            params = SamplingParams(temperature=0, max_tokens=6 + i, ignore_eos=True, logprobs=2, output_kind=kind)
            engine.add_request(f"r{i}", [3 + i, 4, 5], params)
        seen = {"r0": [], "r1": []}
        while engine.has_unfinished_requests():
            for out in engine.step():
                seen[out.request_id].append(out)
        return seen

    cumulative, delta, final = (outputs(kind) for kind in RequestOutputKind)
    for i, rid in enumerate(("r0", "r1")):
        whole = cumulative[rid][-1].outputs[0]
        assert whole.token_ids == greedy_generate_recompute(model, torch.tensor([[3 + i, 4, 5]]), 6 + i)[0].tolist()
        assert [len(o.outputs[0].token_ids) for o in cumulative[rid]] == list(range(1, len(whole.token_ids) + 1))
        assert all(len(o.outputs[0].token_ids) == 1 for o in delta[rid])
        assert [t for o in delta[rid] for t in o.outputs[0].token_ids] == whole.token_ids
        assert [e for o in delta[rid] for e in o.outputs[0].logprobs] == whole.logprobs
        assert len(final[rid]) == 1 and final[rid][0].finished
        assert final[rid][0].outputs[0].token_ids == whole.token_ids
        assert final[rid][0].outputs[0].logprobs == whole.logprobs
    for bad in (3, True, "delta"):
        with pytest.raises(ValueError, match="output_kind"):
            SamplingParams(output_kind=bad)


def test_merged_outputs_keep_every_sample():
    from mmx.engine.async_engine import merge_outputs
    from mmx.engine.outputs import CompletionOutput, RequestOutput

    def sample(index, tokens, new):
        return CompletionOutput(index, "", tokens, new_token_ids=new)

    earlier = RequestOutput("r", None, [1], [sample(0, [7], [7]), sample(1, [8, 9], [9])])
    later = RequestOutput("r", None, [1], [sample(0, [7, 10], [10])], finished=True)
    merged = merge_outputs(earlier, later)
    assert merged.finished and [s.index for s in merged.outputs] == [0, 1]
    assert merged.outputs[0].new_token_ids == [7, 10] and merged.outputs[0].token_ids == [7, 10]
    assert merged.outputs[1].new_token_ids == [9] and merged.outputs[0].new_logprobs is None


def test_a_failing_step_fails_the_requests_in_flight_and_the_engine_goes_on():
    """Whatever raises in the engine thread (a step, a command) fails the requests in flight with an error; the
    thread lives on and serves the next request."""
    engine = AsyncLLM(LLMEngine(tiny_model("tiny-m1"), max_model_len=64))
    schedule = engine.engine.scheduler.schedule
    broken = {"left": 1}

    def fails_once():
        if broken["left"]:
            broken["left"] -= 1
            raise RuntimeError("boom")
        return schedule()

    engine.engine.scheduler.schedule = fails_once

    async def run(prompt):
        return [out async for out in engine.generate(prompt, SamplingParams(max_tokens=3, ignore_eos=True))]

    async def main():
        with pytest.raises(RuntimeError, match="boom"):
            await run([1, 2, 3])
        return await run([4, 5, 6])

    try:
        outs = asyncio.run(main())
        assert outs[-1].finished and len(outs[-1].token_ids) == 3
        assert engine.alive
    finally:
        engine.shutdown()


def test_public_api():
    assert mmx.LLM is LLM and mmx.SamplingParams is SamplingParams


def test_a_refused_prompt_leaves_nothing_of_the_call_in_the_engine():
    llm = LLM(tiny_model("tiny-m1"), max_model_len=64)
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate([[1, 2, 3], list(range(64))], SamplingParams(max_tokens=4), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.cache.num_free_slots == llm.engine.cache.layout.num_slots
    with pytest.raises(ValueError, match="tokenizer"):
        llm.generate("text needs a tokenizer", use_tqdm=False)


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc")
def test_default_cache_fits_the_engine_and_costs_memory_only_as_used():
    """By default the cache holds what max_num_seqs sequences of max_model_len tokens can use (and a quarter more
    for prefix-cache snapshots), and its pages are committed only when written: a 600 MB cache costs ~nothing."""
    model = tiny_model("tiny-m1")

    def run(engine):
        engine.add_request("r", list(range(1, 40)), SamplingParams(max_tokens=3, ignore_eos=True))
        while engine.has_unfinished_requests():
            engine.step()

    run(LLMEngine(model, max_model_len=64))  # torch's first-forward allocations, before measuring
    before = _rss_mb()
    engine = LLMEngine(model, max_model_len=65536, max_num_seqs=64, block_size=16)
    grown = _rss_mb() - before
    layout, config = engine.cache.layout, model.config
    assert layout.num_slots == 64 and layout.num_blocks == 64 * 65536 // 16
    assert layout.num_snapshots > 0
    reserved = layout.num_blocks * CacheLayout.bytes_per_block(config, 16, model.dtype) / 2**20
    assert reserved > 500 and grown < 50, (reserved, grown)
    run(engine)
    assert _rss_mb() - before < 50


def test_an_idle_server_engine_gives_the_heaps_free_memory_back(monkeypatch):
    """After a burst the engine thread trims the malloc heap once when it goes idle (the prefills' activations),
    and not again while it stays idle."""
    import mmx.engine.async_engine as async_engine

    trims = []
    monkeypatch.setattr(async_engine, "release_free_memory", lambda collect=True: trims.append(collect))
    engine = AsyncLLM(LLMEngine(tiny_model("tiny-m2"), max_model_len=64))

    async def one():
        async for out in engine.generate([1, 2, 3], SamplingParams(max_tokens=4, ignore_eos=True)):
            last = out
        return last

    try:
        assert asyncio.run(one()).finished
        for _ in range(100):
            if trims:
                break
            time.sleep(0.01)
        time.sleep(0.6)  # past the idle loop's next wake-up
        assert trims == [False]  # no garbage collection pass: it would stall the next request
    finally:
        engine.shutdown()


def test_loading_a_model_leaves_sympy_unimported(tmp_path):
    """Materialising a checkpoint's model must not pull in torch's symbolic shapes (sympy, ~40 MB resident in every
    server); a fresh interpreter loads a saved tiny model and checks."""
    import subprocess
    import sys

    tiny_model("tiny-m2").save_pretrained(str(tmp_path))
    code = (
        "import sys; from mmx.model.weights import load_model; "
        f"load_model({str(tmp_path)!r}, dtype='float32'); print('sympy' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr


@pytest.mark.parametrize("preset", ["tiny-m1", "tiny-m2"])
@pytest.mark.parametrize("kv_dtype", ["bfloat16", "float16"])
def test_kv_cache_dtype(preset, kv_dtype):
    """Half-precision K/V: half the block memory, log-probs close to float32 K/V, and prefix caching still exact
    (attention always reads the stored, rounded K/V, also for the tokens of the same forward)."""
    model = tiny_model(preset)
    prompts = [list(range(3, 70)), list(range(3, 40)) + list(range(200, 260))]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=0)

    def run(**kw):
        engine = LLMEngine(model, max_model_len=256, max_num_batched_tokens=32, cache_memory_gb=0.01, **kw)
        outs = []
        for i, prompt in enumerate(prompts * 2):  # the repeats read the prefix cache (when on)
            engine.add_request(f"r{i}", prompt, params)
            while engine.has_unfinished_requests():
                outs += [o for o in engine.step() if o.finished]
        return engine, outs

    _, full = run()
    half_engine, half = run(kv_cache_dtype=kv_dtype)
    _, uncached = run(kv_cache_dtype=kv_dtype, enable_prefix_caching=False)
    assert half_engine.cache.keys[next(iter(half_engine.cache.keys))].dtype == getattr(torch, kv_dtype)
    per_block = CacheLayout.bytes_per_block(model.config, 16, torch.float32)
    assert CacheLayout.bytes_per_block(model.config, 16, getattr(torch, kv_dtype)) * 2 == per_block
    assert [o.token_ids for o in half] == [o.token_ids for o in uncached]  # caching stays exact
    assert half[2].outputs[0].logprobs and half[2].num_cached_tokens > 0
    same = [(a, b) for a, b in zip(full, half) if a.token_ids == b.token_ids]
    assert same  # (a greedy tie may part them; the log-probs of the ones that agree are compared)
    for a, b in same:
        diffs = [abs(x.logprob - y.logprob) for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs)]
        assert max(diffs) < 0.05, diffs
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        LLMEngine(model, kv_cache_dtype="fp8")
