"""ReplyStream: token ids in, events out. Fed a token at a time, its events add up to the finished reply; text that
could still become a stop string is held back, so no stream ever shows what the final text drops; chat replies
split into reasoning, content and tool calls exactly as the non-streaming parsers split the same text."""

from __future__ import annotations

import json

import pytest

from mmx.chat import parse_tool_calls, split_reasoning
from mmx.chat.formats import M1, M2, new_tool_call_id, tool_call_id_for
from mmx.chat.reply import ContentDelta, Finish, ReasoningDelta, ReplyStream, ToolCallArgs, ToolCallStart

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}},
        },
    }
]
REPLY = (
    "The user wants Paris.\nLet me check.\n</think>\n\nChecking now.\n<minimax:tool_call>\n"
    '<invoke name="get_weather">\n<parameter name="city">Paris</parameter>\n<parameter name="days">3</parameter>\n'
    "</invoke>\n</minimax:tool_call>"
)


def _run(tokenizer, text: str, reason: str = "stop", **options) -> tuple[ReplyStream, list]:
    """Feed ``text``'s tokens one at a time, ending the stream itself or with ``reason``."""
    stream = ReplyStream(tokenizer, **options)
    events = []
    for token in tokenizer.encode(text):
        events += stream.feed([token])
        if stream.done:
            break
    events += stream.finish(reason)
    return stream, events


def _text(events, kind) -> str:
    return "".join(ev.text for ev in events if isinstance(ev, kind))


@pytest.mark.parametrize("stop", ["Let", "\n</think>", "days", "Paris.\nLet", "never there"])
def test_plain_text_with_stop_strings_never_shows_what_is_dropped(tiny_tokenizer, stop):
    stream, events = _run(tiny_tokenizer, REPLY, stop=[stop])
    cut = REPLY.find(stop)
    expected = REPLY if cut == -1 else REPLY[:cut]
    assert stream.text == expected and _text(events, ContentDelta) == expected
    shown = ""
    for ev in events:  # no prefix of the stream ever reaches past the final text
        if isinstance(ev, ContentDelta):
            shown += ev.text
            assert expected.startswith(shown)
    assert events[-1] == Finish("stop", stop if cut != -1 else None)
    assert stream.done and (stream.stop_reason == stop) == (cut != -1)


def test_stop_string_included_and_tokens_kept_up_to_it(tiny_tokenizer):
    stream, _ = _run(tiny_tokenizer, REPLY, stop=["Checking"], include_stop_str_in_output=True)
    assert stream.text == REPLY[: REPLY.find("Checking") + len("Checking")]
    # the tokens fed before the stream stopped itself decode to at least the kept text
    assert tiny_tokenizer.decode(stream.token_ids).startswith(stream.text)
    assert stream.feed([1, 2, 3]) == [] and stream.finish("length") == []  # done: later tokens are ignored


@pytest.mark.parametrize("chunk", [2, 3, 7, 1000])
def test_chunks_of_tokens_stop_where_single_tokens_do(tiny_tokenizer, chunk):
    """A server reader that fell behind feeds several tokens at once: the tokens and log-probs taken, the text
    and the events are those of feeding one token at a time, none past the token that completed the stop string."""
    stop = ["Checking"]
    single, single_events = _run(tiny_tokenizer, REPLY, stop=stop)
    tokens = tiny_tokenizer.encode(REPLY)
    entries = [f"entry {i}" for i in range(len(tokens))]  # stand-ins for TokenLogprob
    stream, events = ReplyStream(tiny_tokenizer, stop=stop), []
    for i in range(0, len(tokens), chunk):
        events += stream.feed(tokens[i : i + chunk], entries[i : i + chunk])
    assert stream.done and stream.text == single.text and stream.token_ids == single.token_ids
    assert stream.logprobs == entries[: len(single.token_ids)] and len(stream.token_ids) < len(tokens)
    assert _text(events, ContentDelta) == _text(single_events, ContentDelta) and events[-1] == single_events[-1]


