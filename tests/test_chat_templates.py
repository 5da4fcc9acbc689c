"""Chat templates: mmx renders any template exactly as transformers' apply_chat_template does, and mmx's own M1
and M2 templates reproduce the spec's rendered examples (specs/m2_and_formats.md §6.2, §7.1) character for
character."""

from __future__ import annotations

import json

import pytest

from mmx.chat import builtin_template, render_chat

transformers = pytest.importorskip("transformers")

WEATHER = {
    "name": "get_weather",
    "description": "Get weather",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        "required": ["city"],
    },
}
TOOLS = [{"type": "function", "function": WEATHER}]


def _call(name, arguments, call_id="call_1"):
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


M2_TOOL_ROUND = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": "Let me check.",
        "reasoning_content": "Need tool.",
        "tool_calls": [_call("get_weather", {"city": "Paris", "days": 3})],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 20}'},
]

M2_EXAMPLE = (
    "]~!b[]~b]system\nYou are a helpful assistant.\n\n# Tools\nYou may call one or more tools to assist with the user "
    "query.\nHere are the tools available in JSONSchema format:\n\n<tools>\n"
    '<tool>{"name": "get_weather", "description": "Get weather", "parameters": {"type": "object", "properties": '
    '{"city": {"type": "string"}, "days": {"type": "integer"}}, "required": ["city"]}}</tool>\n</tools>\n\n'
    "When making tool calls, use XML format to invoke tools and pass parameters:\n\n<minimax:tool_call>\n"
    '<invoke name="tool-name-1">\n<parameter name="param-key-1">param-value-1</parameter>\n'
    '<parameter name="param-key-2">param-value-2</parameter>\n...\n</invoke>\n</minimax:tool_call>[e~[\n'
    "]~b]user\nWeather in Paris?[e~[\n"
    "]~b]ai\n<think>\nNeed tool.\n</think>\n\nLet me check.<minimax:tool_call>\n"
    '<invoke name="get_weather">\n<parameter name="city">Paris</parameter>\n<parameter name="days">3</parameter>\n'
    "</invoke>\n</minimax:tool_call>[e~[\n"
    ']~b]tool\n<response>{"temp": 20}</response>[e~[\n'
    "]~b]ai\n<think>\n"
)


def test_m2_template_reproduces_the_tool_round_example():
    assert (
        render_chat(builtin_template("minimax_m2"), M2_TOOL_ROUND, tools=TOOLS, add_generation_prompt=True)
        == M2_EXAMPLE
    )


