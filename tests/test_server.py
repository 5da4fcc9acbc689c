"""`mmx serve` as a real subprocess on 127.0.0.1, driven by the real openai and anthropic SDKs."""

from __future__ import annotations

import json
import sys
import time

import httpx
import pytest

openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")

from .helpers import free_port, running, serve  # noqa: E402

MODEL = "tiny"
KEY = "sk-test-123"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_tokenizer):
    from .conftest import tiny_model

    path = tmp_path_factory.mktemp("served") / MODEL
    tiny_model("tiny-m2").save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def server(checkpoint):
    with serve(checkpoint) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


# ---------------------------------------------------------------------------------------------------- OpenAI
def test_models_health_and_metrics(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(f"{server}/health").status_code == 200
    metrics = httpx.get(f"{server}/metrics").text
    assert "# TYPE mmx_generation_tokens_total counter" in metrics and "mmx_requests_running" in metrics


def test_chat_streaming_accumulates_to_the_non_streaming_result(client):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Weather in Paris?"}]
    full = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=24)
    choice = full.choices[0]
    assert choice.finish_reason in ("stop", "length")
    assert full.usage.completion_tokens > 0 and full.usage.prompt_tokens > 10
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=messages,
            temperature=0,
            max_tokens=24,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
    assert content == (choice.message.content or "")
    assert reasoning == (getattr(choice.message, "reasoning_content", None) or "")
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        choice.finish_reason
    ]
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_chat_sampling_options_n_seed_and_logprobs(client):
    messages = [{"role": "user", "content": "hi"}]
    out = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        n=3,
        temperature=1.0,
        top_p=0.9,
        seed=7,
        max_completion_tokens=6,
        logprobs=True,
        top_logprobs=2,
        presence_penalty=0.5,
        frequency_penalty=0.2,
        extra_body={"top_k": 20, "ignore_eos": True},
    )
    assert [c.index for c in out.choices] == [0, 1, 2]
    again = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        n=3,
        temperature=1.0,
        top_p=0.9,
        seed=7,
        max_completion_tokens=6,
        presence_penalty=0.5,
        frequency_penalty=0.2,
        extra_body={"top_k": 20, "ignore_eos": True},
    )
    assert [c.message.content for c in out.choices] == [c.message.content for c in again.choices]  # seeded
    lp = out.choices[0].logprobs.content
    assert len(lp) == 6 and all(len(t.top_logprobs) == 2 for t in lp) and all(t.logprob <= 0 for t in lp)


def test_completions_stream_echo_and_stop(client):
    full = client.completions.create(model=MODEL, prompt="The quick brown", max_tokens=12, temperature=0)
    text = full.choices[0].text
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=MODEL, prompt="The quick brown", max_tokens=12, temperature=0, stream=True
        )
        if c.choices
    )
    assert streamed == text
    echoed = client.completions.create(
        model=MODEL, prompt="The quick brown", max_tokens=12, temperature=0, echo=True, logprobs=2
    )
    assert echoed.choices[0].text == "The quick brown" + text
    assert len(echoed.choices[0].logprobs.token_logprobs) == len(
        full.choices[0].text and echoed.choices[0].logprobs.tokens
    )
    many = client.completions.create(model=MODEL, prompt=["a b", "c d"], max_tokens=3, temperature=0, n=2)
    assert sorted(c.index for c in many.choices) == [0, 1, 2, 3]
    ids = client.completions.create(model=MODEL, prompt=[[5, 6, 7], [8, 9]], max_tokens=3, temperature=0)
    assert len(ids.choices) == 2 and ids.usage.prompt_tokens == 5
    with pytest.raises(openai.BadRequestError, match="token ids"):
        client.completions.create(model=MODEL, prompt=["a", [1]], max_tokens=3)
    if len(text) > 3:
        cut = client.completions.create(
            model=MODEL, prompt="The quick brown", max_tokens=12, temperature=0, stop=[text[1:3]]
        )
        assert cut.choices[0].text == text[: text.find(text[1:3])] and cut.choices[0].finish_reason == "stop"


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(max_tokens=-1), "max_tokens"),
        (dict(top_p=1.5), "top_p"),
        (dict(temperature=3), "temperature"),
        (dict(messages=[{"role": "wizard", "content": "x"}]), "role"),
        (dict(tools=[{"type": "function", "function": {"name": "bad name!", "parameters": {}}}]), "name"),
        (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]), "object"),
        (dict(tool_choice="required"), "tool"),
        (dict(messages=[{"role": "user", "content": "word " * 600}]), "context"),
    ],
)
def test_bad_chat_requests_are_400_with_an_openai_body(client, kwargs, fragment):
    request = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **kwargs}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**request)
    assert e.value.status_code == 400 and fragment in e.value.message
    assert set(e.value.body) >= {"message", "type", "param"} and e.value.body["type"] == "invalid_request_error"


