"""Structured outputs and logit_bias (issue 15): grammars held as token masks on mmx-tiny.

The grammar checks are independent of the code under test: replies are validated with pydantic (through the
openai SDK's ``parse``), ``jsonschema``, ``re.fullmatch`` and mmx's own tool-call parser; the tool-call grammars are
checked against calls rendered by the chat templates. The SDK tests run against a real `mmx serve` on 127.0.0.1.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Literal

import httpx
import pytest
from pydantic import BaseModel, Field

from mmx.chat.constraints import added_tokens, answer_start, tool_call_grammar
from mmx.chat.formats import M1, M2
from mmx.chat.template import render_chat
from mmx.chat.tool_calls import parse_tool_calls
from mmx.engine.sampling_params import SamplingParams
from mmx.engine.structured import GrammarCompiler, ReasoningGate, StructuredOutputsParams, allowed_tokens

jsonschema = pytest.importorskip("jsonschema")
openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")

MODEL = "mmx-tiny"
SEEDS = [0, 1, 2, 3]
ASK = [{"role": "user", "content": "Describe a person as JSON."}]


class Person(BaseModel):
    name: str = Field(max_length=12)
    age: int = Field(ge=0, le=120)
    mood: Literal["happy", "sad"]
    tags: list[Annotated[str, Field(max_length=8)]] = Field(max_length=2)


PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "mood": {"type": "string", "enum": ["happy", "sad"]},
    },
    "required": ["name", "age", "mood"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather forecast for a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
                "units": {"type": "string", "enum": ["c", "f"]},
                "hourly": {"type": "boolean"},
                "hours": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 23}, "maxItems": 3},
            },
            "required": ["city", "days", "hourly"],
        },
    },
}
LOOKUP = {
    "type": "function",
    "function": {
        "name": "lookup",
        "parameters": {
            "type": "object",
            "properties": {"word": {"type": "string", "pattern": "^[a-z]{1,8}$"}},
            "required": ["word"],
        },
    },
}
TOOLS = [WEATHER, LOOKUP]


@pytest.fixture(scope="module")
def tiny_llm():
    from mmx import LLM
    from mmx.embedded import embedded_model_path

    path = embedded_model_path()
    if path is None:
        pytest.skip("the embedded mmx-tiny model is not installed")
    return LLM(path, max_model_len=1024, cache_memory_gb=0.05)


def _gate(tokenizer, opened=True) -> ReasoningGate:
    return ReasoningGate(tokenizer.token_to_id("<think>"), tokenizer.token_to_id("</think>"), opened)


# ---------------------------------------------------------------------------------------------------- grammars
def _accepts(tokenizer, grammar_text: str, text: str) -> bool:
    import llguidance

    lltok = llguidance.LLTokenizer(tokenizer.backend.to_str(), eos_token=[tokenizer.eos_token_id])
    matcher = llguidance.LLMatcher(lltok, grammar_text, log_level=0)
    assert not matcher.is_error(), matcher.get_error()
    ids = tokenizer.encode(text)
    return matcher.try_consume_tokens(ids) == len(ids) and matcher.is_accepting()


def _rendered_calls(tokenizer, template: str, calls: list[tuple[str, dict]]) -> str:
    """What the chat template writes for these calls (the reference syntax of the format)."""
    messages = [
        {"role": "user", "content": "x"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": n, "arguments": a}} for n, a in calls],
        },
    ]
    return render_chat(template, messages, add_generation_prompt=False)


M2_CASES = [
    ([("get_weather", {"city": "Paris <b>", "days": 3, "hourly": False, "hours": [1, 2]})], True),
    ([("get_weather", {"city": "Oslo", "days": 7, "units": "f", "hourly": True})], True),
    ([("get_weather", {"city": "Oslo", "hourly": True})], False),  # a required parameter missing
    ([("get_weather", {"city": "Oslo", "days": 9, "hourly": True})], False),  # days out of range
    ([("get_weather", {"city": "Oslo", "days": 2, "units": "k", "hourly": True})], False),  # not in the enum
    ([("get_weather", {"city": "Os</invoke>lo", "days": 2, "hourly": True})], False),  # a tag inside a string
    ([("get_weather", {"city": "Oslo", "days": "two", "hourly": True})], False),  # not an integer
    ([("lookup", {"word": "apple"})], True),
    ([("lookup", {"word": "Apple1"})], False),  # against the pattern
    ([("lookup", {"word": "a"}), ("get_weather", {"city": "x", "days": 1, "hourly": True})], True),  # parallel
]


@pytest.mark.parametrize("calls, valid", M2_CASES)
def test_m2_tool_call_grammar_matches_the_template_and_the_schemas(tiny_tokenizer, calls, valid):
    rendered = _rendered_calls(tiny_tokenizer, tiny_tokenizer.chat_template, calls)
    block = rendered[rendered.index("<minimax:tool_call>") :].removesuffix("[e~[\n")
    after_required = block.removeprefix('<minimax:tool_call>\n<invoke name="')
    grammar = tool_call_grammar(M2, TOOLS, None, True, added_tokens(tiny_tokenizer))
    assert _accepts(tiny_tokenizer, grammar, after_required) is valid
    if len(calls) == 1:  # the named tool: the prefix ends after its <invoke> line
        named = tool_call_grammar(M2, TOOLS, calls[0][0], True, added_tokens(tiny_tokenizer))
        assert _accepts(tiny_tokenizer, named, block.split('">\n', 1)[1]) is valid
    if valid:  # what the grammar admits, the parser reads back as the same calls
        _, parsed = parse_tool_calls(block, TOOLS, "minimax_m2")
        assert [(c["name"], c["arguments"]) for c in parsed] == calls


def test_one_call_only_without_parallel_tool_calls(tiny_tokenizer):
    calls = [("lookup", {"word": "a"}), ("lookup", {"word": "b"})]
    rendered = _rendered_calls(tiny_tokenizer, tiny_tokenizer.chat_template, calls)
    block = rendered[rendered.index('<invoke name="') + len('<invoke name="') :].removesuffix("[e~[\n")
    single = added_tokens(tiny_tokenizer)
    assert _accepts(tiny_tokenizer, tool_call_grammar(M2, TOOLS, None, True, single), block)
    assert not _accepts(tiny_tokenizer, tool_call_grammar(M2, TOOLS, None, False, single), block)


@pytest.mark.parametrize(
    "calls, valid",
    [
        ([("get_weather", {"city": "Oslo", "days": 2, "hourly": True})], True),
        ([("get_weather", {"city": "Oslo", "days": 0, "hourly": True})], False),
        ([("lookup", {"word": "a"}), ("lookup", {"word": "b"})], True),
        ([("lookup", {})], False),
    ],
)
def test_m1_tool_call_grammar_matches_the_template_and_the_schemas(tiny_tokenizer, calls, valid):
    rendered = _rendered_calls(tiny_tokenizer, M1.builtin_template, calls)
    block = rendered[rendered.index("<tool_calls>") :].split("<end_of_sentence>")[0]
    after_required = block.removeprefix('<tool_calls>\n{"name": "')
    assert _accepts(tiny_tokenizer, tool_call_grammar(M1, TOOLS), after_required) is valid
    if len(calls) == 1:
        after_named = block.split('"arguments": ', 1)[1]
        assert _accepts(tiny_tokenizer, tool_call_grammar(M1, TOOLS, calls[0][0]), after_named) is valid


def test_a_tool_that_cannot_be_written_is_refused():
    bad = {"type": "function", "function": {"name": "f", "parameters": {"properties": {'a"b': {}}}}}
    with pytest.raises(ValueError, match="cannot be written"):
        tool_call_grammar(M2, [bad])


@pytest.mark.parametrize(
    "fields, message",
    [
        ({}, "exactly one"),
        ({"regex": "a", "choice": ["a"]}, "exactly one"),
        ({"choice": []}, "choice"),
        ({"json": "{not json"}, "json"),
    ],
)
def test_constraint_params_are_checked(fields, message):
    with pytest.raises(ValueError, match=message):
        StructuredOutputsParams(**fields)


@pytest.mark.parametrize(
    "spec, message",
    [
        (StructuredOutputsParams(regex="a(("), "regex"),
        (StructuredOutputsParams(grammar="start: foo("), "grammar"),
        (StructuredOutputsParams(grammar="root ::= ("), "grammar"),
    ],
)
def test_grammars_that_do_not_compile_are_named(spec, message):
    with pytest.raises(ValueError, match=f"^{message}"):
        spec.check()


def test_gbnf_and_lark_grammars_compile(tiny_tokenizer):
    for grammar in ('root ::= "yes" | "no"', 'start: "yes" | "no"'):
        spec = StructuredOutputsParams(grammar=grammar)
        spec.check()
        assert _accepts(tiny_tokenizer, spec.grammar_text(), "no")
        assert not _accepts(tiny_tokenizer, spec.grammar_text(), "maybe")


def _is_json_prefix(text: str, finish_token: bool = True) -> bool:
    """Whether ``text`` can still grow into valid JSON, read by the json module: the only errors allowed are running
    out of input, an unterminated string of legal characters, or a literal or number cut short."""
    try:
        json.loads(text)
        return True
    except json.JSONDecodeError as e:
        if e.msg.startswith("Unterminated string"):
            tail = text[e.pos + 1 :].replace("\\\\", "").replace('\\"', "")
            return all(ord(c) >= 0x20 for c in tail) and _is_json_prefix(text[: e.pos] + '""')
        if e.pos >= len(text):
            return True
        ends = ("0", "e", "ue", "rue", "lse", "alse", "se", "l", "ll", "ull")
        return finish_token and any(_is_json_prefix(text + end, False) for end in ends)


@pytest.mark.parametrize(
    "text, valid",
    [('{"a": [1, {"b": null}], "c": "d"}', True), ("[1]", False), ('{"a": }', False), ('{"a" 1}', False)],
)
def test_json_object_grammar(tiny_tokenizer, text, valid):
    grammar = StructuredOutputsParams(json_object=True).grammar_text()
    assert _accepts(tiny_tokenizer, grammar, text) is valid
    assert _is_json_prefix(text) or not valid


def test_masks_follow_the_reasoning_gate(tiny_tokenizer):
    """Free (all but EOS) while reasoning; after </think> the grammar's tokens only; padding ids never."""
    vocab = tiny_tokenizer.vocab_size + 7  # a model vocabulary with padding rows
    eos = tiny_tokenizer.eos_token_id
    compiler = GrammarCompiler(tiny_tokenizer.backend.to_str(), vocab, [eos])
    gate = _gate(tiny_tokenizer)
    state = compiler.compile(StructuredOutputsParams(choice=["yes"], reasoning=gate)).start()
    reasoning = allowed_tokens([state], vocab)[0]
    assert not reasoning[eos] and reasoning.sum() == vocab - 1
    assert state.advance(tiny_tokenizer.encode("hmm")[0]) and state.advance(gate.close_id)
    after = allowed_tokens([state], vocab)[0]
    allowed = set(after.nonzero().flatten().tolist())
    assert allowed and all(tiny_tokenizer.decode([t]) in ("\n", "y", "ye", "yes") for t in allowed)
    assert not after[tiny_tokenizer.vocab_size :].any()
    for token in tiny_tokenizer.encode("\n\nyes"):
        assert state.advance(token)
    assert allowed_tokens([state], vocab)[0].nonzero().flatten().tolist() == [eos]  # complete: only EOS


