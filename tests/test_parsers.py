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
    # missing </parameter> before the next parameter, empty invoke
    text = '<minimax:tool_call><invoke name="get_weather"><parameter name="city">Oslo<parameter name="days">2</invoke><invoke name="search"></invoke></minimax:tool_call>'
    assert parse_tool_calls(text, TOOLS)[1] == [
        {"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}},
        {"name": "search", "arguments": {}},
    ]
    # a damaged parameter header in a closed invoke: the call is not run with a missing argument
    text = '<minimax:tool_call><invoke name="search"><parameter name="q</invoke></minimax:tool_call>'
    assert parse_tool_calls(text, TOOLS) == (text, [])


# ---------------------------------------------------------------------------------------------------- unterminated
# Replies cut off inside a tool call (the length limit, a stop string, an early end of sequence): (text, content).
# No call comes out of any of them; the text stays as the model wrote it.
CUT_M2 = [
    '<minimax:tool_call>\n<invoke name="search">\n<parameter name="q">abc',  # inside a value
    '<minimax:tool_call>\n<invoke name="search">\n<parameter name="q">abc</parameter>\n',  # before </invoke>
    '<minimax:tool_call>\n<invoke name="search">\n<parameter name="q">abc</parameter>\n</invoke>\n',  # block open
    '<minimax:tool_call>\n<invoke name="search">\n<parameter name="q">abc</parameter>\n</invoke>\n</minimax:tool',
    '<minimax:tool_call><invoke name="sea',
    "<minimax:tool_call>",
    # a complete call, then a second one cut off: the block never closed, so neither is a call
    '<minimax:tool_call>\n<invoke name="search">\n<parameter name="q">a</parameter>\n</invoke>\n'
    '<invoke name="get_weather">\n<parameter name="city">Ro',
]
CUT_M1 = [
    '<tool_calls>\n{"name": "search", "arguments": {"q": "a"}}\n',  # the line is complete, the block is not
    '<tool_calls>\n{"name": "search", "arguments": {"q": "a"}}',
    '<tool_calls>\n{"name": "search", "arguments": {"q": ',
    '<tool_calls>\n{"name": "search", "arguments": {"q": "a"}}\n</tool_',
]


@pytest.mark.parametrize("style, text", [("minimax_m2", t) for t in CUT_M2] + [("minimax_m1", t) for t in CUT_M1])
def test_an_unterminated_tool_call_is_never_a_call(style, text):
    assert parse_tool_calls("Let me look. " + text, TOOLS, style) == (("Let me look. " + text).strip(), [])
    # streamed: nothing of the block comes out until the reply ends, and then only as content
    parser = ToolCallStreamParser(TOOLS, style)
    streamed = [ev for ch in "Let me look. " + text for ev in parser.feed(ch)]
    assert "".join(ev.text for ev in streamed) == "Let me look."
    tail = parser.finish()
    assert all(isinstance(ev, ContentDelta) for ev in tail)
    assert "".join(ev.text for ev in streamed + tail) == ("Let me look. " + text).strip()


def test_an_invoke_without_its_end_is_not_a_call_even_in_a_closed_block():
    first = '<invoke name="search"><parameter name="q">a</parameter>\n'
    text = f'<minimax:tool_call>{first}<invoke name="search"><parameter name="q">b</parameter></invoke></minimax:tool_call>'
    assert parse_tool_calls(text, TOOLS) == (first.strip(), [{"name": "search", "arguments": {"q": "b"}}])
    text = '<minimax:tool_call><invoke name="search"><parameter name="q">a</parameter></minimax:tool_call> ok'
    assert parse_tool_calls(text, TOOLS) == (text, [])


def test_calls_are_held_back_until_their_block_closes():
    text = (
        'Checking.\n<minimax:tool_call>\n<invoke name="search">\n<parameter name="q">cats</parameter>\n</invoke>\n'
        '<invoke name="get_weather">\n<parameter name="city">Rome</parameter>\n</invoke>\n</minimax:tool_call>'
    )
    parser = ToolCallStreamParser(TOOLS, "minimax_m2")
    for i, ch in enumerate(text):
        events = parser.feed(ch)
        calls = [ev for ev in events if not isinstance(ev, ContentDelta)]
        if i < len(text) - 1:
            assert not calls, (i, text[: i + 1])
    assert [(type(ev), ev.index) for ev in calls] == [
        (ToolCallStart, 0),
        (ToolCallArgs, 0),
        (ToolCallStart, 1),
        (ToolCallArgs, 1),
    ]
    assert [ev.name for ev in calls[::2]] == ["search", "get_weather"]
    assert [json.loads(ev.text) for ev in calls[1::2]] == [{"q": "cats"}, {"city": "Rome"}]
    assert parser.finish() == []


# ---------------------------------------------------------------------------------------------------- in reasoning
def test_tool_calls_inside_thinking_are_not_calls():
    m1_call = '<tool_calls>\n{"name": "search", "arguments": {"q": "x"}}\n</tool_calls>'
    # M1 reasoning that opens the reply: the calls stay in the reasoning
    reasoning, content = split_reasoning(f"<think>\nI could call {m1_call}\n</think>\nDone.", "minimax_m1")
    assert reasoning == f"I could call {m1_call}" and parse_tool_calls(content, TOOLS, "minimax_m1") == ("Done.", [])
    # a think block later in the content: passed through as content, its calls are not calls
    content = f"Sure. <think>maybe {m1_call}</think> Done."
    assert parse_tool_calls(content, TOOLS, "minimax_m1") == (content, [])
    # ... while a call after the think block is one
    content, calls = parse_tool_calls(f"<think>a {m1_call}</think>\n{m1_call}", TOOLS, "minimax_m1")
    assert content == f"<think>a {m1_call}</think>" and calls == [{"name": "search", "arguments": {"q": "x"}}]
    # M2: reasoning ends at </think>; a think block in the content holds no calls either
    m2_call = '<minimax:tool_call><invoke name="search"><parameter name="q">x</parameter></invoke></minimax:tool_call>'
    reasoning, content = split_reasoning(f"plan\n</think>\n\nSo <think>or {m2_call}?</think> no.", "minimax_m2")
    assert reasoning == "plan" and parse_tool_calls(content, TOOLS) == (f"So <think>or {m2_call}?</think> no.", [])


# ---------------------------------------------------------------------------------------------------- call limit
def test_max_calls_keeps_the_first_complete_calls():
    first = '<invoke name="search"><parameter name="q">1</parameter></invoke>'
    text = (
        f'A <minimax:tool_call><invoke name="rm_rf"></invoke>{first}<invoke name="search"><parameter name="q">2'
        '</parameter></invoke></minimax:tool_call> B <minimax:tool_call><invoke name="get_weather"><parameter '
        'name="city">Rome</parameter></invoke></minimax:tool_call> C'
    )
    everything = parse_tool_calls(text, TOOLS)
    assert [c["arguments"] for c in everything[1]] == [{"q": "1"}, {"q": "2"}, {"city": "Rome"}]
    # later complete calls are dropped (neither calls nor content); text that is not a call stays content
    assert parse_tool_calls(text, TOOLS, max_calls=1) == (
        'A <invoke name="rm_rf"></invoke> B  C',
        [{"name": "search", "arguments": {"q": "1"}}],
    )
    assert len(parse_tool_calls(text, TOOLS, max_calls=2)[1]) == 2
    m1 = '<tool_calls>\n{"name": "search", "arguments": {}}\n{"name": "get_weather", "arguments": {}}\n</tool_calls>'
    assert parse_tool_calls(m1, TOOLS, "minimax_m1", max_calls=1) == (None, [{"name": "search", "arguments": {}}])
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="max_calls"):
            ToolCallStreamParser(TOOLS, "minimax_m2", bad)


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


