"""Prefix caching is exact: greedy outputs with it equal those without it (and full recompute), and a request reuses
only the cache of its own prefix, on the hybrid (lightning + softmax) and the full-attention tiny configs."""

from __future__ import annotations

import itertools

import pytest
import torch

from mmx.engine import LLMEngine, SamplingParams
from mmx.engine.cache import CacheLayout
from mmx.model.generate import greedy_generate_recompute

from .conftest import tiny_model

END = 7  # the message-end token of these traces (the engine's EOS: where a snapshot is kept)
BLOCK = 4


@pytest.fixture(scope="module", params=["tiny-m1", "tiny-m2"])
def model(request):
    return tiny_model(request.param)


def _engine(model, caching: bool = True, **overrides) -> LLMEngine:
    args = dict(max_model_len=256, max_num_seqs=8, max_num_batched_tokens=64, block_size=BLOCK, cache_memory_gb=0.01)
    return LLMEngine(model, eos_token_ids=[END], enable_prefix_caching=caching, **{**args, **overrides})


def _greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kw)


def _run(engine: LLMEngine, prompts: list[list[int]], max_tokens: int = 6, **kw) -> list:
    """All prompts at once; the final outputs in order."""
    for i, prompt in enumerate(prompts):
        engine.add_request(f"q{engine.num_unfinished_requests}-{i}-{id(prompt)}", prompt, _greedy(max_tokens, **kw))
    done = {}
    ids = list(engine.requests)
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return [done[i] for i in ids]


def _tokens(gen: torch.Generator, n: int) -> list[int]:
    return [t if t != END else END + 1 for t in torch.randint(10, 500, (n,), generator=gen).tolist()]


def _expected(model, prompt: list[int], max_tokens: int = 6) -> list[int]:
    return greedy_generate_recompute(model, torch.tensor([prompt]), max_tokens)[0].tolist()


def _agent_trace(model, engine: LLMEngine, turns: int, seed: int) -> list:
    """A tool loop: each turn's prompt is the last prompt, the model's reply, and a tool result ending a message."""
    gen = torch.Generator().manual_seed(seed)
    prompt = [*_tokens(gen, 37), END, *_tokens(gen, 9)]
    outs = []
    for _ in range(turns):
        (out,) = _run(engine, [prompt], max_tokens=5)
        outs.append(out)
        prompt = [*prompt, *out.token_ids, END, *_tokens(gen, int(torch.randint(3, 14, (1,), generator=gen))), END, 5]
    return outs


def test_agent_turns_reuse_the_previous_turn_and_match_no_caching(model):
    cached, plain = _engine(model), _engine(model, caching=False)
    with_cache, without = _agent_trace(model, cached, 5, 0), _agent_trace(model, plain, 5, 0)
    assert [o.token_ids for o in with_cache] == [o.token_ids for o in without]
    for out in with_cache:
        assert out.token_ids == _expected(model, out.prompt_token_ids, 5)
    assert all(o.num_cached_tokens == 0 for o in without)
    assert with_cache[0].num_cached_tokens == 0
    for before, after in itertools.pairwise(with_cache):
        seen = len(before.prompt_token_ids) + len(before.token_ids)
        # the previous prompt and reply, less at most one block (the reply's last token was never fed)
        assert after.num_cached_tokens >= seen - BLOCK, (after.num_cached_tokens, seen)
        assert after.num_cached_tokens < len(after.prompt_token_ids)


def test_a_shared_system_message_is_reused_by_another_conversation(model):
    gen = torch.Generator().manual_seed(1)
    system = [*_tokens(gen, 150), END]
    engine = _engine(model)
    first, second = [system + _tokens(gen, 12)], [system + _tokens(gen, 20)]
    (a,) = _run(engine, first)
    (b,) = _run(engine, second)
    assert a.num_cached_tokens == 0
    assert b.num_cached_tokens >= 0.9 * len(system)
    assert b.token_ids == _expected(model, second[0])


def test_divergence_inside_a_block(model):
    """Prompts that part in the middle of a block: the hybrid model resumes from a snapshot after a message end
    inside the block (its partial block copied), the full-attention model after the last common full block."""
    gen = torch.Generator().manual_seed(2)
    common = [*_tokens(gen, 5), END, *_tokens(gen, 4)]  # 10 tokens: the END ends position 5, block 1 is partial
    prompts = [common + _tokens(gen, 11), common + _tokens(gen, 6)]
    engine = _engine(model)
    _run(engine, prompts[:1])
    (b,) = _run(engine, prompts[1:])
    assert b.token_ids == _expected(model, prompts[1])
    assert b.num_cached_tokens == (6 if engine.cache.uses_slots else 8)