def test_unknown_model_malformed_json_and_oversized_body(server, client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])
    r = httpx.post(
        f"{server}/v1/chat/completions",
        content=b'{"model": "tiny", "messages": [',
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["error"]["message"] == "the request body is not valid JSON"
    r = httpx.post(
        f"{server}/v1/chat/completions", content=b"x" * 300_000, headers={"content-type": "application/json"}
    )
    assert r.status_code == 413 and "error" in r.json()
    r = httpx.post(f"{server}/v1/messages", json={"model": MODEL, "messages": []})
    assert r.status_code == 400 and r.json()["type"] == "error" and r.json()["error"]["type"] == "invalid_request_error"


def test_client_disconnect_aborts_the_request(server):
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "max_tokens": 400,
        "ignore_eos": True,
    }
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, timeout=30) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 3:
                break
    for _ in range(100):
        metrics = httpx.get(f"{server}/metrics").text
        if "mmx_requests_running 0" in metrics and "mmx_engine_requests_aborted_total 0" not in metrics:
            break
        time.sleep(0.1)
    assert "mmx_requests_running 0" in metrics
    assert "mmx_engine_requests_aborted_total 0" not in metrics


# ---------------------------------------------------------------------------------------------------- Anthropic
def test_anthropic_messages_and_stream(server):
    client = anthropic.Anthropic(base_url=server, api_key="unused", max_retries=0)
    greedy = {"extra_body": {"temperature": 0}}  # this SDK has no temperature argument; the API field still works
    msg = client.messages.create(
        model=MODEL,
        max_tokens=20,
        system="be brief",
        **greedy,
        messages=[{"role": "user", "content": "Weather in Paris?"}],
    )
    assert msg.role == "assistant" and msg.stop_reason in ("end_turn", "max_tokens")
    assert msg.usage.output_tokens > 0
    text = "".join(b.text for b in msg.content if b.type == "text")
    thinking = "".join(b.thinking for b in msg.content if b.type == "thinking")
    with client.messages.stream(
        model=MODEL,
        max_tokens=20,
        system="be brief",
        **greedy,
        messages=[{"role": "user", "content": "Weather in Paris?"}],
    ) as stream:
        final = stream.get_final_message()
    assert "".join(b.text for b in final.content if b.type == "text") == text
    assert "".join(b.thinking for b in final.content if b.type == "thinking") == thinking
    assert final.stop_reason == msg.stop_reason


def test_auth(checkpoint):
    with serve(checkpoint, "--api-key", KEY) as url:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
        r = httpx.get(f"{url}/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0).models.list().data[0].id == MODEL
        with pytest.raises(anthropic.AuthenticationError):
            anthropic.Anthropic(base_url=url, api_key="wrong", max_retries=0).messages.create(
                model=MODEL, max_tokens=2, messages=[{"role": "user", "content": "x"}]
            )
        ok = anthropic.Anthropic(base_url=url, api_key=KEY, max_retries=0).messages.create(
            model=MODEL, max_tokens=2, messages=[{"role": "user", "content": "x"}]
        )
        assert ok.type == "message"
        assert httpx.get(f"{url}/health").status_code == 200  # health stays open for load balancers


# ---------------------------------------------------------------------------------------------------- replayed model
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}},
    },
}
SCRIPT = {
    "Weather in Paris?": 'The user wants the weather.\n</think>\n\nLet me check.<minimax:tool_call>\n<invoke name="get_weather">\n'
    '<parameter name="city">Paris</parameter>\n<parameter name="days">3</parameter>\n</invoke>\n</minimax:tool_call>',
    "<response>": "Got it: 20 degrees.\n</think>\n\nIt is 20°C in Paris.",
    # continuation after the prefix the server pre-fills for tool_choice={"function": {"name": "get_weather"}}
    '<invoke name="get_weather">\n': '<parameter name="city">Oslo</parameter>\n</invoke>\n</minimax:tool_call>',
    "Just chat": "No tools here.\n</think>\n\nHello <minimax:tool_call> stays text",
}