def test_chat_reply_splits_like_the_parsers(tiny_tokenizer):
    stream, events = _run(tiny_tokenizer, REPLY, format=M2, tools=TOOLS)
    reasoning, rest = split_reasoning(REPLY, M2.name)
    content, calls = parse_tool_calls(rest, TOOLS, M2.name)
    assert _text(events, ReasoningDelta) == reasoning and _text(events, ContentDelta) == content
    starts = [ev for ev in events if isinstance(ev, ToolCallStart)]
    args = "".join(ev.text for ev in events if isinstance(ev, ToolCallArgs))
    assert [s.name for s in starts] == ["get_weather"] and json.loads(args) == calls[0]["arguments"]
    assert events[-1] == Finish("tool_calls")
    message = stream.message()
    assert message["reasoning_content"] == reasoning and message["content"] == content
    assert message["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}
    assert message["tool_calls"][0]["id"] == starts[0].id and starts[0].id.startswith("call_")


def test_inline_reasoning_and_a_forced_prefix(tiny_tokenizer):
    stream, events = _run(tiny_tokenizer, "Short.\n</think>\n\nAnswer.", format=M2, inline_reasoning=True)
    assert _text(events, ContentDelta) == "<think>\nShort.\n</think>\n\nAnswer." and not _text(events, ReasoningDelta)
    assert stream.message()["reasoning_content"] is None
    # a forced tool-call opening goes through the parsers but is not part of the text
    prefix = M2.forced_tool_prefix("get_weather")
    body = '<parameter name="city">Rome</parameter>\n</invoke>\n</minimax:tool_call>'
    stream, events = _run(tiny_tokenizer, body, format=M2, tools=TOOLS, prefix=prefix)
    assert stream.text == body and stream.message()["tool_calls"][0]["function"]["arguments"] == {"city": "Rome"}


def test_tool_call_ids_keep_their_random_part_across_apis():
    call_id = new_tool_call_id()
    anthropic_id = tool_call_id_for("anthropic", call_id)
    assert call_id.startswith("call_") and anthropic_id.startswith("toolu_")
    assert anthropic_id.removeprefix("toolu_") == call_id.removeprefix("call_")
    assert tool_call_id_for("openai", anthropic_id) == call_id


# ---------------------------------------------------------------------------------------------------- complete calls only
def _summary(stream: ReplyStream, events: list) -> tuple:
    """What a client puts together from the events, next to what the finished message says."""
    starts = {ev.index: ev.name for ev in events if isinstance(ev, ToolCallStart)}
    args = {i: "".join(ev.text for ev in events if isinstance(ev, ToolCallArgs) and ev.index == i) for i in starts}
    streamed = (
        _text(events, ReasoningDelta),
        _text(events, ContentDelta),
        [(starts[i], json.loads(args[i])) for i in sorted(starts)],
        events[-1],
    )
    message = stream.message()
    whole = (
        message["reasoning_content"] or "",
        message["content"] or "",
        [(c["function"]["name"], c["function"]["arguments"]) for c in message.get("tool_calls", [])],
        Finish(stream.reply_finish_reason, stream.stop_reason),
    )
    assert streamed == whole
    return streamed


def _at_once(tokenizer, token_ids: list[int], reason: str, **options) -> tuple:
    stream = ReplyStream(tokenizer, **options)
    events = stream.feed(token_ids)
    return _summary(stream, events + stream.finish(reason))


def test_a_reply_cut_inside_its_tool_call_has_no_call_and_stays_length(tiny_tokenizer):
    """Cut after every token from the block's opening to just before its end: never a call, the finish reason is
    "length", the block is content as written, and token by token == all at once."""
    ids = tiny_tokenizer.encode(REPLY)
    opening = next(k for k in range(len(ids)) if "<minimax:tool_call>" in tiny_tokenizer.decode(ids[: k + 1]))
    reasoning, rest = split_reasoning(REPLY, M2.name)
    for k in range(opening + 1, len(ids)):
        cut = tiny_tokenizer.decode(ids[:k])
        stream, events = _run(tiny_tokenizer, cut, "length", format=M2, tools=TOOLS)
        got = _summary(stream, events)
        assert got == (reasoning, rest[: len(cut) - len(REPLY)].strip(), [], Finish("length")), cut
        assert "tool_calls" not in stream.message() and not any(isinstance(ev, ToolCallStart) for ev in events)
        assert _at_once(tiny_tokenizer, ids[:k], "length", format=M2, tools=TOOLS) == got
    # the whole block arrived, then the length limit: the complete call stands, the reply says it was cut
    stream, events = _run(tiny_tokenizer, REPLY, "length", format=M2, tools=TOOLS)
    assert _summary(stream, events)[2:] == ([("get_weather", {"city": "Paris", "days": 3})], Finish("length"))


def test_a_stop_string_inside_a_tool_call_leaves_no_call(tiny_tokenizer):
    stream, events = _run(tiny_tokenizer, REPLY, format=M2, tools=TOOLS, stop=["</invoke>"])
    content = REPLY[REPLY.find("Checking") : REPLY.find("</invoke>")].strip()
    assert _summary(stream, events)[1:] == (content, [], Finish("stop", "</invoke>"))


def test_m1_calls_inside_thinking_are_not_run(tiny_tokenizer):
    call = '<tool_calls>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_calls>'
    reply = f"<think>\nI could call {call}\n</think>\nNo call needed. <think>or {call}</think>"
    stream, events = _run(tiny_tokenizer, reply, format=M1, tools=TOOLS)
    assert _summary(stream, events) == (
        f"I could call {call}",
        f"No call needed. <think>or {call}</think>",
        [],
        Finish("stop"),
    )
    stream, events = _run(tiny_tokenizer, f"<think>\nok\n</think>\n{call}", format=M1, tools=TOOLS)
    assert _summary(stream, events)[2:] == ([("get_weather", {"city": "Oslo"})], Finish("tool_calls"))


PARALLEL = REPLY.replace(
    "</invoke>\n</minimax:tool_call>",
    '</invoke>\n<invoke name="get_weather">\n<parameter name="city">Rome</parameter>\n</invoke>\n</minimax:tool_call>',
)


def test_max_tool_calls_keeps_the_first_call(tiny_tokenizer):
    stream, events = _run(tiny_tokenizer, PARALLEL, format=M2, tools=TOOLS)
    assert [name for name, _ in _summary(stream, events)[2]] == ["get_weather", "get_weather"]
    stream, events = _run(tiny_tokenizer, PARALLEL, format=M2, tools=TOOLS, max_tool_calls=1)
    got = _summary(stream, events)
    assert got[1:] == ("Checking now.", [("get_weather", {"city": "Paris", "days": 3})], Finish("tool_calls"))
    ids = tiny_tokenizer.encode(PARALLEL)
    assert _at_once(tiny_tokenizer, ids, "stop", format=M2, tools=TOOLS, max_tool_calls=1) == got
    for bad in (0, -2, 1.0):
        with pytest.raises(ValueError, match="max_tool_calls"):
            ReplyStream(tiny_tokenizer, M2, max_tool_calls=bad)