# ---------------------------------------------------------------------------------------------------- upstream cases
# The MiniMax-M2 cases of vLLM (tests/tool_parsers/test_minimax_m2_tool_parser.py and the older
# tests/tool_use/test_minimax_m2_tool_parser.py), SGLang (test/registered/function_call/test_minimax_m2_detector.py)
# and llama.cpp (tests/test-chat.cpp, test_minimax_m2_parser): their model outputs and expected results, restated.
# Without tools every value is a string, as in vLLM's tests, which give none.
def _tool(name: str, **properties) -> dict:
    return {"type": "function", "function": {"name": name, "parameters": {"type": "object", "properties": properties}}}


def _call(name: str, **arguments) -> dict:
    return {"name": name, "arguments": arguments}


def _block(*invokes: str) -> str:
    return "<minimax:tool_call>" + "".join(invokes) + "</minimax:tool_call>"


def _invoke(name: str, *params: tuple[str, str]) -> str:
    return (
        f'<invoke name="{name}">' + "".join(f'<parameter name="{k}">{v}</parameter>' for k, v in params) + "</invoke>"
    )


NULLABLE_STRING = {"anyOf": [{"type": "string"}, {"type": "null"}]}
CONTEXT_TOOLS = [_tool("context_info", metadata_only={"type": "boolean"})]
LLAMA_TOOLS = [
    _tool("special_function", arg1={"type": "integer"}),
    _tool("special_function_with_opt", arg1={"type": "integer"}, arg2={"type": "integer"}),
]
LLAMA_CALL = (
    '<minimax:tool_call>\n<invoke name="special_function">\n<parameter name="arg1">1</parameter>\n</invoke>\n'
    "</minimax:tool_call>"
)
HELLO = "Hello, world!\nWhat's up?"
UPSTREAM_TOOL_CASES = [  # (tools, output after the reasoning, content, calls)
    # vLLM
    (None, "Hello world", "Hello world", []),
    (
        None,
        "Let me check. " + _block(_invoke("get_weather", ("city", "Seattle"))),
        "Let me check.",
        [_call("get_weather", city="Seattle")],
    ),
    (
        None,
        _block(_invoke("get_weather", ("city", "Seattle"), ("days", "5"))),
        None,
        [_call("get_weather", city="Seattle", days="5")],
    ),
    (
        None,
        _block(_invoke("search_web", ("query", "OpenAI")), _invoke("search_web", ("query", "Gemini"))),
        None,
        [_call("search_web", query="OpenAI"), _call("search_web", query="Gemini")],
    ),
    (
        None,
        _block(_invoke("fn_a", ("x", "1")), _invoke("fn_b", ("y", "2"))),
        None,
        [_call("fn_a", x="1"), _call("fn_b", y="2")],
    ),
    (
        None,
        _block(_invoke("get_weather", ("city", "NYC")), _invoke("get_stock", ("ticker", "AAPL"))),
        None,
        [_call("get_weather", city="NYC"), _call("get_stock", ticker="AAPL")],
    ),
    (
        [_tool("update_profile", nickname=NULLABLE_STRING)],
        _block(_invoke("update_profile", ("nickname", "Alice"))),
        None,
        [_call("update_profile", nickname="Alice")],
    ),
    (
        [_tool("update_profile", nickname=NULLABLE_STRING)],
        _block(_invoke("update_profile", ("nickname", "null"))),
        None,
        [_call("update_profile", nickname=None)],
    ),
    (
        [_tool("update_settings", config={"anyOf": [{"type": "object"}, {"type": "null"}]})],
        _block(_invoke("update_settings", ("config", '{"theme": "dark", "fontSize": 14}'))),
        None,
        [_call("update_settings", config={"theme": "dark", "fontSize": 14})],
    ),
    (
        None,
        _block(
            _invoke("search_web", ("query_tag", '["technology", "events"]'), ("query_list", '["OpenAI", "latest"]')),
            _invoke("search_web", ("query_tag", '["technology", "events"]'), ("query_list", '["Gemini", "latest"]')),
        ),
        None,
        [
            _call("search_web", query_tag='["technology", "events"]', query_list='["OpenAI", "latest"]'),
            _call("search_web", query_tag='["technology", "events"]', query_list='["Gemini", "latest"]'),
        ],
    ),
    (
        None,
        '<minimax:tool_call><invoke name="execute_command" description="Run a command">'
        '<parameter name="command" type="string">ls -la</parameter></invoke></minimax:tool_call>',
        None,
        [_call("execute_command", command="ls -la")],
    ),
    (
        None,
        _block(_invoke("help", ("topic", "commands (e.g. ls -la, cat file.txt)"))),
        None,
        [_call("help", topic="commands (e.g. ls -la, cat file.txt)")],
    ),
    (
        None,
        '<minimax:tool_call><invoke name="test_func" extra="ignored"><parameter name="arg1" type="string">value1'
        '</parameter><parameter name="arg2" description="(e.g. example)">value2</parameter></invoke></minimax:tool_call>',
        None,
        [_call("test_func", arg1="value1", arg2="value2")],
    ),
    # SGLang
    (
        [_tool("the_tool", args=NULLABLE_STRING)],
        _block(_invoke("the_tool", ("args", "hi"))),
        None,
        [_call("the_tool", args="hi")],
    ),
    (
        [_tool("the_tool", args=NULLABLE_STRING)],
        _block(_invoke("the_tool", ("args", "null"))),
        None,
        [_call("the_tool", args=None)],
    ),
    (  # the block never closed: no call (SGLang drops the text, mmx keeps it as written)
        CONTEXT_TOOLS,
        '[Pasted ~4 lines]<minimax:tool_call><invoke name="context_info"><parameter name="metadata_only">false'
        "</parameter></invoke>",
        '[Pasted ~4 lines]<minimax:tool_call><invoke name="context_info"><parameter name="metadata_only">false'
        "</parameter></invoke>",
        [],
    ),
    (
        CONTEXT_TOOLS,
        "Here is some text." + _block(_invoke("context_info", ("metadata_only", "true"))) + "More text after.",
        "Here is some text.More text after.",
        [_call("context_info", metadata_only=True)],
    ),
    (
        [_tool("test_func", content={"type": "string"})],
        _block(_invoke("test_func", ("content", "This text contains </parameter> in it"))),
        None,
        [_call("test_func", content="This text contains </parameter> in it")],
    ),
    (
        [_tool("process_html", html={"type": "string"})],
        _block(_invoke("process_html", ("html", "<div>Hello</div>"))),
        None,
        [_call("process_html", html="<div>Hello</div>")],
    ),
    (
        [
            _tool(
                "complex_func",
                data={"anyOf": [{"type": "object", "properties": {"key": {"type": "string"}}}, {"type": "null"}]},
            )
        ],
        _block(_invoke("complex_func", ("data", '{"key": "value"}'))),
        None,
        [_call("complex_func", data={"key": "value"})],
    ),
    (
        [_tool("array_func", items={"type": "array"})],
        _block(_invoke("array_func", ("items", '[1, 2, 3, "four"]'))),
        None,
        [_call("array_func", items=[1, 2, 3, "four"])],
    ),
    # llama.cpp
    (LLAMA_TOOLS, HELLO, HELLO, []),
    (LLAMA_TOOLS, LLAMA_CALL, None, [_call("special_function", arg1=1)]),
    (LLAMA_TOOLS, LLAMA_CALL + HELLO, HELLO, [_call("special_function", arg1=1)]),
    (
        LLAMA_TOOLS,
        '<minimax:tool_call>\n<invoke name="special_function_with_opt">\n<parameter name="arg1">1</parameter>\n'
        '<parameter name="arg2">2</parameter>\n</invoke>\n</minimax:tool_call>',
        None,
        [_call("special_function_with_opt", arg1=1, arg2=2)],
    ),
    (LLAMA_TOOLS, _block(_invoke("special_function", ("arg1", "1"))), None, [_call("special_function", arg1=1)]),
]
UPSTREAM_REPLY_CASES = [  # llama.cpp, whole M2 replies (the prompt pre-filled <think>): (reply, reasoning, content, calls)
    ("I'm\nthinking</think>" + HELLO, "I'm\nthinking", HELLO, []),
    ("I'm\nthinking</think>" + LLAMA_CALL, "I'm\nthinking", None, [_call("special_function", arg1=1)]),
    ("I'm\nthinking</think>" + LLAMA_CALL + HELLO, "I'm\nthinking", HELLO, [_call("special_function", arg1=1)]),
    (
        "I'm\nthinking\n</think>" + HELLO + "\n" + LLAMA_CALL,
        "I'm\nthinking",
        HELLO,
        [_call("special_function", arg1=1)],
    ),
    (
        "I'm\nthinking\n</think>\n\n" + HELLO + "\n\n" + LLAMA_CALL + "\n",
        "I'm\nthinking",
        HELLO,
        [_call("special_function", arg1=1)],
    ),
]