def test_a_repeated_prompt_recomputes_only_its_last_token(model):
    """A whole prompt cached: its last token is fed again for the logits. With the prompt a whole number of blocks
    long, the full-attention model copies the last block before writing into it (copy-on-write); otherwise it
    reuses the full blocks (the hybrid model resumes from the snapshot one token before the prompt's end)."""
    gen = torch.Generator().manual_seed(3)
    for length in (4 * BLOCK, 4 * BLOCK + 3):
        prompt = _tokens(gen, length)
        engine = _engine(model)
        outs = [_run(engine, [prompt])[0] for _ in range(3)]
        reused = length - 1 if engine.cache.uses_slots or length % BLOCK == 0 else length // BLOCK * BLOCK
        assert [o.num_cached_tokens for o in outs] == [0, reused, reused]
        assert all(o.token_ids == _expected(model, prompt) for o in outs)


def test_samples_of_one_request_share_its_prompt(model):
    gen = torch.Generator().manual_seed(4)
    prompt = _tokens(gen, 7 * BLOCK + 1)  # all but its last token: 7 full blocks
    engine, plain = _engine(model), _engine(model, caching=False)
    params = SamplingParams(n=4, temperature=1.0, seed=11, max_tokens=6, ignore_eos=True)
    outs = {}
    for name, e in (("cached", engine), ("plain", plain)):
        e.add_request("r", prompt, params)
        while e.has_unfinished_requests():
            for out in e.step():
                if out.finished:
                    outs[name] = [s.token_ids for s in out.outputs]
    assert outs["cached"] == outs["plain"]
    stats = engine.prefix_cache.stats
    assert stats.hit_tokens == 3 * (len(prompt) - 1)  # samples 1..3 each reuse all but the last prompt token
    assert stats.queried_tokens == 4 * len(prompt)


def test_interleaved_prompts_of_equal_length_never_read_each_other(model):
    """Different prompts of one length, several sharing a first block, arrive together and in waves while the
    cache recycles slots and blocks: each output is its own prompt's full-recompute greedy output."""
    gen = torch.Generator().manual_seed(5)
    head = _tokens(gen, BLOCK)
    prompts = [(head if i % 2 else []) + _tokens(gen, 24 - (BLOCK if i % 2 else 0)) for i in range(10)]
    engine = _engine(model, max_num_seqs=3, max_num_batched_tokens=20)
    first = _run(engine, prompts)
    second = _run(engine, prompts[::-1])
    for prompt, out in zip(prompts + prompts[::-1], first + second):
        assert out.token_ids == _expected(model, prompt), prompt
    assert all(o.num_cached_tokens == 23 for o in second)  # every prompt's own snapshot / blocks


def _budget(model, blocks: int, slots: int) -> float:
    config, dtype = model.config, model.dtype
    nbytes = blocks * CacheLayout.bytes_per_block(config, BLOCK, dtype) + slots * CacheLayout.bytes_per_slot(config)
    return nbytes / (1 << 30)


def _tight_engine(model, snapshots: int, **overrides) -> LLMEngine:
    """4 sequences over 26 blocks (about one sequence of max_model_len): eviction and preemption are certain."""
    snapshot_gb = CacheLayout.bytes_per_snapshot(model.config, BLOCK, model.dtype) * snapshots / (1 << 30)
    budget = _budget(model, blocks=26, slots=4)
    return _engine(model, max_num_seqs=4, cache_memory_gb=budget, snapshot_memory_gb=snapshot_gb, **overrides)


def test_eviction_under_a_small_budget_and_preemption(model):
    """A cache of a few sequences' worth of blocks and two snapshots: cached prefixes are evicted, sequences are
    preempted and resumed, and every output is still exact; revisiting evicted prompts recomputes them."""
    gen = torch.Generator().manual_seed(6)
    system = [*_tokens(gen, 11), END]
    prompts = [system + _tokens(gen, int(torch.randint(4, 30, (1,), generator=gen))) for _ in range(12)]
    engine = _tight_engine(model, snapshots=2, max_num_batched_tokens=16, max_model_len=64)
    outs = _run(engine, prompts, max_tokens=12) + _run(engine, prompts[:4], max_tokens=12)
    for prompt, out in zip(prompts + prompts[:4], outs):
        assert out.token_ids == _expected(model, prompt, 12)
    assert engine.scheduler.num_preemptions > 0
    assert engine.cache.num_free_blocks == engine.cache.layout.num_blocks
    if engine.cache.uses_slots:
        assert engine.prefix_cache.stats.snapshots_evicted > 0
        assert engine.prefix_cache.num_snapshots_held <= 2
    assert engine.prefix_cache.stats.hit_tokens > 0


