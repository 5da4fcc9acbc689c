"""Reasoning and tool-call parsing: expected values on hand-written outputs (including the upstream bugs the spec
lists, avoided), and streaming == non-streaming on a corpus of well-formed and malformed outputs, fed one character
at a time and in random chunks."""

from __future__ import annotations

import json
import random

import pytest

from mmx.chat import (
    ContentDelta,
    ReasoningStreamParser,
    ToolCallArgs,
    ToolCallStart,
    ToolCallStreamParser,
    parse_tool_calls,
    split_reasoning,
)
from mmx.chat.schema import coerce_value

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "days": {"type": "integer"},
                    "unit": {"type": ["string", "null"]},
                    "detail": {"type": "boolean"},
                    "ratio": {"type": "number"},
                    "tags": {"type": "array", "items": {"type": "integer"}},
                    "options": {"type": "object", "properties": {"depth": {"type": "integer"}}},
                    "choice": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
                },
            },
        },
    },
    {"type": "function", "function": {"name": "search", "parameters": {"properties": {"q": {"type": "string"}}}}},
]


# ---------------------------------------------------------------------------------------------------- expected values
def test_m2_reasoning_split():
    assert split_reasoning("Need a tool.\n</think>\n\nHello!", "minimax_m2") == ("Need a tool.", "Hello!")
    assert split_reasoning("<think>\nredundant\n</think>\nok", "minimax_m2") == ("redundant", "ok")
    assert split_reasoning("still thinking", "minimax_m2") == ("still thinking", "")
    text = 'plan\n<minimax:tool_call>\n<invoke name="search">'
    assert split_reasoning(text, "minimax_m2") == ("plan", '<minimax:tool_call>\n<invoke name="search">')
    assert split_reasoning("<think>\nhmm\n</think>\nAnswer", "minimax_m1") == ("hmm", "Answer")
    assert split_reasoning("  Plain answer", "minimax_m1") == (None, "  Plain answer")


def test_m2_tool_calls_typed_by_schema():
    text = (
        'I\'ll check.\n<minimax:tool_call>\n<invoke name="get_weather">\n'
        '<parameter name="city">\n San Francisco \n</parameter>\n<parameter name="days">3</parameter>\n'
        '<parameter name="unit">hello</parameter>\n<parameter name="detail">True</parameter>\n'
        '<parameter name="ratio">2.50</parameter>\n<parameter name="tags">[1, 2]</parameter>\n'
        '<parameter name="options">{"depth": "4"}</parameter>\n<parameter name="choice">7</parameter>\n'
        "</invoke>\n<invoke name=search>\n<parameter name='q' type=\"string\">none</parameter>\n</invoke>\n"
        "</minimax:tool_call>"
    )
    content, calls = parse_tool_calls(text, TOOLS, "minimax_m2")
    assert content == "I'll check."
    assert calls == [
        {
            "name": "get_weather",
            "arguments": {
                "city": " San Francisco ",  # one newline each side is layout; spaces are data
                "days": 3,
                "unit": "hello",  # a nullable string stays a string (SGLang 0.5.23 returned None)
                "detail": True,
                "ratio": 2.5,
                "tags": [1, 2],
                "options": {"depth": 4},  # nested schema types are applied
                "choice": 7,
            },
        },
        {"name": "search", "arguments": {"q": "none"}},  # "none" is text, not null (vLLM PR #39580)
    ]


def test_schema_coercion_edge_cases():
    assert coerce_value("null", {"type": ["string", "null"]}) is None
    assert coerce_value("nil", {"type": "string"}) == "nil"
    assert coerce_value("3.0", {"type": "number"}) == 3
    assert coerce_value("inf", {"type": "number"}) == "inf"
    assert coerce_value("[1, 2", {"type": "array"}) == "[1, 2"
    assert coerce_value("12", None) == "12"  # no schema: a string
    assert coerce_value('{"a": 1}', {}) == '{"a": 1}'
    assert coerce_value("x", {"enum": [1, 2]}) == "x"
    assert coerce_value("2", {"enum": [1, 2]}) == 2