@pytest.fixture(scope="module")
def replay(tmp_path_factory, tiny_tokenizer):
    tmp = tmp_path_factory.mktemp("replay")
    tiny_tokenizer.save_pretrained(tmp / "tok")
    (tmp / "script.json").write_text(json.dumps(SCRIPT))
    log = tmp / "prompts.log"
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "tests.replay_server",
        "--script",
        str(tmp / "script.json"),
        "--log",
        str(log),
        "--tokenizer",
        str(tmp / "tok"),
        "--port",
        str(port),
    ]
    with running(command, port) as url:
        yield url, log


def test_tool_calls_and_reasoning_openai(replay):
    url, log = replay
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    out = client.chat.completions.create(model="replay", messages=messages, tools=[WEATHER])
    msg = out.choices[0].message
    assert out.choices[0].finish_reason == "tool_calls"
    assert msg.content == "Let me check." and msg.reasoning_content == "The user wants the weather."
    assert msg.tool_calls[0].function.name == "get_weather"
    assert json.loads(msg.tool_calls[0].function.arguments) == {"city": "Paris", "days": 3}
    # streaming: the first delta of a call has index, id, type and name; argument fragments follow
    calls: dict[int, dict] = {}
    reasoning = content = ""
    finish = None
    for chunk in client.chat.completions.create(model="replay", messages=messages, tools=[WEATHER], stream=True):
        delta = chunk.choices[0].delta
        reasoning += getattr(delta, "reasoning_content", None) or ""
        content += delta.content or ""
        for tc in delta.tool_calls or []:
            if tc.index not in calls:
                assert tc.id and tc.type == "function" and tc.function.name == "get_weather"
                calls[tc.index] = {"name": tc.function.name, "args": ""}
            calls[tc.index]["args"] += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert (reasoning, content, finish) == ("The user wants the weather.", "Let me check.", "tool_calls")
    assert json.loads(calls[0]["args"]) == {"city": "Paris", "days": 3}
    # next turn: the assistant's reasoning and call come back and are rendered (interleaved thinking)
    messages += [
        msg.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": msg.tool_calls[0].id, "content": '{"temp": 20}'},
    ]
    final = client.chat.completions.create(model="replay", messages=messages, tools=[WEATHER])
    assert final.choices[0].message.content == "It is 20°C in Paris." and final.choices[0].finish_reason == "stop"
    prompt = json.loads(log.read_text().splitlines()[-1])
    assert "<think>\nThe user wants the weather.\n</think>\n\nLet me check.<minimax:tool_call>" in prompt
    assert '<response>{"temp": 20}</response>' in prompt
    # append_think mode keeps the reasoning inside content, for clients that only round-trip content
    raw = client.chat.completions.create(
        model="replay", messages=messages[:1], tools=[WEATHER], extra_body={"reasoning_mode": "append_think"}
    )
    assert raw.choices[0].message.content == "<think>\nThe user wants the weather.\n</think>\n\nLet me check."


def test_tool_calls_and_thinking_anthropic(replay):
    url, log = replay
    client = anthropic.Anthropic(base_url=url, api_key="x", max_retries=0)
    tools = [{"name": "get_weather", "description": "Get weather", "input_schema": WEATHER["function"]["parameters"]}]
    msg = client.messages.create(
        model="replay", max_tokens=200, tools=tools, messages=[{"role": "user", "content": "Weather in Paris?"}]
    )
    assert [b.type for b in msg.content] == ["thinking", "text", "tool_use"] and msg.stop_reason == "tool_use"
    assert msg.content[2].input == {"city": "Paris", "days": 3} and msg.content[2].id.startswith("toolu_")
    with client.messages.stream(
        model="replay", max_tokens=200, tools=tools, messages=[{"role": "user", "content": "Weather in Paris?"}]
    ) as stream:
        events = [e.type for e in stream]
        streamed = stream.get_final_message()
    assert [b.type for b in streamed.content] == ["thinking", "text", "tool_use"]
    assert (
        streamed.content[2].input == {"city": "Paris", "days": 3}
        and streamed.content[0].thinking == msg.content[0].thinking
    )
    assert events[0] == "message_start" and events[-1] == "message_stop" and "content_block_delta" in events
    follow = client.messages.create(
        model="replay",
        max_tokens=200,
        tools=tools,
        messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": [b.model_dump() for b in msg.content]},
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": msg.content[2].id, "content": '{"temp": 20}'}],
            },
        ],
    )
    assert [b.type for b in follow.content] == ["thinking", "text"] and follow.stop_reason == "end_turn"
    prompt = json.loads(log.read_text().splitlines()[-1])
    assert "<think>\nThe user wants the weather.\n</think>" in prompt and "<response>" in prompt