def test_answer_start_follows_the_prompt_and_format(tiny_tokenizer):
    think, close = tiny_tokenizer.token_to_id("<think>"), tiny_tokenizer.token_to_id("</think>")
    opened = tiny_tokenizer.encode("]~b]ai\n<think>\n")
    closed = tiny_tokenizer.encode("]~b]ai\n<think>\n</think>\n\n")
    assert answer_start(tiny_tokenizer, M2, opened) == (think, close, True)  # M2 pre-fills <think>
    assert answer_start(tiny_tokenizer, M2, closed) is None  # thinking switched off: the answer starts at once
    plain = tiny_tokenizer.encode("]~b]ai\n")
    assert answer_start(tiny_tokenizer, M1, plain) == (think, close, False)  # M1 may open it itself
    assert answer_start(tiny_tokenizer, M1, plain, free_start=False) is None  # after a forced tool-call opening


def test_a_model_that_opens_its_own_reasoning_may_do_so_first(tiny_tokenizer):
    vocab, eos = tiny_tokenizer.vocab_size, tiny_tokenizer.eos_token_id
    compiler = GrammarCompiler(tiny_tokenizer.backend.to_str(), vocab, [eos])
    gate = _gate(tiny_tokenizer, opened=False)
    first = compiler.compile(StructuredOutputsParams(choice=["no"], reasoning=gate)).start()
    allowed = set(allowed_tokens([first], vocab)[0].nonzero().flatten().tolist())
    assert gate.open_id in allowed and tiny_tokenizer.encode("no")[0] in allowed and eos not in allowed
    assert first.advance(gate.open_id) and first.phase == "reasoning"
    direct = compiler.compile(StructuredOutputsParams(choice=["no"], reasoning=gate)).start()
    assert all(direct.advance(t) for t in tiny_tokenizer.encode("no"))
    assert allowed_tokens([direct], vocab)[0].nonzero().flatten().tolist() == [eos]