def test_the_cpu_cache_takes_cached_blocks_before_unwritten_ones(model):
    """At its default size on the CPU (pages committed as written) the cache writes new blocks only while it caches
    fewer than the running requests hold, and takes its least recently used cached ones past that: 12 distinct
    prompts, one after another, leave it holding twice what one request needed, where a cache the user sized keeps
    every prefix. Outputs are exact either way, and a prompt repeated right away is still read from the cache."""
    gen = torch.Generator().manual_seed(8)
    prompts = [[*_tokens(gen, 37), END, *_tokens(gen, 3)] for _ in range(12)]
    settings = dict(max_model_len=256, max_num_seqs=8, max_num_batched_tokens=64, block_size=BLOCK)
    default = LLMEngine(model, eos_token_ids=[END], **settings)
    sized = _engine(model)
    assert not default.cache.grow_for_prefix_cache and sized.cache.grow_for_prefix_cache
    for engine in (default, sized):
        for prompt in prompts:
            (out,) = _run(engine, [prompt])
            assert out.token_ids == _expected(model, prompt)
    one_request = -(-(41 + 6) // BLOCK)
    assert default.cache.num_touched_blocks <= 2 * one_request + 1
    assert sized.cache.num_touched_blocks >= 12 * (41 // BLOCK)
    if default.cache.uses_slots:
        assert default.prefix_cache._rows_written <= default.cache.layout.num_slots < 12
        assert sized.prefix_cache._rows_written >= 12
    hits = default.prefix_cache.stats.hit_tokens
    (out,) = _run(default, [prompts[-1]])
    assert out.token_ids == _expected(model, prompts[-1])
    assert default.prefix_cache.stats.hit_tokens - hits >= 40
    assert default.cache.num_free_blocks == default.cache.layout.num_blocks


def test_prompt_logprobs_requests_compute_every_prompt_token(model):
    gen = torch.Generator().manual_seed(7)
    prompt = _tokens(gen, 21)
    engine, plain = _engine(model), _engine(model, caching=False)
    _run(engine, [prompt])
    (a,) = _run(engine, [prompt], max_tokens=1, prompt_logprobs=0)
    (b,) = _run(plain, [prompt], max_tokens=1, prompt_logprobs=0)
    assert a.num_cached_tokens == 0
    got = [e.logprob for e in a.prompt_logprobs[1:]]
    want = [e.logprob for e in b.prompt_logprobs[1:]]
    assert got == pytest.approx(want, abs=1e-4)  # the chunks differ (a snapshot cut), not the inputs


def test_snapshot_grid_for_long_prompts():
    model = tiny_model("tiny-m1")
    gen = torch.Generator().manual_seed(8)
    long = _tokens(gen, 90)
    engine = _engine(model, snapshot_interval=32)
    _run(engine, [long])
    (out,) = _run(engine, [long[:70] + _tokens(gen, 5)])  # parts from the first prompt after 70 tokens
    assert out.num_cached_tokens == 64
    assert out.token_ids == _expected(model, out.prompt_token_ids)


@pytest.mark.parametrize("preset", ["tiny-m1", "tiny-m2"])
def test_new_weights_need_a_reset(preset):
    """The cache holds what the weights computed: after an in-place weight change (an RL step) reset_prefix_cache
    forgets it, and the next request is computed with the new weights."""
    model = tiny_model(preset, seed=3)
    gen = torch.Generator().manual_seed(9)
    prompt = _tokens(gen, 30)
    engine = _engine(model)
    _run(engine, [prompt])
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    engine.reset_prefix_cache()
    (out,) = _run(engine, [prompt])
    assert out.num_cached_tokens == 0 and out.token_ids == _expected(model, prompt)
    assert engine.cache.num_free_blocks == engine.cache.layout.num_blocks
    (again,) = _run(engine, [prompt])
    assert again.num_cached_tokens > 0 and again.token_ids == out.token_ids


def test_metrics_figures_on_both_model_kinds(model):
    """The figures a server's /metrics reads after every step (a full-attention model keeps no snapshots)."""
    import asyncio

    from mmx.engine import AsyncLLM

    runner = AsyncLLM(_engine(model))

    async def twice():
        for _ in range(2):
            async for _ in runner.generate(list(range(20, 60)), _greedy(3)):
                pass

    try:
        asyncio.run(twice())
    finally:
        runner.shutdown()
    stats = runner.stats
    assert stats.prefix_cache_enabled and stats.prefix_cache_queried_tokens == 80
    assert stats.prefix_cache_hit_tokens == 39  # all but the last token (M2: 10 whole blocks, the last copied)
    assert (
        (stats.prefix_cache_snapshots > 0) == (stats.prefix_cache_snapshot_bytes > 0) == runner.engine.cache.uses_slots
    )


def test_prefix_caching_off_keeps_nothing():
    model = tiny_model("tiny-m1")
    engine = _engine(model, caching=False)
    assert engine.prefix_cache is None and engine.cache.layout.num_snapshots == 0
    prompt = list(range(20, 60))
    _run(engine, [prompt])
    (out,) = _run(engine, [prompt])
    assert out.num_cached_tokens == 0 and engine.cache.num_cached_blocks == 0


def test_bad_prefix_cache_settings_are_refused():
    from mmx.engine.args import EngineArgs

    with pytest.raises(ValueError, match="snapshot_interval"):
        EngineArgs(snapshot_interval=0)
    with pytest.raises(ValueError, match="snapshot_memory_gb"):
        EngineArgs(snapshot_memory_gb=-1)


# ---------------------------------------------------------------------------------------------------- the server
def test_the_server_reports_cached_prompt_tokens(tiny_server):
    """A conversation's second turn over the real SDKs reads the first turn's cache; usage says how much (OpenAI:
    part of prompt_tokens; Anthropic: input_tokens are the rest), and /metrics counts queried and reused tokens."""
    import anthropic
    import httpx
    import openai

    client = openai.OpenAI(base_url=f"{tiny_server}/v1", api_key="unused", max_retries=0)
    system = "You are a careful assistant. Answer in one short sentence. " * 8
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "Sara has 12 apples."}]
    first = client.chat.completions.create(model="mmx-tiny", messages=messages, temperature=0, max_tokens=12)
    reply = first.choices[0].message
    messages += [{"role": "assistant", "content": reply.content or ""}, {"role": "user", "content": "And Tom?"}]
    second = client.chat.completions.create(model="mmx-tiny", messages=messages, temperature=0, max_tokens=4)
    cached = second.usage.prompt_tokens_details.cached_tokens
    # at least the system message and the first question (the history re-renders the reply without its reasoning)
    assert first.usage.prompt_tokens - 8 <= cached < second.usage.prompt_tokens

    claude = anthropic.Anthropic(base_url=tiny_server, api_key="unused", max_retries=0)
    marked = [{"type": "text", "text": system, "cache_control": {"type": "ephemeral"}}]  # accepted; mmx caches anyway
    ask = dict(model="mmx-tiny", system=marked, max_tokens=4)
    claude.messages.create(**ask, messages=[{"role": "user", "content": "Name a fruit."}])
    again = claude.messages.create(**ask, messages=[{"role": "user", "content": "Name a fruit."}])
    usage = again.usage
    assert usage.cache_read_input_tokens > 0 and usage.input_tokens >= 1
    with claude.messages.stream(**ask, messages=[{"role": "user", "content": "Name a fruit."}]) as stream:
        streamed = stream.get_final_message().usage
    assert (streamed.input_tokens, streamed.cache_read_input_tokens) == (
        usage.input_tokens,
        usage.cache_read_input_tokens,
    )

    metrics = httpx.get(f"{tiny_server}/metrics").text
    values = dict(line.split() for line in metrics.splitlines() if line.startswith("mmx_prefix_cache"))
    assert int(values["mmx_prefix_cache_hits_total"]) >= cached + usage.cache_read_input_tokens
    assert int(values["mmx_prefix_cache_queries_total"]) > int(values["mmx_prefix_cache_hits_total"])
    assert int(values["mmx_prefix_cache_snapshots"]) > 0 and int(values["mmx_prefix_cache_snapshot_bytes"]) > 0