@pytest.mark.parametrize("tools, output, content, calls", UPSTREAM_TOOL_CASES)
def test_upstream_m2_tool_parser_cases(tools, output, content, calls):
    assert parse_tool_calls(output, tools, "minimax_m2") == (content, calls)
    for chunks in _chunkings(output, seed=len(output)):
        assert _stream_tools(output, "minimax_m2", chunks, tools) == (content, calls), chunks


@pytest.mark.parametrize("reply, reasoning, content, calls", UPSTREAM_REPLY_CASES)
def test_upstream_m2_reply_cases(reply, reasoning, content, calls):
    split, rest = split_reasoning(reply, "minimax_m2")
    assert (split, *parse_tool_calls(rest, LLAMA_TOOLS, "minimax_m2")) == (reasoning, content, calls)
    for chunks in _chunkings(reply, seed=len(reply)):
        assert _stream(reply, "minimax_m2", chunks, LLAMA_TOOLS) == (reasoning, content, calls), chunks


def test_upstream_sglang_streaming_cases():
    parser = ToolCallStreamParser(CONTEXT_TOOLS, "minimax_m2")
    pieces = ["Normal text before", "<minimax:tool_call>", '<invoke name="context_info">']
    pieces.append('<parameter name="metadata_only">false</parameter>')
    assert [ev for piece in pieces for ev in parser.feed(piece)] == [ContentDelta("Normal text before")]
    pieces = ["Text before ", "<minimax:tool_call>", '<invoke name="context_info">']
    pieces += ['<parameter name="metadata_only">true</parameter>', "</invoke>", "</minimax:tool_call>", " Text after"]
    parser = ToolCallStreamParser(CONTEXT_TOOLS, "minimax_m2")
    events = [ev for piece in pieces for ev in parser.feed(piece)] + parser.finish()
    assert _collect(events) == ("Text before  Text after", [_call("context_info", metadata_only=True)])


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
    'r</think>x <think>y <minimax:tool_call><invoke name="search"></invoke></minimax:tool_call></think> z',
    'r</think><minimax:tool_call><invoke name="search"><parameter name="q">a</parameter></minimax:tool_call>',
    'r</think><minimax:tool_call><invoke name="search"><parameter name="q">x</parameter> y</parameter></invoke>'
    '<invoke name="search"><parameter name="q">b</parameter></invoke></minimax:tool_call>',
    'r</think><minimax:tool_call><invoke name="search"><parameter name="q">a</parameter></invoke>\n</minimax:tool',
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
    '<think>x</think>a <think>b <tool_calls>\n{"name": "search", "arguments": {}}\n</tool_calls></think> c',
    '<think>x</think>\n<tool_calls>\n{"name": "search", "arguments": {}}\n{"name": "search", "arguments": {"q": "y"}}',
]