def test_compiled_grammars_are_cached_by_text(tiny_tokenizer):
    compiler = GrammarCompiler(tiny_tokenizer.backend.to_str(), tiny_tokenizer.vocab_size, [0])
    first = compiler.compile(StructuredOutputsParams(json={"type": "object"}))
    again = compiler.compile(StructuredOutputsParams(json='{"type": "object"}'))
    assert first._matcher is again._matcher
    assert compiler.compile(StructuredOutputsParams(json={"type": "array"}))._matcher is not first._matcher


# ---------------------------------------------------------------------------------------------------- mmx-tiny
def test_json_schema_holds_for_every_seed_and_ends_with_stop(tiny_llm):
    # LLM.chat starts the constraint after the reasoning M2's prompt opens
    so = StructuredOutputsParams(json=PERSON_SCHEMA)
    params = SamplingParams(n=2, temperature=1.0, max_tokens=400, seed=5, structured_outputs=so)
    for out in tiny_llm.chat([ASK], params, use_tqdm=False):
        for sample in out.outputs:
            assert sample.finish_reason == "stop"
            assert sample.message["reasoning_content"]  # the reasoning stayed free, the answer is the JSON
            jsonschema.validate(json.loads(sample.message["content"]), PERSON_SCHEMA)


@pytest.mark.parametrize(
    "constraint, check",
    [
        ({"regex": r"[0-9]{3}-[a-z]{2}"}, lambda text: re.fullmatch(r"[0-9]{3}-[a-z]{2}", text)),
        ({"choice": ["red", "green", "blue"]}, lambda text: text in ("red", "green", "blue")),
        ({"grammar": 'root ::= "(" [0-9]{1,4} ")"'}, lambda text: re.fullmatch(r"\([0-9]{1,4}\)", text)),
    ],
    ids=["regex", "choice", "gbnf"],
)
def test_constraints_on_plain_completions(tiny_llm, constraint, check):
    params = SamplingParams(
        n=4, temperature=1.0, max_tokens=200, seed=1, structured_outputs=StructuredOutputsParams(**constraint)
    )
    (out,) = tiny_llm.generate(["Nora has 12 coins."], params, use_tqdm=False)
    for sample in out.outputs:
        assert sample.finish_reason == "stop" and check(sample.text), sample.text


