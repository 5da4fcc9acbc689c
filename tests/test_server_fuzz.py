"""Fuzzing the HTTP API: hypothesis generates well-formed, half-formed and malformed requests for every route; none
may produce a 5xx or crash the server, every 4xx carries the API's error shape, and every stream ends properly."""

from __future__ import annotations

import json

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from mmx.chat.formats import chat_for  # noqa: E402
from mmx.engine import AsyncLLM, LLMEngine  # noqa: E402
from mmx.serve import ServerState, build_app  # noqa: E402

from .conftest import tiny_model  # noqa: E402

TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)
WEIRD = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 10**6),
    st.floats(allow_nan=True),
    TEXT,
    st.lists(st.integers(-2, 600), max_size=4),
    st.dictionaries(TEXT, st.integers(), max_size=2),
)
TOOL = st.one_of(
    st.just(
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ),
    st.fixed_dictionaries(
        {
            "type": st.sampled_from(["function", "code"]),
            "function": st.fixed_dictionaries(
                {"name": TEXT, "parameters": st.one_of(st.none(), st.just({"type": "string"}), st.just({}))}
            ),
        }
    ),
)
MESSAGE = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["user", "assistant", "system", "tool", "developer", "wizard"]),
        "content": st.one_of(
            TEXT, st.none(), st.just([{"type": "text", "text": "hi"}]), st.just([{"type": "image_url"}])
        ),
    },
    optional={
        "tool_calls": st.sampled_from(['{"city": "Oslo"}', "not json", "{}"]).map(
            lambda args: [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": args}}]
        ),
        "reasoning_content": TEXT,
        "tool_call_id": TEXT,
    },
)
SAMPLING = {
    "temperature": st.one_of(st.floats(-1, 3), WEIRD),
    "top_p": st.one_of(st.floats(-0.5, 1.5), WEIRD),
    "top_k": st.one_of(st.integers(-3, 50), WEIRD),
    "n": st.one_of(st.integers(-1, 3), WEIRD),
    "stop": st.one_of(TEXT, st.lists(TEXT, max_size=3), WEIRD),
    "seed": st.one_of(st.integers(-5, 5), WEIRD),
    "stream": st.booleans(),
    "presence_penalty": st.one_of(st.floats(-3, 3), WEIRD),
    "stream_options": st.one_of(st.just({"include_usage": True}), WEIRD),
    "ignore_eos": st.booleans(),
}
CHAT = st.fixed_dictionaries(
    {"model": st.sampled_from(["tiny", "tiny", "other", ""]), "messages": st.lists(MESSAGE, max_size=3)},
    optional={
        "max_tokens": st.one_of(st.integers(-2, 6), WEIRD),
        "tools": st.lists(TOOL, max_size=2),
        "tool_choice": st.one_of(st.sampled_from(["none", "auto", "required"]), WEIRD),
        "logprobs": st.booleans(),
        "top_logprobs": st.one_of(st.integers(-1, 25), WEIRD),
        **SAMPLING,
    },
)
COMPLETION = st.fixed_dictionaries(
    {
        "model": st.sampled_from(["tiny", "tiny", "nope"]),
        "prompt": st.one_of(TEXT, st.lists(TEXT, max_size=2), st.lists(st.integers(-5, 700), max_size=5), WEIRD),
    },
    optional={
        "max_tokens": st.one_of(st.integers(-2, 6), WEIRD),
        "echo": st.booleans(),
        "logprobs": st.one_of(st.integers(-1, 7), WEIRD),
        "suffix": st.one_of(st.none(), TEXT),
        **SAMPLING,
    },
)
ANTHROPIC = st.fixed_dictionaries(
    {
        "model": st.sampled_from(["tiny", "x"]),
        "max_tokens": st.one_of(st.integers(-1, 6), WEIRD),
        "messages": st.lists(
            st.fixed_dictionaries(
                {
                    "role": st.sampled_from(["user", "assistant", "system"]),
                    "content": st.one_of(
                        TEXT, st.just([{"type": "text", "text": "a"}]), st.just([{"type": "image"}]), WEIRD
                    ),
                }
            ),
            max_size=3,
        ),
    },
    optional={
        "system": st.one_of(TEXT, WEIRD),
        "stream": st.booleans(),
        "stop_sequences": st.one_of(st.lists(TEXT, max_size=2), WEIRD),
        "tool_choice": st.one_of(st.just({"type": "any"}), st.just({"type": "tool", "name": "zz"}), WEIRD),
        "tools": st.lists(
            st.fixed_dictionaries({"name": TEXT, "input_schema": st.one_of(st.just({"type": "object"}), WEIRD)}),
            max_size=2,
        ),
        "temperature": st.one_of(st.floats(-1, 2), WEIRD),
    },
)
REQUEST = st.one_of(
    st.tuples(st.just("/v1/chat/completions"), CHAT),
    st.tuples(st.just("/v1/completions"), COMPLETION),
    st.tuples(st.just("/v1/messages"), ANTHROPIC),
    st.tuples(
        st.sampled_from(["/v1/chat/completions", "/v1/messages", "/v1/completions", "/tokenize"]),
        st.one_of(st.binary(max_size=20), WEIRD),
    ),
)


@pytest.fixture(scope="module")
def http(tiny_tokenizer):
    engine = AsyncLLM(LLMEngine(tiny_model("tiny-m2"), max_model_len=128, cache_memory_gb=0.02))
    state = ServerState(
        engine=engine,
        tokenizer=tiny_tokenizer,
        chat=chat_for(tiny_tokenizer, "minimax_m2", "minimax_m2"),
        model_name="tiny",
        model_path="tiny",
        max_model_len=128,
    )
    with TestClient(build_app(state, max_body_bytes=1 << 16), raise_server_exceptions=False) as client:
        yield client
    engine.shutdown()


@settings(
    max_examples=600,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(request=REQUEST)
def test_no_request_breaks_the_server(http, request):
    path, body = request
    # non-finite floats go out as Python's NaN / Infinity extension of JSON, which the server must also survive
    content = body if isinstance(body, bytes) else json.dumps(body, allow_nan=True).encode()
    response = http.post(path, content=content, headers={"content-type": "application/json"})
    assert response.status_code < 500, (path, body, response.text[:500])
    if response.status_code >= 400:
        payload = response.json()
        if path == "/v1/messages":
            assert payload["type"] == "error" and payload["error"]["message"]
        else:
            assert payload["error"]["message"] and "type" in payload["error"]
    elif response.headers["content-type"].startswith("text/event-stream"):
        lines = [line for line in response.text.splitlines() if line.startswith("data: ")]
        if path == "/v1/messages":
            assert json.loads(lines[-1][6:])["type"] in ("message_stop", "error")
        else:
            assert lines[-1] == "data: [DONE]"
    assert http.get("/health").status_code == 200
