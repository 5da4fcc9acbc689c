"""Request fields that change the result are honoured, through the real SDKs against `mmx serve` of mmx-tiny:
Anthropic thinking (disabled, budget_tokens), assistant prefill, vLLM's continue_final_message /
add_generation_prompt and stop_token_ids, parallel tool calls switched off."""

from __future__ import annotations

import httpx
import pytest

from mmx.chat.template import render_chat

openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")

MODEL = "mmx-tiny"
QUESTION = "Nora has 12 apples and buys 7 more. How many apples does she have?"
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def claude(tiny_server):
    return anthropic.Anthropic(base_url=tiny_server, api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def client(tiny_server):
    return openai.OpenAI(base_url=f"{tiny_server}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def tokenizer():
    from mmx.embedded import embedded_model_path
    from mmx.llm import load_tokenizer

    return load_tokenizer(embedded_model_path())


def _ask(claude, **fields):
    fields = {"max_tokens": 60, **fields}
    return claude.messages.create(
        model=MODEL, messages=[{"role": "user", "content": QUESTION}], extra_body=GREEDY, **fields
    )


def _blocks(message, kind: str) -> list:
    return [b for b in message.content if b.type == kind]


def test_thinking_disabled_gives_no_thinking_block(claude):
    assert _blocks(_ask(claude), "thinking"), "mmx-tiny reasons by default"
    quiet = _ask(claude, thinking={"type": "disabled"})
    assert not _blocks(quiet, "thinking") and _blocks(quiet, "text")
    with claude.messages.stream(
        model=MODEL,
        max_tokens=60,
        messages=[{"role": "user", "content": QUESTION}],
        extra_body=GREEDY,
        thinking={"type": "disabled"},
    ) as stream:
        final = stream.get_final_message()
    assert [b.type for b in final.content] == [b.type for b in quiet.content]
    assert _blocks(final, "text")[0].text == _blocks(quiet, "text")[0].text


def test_budget_tokens_ends_the_reasoning_at_the_budget(claude, tokenizer):
    free = _ask(claude, max_tokens=200)
    free_thinking = _blocks(free, "thinking")[0].thinking
    assert len(tokenizer.encode(free_thinking)) > 6, "the test needs a reply that reasons for longer than the budget"
    capped = _ask(claude, max_tokens=200, thinking={"type": "enabled", "budget_tokens": 5})
    thinking = _blocks(capped, "thinking")[0].thinking
    assert len(tokenizer.encode(thinking)) <= 5 and free_thinking.startswith(thinking.strip())
    assert _blocks(capped, "text") or _blocks(capped, "tool_use")


def test_budget_must_be_below_max_tokens(claude):
    with pytest.raises(anthropic.BadRequestError, match="budget_tokens"):
        _ask(claude, max_tokens=50, thinking={"type": "enabled", "budget_tokens": 50})


def _greedy_text(client, tokenizer, prompt: str, max_tokens: int) -> str:
    """What the model writes after ``prompt`` (a rendered text), through /v1/completions."""
    r = client.completions.create(model=MODEL, prompt=tokenizer.encode(prompt), max_tokens=max_tokens, temperature=0)
    return r.choices[0].text


def test_anthropic_prefill_and_continue_final_message_continue_the_reply(claude, client, tokenizer):
    conversation = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "She has"}]
    rendered = render_chat(tokenizer.chat_template, conversation, add_generation_prompt=False)
    expected = _greedy_text(client, tokenizer, rendered[: rendered.rindex("She has") + len("She has")], 12)
    msg = claude.messages.create(model=MODEL, max_tokens=12, messages=conversation, extra_body=GREEDY)
    assert [b.type for b in msg.content] == ["text"] and msg.content[0].text == expected
    chat = client.chat.completions.create(
        model=MODEL,
        messages=conversation,
        max_tokens=12,
        temperature=0,
        extra_body={"continue_final_message": True, "add_generation_prompt": False},
    )
    assert chat.choices[0].message.content == expected and not getattr(chat.choices[0].message, "reasoning_content", "")
    with pytest.raises(openai.BadRequestError, match="continue_final_message"):
        client.chat.completions.create(
            model=MODEL, messages=conversation, max_tokens=4, extra_body={"continue_final_message": True}
        )


def test_add_generation_prompt_false_renders_no_reply_turn(client, tokenizer):
    conversation = [{"role": "user", "content": QUESTION}]
    rendered = render_chat(tokenizer.chat_template, conversation, add_generation_prompt=False)
    r = client.chat.completions.create(
        model=MODEL, messages=conversation, max_tokens=1, extra_body={"add_generation_prompt": False}
    )
    assert r.usage.prompt_tokens == len(tokenizer.encode(rendered))


def test_stop_token_ids_end_the_sample(tiny_server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 12, "temperature": 0,
            "return_token_ids": True}  # fmt: skip
    ids = httpx.post(f"{tiny_server}/v1/chat/completions", json=body, timeout=60).json()["choices"][0]["token_ids"]
    stop = ids[3]
    assert stop not in ids[:3]
    r = httpx.post(f"{tiny_server}/v1/chat/completions", json={**body, "stop_token_ids": [stop]}, timeout=60)
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == stop
    assert choice["token_ids"] == ids[:4]


def test_stream_equals_whole_with_a_stop_string_and_logprobs(client):
    base = dict(model=MODEL, messages=[{"role": "user", "content": QUESTION}], max_tokens=40, temperature=0)
    free = client.chat.completions.create(**base)
    text = free.choices[0].message.content or free.choices[0].message.reasoning_content
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), text
    whole = client.chat.completions.create(**base, stop=[stop], logprobs=True, top_logprobs=2)
    streamed, entries, finish = {"content": "", "reasoning_content": ""}, [], None
    for chunk in client.chat.completions.create(**base, stop=[stop], logprobs=True, top_logprobs=2, stream=True):
        for choice in chunk.choices:
            for key in streamed:
                streamed[key] += getattr(choice.delta, key, None) or ""
            if choice.logprobs and choice.logprobs.content:
                entries += choice.logprobs.content
            finish = choice.finish_reason or finish
    message = whole.choices[0].message
    assert streamed["content"] == (message.content or "")
    assert streamed["reasoning_content"] == (getattr(message, "reasoning_content", None) or "")
    assert stop not in streamed["content"] + streamed["reasoning_content"]
    assert [(e.token, e.logprob) for e in entries] == [(e.token, e.logprob) for e in whole.choices[0].logprobs.content]
    assert finish == whole.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("thinking", [{"type": "disabled"}, {"type": "enabled", "budget_tokens": 3}])
def test_a_forced_tool_call_with_thinking_off_or_budgeted(claude, thinking):
    from mmx.tasks.arithmetic import CALCULATOR_TOOL

    tool = {
        "name": "calculator",
        "description": CALCULATOR_TOOL["function"]["description"],
        "input_schema": CALCULATOR_TOOL["function"]["parameters"],
    }
    msg = claude.messages.create(
        model=MODEL,
        max_tokens=80,
        messages=[{"role": "user", "content": QUESTION}],
        tools=[tool],
        tool_choice={"type": "tool", "name": "calculator"},
        thinking=thinking,
        extra_body=GREEDY,
    )
    assert [b.type for b in msg.content] == ["tool_use"] and msg.stop_reason == "tool_use"
    assert isinstance(msg.content[0].input.get("expression"), str)