def test_unconstrained_rows_are_untouched_by_a_constrained_neighbour(tiny_llm):
    plain = SamplingParams(temperature=0.0, max_tokens=40)
    constrained = SamplingParams(
        temperature=0.0, max_tokens=40, structured_outputs=StructuredOutputsParams(regex="[a-z ]+")
    )
    (alone,) = tiny_llm.generate(["Nora has 12 coins."], plain, use_tqdm=False)
    together = tiny_llm.generate(
        ["Kim has 3 cards.", "Nora has 12 coins.", "Sam has 5 pens."], [constrained, plain, constrained], use_tqdm=False
    )
    assert together[1].outputs[0].token_ids == alone.outputs[0].token_ids
    assert all(re.fullmatch("[a-z ]+", together[i].outputs[0].text) for i in (0, 2))


def test_logit_bias_bans_and_forces_tokens(tiny_llm):
    greedy = SamplingParams(temperature=0.0, max_tokens=1, logprobs=1)
    (out,) = tiny_llm.generate(["Nora has 12 coins."], greedy, use_tqdm=False)
    first = out.outputs[0].token_ids[0]
    banned = SamplingParams(temperature=0.0, max_tokens=1, logprobs=1, logit_bias={first: -100})
    (out,) = tiny_llm.generate(["Nora has 12 coins."], banned, use_tqdm=False)
    sample = out.outputs[0]
    assert sample.token_ids[0] != first
    assert sample.logprobs[0].top[0][0] == first  # reported log-probabilities stay the model's own
    # sampled at temperature 1 from many seeds, a banned token never appears
    sampled = SamplingParams(n=16, temperature=1.0, max_tokens=3, seed=0, logit_bias={first: -100})
    (out,) = tiny_llm.generate(["Nora has 12 coins."], sampled, use_tqdm=False)
    assert all(first not in s.token_ids for s in out.outputs)
    (chosen,) = tiny_llm.tokenizer.encode("x")
    forced = SamplingParams(temperature=0.0, max_tokens=2, logit_bias={chosen: 100})
    (out,) = tiny_llm.generate(["Nora has 12 coins."], forced, use_tqdm=False)
    assert out.outputs[0].token_ids == [chosen, chosen]