def test_serve_without_prefix_caching(tiny_tokenizer, tmp_path):
    import openai

    from .helpers import serve

    tiny_model("tiny-m1").save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    with serve(str(tmp_path), "--no-enable-prefix-caching") as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        ask = dict(model=tmp_path.name, prompt="the same prompt twice", max_tokens=2, temperature=0)
        client.completions.create(**ask)
        assert client.completions.create(**ask).usage.prompt_tokens_details.cached_tokens == 0


# ---------------------------------------------------------------------------------------------------- M2 re-rendering
WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
}
REPLY = (  # what the model wrote after the generation prompt "]~b]ai\n<think>\n", in the format's own layout
    'The user wants the weather, so I call the tool.\n</think>\n\n<minimax:tool_call>\n<invoke name="get_weather">\n'
    '<parameter name="city">Paris</parameter>\n</invoke>\n</minimax:tool_call>[e~['
)
REPLY_MESSAGE = {  # the same reply as the server returns it and an agent sends it back
    "role": "assistant",
    "content": "",
    "reasoning_content": "The user wants the weather, so I call the tool.",
    "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
}


def test_m2_template_re_renders_the_models_turn_to_the_same_tokens(tiny_tokenizer):
    """In a tool loop (no user message after the reply) the next prompt starts with this turn's prompt and reply,
    token for token, so the next turn resumes after both; after a new user message the template drops the reply's
    reasoning, and the next turn resumes from the snapshot after the last message end before the reply."""
    tok = tiny_tokenizer
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"}]
    prompt = tok.encode(tok.apply_chat_template(messages, tools=[WEATHER]))
    seen = prompt + tok.encode(REPLY)
    tool_turn = [*messages, REPLY_MESSAGE, {"role": "tool", "content": "18 C, sunny"}]
    following = tok.encode(tok.apply_chat_template(tool_turn, tools=[WEATHER]))
    assert following[: len(seen)] == seen

    user_turn = [*messages, REPLY_MESSAGE, {"role": "user", "content": "And in Rome?"}]
    after_user = tok.encode(tok.apply_chat_template(user_turn, tools=[WEATHER]))
    common = next(i for i, (a, b) in enumerate(zip(seen, after_user)) if a != b)
    end = tok.eos_token_id  # "[e~[": every message ends with it
    last_end = max(i for i, t in enumerate(prompt) if t == end) + 1
    assert last_end <= common < len(prompt)  # it parts inside the generation prompt, after the user's message end