def test_m2_minimal_prompt():
    text = render_chat(builtin_template("minimax_m2"), [{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert text == "]~!b[]~b]system\nYou are a helpful assistant.[e~[\n]~b]user\nhi[e~[\n]~b]ai\n<think>\n"


def test_m2_interleaved_thinking_is_dropped_after_a_new_user_turn():
    conversation = [
        *M2_TOOL_ROUND,
        {"role": "assistant", "content": "It is 20C.", "reasoning_content": "Answer now."},
        {"role": "user", "content": "Thanks"},
    ]
    text = render_chat(builtin_template("minimax_m2"), conversation, tools=TOOLS, add_generation_prompt=True)
    assert "<think>\nNeed tool." not in text and "Answer now." not in text
    assert "]~b]ai\nIt is 20C.[e~[\n]~b]user\nThanks[e~[\n]~b]ai\n<think>\n" in text
    # reasoning given inline in the content (<think>...</think>) is recovered the same way
    inline = [dict(m) for m in M2_TOOL_ROUND]
    inline[1] = {**inline[1], "content": "<think>\nNeed tool.\n</think>\n\nLet me check."}
    del inline[1]["reasoning_content"]
    assert render_chat(builtin_template("minimax_m2"), inline, tools=TOOLS, add_generation_prompt=True) == M2_EXAMPLE


def test_m2_parallel_calls_and_tool_result_formats():
    conversation = [
        {"role": "user", "content": "go"},
        {
            "role": "assistant",
            "content": None,
            "reasoning_content": "Plan: call a and b.",
            "tool_calls": [
                _call("a", {"q": ["x", "y"], "flag": True, "n": 2.5, "s": "plain text"}, "c1"),
                _call("b", {}, "c2"),
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "A-result"},
        {"role": "tool", "tool_call_id": "c2", "content": [{"type": "text", "text": "B-result"}]},
    ]
    expected = (
        "]~b]ai\n<think>\nPlan: call a and b.\n</think>\n\n<minimax:tool_call>\n"
        '<invoke name="a">\n<parameter name="q">["x", "y"]</parameter>\n<parameter name="flag">true</parameter>\n'
        '<parameter name="n">2.5</parameter>\n<parameter name="s">plain text</parameter>\n</invoke>\n'
        '<invoke name="b">\n</invoke>\n</minimax:tool_call>[e~[\n'
        "]~b]tool\n<response>A-result</response>\n<response>B-result\n</response>[e~[\n"
    )
    assert expected in render_chat(builtin_template("minimax_m2"), conversation)


def test_m2_tool_message_without_a_call_is_an_error():
    import jinja2

    with pytest.raises(jinja2.TemplateError, match="tool"):
        render_chat(builtin_template("minimax_m2"), [{"role": "tool", "content": "x"}])


def test_m1_template_reproduces_the_example():
    conversation = [
        {"role": "system", "content": [{"type": "text", "text": "You are a helpful assistant."}]},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "reasoning_content": "Need tool.",
            "tool_calls": [_call("get_weather", {"city": "Paris"})],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 20}'},
    ]
    expected = (
        "<begin_of_document><beginning_of_sentence>system ai_setting=assistant\nYou are a helpful assistant."
        "<end_of_sentence>\n<beginning_of_sentence>system tool_setting=tools\nYou are provided with these tools:\n"
        f"<tools>\n{json.dumps(WEATHER)}\n</tools>\n\nIf you need to call tools, please respond with <tool_calls>"
        "</tool_calls> XML tags, and provide tool-name and json-object of arguments, following the format below:\n"
        "<tool_calls>\n{name: <tool-name-1>, arguments: <args-json-object-1>}\n...\n</tool_calls><end_of_sentence>\n"
        "<beginning_of_sentence>user name=user\nWeather in Paris?<end_of_sentence>\n"
        "<beginning_of_sentence>ai name=assistant\n<think>\nNeed tool.\n</think>\n<tool_calls>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_calls><end_of_sentence>\n'
        '<beginning_of_sentence>tool name=tools\ntool name: get_weather\ntool result: {"temp": 20}\n\n'
        "<end_of_sentence>\n<beginning_of_sentence>ai name=assistant\n"
    )
    assert (
        render_chat(builtin_template("minimax_m1"), conversation, tools=[WEATHER], add_generation_prompt=True)
        == expected
    )


def test_m1_template_adds_no_system_block_of_its_own():
    """The official M1 template emits a system block only for system text the conversation gives (no default
    ``ai_setting=assistant`` / "You are a helpful assistant.")."""
    user = {"role": "user", "content": "hi"}
    expected = "<begin_of_document><beginning_of_sentence>user name=user\nhi<end_of_sentence>\n"
    expected += "<beginning_of_sentence>ai name=assistant\n"
    template = builtin_template("minimax_m1")
    assert render_chat(template, [user], add_generation_prompt=True) == expected
    assert render_chat(template, [{"role": "system", "content": ""}, user], add_generation_prompt=True) == expected
    with_tools = render_chat(template, [user], tools=[WEATHER], add_generation_prompt=True)
    assert with_tools.startswith("<begin_of_document><beginning_of_sentence>system tool_setting=tools\n")
    assert "ai_setting" not in with_tools
    system = [{"role": "system", "content": "Be brief."}, user]
    assert render_chat(template, system).startswith(
        "<begin_of_document><beginning_of_sentence>system ai_setting=assistant\nBe brief.<end_of_sentence>\n"
        "<beginning_of_sentence>user name=user\nhi<end_of_sentence>\n"
    )


# A template in the style of Hub chat templates, using what they use: namespace, loop controls, tojson with indent,
# raise_exception, string and list content, the reasoning aliases and the generation tag.
THIRD_PARTY = """{%- set ns = namespace(n=0) -%}
{%- for m in messages -%}
{%- if m.role not in ["system", "user", "assistant", "tool"] %}{{ raise_exception("bad role " ~ m.role) }}{% endif -%}
{%- set ns.n = ns.n + 1 -%}
<|{{ m.role }}|>{% if m.content is string %}{{ m.content }}{% elif m.content %}{% for p in m.content %}{{ p.text }}{% endfor %}{% endif %}
{% if m.thinking %}[thinking: {{ m.thinking }}]{% endif %}{% if m.reasoning %}[reasoning: {{ m.reasoning }}]{% endif %}
{%- if m.tool_calls -%}{% for c in m.tool_calls %}{% if loop.index > 3 %}{% break %}{% endif %}
{{ c.function | tojson(indent=2) }}{% endfor %}{%- endif %}
{% if m.role == "assistant" %}{% generation %}<end>{% endgeneration %}{% endif %}
{% endfor -%}
{%- if tools %}TOOLS {{ tools | tojson }}{% endif -%}
{%- if add_generation_prompt %}<|assistant|>{{ bos_token }}{% endif %}"""

CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [
        {"role": "system", "content": "Be brief. Café 東京"},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
    ],
    M2_TOOL_ROUND,
    [
        *M2_TOOL_ROUND,
        {"role": "assistant", "content": "It is 20C.", "reasoning_content": "ok"},
        {"role": "user", "content": "Thanks"},
    ],
    [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "<think>\nx\n</think>\n\nb"},
        {"role": "user", "content": "c"},
    ],
]


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_tokenizer):
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tiny_tokenizer.backend, bos_token="]~!b[", eos_token="[e~["
    )


