"""POST /v1/responses through the real openai SDK against a real `mmx serve` of mmx-tiny: text, streaming (the
standard event sequence, adding up to the final response), the calculator round trip (function_call ->
function_call_output -> answer) with and without previous_response_id, and the fields it refuses. The chat completions
route on the same server is the reference: the same conversation gives the same prompt and the same greedy reply."""

from __future__ import annotations

import json
from collections import defaultdict

import pytest

openai = pytest.importorskip("openai")

from mmx.tasks.arithmetic import CALCULATOR_TOOL, SYSTEM_PROMPT, calculate  # noqa: E402

MODEL = "mmx-tiny"
PROBLEM = (
    "Sara has 40 coins. Sara finds 25 more. Sara buys 3 bags with 6 coins in each. How many coins does Sara have now?"
)
TOOL = {"type": "function", **CALCULATOR_TOOL["function"]}  # the Responses API's flat tool shape
DELTAS = ("response.output_text.delta", "response.reasoning_text.delta", "response.function_call_arguments.delta")
GREEDY = {"model": MODEL, "instructions": SYSTEM_PROMPT, "temperature": 0, "max_output_tokens": 192}


@pytest.fixture(scope="module")
def client(tiny_server):
    return openai.OpenAI(base_url=f"{tiny_server}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def first(client):
    """The model's first turn on the problem: its reasoning, then a calculator call."""
    return client.responses.create(**GREEDY, input=PROBLEM, tools=[TOOL])


def _shape(output) -> list[tuple]:
    """Output items without their random ids."""
    out = []
    for item in output:
        if item.type == "reasoning":
            out.append(("reasoning", "".join(c.text for c in item.content), item.status))
        elif item.type == "message":
            out.append(("message", "".join(c.text for c in item.content), item.status))
        else:
            out.append(("function_call", item.name, item.arguments, item.status))
    return out


def _check_events(events) -> dict[int, str]:
    """The standard event sequence: created and in_progress first, one terminal event last, sequence numbers in
    order, every item added before its deltas and done after them, items one after another, and each done event
    carrying exactly what its deltas added up to. Returns the streamed text (or arguments) per output index."""
    types = [e.type for e in events]
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[-1] in ("response.completed", "response.incomplete") and types.count(types[-1]) == 1
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].response
    streamed: dict[int, str] = defaultdict(str)
    open_index, closed = None, []
    for e in events[2:-1]:
        if e.type == "response.output_item.added":
            assert open_index is None and e.output_index == len(closed) and e.item.status == "in_progress"
            open_index = e.output_index
            continue
        assert e.output_index == open_index, f"{e.type} for item {e.output_index} while {open_index} is open"
        if e.type in DELTAS:
            streamed[e.output_index] += e.delta
        elif e.type in ("response.output_text.done", "response.reasoning_text.done"):
            assert e.text == streamed[e.output_index]
        elif e.type == "response.function_call_arguments.done":
            assert e.arguments == streamed[e.output_index]
        elif e.type == "response.output_item.done":
            assert e.item == final.output[e.output_index]
            closed.append(open_index)
            open_index = None
        else:
            assert e.type in ("response.content_part.added", "response.content_part.done"), e.type
    assert open_index is None and len(closed) == len(final.output)
    return streamed


def test_text_matches_chat_completions_of_the_same_conversation(client):
    response = client.responses.create(**GREEDY, input="Sara has 12 apples. How many apples does Sara have?")
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": "Sara has 12 apples. How many apples does Sara have?"},
        ],
        temperature=0,
        max_tokens=192,
    )
    message = chat.choices[0].message
    assert response.status == "completed" and response.object == "response" and response.id.startswith("resp_")
    assert [o.type for o in response.output] == ["reasoning", "message"]
    assert response.output[0].content[0].text == message.reasoning_content
    assert response.output_text == message.content and response.output_text
    usage = response.usage
    assert usage.input_tokens == chat.usage.prompt_tokens
    assert usage.output_tokens == chat.usage.completion_tokens
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert 0 < usage.output_tokens_details.reasoning_tokens < usage.output_tokens
    assert 0 <= usage.input_tokens_details.cached_tokens < usage.input_tokens
    # the same prompt again: all of it but its last token comes from the prefix cache
    assert chat.usage.prompt_tokens_details.cached_tokens == chat.usage.prompt_tokens - 1