# ---------------------------------------------------------------------------------------------------- random traffic
@pytest.mark.parametrize("grow", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_random_traffic_with_shared_prefixes_aborts_and_a_tight_cache(model, seed, grow):
    """Requests built from a few shared stems (some the exact prompt of an earlier request, some its prompt and
    reply), arriving over time, some aborted midway, n up to 3, in a cache small enough to evict and preempt, that
    keeps cached blocks while unwritten ones remain or takes them first (the CPU's default): every completed output
    equals full-recompute greedy, and the cache's books balance at the end."""
    gen = torch.Generator().manual_seed(100 + seed)
    engine = _tight_engine(model, snapshots=6, max_num_batched_tokens=24, max_model_len=96)
    engine.cache.grow_for_prefix_cache = grow
    stems = [[*_tokens(gen, int(torch.randint(3, 20, (1,), generator=gen))), END] for _ in range(3)]
    finished: dict[str, tuple[list[int], list[list[int]]]] = {}
    prompts: dict[str, list[int]] = {}
    aborted, step = set(), 0
    for i in range(24):
        kind = int(torch.randint(0, 3, (1,), generator=gen))
        done = list(finished.values())
        if kind == 0 or not done:
            prompt = stems[i % 3] + _tokens(gen, int(torch.randint(1, 25, (1,), generator=gen)))
        elif kind == 1:
            prompt = list(done[int(torch.randint(0, len(done), (1,), generator=gen))][0])  # an exact repeat
        else:
            earlier, outs = done[int(torch.randint(0, len(done), (1,), generator=gen))]
            prompt = earlier + outs[0] + [END] + _tokens(gen, 4)  # the next turn
        prompt = prompt[:80]
        n = 1 + int(torch.randint(0, 3, (1,), generator=gen))
        rid = f"r{i}"
        prompts[rid] = prompt
        engine.add_request(rid, prompt, SamplingParams(n=n, temperature=0, max_tokens=6, ignore_eos=True))
        for _ in range(int(torch.randint(0, 4, (1,), generator=gen))):
            for out in engine.step():
                if out.finished:
                    finished[out.request_id] = (prompts[out.request_id], [s.token_ids for s in out.outputs])
            step += 1
        if i % 7 == 3 and rid in engine.requests:
            engine.abort_request(rid)
            aborted.add(rid)
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = (prompts[out.request_id], [s.token_ids for s in out.outputs])
    for rid, (prompt, outs) in finished.items():
        if rid in aborted:
            continue
        want = _expected(model, prompt)
        assert all(o == want for o in outs), (rid, len(prompt))
    assert len(finished) >= 18 and engine.prefix_cache.stats.hit_tokens > 0
    assert engine.scheduler.num_preemptions > 0
    cache = engine.cache
    assert cache.num_free_blocks == cache.layout.num_blocks and cache.num_free_slots == cache.layout.num_slots
    assert all(users == 0 for users in cache._users)