def test_grammar_end_wins_over_min_tokens(tiny_llm):
    params = SamplingParams(
        temperature=0.0, max_tokens=20, min_tokens=10, structured_outputs=StructuredOutputsParams(choice=["yes"])
    )
    (out,) = tiny_llm.generate(["Nora has 12 coins."], params, use_tqdm=False)
    assert out.outputs[0].text == "yes" and out.outputs[0].finish_reason == "stop"


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"logit_bias": {0: 101}}, "logit_bias"),
        ({"logit_bias": {-1: 1}}, "logit_bias"),
        ({"ignore_eos": True, "structured_outputs": StructuredOutputsParams(regex="a")}, "ignore_eos"),
    ],
)
def test_sampling_params_refuse_bad_bias_and_endless_constraints(fields, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**fields)


def test_engine_refuses_what_it_cannot_run(tiny_llm):
    from mmx.engine import InvalidRequest

    with pytest.raises(InvalidRequest, match="logit_bias"):
        tiny_llm.engine.validate_request([1, 2], SamplingParams(logit_bias={10**6: 1}))
    with pytest.raises(InvalidRequest, match=r"structured_outputs\.regex"):
        tiny_llm.engine.validate_request([1, 2], SamplingParams(structured_outputs=StructuredOutputsParams(regex="(")))


# ---------------------------------------------------------------------------------------------------- the server
@pytest.fixture(scope="module")
def client(tiny_server):
    return openai.OpenAI(base_url=f"{tiny_server}/v1", api_key="unused", max_retries=0, timeout=300)


def test_sdk_parse_with_a_pydantic_model_validates_for_every_seed(client):
    for seed in SEEDS:
        reply = client.chat.completions.parse(
            model=MODEL, messages=ASK, response_format=Person, temperature=1.0, seed=seed, n=2, max_tokens=400
        )
        for choice in reply.choices:
            assert choice.finish_reason == "stop"
            assert isinstance(choice.message.parsed, Person), choice.message.content
            Person.model_validate_json(choice.message.content)


def test_json_schema_strict_and_json_object(client):
    schema = {"name": "person", "schema": PERSON_SCHEMA, "strict": True}
    for seed in SEEDS:
        reply = client.chat.completions.create(
            model=MODEL,
            messages=ASK,
            response_format={"type": "json_schema", "json_schema": schema},
            temperature=1.0,
            seed=seed,
            max_tokens=400,
        )
        jsonschema.validate(json.loads(reply.choices[0].message.content), PERSON_SCHEMA)
    # any object: mmx-tiny writes keys it never closes, so what it wrote by max_tokens must still be JSON's start
    reply = client.chat.completions.create(
        model=MODEL, messages=ASK, response_format={"type": "json_object"}, temperature=1.0, seed=7, max_tokens=100
    )
    content = reply.choices[0].message.content
    assert content.startswith("{") and _is_json_prefix(content), content
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(content), dict)


@pytest.mark.parametrize(
    "extra, check",
    [
        ({"structured_outputs": {"regex": "[0-9]{2}:[0-9]{2}"}}, lambda t: re.fullmatch("[0-9]{2}:[0-9]{2}", t)),
        ({"guided_regex": "(yes|no), [a-z]{1,8}"}, lambda t: re.fullmatch("(yes|no), [a-z]{1,8}", t)),
        ({"structured_outputs": {"choice": ["cat", "dog"]}}, lambda t: t in ("cat", "dog")),
        ({"guided_choice": ["up", "down"]}, lambda t: t in ("up", "down")),
        ({"guided_json": PERSON_SCHEMA}, lambda t: jsonschema.validate(json.loads(t), PERSON_SCHEMA) is None),
        ({"guided_grammar": 'start: "a"{1,5} "!"'}, lambda t: re.fullmatch("a{1,5}!", t)),
    ],
    ids=["regex", "guided_regex", "choice", "guided_choice", "guided_json", "guided_grammar"],
)
def test_vllm_fields_on_chat_and_completions(client, extra, check):
    chat = client.chat.completions.create(
        model=MODEL, messages=ASK, temperature=1.0, seed=3, max_tokens=300, extra_body=extra
    )
    assert chat.choices[0].finish_reason == "stop" and check(chat.choices[0].message.content)
    completion = client.completions.create(
        model=MODEL, prompt="Nora has", temperature=1.0, seed=3, max_tokens=300, extra_body=extra
    )
    assert completion.choices[0].finish_reason == "stop" and check(completion.choices[0].text)