def test_malformed_m2_output_falls_back_to_content():
    assert parse_tool_calls("<minimax:tool_call>\nno invoke here\n</minimax:tool_call> tail", TOOLS) == (
        "<minimax:tool_call>\nno invoke here\n</minimax:tool_call> tail",
        [],
    )
    # an unknown tool is not fabricated into a call; the text is kept
    content, calls = parse_tool_calls(
        '<minimax:tool_call>\n<invoke name="rm_rf">\n</invoke>\n</minimax:tool_call>', TOOLS
    )
    assert calls == [] and "rm_rf" in content
    # unterminated block and parameter at the end of the output
    content, calls = parse_tool_calls('<minimax:tool_call>\n<invoke name="search">\n<parameter name="q">abc', TOOLS)
    assert content is None and calls == [{"name": "search", "arguments": {"q": "abc"}}]
    # missing </parameter> before the next parameter, empty invoke
    text = '<minimax:tool_call><invoke name="get_weather"><parameter name="city">Oslo<parameter name="days">2</invoke><invoke name="search"></invoke></minimax:tool_call>'
    assert parse_tool_calls(text, TOOLS)[1] == [
        {"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}},
        {"name": "search", "arguments": {}},
    ]


def test_m1_tool_calls():
    text = (
        "Sure.\n<tool_calls>\n"
        '{"name": "search", "arguments": {"q": "OpenAI"}}}\n'  # a stray brace, repaired
        "not json\n"
        '{"name": "get_weather", "arguments": "{\\"city\\": \\"Rome\\"}"}\n'
        "</tool_calls>"
    )
    content, calls = parse_tool_calls(text, TOOLS, "minimax_m1")
    assert calls == [
        {"name": "search", "arguments": {"q": "OpenAI"}},
        {"name": "get_weather", "arguments": {"city": "Rome"}},
    ]
    assert content == "Sure.\nnot json"
    assert parse_tool_calls("<tool_calls>\ngarbage\n</tool_calls>", None, "minimax_m1") == (
        "<tool_calls>\ngarbage\n</tool_calls>",
        [],
    )


# ---------------------------------------------------------------------------------------------------- streaming
M2_CORPUS = [
    "Need a tool.\n</think>\n\nHello!",
    "<think>\nredundant\n</think>\nok",
    "\n\nthinking with <b>tags</b> and a < sign\n\n</think>\n\n\nanswer with </thi and <minimax:tool",
    "still thinking <minim",
    "",
    "</think>",
    "short</think>x",
    'plan\n<minimax:tool_call>\n<invoke name="search">\n<parameter name="q">cats</parameter>\n</invoke>\n</minimax:tool_call>',
    'p</think>\n\nA <minimax:tool_call>\n<invoke name="get_weather">\n<parameter name="city">\nRome\n</parameter>\n'
    '<parameter name="days">4</parameter>\n<parameter name="tags">[1,2]</parameter>\n</invoke>\n'
    '<invoke name="search">\n<parameter name="q">x</parameter>\n</invoke>\n</minimax:tool_call> B',
    'r</think><minimax:tool_call>\n<invoke name="rm_rf">\n<parameter name="p">/</parameter>\n</invoke>\n'
    '<invoke name="search"><parameter name="q">ok</parameter></invoke></minimax:tool_call>',
    'r</think><minimax:tool_call>junk<invoke name="nope"></invoke></minimax:tool_call>after',
    'r</think><minimax:tool_call>\n<invoke name="search">\n<parameter name="q">unterminated',
    'r</think><minimax:tool_call>\n<invoke name=\'get_weather\' extra="1">\n<parameter name=city>Oslo<parameter name="days">2</invoke>',
    'r</think>text <minimax:tool_call><invoke name="search"><parameter name="q">a</parameter></invoke>'
    '</minimax:tool_call> mid <minimax:tool_call><invoke name="search"></invoke></minimax:tool_call> end',
    'r</think><minimax:tool_call><invoke name="search"><parameter name="q">1 < 2 and </para</parameter></invoke>',
    'r</think><minimax:tool_call><invoke name="search"><param',
    'r</think><minimax:tool_call><invoke name="sea',
    'r</think>  lots of space   <minimax:tool_call><invoke name="search"></invoke></minimax:tool_call>   \n',
    'r</think>emoji 🙂 and 東京 <minimax:tool_call><invoke name="search"><parameter name="q">東京</parameter></invoke>',
]
M1_CORPUS = [
    "<think>\nhmm\n</think>\nAnswer",
    "Plain answer, no thinking",
    "  <think>unterminated thinking",
    "<thin",
    "<think>\nuse tools\n</think>\n<tool_calls>\n"
    '{"name": "search", "arguments": {"q": "OpenAI"}}}}\nnot json\n{"name": "nope", "arguments": {}}\n'
    '{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_calls>',
    '<think>x</think>a<tool_calls>\n{"name": "search", "arguments": {"q": 1}}',
    "<think>x</think><tool_calls>\ngarbage only\n</tool_calls> trailing",
]


def _stream(text: str, style: str, chunks: list[int], tools=TOOLS):
    reasoning_parser, tool_parser = ReasoningStreamParser(style), ToolCallStreamParser(tools, style)
    reasoning, events, pos = "", [], 0
    for size in chunks:
        r, c = reasoning_parser.feed(text[pos : pos + size])
        reasoning += r
        events += tool_parser.feed(c)
        pos += size
    r, c = reasoning_parser.finish()
    reasoning += r
    events += tool_parser.feed(c) + tool_parser.finish()
    content = "".join(e.text for e in events if isinstance(e, ContentDelta))
    calls: dict[int, dict] = {}
    for e in events:
        if isinstance(e, ToolCallStart):
            assert e.index not in calls and e.id.startswith("call_")
            calls[e.index] = {"name": e.name, "args": ""}
        elif isinstance(e, ToolCallArgs):
            calls[e.index]["args"] += e.text
    parsed = [{"name": c["name"], "arguments": json.loads(c["args"])} for _, c in sorted(calls.items())]
    return reasoning, content or None, parsed


def _chunkings(text: str, seed: int):
    rng = random.Random(seed)
    yield [1] * len(text)
    for _ in range(4):
        sizes, left = [], len(text)
        while left > 0:
            sizes.append(min(left, rng.randint(1, 9)))
            left -= sizes[-1]
        yield sizes
    yield [len(text)]


@pytest.mark.parametrize("style, corpus", [("minimax_m2", M2_CORPUS), ("minimax_m1", M1_CORPUS)])
def test_streaming_equals_non_streaming(style, corpus):
    for i, text in enumerate(corpus):
        reasoning, content = split_reasoning(text, style)
        expected_content, expected_calls = parse_tool_calls(content, TOOLS, style)
        for chunks in _chunkings(text, seed=i):
            got = _stream(text, style, chunks)
            assert got == (reasoning or "", expected_content, expected_calls), (i, text, chunks)


def test_streaming_emits_the_name_before_the_arguments_arrive():
    parser = ToolCallStreamParser(TOOLS, "minimax_m2")
    events = parser.feed('<minimax:tool_call>\n<invoke name="search">\n<parameter name="q">long val')
    assert [type(e) for e in events] == [ToolCallStart] and events[0].name == "search"
    events = parser.feed("ue</parameter>\n</invoke>")
    assert [e.text for e in events] == ['{"q": "long value"', "}"]


def test_parsers_never_raise_on_garbage():
    rng = random.Random(0)
    alphabet = [
        *"<>/=\"' \nabc",
        "<minimax:tool_call>",
        "</minimax:tool_call>",
        "<invoke name=",
        "</invoke>",
        "<parameter name=",
        "</parameter>",
        "</think>",
        "<tool_calls>",
        "{",
        "}",
    ]
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        for style in ("minimax_m2", "minimax_m1"):
            reasoning, content = split_reasoning(text, style)
            expected = parse_tool_calls(content, TOOLS, style)
            assert _stream(text, style, [1] * len(text)) == (reasoning or "", *expected)