def _collect(events) -> tuple[str | None, list[dict]]:
    """(content, calls) of a stream of tool-parser events, checking each call's index and id."""
    content = "".join(e.text for e in events if isinstance(e, ContentDelta))
    calls: dict[int, dict] = {}
    for e in events:
        if isinstance(e, ToolCallStart):
            assert e.index == len(calls) and e.id.startswith("call_")
            calls[e.index] = {"name": e.name, "args": ""}
        elif isinstance(e, ToolCallArgs):
            calls[e.index]["args"] += e.text
    return content or None, [{"name": c["name"], "arguments": json.loads(c["args"])} for c in calls.values()]


def _stream(text: str, style: str, chunks: list[int], tools=TOOLS):
    """(reasoning, content, calls) of ``text`` fed in pieces of the given sizes through both parsers."""
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
    return reasoning, *_collect(events)


def _stream_tools(text: str, style: str, chunks: list[int], tools=TOOLS):
    """(content, calls) of ``text`` (an output without reasoning) fed in pieces through the tool-call parser."""
    parser, events, pos = ToolCallStreamParser(tools, style), [], 0
    for size in chunks:
        events += parser.feed(text[pos : pos + size])
        pos += size
    return _collect(events + parser.finish())


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
        "</tool_calls>",
        "<think>",
        "{",
        "}",
    ]
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        for style in ("minimax_m2", "minimax_m1"):
            reasoning, content = split_reasoning(text, style)
            expected = parse_tool_calls(content, TOOLS, style)
            assert _stream(text, style, [1] * len(text)) == (reasoning or "", *expected)
