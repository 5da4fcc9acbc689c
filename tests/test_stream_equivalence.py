"""Streamed replies add up to the non-streamed ones, through the real SDKs against a real `mmx serve` of mmx-tiny:
OpenAI chat and completions and Anthropic messages, with stop strings, log-probabilities and tool calls. A stop
string never leaks into a stream, even in part."""

from __future__ import annotations

import json
import time

import anthropic
import httpx
import openai
import pytest

from mmx.tasks.arithmetic import CALCULATOR_TOOL, SYSTEM_PROMPT

PROBLEM = (
    "Tom has 57 marbles. Tom loses 19. Tom buys 4 packs with 6 marbles in each. How many marbles does Tom have now?"
)
MESSAGES = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": PROBLEM}]
ANTHROPIC_TOOL = {
    "name": "calculator",
    "description": CALCULATOR_TOOL["function"]["description"],
    "input_schema": CALCULATOR_TOOL["function"]["parameters"],
}


@pytest.fixture(scope="module")
def client(tiny_server):
    return openai.OpenAI(base_url=f"{tiny_server}/v1", api_key="x", max_retries=0)


def _stop_inside(text: str) -> str:
    """A stop string that first occurs in the middle of ``text``, so that a stopped reply is cut there."""
    for start in range(len(text) // 3, len(text) - 4):
        candidate = text[start : start + 4]
        if text.find(candidate) == start and candidate.strip():
            return candidate
    raise AssertionError(f"no usable stop string in {text!r}")


def _chat_both(client, **kwargs) -> tuple[dict, dict]:
    """(non-streamed choice, the stream's choice put together) for one chat request."""
    whole = client.chat.completions.create(model="mmx-tiny", temperature=0, **kwargs).choices[0]
    parts = {"reasoning": "", "content": "", "calls": {}, "logprobs": [], "finish": None}
    for chunk in client.chat.completions.create(model="mmx-tiny", temperature=0, stream=True, **kwargs):
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        delta = choice.delta
        parts["reasoning"] += getattr(delta, "reasoning_content", None) or ""
        parts["content"] += delta.content or ""
        for tc in delta.tool_calls or []:
            call = parts["calls"].setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            call["id"] = tc.id or call["id"]
            call["name"] += tc.function.name or ""
            call["arguments"] += tc.function.arguments or ""
        if choice.logprobs and choice.logprobs.content:
            parts["logprobs"] += [(t.token, round(t.logprob, 4)) for t in choice.logprobs.content]
        parts["finish"] = choice.finish_reason or parts["finish"]
    message = whole.message
    expected = {
        "reasoning": getattr(message, "reasoning_content", None) or "",
        "content": message.content or "",
        "calls": [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []],
        "logprobs": [(t.token, round(t.logprob, 4)) for t in whole.logprobs.content] if whole.logprobs else [],
        "finish": whole.finish_reason,
    }
    got = {**parts, "calls": [(c["name"], json.loads(c["arguments"])) for c in parts["calls"].values()]}
    return expected, got


def test_openai_chat_stream_equals_whole_with_tool_calls_and_logprobs(client):
    expected, got = _chat_both(client, messages=MESSAGES, tools=[CALCULATOR_TOOL], logprobs=True, top_logprobs=2)
    assert expected["finish"] == "tool_calls" and expected["calls"][0][0] == "calculator"
    assert got == expected


def test_a_tool_call_cut_off_by_the_length_limit_is_no_call(client):
    """max_tokens ends the reply inside its tool call: no call, finish_reason "length", the unfinished call is content,
    streamed == whole (the stream held the call back and never showed a part of it as a call)."""
    free = client.chat.completions.create(model="mmx-tiny", temperature=0, messages=MESSAGES, tools=[CALCULATOR_TOOL])
    assert free.choices[0].finish_reason == "tool_calls"
    length = free.usage.completion_tokens  # the block's last tokens are </minimax:tool_call> and the end of sequence
    expected, got = _chat_both(client, messages=MESSAGES, tools=[CALCULATOR_TOOL], max_tokens=length - 2)
    assert expected["finish"] == "length" and expected["calls"] == []
    assert "<minimax:tool_call>" in expected["content"] and got == expected


def test_openai_chat_stream_equals_whole_with_a_stop_string(client):
    free, _ = _chat_both(client, messages=MESSAGES, max_tokens=96)
    stop = _stop_inside(free["reasoning"])
    expected, got = _chat_both(client, messages=MESSAGES, max_tokens=96, stop=[stop], logprobs=True)
    cut = free["reasoning"][: free["reasoning"].find(stop)].rstrip("\n")  # newlines before </think> are layout
    assert expected["finish"] == "stop" and expected["reasoning"] == cut and expected["logprobs"]
    assert stop not in got["reasoning"] and got == expected


def test_completions_stream_equals_whole_with_a_stop_string_and_logprobs(client):
    prompt = "Ana has 12 apples. Ana buys 30 more."
    free = client.completions.create(model="mmx-tiny", prompt=prompt, max_tokens=40, temperature=0).choices[0]
    stop = _stop_inside(free.text)
    kwargs = {"model": "mmx-tiny", "prompt": prompt, "max_tokens": 40, "temperature": 0, "stop": [stop], "logprobs": 2}
    whole = client.completions.create(**kwargs).choices[0]
    text, tokens, finish = "", [], None
    for chunk in client.completions.create(**kwargs, stream=True):
        text += chunk.choices[0].text
        if chunk.choices[0].logprobs:
            tokens += chunk.choices[0].logprobs.tokens
        finish = chunk.choices[0].finish_reason or finish
    assert whole.text == free.text[: free.text.find(stop)] and whole.finish_reason == "stop"
    assert (text, tokens, finish) == (whole.text, whole.logprobs.tokens, whole.finish_reason)


@pytest.mark.parametrize("stop", [False, True], ids=["tool_use", "stop_sequence"])
def test_anthropic_stream_equals_whole(tiny_server, stop):
    claude = anthropic.Anthropic(base_url=tiny_server, api_key="x", max_retries=0)
    settings = {
        "model": "mmx-tiny",
        "system": SYSTEM_PROMPT,
        "max_tokens": 192,
        "tools": [ANTHROPIC_TOOL],
        "messages": [{"role": "user", "content": PROBLEM}],
        "extra_body": {"temperature": 0},
    }
    if stop:
        free = claude.messages.create(**settings)
        settings["stop_sequences"] = [_stop_inside(free.content[0].thinking)]
    whole = claude.messages.create(**settings)
    with claude.messages.stream(**settings) as stream:
        streamed = stream.get_final_message()

    def blocks(message) -> list:
        return [
            (b.type, getattr(b, "thinking", None), getattr(b, "text", None), getattr(b, "input", None))
            for b in message.content
        ]

    assert whole.stop_reason == ("stop_sequence" if stop else "tool_use")
    assert blocks(streamed) == blocks(whole)
    assert (streamed.stop_reason, streamed.stop_sequence) == (whole.stop_reason, whole.stop_sequence)
    assert streamed.usage.output_tokens == whole.usage.output_tokens


def test_n_samples_each_ended_by_its_own_stop_string(client, tiny_server):
    """n = 3 seeded samples, each cut at its first newline while the others go on: streamed == whole, per choice,
    and the engine ends every sample (nothing left running)."""
    kwargs = {"model": "mmx-tiny", "messages": MESSAGES, "n": 3, "seed": 5, "temperature": 1.0, "stop": ["\n"]}
    whole = client.chat.completions.create(**kwargs, max_tokens=64)
    streamed = {i: "" for i in range(3)}
    finish = {}
    for chunk in client.chat.completions.create(**kwargs, max_tokens=64, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] += getattr(choice.delta, "reasoning_content", None) or ""
            finish[choice.index] = choice.finish_reason or finish.get(choice.index)
    for choice in whole.choices:
        assert choice.finish_reason == "stop" and "\n" not in choice.message.reasoning_content
        assert streamed[choice.index] == choice.message.reasoning_content and finish[choice.index] == "stop"
    for _ in range(50):  # the last stop lands in the engine between steps
        if "mmx_requests_running 0" in httpx.get(f"{tiny_server}/metrics").text:
            break
        time.sleep(0.05)
    assert "mmx_requests_running 0" in httpx.get(f"{tiny_server}/metrics").text