@pytest.mark.parametrize("template_name", ["minimax_m2", "minimax_m1", "third_party"])
@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("with_tools", [False, True])
def test_rendering_equals_transformers(hf_tokenizer, tiny_tokenizer, template_name, index, with_tools):
    template = THIRD_PARTY if template_name == "third_party" else builtin_template(template_name)
    conversation = CONVERSATIONS[index]
    tools = TOOLS if with_tools else None
    expected = hf_tokenizer.apply_chat_template(
        conversation, tools=tools, chat_template=template, tokenize=False, add_generation_prompt=True
    )
    actual = tiny_tokenizer.apply_chat_template(conversation, tools=tools, chat_template=template)
    assert actual == expected


def test_generation_spans_mark_assistant_text():
    text, spans = render_chat(THIRD_PARTY, CONVERSATIONS[3], return_generation_spans=True)
    assert [text[a:b] for a, b in spans] == ["<end>", "<end>"]
    assert text == render_chat(THIRD_PARTY, CONVERSATIONS[3])  # the markers leave no trace
    text, spans = render_chat(builtin_template("minimax_m2"), M2_TOOL_ROUND, tools=TOOLS, return_generation_spans=True)
    assert [text[a:b] for a, b in spans] == [
        '<think>\nNeed tool.\n</think>\n\nLet me check.<minimax:tool_call>\n<invoke name="get_weather">\n'
        '<parameter name="city">Paris</parameter>\n<parameter name="days">3</parameter>\n</invoke>\n'
        "</minimax:tool_call>[e~["
    ]
    m1 = render_chat(
        builtin_template("minimax_m1"),
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
        return_generation_spans=True,
    )
    assert [m1[0][a:b] for a, b in m1[1]] == ["b<end_of_sentence>"]


def test_sandbox_blocks_unsafe_attributes():
    import jinja2

    with pytest.raises(jinja2.exceptions.SecurityError):
        render_chat("{{ messages.__class__.__init__.__globals__ }}", [{"role": "user", "content": "x"}])


def test_chat_format_detection_and_template_preference(tmp_path):
    """A checkpoint's own template wins over mmx's; the format follows the template's tool syntax, else the family."""
    from mmx.chat.formats import M1, M2, chat_for, detect_format, get_format, resolve_template

    assert detect_format(M2.builtin_template, "minimax_m1") is M2  # mmx-tiny: M1 architecture, M2 chat format
    assert detect_format(M1.builtin_template, "minimax_m2") is M1
    assert detect_format("{{ messages }}", "minimax_m2") is M2 and detect_format(None, "minimax_m1") is M1
    own = "{{ messages[0].content }}<minimax:tool_call>"
    assert resolve_template(None, own, "minimax_m1") == own
    assert resolve_template("tokenizer", None, "minimax_m1") == M1.builtin_template
    assert resolve_template("m2", own, "minimax_m1") == M2.builtin_template
    path = tmp_path / "t.jinja"
    path.write_text("{{ 1 }}")
    assert resolve_template(str(path), own, "minimax_m2") == "{{ 1 }}"
    with pytest.raises(FileNotFoundError):
        resolve_template(str(tmp_path / "missing.jinja"), None, "minimax_m2")
    with pytest.raises(ValueError, match="unknown chat format"):
        get_format("minimax_m3")

    class Tok:
        chat_template = own

    setup = chat_for(Tok(), "minimax_m1")
    assert setup.template == own and setup.format is M2