def test_function_call_round_trip_with_previous_response_id(client, first):
    assert [o.type for o in first.output] == ["reasoning", "function_call"]
    assert "Sara starts with 40" in first.output[0].content[0].text
    call = first.output[1]
    assert call.name == "calculator" and call.call_id.startswith("call_") and call.id.startswith("fc_")
    expression = json.loads(call.arguments)["expression"]
    assert calculate(expression) == "83"
    result = {"type": "function_call_output", "call_id": call.call_id, "output": calculate(expression)}
    answer = client.responses.create(**GREEDY, tools=[TOOL], previous_response_id=first.id, input=[result])
    assert answer.status == "completed" and "83" in answer.output_text
    assert answer.previous_response_id == first.id
    # the reference: the same conversation through chat completions (the reasoning sent back, as interleaved
    # thinking needs), with the call in the chat shape
    chat = client.chat.completions.create(
        model=MODEL,
        temperature=0,
        max_tokens=192,
        tools=[CALCULATOR_TOOL],
        messages=[
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": PROBLEM},
            {
                "role": "assistant",
                "content": "",
                "reasoning_content": first.output[0].content[0].text,
                "tool_calls": [
                    {
                        "id": call.call_id,
                        "type": "function",
                        "function": {"name": call.name, "arguments": call.arguments},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": call.call_id, "content": "83"},
        ],
    )
    assert answer.output_text == chat.choices[0].message.content
    assert answer.usage.input_tokens == chat.usage.prompt_tokens


def test_the_same_turn_without_server_state(client, first):
    """Items sent back in full (store=false clients such as Codex): the same answer as with previous_response_id;
    a reasoning item carried only as mmx's encrypted_content reads back the same."""
    call = first.output[1]
    result = {"type": "function_call_output", "call_id": call.call_id, "output": "83"}
    items = [o.model_dump(exclude_none=True) for o in first.output]
    stateless = client.responses.create(
        **GREEDY, tools=[TOOL], store=False, input=[{"role": "user", "content": PROBLEM}, *items, result]
    )
    with_state = client.responses.create(**GREEDY, tools=[TOOL], previous_response_id=first.id, input=[result])
    assert stateless.output_text == with_state.output_text
    assert stateless.usage.input_tokens == with_state.usage.input_tokens

    opaque = client.responses.create(
        **GREEDY, input=PROBLEM, tools=[TOOL], store=False, include=["reasoning.encrypted_content"]
    )
    reasoning = opaque.output[0]
    assert reasoning.type == "reasoning" and reasoning.encrypted_content
    assert reasoning.encrypted_content != reasoning.content[0].text  # opaque, not the text itself
    sent_back = [
        {"type": "reasoning", "id": reasoning.id, "summary": [], "encrypted_content": reasoning.encrypted_content},
        *[o.model_dump(exclude_none=True) for o in opaque.output[1:]],
    ]
    again = client.responses.create(
        **GREEDY, tools=[TOOL], input=[{"role": "user", "content": PROBLEM}, *sent_back, result]
    )
    assert again.output_text == with_state.output_text
    with pytest.raises(openai.NotFoundError) as e:  # store=false kept nothing to continue from
        client.responses.create(**GREEDY, input="next", previous_response_id=opaque.id)
    assert e.value.body["param"] == "previous_response_id"
    forged = {"type": "reasoning", "summary": [], "encrypted_content": "gAAAAB-not-ours"}
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(**GREEDY, input=[{"role": "user", "content": "hi"}, forged])
    assert e.value.body["param"] == "input.1.encrypted_content"


def test_streaming_is_the_standard_event_sequence_and_adds_up(client, first):
    events = list(client.responses.create(**GREEDY, input=PROBLEM, tools=[TOOL], stream=True))
    streamed = _check_events(events)
    final = events[-1].response
    assert final.status == "completed" and _shape(final.output) == _shape(first.output)
    details = {"input_tokens_details"}  # the repeat reads the prompt's cache
    assert final.usage.model_dump(exclude=details) == first.usage.model_dump(exclude=details)
    assert final.usage.input_tokens_details.cached_tokens == final.usage.input_tokens - 1
    assert streamed[0] == first.output[0].content[0].text and streamed[1] == first.output[1].arguments
    types = [e.type for e in events]
    assert "response.reasoning_text.delta" in types and "response.function_call_arguments.delta" in types
    added = [e.item for e in events if e.type == "response.output_item.added"]
    assert added[1].type == "function_call" and added[1].name == "calculator" and added[1].arguments == ""
    # the answer turn streams a message; the SDK's stream helper accumulates it into the final response
    result = {"type": "function_call_output", "call_id": first.output[1].call_id, "output": "83"}
    turn = dict(GREEDY, tools=[TOOL], previous_response_id=first.id, input=[result])
    answer_events = list(client.responses.create(**turn, stream=True))
    streamed = _check_events(answer_events)
    answer = client.responses.create(**turn)
    message_index = [o.type for o in answer.output].index("message")
    assert streamed[message_index] == answer.output_text and "response.output_text.delta" in [
        e.type for e in answer_events
    ]
    with client.responses.stream(**turn) as stream:
        assert stream.get_final_response().output_text == answer.output_text


def test_max_output_tokens_cuts_the_response_as_incomplete(client):
    cut = client.responses.create(**{**GREEDY, "max_output_tokens": 5}, input=PROBLEM)
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"
    assert cut.usage.output_tokens == 5 and cut.output[-1].status == "incomplete"
    events = list(client.responses.create(**{**GREEDY, "max_output_tokens": 5}, input=PROBLEM, stream=True))
    _check_events(events)
    assert events[-1].type == "response.incomplete" and _shape(events[-1].response.output) == _shape(cut.output)


def test_tool_choice_forces_a_call_and_reasoning_effort_none_skips_thinking(client):
    forced = client.responses.create(
        **GREEDY, input="Say hello.", tools=[TOOL], tool_choice={"type": "function", "name": "calculator"}
    )
    assert [o.type for o in forced.output] == ["function_call"] and forced.output[0].name == "calculator"
    allowed = client.responses.create(
        **GREEDY,
        input="Say hello.",
        tools=[TOOL],
        tool_choice={
            "type": "allowed_tools",
            "mode": "required",
            "tools": [{"type": "function", "name": "calculator"}],
        },
    )
    assert [o.type for o in allowed.output] == ["function_call"]
    quiet = client.responses.create(**GREEDY, input="Sara has 12 apples.", reasoning={"effort": "none"})
    assert "reasoning" not in [o.type for o in quiet.output] and quiet.usage.output_tokens_details.reasoning_tokens == 0
    assert quiet.reasoning.effort == "none"


def test_text_format_json_schema_holds_the_answer_to_the_schema(client):
    # bounded values: a free integer lets a tiny model write digits until the length limit
    schema = {
        "type": "object",
        "properties": {"coins": {"enum": [18, 65, 83]}, "unit": {"enum": ["coins", "bags"]}},
        "required": ["coins", "unit"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "name": "answer", "schema": schema, "strict": True}
    for seed in range(3):
        response = client.responses.create(
            **{**GREEDY, "temperature": 1.0}, input=PROBLEM, text={"format": fmt}, extra_body={"seed": seed}
        )
        answer = json.loads(response.output_text)
        assert response.status == "completed" and set(answer) == {"coins", "unit"}
        assert answer["coins"] in (18, 65, 83) and answer["unit"] in ("coins", "bags")
        assert response.text.format.type == "json_schema"
        assert [o.type for o in response.output] == ["reasoning", "message"]  # the constraint starts after it


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"background": True}, "background"),
        ({"tools": [{"type": "web_search"}]}, "tools.0.type"),
        ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
        (
            {"text": {"format": {"type": "json_object"}}, "extra_body": {"structured_outputs": {"regex": "a+"}}},
            "structured_outputs",
        ),
        ({"reasoning": {"effort": "high"}}, "reasoning.effort"),
        ({"truncation": "auto"}, "truncation"),
        ({"include": ["message.output_text.logprobs"]}, "include"),
        ({"input": [{"type": "web_search_call", "id": "ws_1"}]}, "input.0"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input.0.content.0"),
        ({"extra_body": {"n": 2}}, "n"),
        ({"extra_body": {"frobnicate": 1}}, "frobnicate"),
        ({"tool_choice": {"type": "function", "name": "calculator"}}, "tool_choice"),  # no such tool offered
    ],
)
def test_fields_that_would_change_the_result_are_refused_by_name(client, fields, param):
    request = {"model": MODEL, "input": "hi", "max_output_tokens": 4, **fields}
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(**request)
    assert e.value.status_code == 400 and e.value.body["param"] == param
    assert e.value.body["type"] == "invalid_request_error" and e.value.body["message"]


def test_unknown_model_and_unknown_previous_response_are_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.create(model="gpt-9", input="hi")
    assert e.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.create(model=MODEL, input="hi", previous_response_id="resp_never")
    assert e.value.body["param"] == "previous_response_id" and "resp_never" in e.value.body["message"]


def test_the_response_store_keeps_the_most_recently_used():
    from mmx.serve.chat import RequestError
    from mmx.serve.responses_api import ResponseStore, StoredResponse

    store = ResponseStore(capacity=2)
    for name in ("a", "b"):
        store.put(name, StoredResponse([], {"id": name}))
    store.get("a")  # continued: now the most recent
    store.put("c", StoredResponse([], {"id": "c"}))
    assert len(store) == 2 and store.get("a").response["id"] == "a" and store.get("c").response["id"] == "c"
    with pytest.raises(RequestError) as e:
        store.get("b")
    assert e.value.status == 404 and e.value.param == "previous_response_id"