def test_forced_and_disabled_tool_choice(replay):
    url, log = replay
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    named = {"type": "function", "function": {"name": "get_weather"}}
    out = client.chat.completions.create(
        model="replay", messages=[{"role": "user", "content": "Tell me a joke"}], tools=[WEATHER], tool_choice=named
    )
    prompt = json.loads(log.read_text().splitlines()[-1])
    assert prompt.endswith('</think>\n\n<minimax:tool_call>\n<invoke name="get_weather">\n')
    call = out.choices[0].message.tool_calls[0]
    assert out.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Oslo"}
    # tool_choice "none": no tools in the prompt, and tool syntax in the output stays text
    out = client.chat.completions.create(
        model="replay", messages=[{"role": "user", "content": "Just chat"}], tools=[WEATHER], tool_choice="none"
    )
    prompt = json.loads(log.read_text().splitlines()[-1])
    assert "# Tools" not in prompt
    assert out.choices[0].message.tool_calls is None and "<minimax:tool_call>" in out.choices[0].message.content


# ---------------------------------------------------------------------------------------------------- mmx-tiny
PROBLEM = (
    "Sara has 40 coins. Sara finds 25 more. Sara buys 3 bags with 6 coins in each. How many coins does Sara have now?"
)


def test_mmx_tiny_reasons_and_calls_the_calculator_through_both_apis(tiny_server):
    """The real model, not a replay: its reasoning, its tool call, the result sent back, its answer (40 + 25 + 18)."""
    from mmx.tasks.arithmetic import CALCULATOR_TOOL, SYSTEM_PROMPT, calculate

    client = openai.OpenAI(base_url=f"{tiny_server}/v1", api_key="x", max_retries=0)
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": PROBLEM}]
    first = client.chat.completions.create(
        model="mmx-tiny", messages=messages, tools=[CALCULATOR_TOOL], temperature=0, max_tokens=192
    )
    msg = first.choices[0].message
    assert first.choices[0].finish_reason == "tool_calls" and "Sara starts with 40" in msg.reasoning_content
    expression = json.loads(msg.tool_calls[0].function.arguments)["expression"]
    assert msg.tool_calls[0].function.name == "calculator" and calculate(expression) == "83"
    streamed_args = ""
    for chunk in client.chat.completions.create(
        model="mmx-tiny", messages=messages, tools=[CALCULATOR_TOOL], temperature=0, max_tokens=192, stream=True
    ):
        for tc in chunk.choices[0].delta.tool_calls or []:
            streamed_args += tc.function.arguments or ""
    assert json.loads(streamed_args) == {"expression": expression}
    messages += [
        msg.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": msg.tool_calls[0].id, "content": calculate(expression)},
    ]
    final = client.chat.completions.create(
        model="mmx-tiny", messages=messages, tools=[CALCULATOR_TOOL], temperature=0, max_tokens=192
    )
    assert final.choices[0].finish_reason == "stop" and "83" in final.choices[0].message.content

    claude = anthropic.Anthropic(base_url=tiny_server, api_key="x", max_retries=0)
    tool = {
        "name": "calculator",
        "description": CALCULATOR_TOOL["function"]["description"],
        "input_schema": CALCULATOR_TOOL["function"]["parameters"],
    }
    # this SDK version no longer takes temperature as an argument
    settings = {"model": "mmx-tiny", "system": SYSTEM_PROMPT, "max_tokens": 192, "extra_body": {"temperature": 0}}
    reply = claude.messages.create(**settings, tools=[tool], messages=[{"role": "user", "content": PROBLEM}])
    assert reply.stop_reason == "tool_use" and reply.content[0].type == "thinking"
    use = reply.content[-1]
    assert use.type == "tool_use" and use.input == {"expression": expression}
    answer = claude.messages.create(
        **settings,
        tools=[tool],
        messages=[
            {"role": "user", "content": PROBLEM},
            {"role": "assistant", "content": [b.model_dump() for b in reply.content]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "83"}]},
        ],
    )
    assert answer.stop_reason == "end_turn" and "83" in answer.content[-1].text
