"""One bad request fails alone: non-finite numbers, malformed input, huge prompts, greedy requests, clients that go
away and a server told to stop. The engine-level tests run mmx-tiny directly; the server tests run the real app
in this process (so a test can reach into its engine) or as a subprocess (for signals)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import threading
import time

import httpx
import pytest
import torch

from mmx.embedded import embedded_model_path
from mmx.engine import AsyncLLM, LLMEngine, SamplingParams
from mmx.engine.sampler import finite_rows
from mmx.llm import load_engine

from .helpers import free_port, running_process

MODEL = "mmx-tiny"
PATH = embedded_model_path()
pytestmark = pytest.mark.skipif(PATH is None, reason="the embedded mmx-tiny model is not installed")


def _engine(**args) -> tuple[LLMEngine, object]:
    return load_engine(PATH, **{"max_model_len": 512, "cache_memory_gb": 0.05, **args})


def _poison(engine: LLMEngine, is_bad) -> None:
    """Make the logits of the sequences ``is_bad`` picks NaN, as a numerical fault in the model would."""
    sample = engine._sample

    def poisoned(logits, seqs):
        logits = logits.clone()
        for i, seq in enumerate(seqs):
            if is_bad(seq):
                logits[i] = float("nan")
        return sample(logits, seqs)

    engine._sample = poisoned


def _run(engine: LLMEngine) -> dict:
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return done


# ---------------------------------------------------------------------------------------------------- engine
def test_a_sequence_with_non_finite_logits_fails_alone():
    prompts = [[5, 6, 7], [8, 9, 10, 11], [12, 13]]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    engine, _ = _engine()
    alone = {}
    for i, ids in enumerate(prompts):
        engine.add_request(f"r{i}", ids, params)
        alone[f"r{i}"] = _run(engine)[f"r{i}"].token_ids
    _poison(engine, lambda seq: seq.request_id == "bad")
    for i, ids in enumerate(prompts):
        engine.add_request(f"r{i}", ids, params)
    engine.add_request("bad", [5, 6], SamplingParams(max_tokens=12, temperature=0.8, n=2))
    done = _run(engine)
    assert done["bad"].error is not None and "not finite" in done["bad"].error
    assert {o.finish_reason for o in done["bad"].outputs} == {"error"}
    for rid, ids in alone.items():
        assert done[rid].error is None and done[rid].token_ids == ids
    assert not engine.scheduler.running and engine.cache.num_free_slots == engine.cache.layout.num_slots


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_finite_rows_finds_every_non_finite_row(bad):
    logits = torch.randn(6, 300)
    logits[1, 7] = bad
    logits[4, 299] = bad
    logits[5] = 3e38  # every entry finite, but the row's sum overflows: must still count as finite
    assert finite_rows(logits) == [True, False, True, True, False, True]
    assert finite_rows(logits[[0, 2, 3]]) == [True, True, True]


def test_probabilities_that_go_nan_under_a_penalty_fail_that_request_alone():
    engine, _ = _engine()
    good = SamplingParams(max_tokens=8, temperature=1.0, seed=3, ignore_eos=True)
    engine.add_request("good", [5, 6, 7], good)
    expected = _run(engine)["good"].token_ids
    bad = SamplingParams(max_tokens=8, temperature=1.0, seed=1)
    bad.repetition_penalty = 1e-300  # past validation, as a bug elsewhere could: logits / 1e-300 overflow to inf
    engine.add_request("bad", [5, 6, 7], bad)
    engine.add_request("good", [5, 6, 7], good)
    done = _run(engine)
    assert done["bad"].error and "sampling failed" in done["bad"].error
    assert done["good"].token_ids == expected


@pytest.mark.parametrize(
    "field, value",
    [
        ("repetition_penalty", 1e-300),
        ("repetition_penalty", 1e300),
        ("temperature", float("inf")),
        ("top_p", float("nan")),
        ("seed", 2**80),
        ("seed", -1),
    ],
)
def test_sampling_values_that_could_produce_nan_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_a_request_of_many_sequences_does_not_starve_a_small_one():
    """Fair admission: with 2 places, a request of 12 long sequences and a small one that arrives after it, the
    small one runs as soon as a place frees, not after all 12."""
    engine, _ = _engine(max_num_seqs=2)
    engine.add_request("big", [5, 6, 7], SamplingParams(n=12, max_tokens=30, ignore_eos=True, temperature=0))
    engine.step()
    engine.add_request("small", [8, 9], SamplingParams(max_tokens=5, ignore_eos=True, temperature=0))
    finished_at, step = {}, 0
    while engine.has_unfinished_requests():
        step += 1
        for out in engine.step():
            if out.finished:
                finished_at[out.request_id] = step
    # FIFO admission would run the small request after 6 rounds of 30 tokens
    assert finished_at["small"] <= 30 + 5 + 2 < finished_at["big"]


# ---------------------------------------------------------------------------------------------------- server
@contextlib.contextmanager
def _app_server(engine_args: dict | None = None, **state_args):
    """The real app over a real engine, served by uvicorn in a thread of this process."""
    import uvicorn

    from mmx.chat.formats import chat_for
    from mmx.serve import ServerState, build_app

    engine, tokenizer = _engine(**(engine_args or {}))
    state = ServerState(
        engine=AsyncLLM(engine),
        tokenizer=tokenizer,
        chat=chat_for(tokenizer, engine.config.architecture, None),
        model_name=MODEL,
        model_path=PATH,
        max_model_len=engine.max_model_len,
        **state_args,
    )
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(build_app(state), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", state
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        state.engine.shutdown()


@pytest.fixture(scope="module")
def app_server():
    with _app_server() as served:
        yield served


def _chat(content: str = "What is 2 + 3?", **fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 8, **fields}


async def _stream_text(client: httpx.AsyncClient, url: str, body: dict) -> tuple[str, str | None]:
    text, error = "", None
    async with client.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}) as r:
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                error = chunk["error"]["message"]
                continue
            for choice in chunk["choices"]:
                text += choice["delta"].get("content") or choice["delta"].get("reasoning_content") or ""
    return text, error


def test_a_failing_stream_among_eight_fails_alone(app_server):
    url, state = app_server
    bodies = [_chat(f"What is {i} + {i}?", temperature=0, max_tokens=24, ignore_eos=True) for i in range(8)]

    async def all_streams():
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*(_stream_text(client, url, b) for b in bodies))

    alone = asyncio.run(all_streams())
    engine = state.engine.engine
    original = engine._sample
    _poison(engine, lambda seq: seq.params.seed == 666)
    try:
        poisoned = {**_chat("What is 9 + 9?", max_tokens=24, ignore_eos=True), "seed": 666}

        async def with_poison():
            async with httpx.AsyncClient(timeout=60) as client:
                return await asyncio.gather(*(_stream_text(client, url, b) for b in [poisoned, *bodies]))

        bad, *good = asyncio.run(with_poison())
        r = httpx.post(f"{url}/v1/chat/completions", json=poisoned, timeout=60)
    finally:
        engine._sample = original
    assert bad[1] is not None and "engine failed this request" in bad[1]
    assert [text for text, _ in good] == [text for text, _ in alone] and all(err is None for _, err in good)
    assert r.status_code == 500 and "not finite" in r.json()["error"]["message"]
    assert httpx.get(f"{url}/health").status_code == 200


RAW_BAD_BODIES = [
    # lone surrogates reach the server as valid JSON escapes
    ("/v1/chat/completions", '{"model": "mmx-tiny", "messages": [{"role": "user", "content": "a\\ud800b"}]}'),
    ("/v1/completions", '{"model": "mmx-tiny", "prompt": "x\\udfff"}'),
    ("/v1/messages", '{"model": "mmx-tiny", "max_tokens": 4, "messages": [{"role": "user", "content": "\\ud83d"}]}'),
    ("/v1/chat/completions", '{"model": "mmx-tiny", "messages": [{"role": "user", "content": "hi"}], "seed": ' + str(2**80) + "}"),
    ("/v1/chat/completions", '{"model": "mmx-tiny", "messages": [{"role": "user", "content": "hi"}], "repetition_penalty": 1e-300}'),
    ("/v1/chat/completions", '{"model": "mmx-tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}'),
    ("/v1/completions", '{"model": "mmx-tiny", "prompt": "hi", "top_p": Infinity}'),
]  # fmt: skip

BAD_ANTHROPIC_BLOCKS = [
    [{"type": "text"}],
    [{"type": "text", "text": 5}],
    [{"type": "tool_use", "id": "t1", "input": {}}],
    [{"type": "tool_use", "id": "t1", "name": "f", "input": "not an object"}],
    [{"type": "tool_result", "content": "x"}],
    [{"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "image"}]}],
    [{"type": "tool_result", "tool_use_id": "t1", "content": 7}],
    [{"type": "thinking"}],
    ["just a string"],
    [{"type": "image", "source": {}}],
]


def test_malformed_inputs_get_a_4xx_with_an_error_body(app_server):
    url, _ = app_server
    for path, raw in RAW_BAD_BODIES:
        r = httpx.post(f"{url}{path}", content=raw, headers={"content-type": "application/json"}, timeout=30)
        assert r.status_code == 400, (path, raw, r.text)
        assert r.json()["error"]["message"]
    for blocks in BAD_ANTHROPIC_BLOCKS:
        for role in ("user", "assistant"):
            body = {"model": MODEL, "max_tokens": 4, "messages": [{"role": role, "content": blocks}]}
            r = httpx.post(f"{url}/v1/messages", json=body, timeout=30)
            assert r.status_code == 400, (blocks, r.text)
            assert r.json()["type"] == "error" and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(f"{url}/v1/messages", json={"model": MODEL, "max_tokens": 4, "system": [{"type": "text"}],
                                               "messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
    assert r.status_code == 400


def test_unknown_and_unsupported_fields_are_refused_by_name(app_server):
    url, _ = app_server
    for field, value in [("functions", [{"name": "f"}]), ("use_beam_search", True), ("frobnicate", 1)]:
        r = httpx.post(f"{url}/v1/chat/completions", json=_chat(**{field: value}), timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
        assert field in r.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/messages", json={"model": MODEL, "max_tokens": 4, "mcp_servers": [],
                                               "messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
    assert r.status_code == 400 and "mcp_servers" in r.json()["error"]["message"]
    harmless = _chat(user="u1", metadata={"k": "v"}, store=False, service_tier="auto")
    assert httpx.post(f"{url}/v1/chat/completions", json=harmless, timeout=30).status_code == 200


def test_too_many_sequences_in_one_request_is_refused(app_server):
    url, _ = app_server
    body = {"model": MODEL, "prompt": ["a"] * 10, "n": 30, "max_tokens": 2}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
    assert r.status_code == 400 and "300 sequences" in r.json()["error"]["message"]


def test_a_huge_prompt_does_not_stall_health(app_server):
    url, _ = app_server
    huge = _chat("word " * 1_000_000)  # 5 MB
    result = {}

    def post():
        result["r"] = httpx.post(f"{url}/v1/chat/completions", json=huge, timeout=60)

    thread = threading.Thread(target=post)
    thread.start()
    worst = 0.0
    while thread.is_alive():
        start = time.perf_counter()
        assert httpx.get(f"{url}/health", timeout=5).status_code == 200
        worst = max(worst, time.perf_counter() - start)
        time.sleep(0.01)
    thread.join()
    assert result["r"].status_code == 400 and "context" in result["r"].json()["error"]["message"]
    assert worst < 0.2


def test_a_non_streaming_client_that_disconnects_frees_its_sequences(app_server):
    url, state = app_server
    body = _chat(max_tokens=480, ignore_eos=True, n=4)
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{url}/v1/chat/completions", json=body, timeout=0.5)
    engine = state.engine.engine
    for _ in range(100):
        if not engine.requests and not engine.scheduler.running:
            break
        time.sleep(0.05)
    assert not engine.requests and not engine.scheduler.running
    assert engine.cache.num_free_slots == engine.cache.layout.num_slots


def test_a_small_request_is_served_while_a_large_one_runs():
    with _app_server({"max_num_seqs": 4}) as (url, _):
        big = {"model": MODEL, "prompt": ["one", "two", "three", "four"], "n": 8, "max_tokens": 60,
               "ignore_eos": True, "temperature": 0}  # fmt: skip
        times = {}

        def run_big():
            httpx.post(f"{url}/v1/completions", json=big, timeout=300).raise_for_status()
            times["big"] = time.perf_counter()

        thread = threading.Thread(target=run_big)
        thread.start()
        time.sleep(0.3)
        r = httpx.post(f"{url}/v1/chat/completions", json=_chat(max_tokens=4, ignore_eos=True), timeout=300)
        times["small"] = time.perf_counter()
        thread.join()
    assert r.status_code == 200
    assert times["small"] < times["big"]


def test_sigterm_drains_for_the_shutdown_timeout_then_aborts():
    port = free_port()
    command = [sys.executable, "-m", "mmx.cli.main", "serve", PATH, "--port", str(port), "--max-model-len", "2048",
               "--cache-memory-gb", "0.05", "--shutdown-timeout", "1"]  # fmt: skip
    body = _chat(max_tokens=2000, ignore_eos=True)
    with running_process(command, port) as (url, proc):
        lines = []

        def stream():
            request = {**body, "stream": True}
            with (
                contextlib.suppress(httpx.RemoteProtocolError),  # the cut, once the drain time is over
                httpx.stream("POST", f"{url}/v1/chat/completions", json=request, timeout=60) as r,
            ):
                lines.extend(r.iter_lines())

        thread = threading.Thread(target=stream)
        thread.start()
        while len(lines) < 3:
            time.sleep(0.02)
        start = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
        stopped = time.perf_counter() - start
        thread.join(timeout=10)
    assert stopped < 8, stopped  # 1 s of drain, then the stream is cut and the process exits
    assert not thread.is_alive() and "data: [DONE]" not in lines