def test_named_tool_choice_arguments_validate_against_the_tool(client):
    schema = WEATHER["function"]["parameters"]
    for seed in SEEDS:
        reply = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "What will the weather be?"}],
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            temperature=1.0,
            seed=seed,
            max_tokens=300,
        )
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls"
        (call,) = choice.message.tool_calls
        assert call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), schema)


def test_required_tool_choice_calls_an_offered_tool_with_valid_arguments(client):
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for seed in SEEDS:
        reply = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Look something up."}],
            tools=TOOLS,
            tool_choice="required",
            parallel_tool_calls=False,
            temperature=1.0,
            seed=seed,
            max_tokens=300,
        )
        calls = reply.choices[0].message.tool_calls
        assert reply.choices[0].finish_reason == "tool_calls" and len(calls) == 1
        jsonschema.validate(json.loads(calls[0].function.arguments), schemas[calls[0].function.name])


def test_anthropic_output_config_and_forced_tool(tiny_server):
    client = anthropic.Anthropic(base_url=tiny_server, api_key="unused", max_retries=0, timeout=300)
    for seed_text in ("Describe a person.", "Describe someone else."):
        reply = client.messages.create(
            model=MODEL,
            max_tokens=400,
            messages=[{"role": "user", "content": seed_text}],
            extra_body={"output_config": {"format": {"type": "json_schema", "schema": PERSON_SCHEMA}}},
        )
        text = "".join(b.text for b in reply.content if b.type == "text")
        assert reply.stop_reason == "end_turn"
        jsonschema.validate(json.loads(text), PERSON_SCHEMA)
    reply = client.messages.create(
        model=MODEL,
        max_tokens=300,
        messages=[{"role": "user", "content": "Weather?"}],
        tools=[{"name": "get_weather", "input_schema": WEATHER["function"]["parameters"]}],
        tool_choice={"type": "tool", "name": "get_weather"},
    )
    (use,) = [b for b in reply.content if b.type == "tool_use"]
    jsonschema.validate(use.input, WEATHER["function"]["parameters"])


def test_logit_bias_through_the_server(client):
    def first_token(**extra) -> int:
        reply = client.chat.completions.create(
            model=MODEL, messages=ASK, temperature=0.0, max_tokens=1, extra_body={"return_token_ids": True, **extra}
        )
        return reply.choices[0].model_extra["token_ids"][0]

    greedy = first_token()
    assert first_token(logit_bias={str(greedy): -100}) != greedy


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
        ({"structured_outputs": {"structural_tag": {"x": 1}}}, "structured_outputs.structural_tag"),
        ({"structured_outputs": {"regex": "a(("}}, "structured_outputs"),
        ({"guided_grammar": "start: foo("}, "guided_grammar"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": 3}}}, "response_format"),
        ({"response_format": {"type": "yaml"}}, "response_format.type"),
        ({"guided_json": {"type": "object"}, "ignore_eos": True}, "ignore_eos"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"logit_bias": {"5": -101}}, "logit_bias"),
        (
            {
                "tools": TOOLS,
                "tool_choice": "required",
                "response_format": {"type": "json_object"},
            },
            "response_format",
        ),
    ],
)
def test_refusals_name_the_field(tiny_server, fields, param):
    body = {"model": MODEL, "messages": ASK, "max_tokens": 5, **fields}
    r = httpx.post(f"{tiny_server}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text


def test_out_of_vocabulary_bias_and_bad_anthropic_format_are_refused(tiny_server):
    r = httpx.post(
        f"{tiny_server}/v1/chat/completions",
        json={"model": MODEL, "messages": ASK, "max_tokens": 5, "logit_bias": {"1000000": 5}},
        timeout=60,
    )
    assert r.status_code == 400 and "logit_bias" in r.json()["error"]["message"]
    for fields in ({"output_config": {"format": {"type": "yaml"}}}, {"output_config": {"effort": "high"}}):
        r = httpx.post(
            f"{tiny_server}/v1/messages",
            json={"model": MODEL, "max_tokens": 5, "messages": ASK, **fields},
            timeout=60,
        )
        assert r.status_code == 400 and "output_config" in r.json()["error"]["message"], r.text
