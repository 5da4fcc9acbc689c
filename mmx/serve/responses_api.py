"""OpenAI's Responses API: ``POST /v1/responses`` (``client.responses.create``, Codex CLI, ``litellm.responses``).

A request is turned into the chat conversation the other routes render (input items -> messages, flat function
tools -> chat tools) and runs on the same path as ``/v1/chat/completions`` (:func:`prepare_chat_async`,
:func:`constrain_chat`, :func:`start_run`, :func:`follow`); ``text.format`` JSON is held by the same constrained
decoding as the chat route's ``response_format``. Replies come back as output items, in the order the model wrote them:
``reasoning`` (the model's thinking, as ``reasoning_text``), ``message`` (``output_text``) and ``function_call``.
One :class:`OutputItems` turns a reply's events into those items for both the streamed response (its events are
the API's standard sequence) and the non-streamed one, so the two always agree.

Finished responses are kept in memory (:class:`ResponseStore`, the most recent ones) for ``previous_response_id``;
``store: false`` keeps nothing. With ``include: ["reasoning.encrypted_content"]`` a reasoning item also carries its
text in an opaque field, for clients that keep no server-side state and send the items back.
"""

from __future__ import annotations

import base64
import binascii
import copy
import json
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import TypeAdapter

from mmx.chat.reasoning import THINK_CLOSE
from mmx.chat.reply import ContentDelta, Finish, ReasoningDelta, ReplyEvent, ReplyStream, ToolCallArgs, ToolCallStart
from mmx.engine.structured import StructuredOutputsParams
from mmx.serve.chat import (
    RequestError,
    Run,
    Thinking,
    follow,
    prepare_chat_async,
    run_all_unless_disconnected,
    start_run,
)
from mmx.serve.openai_api import check_model, sampling_params
from mmx.serve.responses_protocol import (
    ENCRYPTED_REASONING,
    FunctionCallItem,
    FunctionCallOutputItem,
    InputItem,
    MessageItem,
    ReasoningItem,
    ResponsesRequest,
    ToolChoiceAllowed,
    ToolChoiceFunction,
    text_of,
)
from mmx.serve.structured_requests import RequestedConstraint, constrain_chat, openai_constraint

router = APIRouter()

_ITEMS = TypeAdapter(list[InputItem])
_ENCRYPTED_PREFIX = "mmx1:"  # mmx's opaque reasoning: the text, base64; not a secret, only not meant to be read


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


# ---------------------------------------------------------------------------------------------------- the store
@dataclass
class StoredResponse:
    items: list[Any]  # the conversation so far as input items: every input, then this response's output
    response: dict[str, Any]


class ResponseStore:
    """The most recent finished responses, for ``previous_response_id``: an LRU of ``capacity`` entries (a
    response that is continued counts as used)."""

    def __init__(self, capacity: int = 1000):
        self.capacity = capacity
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, response_id: str, entry: StoredResponse) -> None:
        self._entries[response_id] = entry
        self._entries.move_to_end(response_id)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def get(self, response_id: str) -> StoredResponse:
        entry = self._entries.get(response_id)
        if entry is None:
            raise RequestError(
                f"no stored response {response_id!r}: it was never stored (store: false), or it is older than the "
                f"{self.capacity} responses this server keeps in memory",
                "previous_response_id",
                status=404,
            )
        self._entries.move_to_end(response_id)
        return entry


# ---------------------------------------------------------------------------------------------------- input
def opaque_reasoning(text: str) -> str:
    """A reasoning item's ``encrypted_content``: its text, for clients that keep no state and send items back."""
    return _ENCRYPTED_PREFIX + base64.b64encode(text.encode("utf-8")).decode("ascii")


def _reasoning_from_opaque(blob: str, param: str) -> str:
    try:
        if not blob.startswith(_ENCRYPTED_PREFIX):
            raise ValueError
        return base64.b64decode(blob.removeprefix(_ENCRYPTED_PREFIX), validate=True).decode("utf-8")
    except (ValueError, binascii.Error):
        raise RequestError("encrypted_content was not produced by this server", param) from None


def _reasoning_text(item: ReasoningItem, param: str) -> str:
    if item.content:
        return "".join(part.text for part in item.content)
    if item.encrypted_content is not None:
        return _reasoning_from_opaque(item.encrypted_content, f"{param}.encrypted_content")
    return "".join(part.text for part in item.summary)


def to_messages(items: list[Any], stored: int = 0) -> list[dict[str, Any]]:
    """Input items as the chat conversation the templates render. Consecutive assistant items (reasoning, an
    assistant message, function calls) make one assistant turn; a reasoning item after that turn's text or calls
    starts the next one. ``stored``: how many leading items come from a previous response (errors name the
    request's own items by their place in its ``input``)."""
    messages: list[dict[str, Any]] = []
    turn: dict[str, Any] | None = None

    def assistant_turn() -> dict[str, Any]:
        nonlocal turn
        if turn is None:
            turn = {"role": "assistant", "content": ""}
            messages.append(turn)
        return turn

    for i, item in enumerate(items):
        if isinstance(item, ReasoningItem):
            if turn is not None and (turn["content"] or turn.get("tool_calls")):
                turn = None
            current = assistant_turn()
            text = _reasoning_text(item, f"input.{i - stored}")
            current["reasoning_content"] = current.get("reasoning_content", "") + text
        elif isinstance(item, FunctionCallItem):
            call = {
                "id": item.call_id,
                "type": "function",
                "function": {"name": item.name, "arguments": item.arguments},
            }
            assistant_turn().setdefault("tool_calls", []).append(call)
        elif isinstance(item, MessageItem) and item.role == "assistant":
            assistant_turn()["content"] += text_of(item.content)
        elif isinstance(item, FunctionCallOutputItem):
            turn = None
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": text_of(item.output)})
        else:
            turn = None
            messages.append({"role": item.role, "content": text_of(item.content)})
    return messages


def _input_items(body: ResponsesRequest) -> list[Any]:
    if isinstance(body.input, str):
        return [MessageItem(role="user", content=body.input)]
    return list(body.input)


def _tools(body: ResponsesRequest) -> tuple[list[dict[str, Any]] | None, str]:
    """(the chat tools offered, the chat tool_choice: "none", "auto", "required" or a tool's name)."""
    tools = body.tools or []
    choice = body.tool_choice
    if isinstance(choice, ToolChoiceAllowed):
        allowed = {t.name for t in choice.tools}
        tools, mode = [t for t in tools if t.name in allowed], choice.mode
    elif isinstance(choice, ToolChoiceFunction):
        mode = choice.name
    else:
        mode = choice or "auto"
    if not tools:
        return None, "none"
    return [t.as_chat_tool() for t in tools], mode


def _constraint(body: ResponsesRequest) -> RequestedConstraint | None:
    """What the reply is held to: ``text.format`` (a JSON object, or JSON under a schema), or vLLM's
    ``structured_outputs`` / ``guided_*`` as on the chat route; at most one of them."""
    fmt = body.text.format if body.text else None
    requested = None
    if fmt is not None and fmt.type != "text":
        kind = {"json": fmt.json_schema} if fmt.type == "json_schema" else {"json_object": True}
        try:
            requested = RequestedConstraint(StructuredOutputsParams(**kind), "text.format")
        except ValueError as e:
            raise RequestError(f"text.format: {e}", "text.format") from None
    other = openai_constraint(body)
    if requested is not None and other is not None:
        raise RequestError(f"text.format and {other.field} both constrain the reply; send one", other.field)
    return requested or other


# ---------------------------------------------------------------------------------------------------- output
class OutputItems:
    """A reply's events as Responses output items, in the order the model wrote them, and the stream events that
    build them (dicts with ``type``; the writer numbers them). An item is closed when the next one begins or the
    reply ends; the item open when the reply is cut by the length limit ends ``incomplete``."""

    def __init__(self, encrypted_reasoning: bool = False):
        self.items: list[dict[str, Any]] = []
        self.encrypted_reasoning = encrypted_reasoning
        self._open: dict[str, Any] | None = None
        self._call_items: dict[int, int] = {}  # the reply's tool-call index -> output index

    def feed(self, ev: ReplyEvent) -> list[dict[str, Any]]:
        if isinstance(ev, ReasoningDelta):
            return self._text("reasoning", ev.text) if ev.text else []
        if isinstance(ev, ContentDelta):
            return self._text("message", ev.text) if ev.text else []
        if isinstance(ev, ToolCallStart):
            item = {"id": _new_id("fc"), "type": "function_call", "call_id": ev.id, "name": ev.name, "arguments": ""}
            events = self._begin(item)
            self._call_items[ev.index] = len(self.items) - 1
            return events
        if isinstance(ev, ToolCallArgs):
            index = self._call_items[ev.index]
            self.items[index]["arguments"] += ev.text
            return [self._at(index, "response.function_call_arguments.delta", delta=ev.text)]
        if isinstance(ev, Finish):
            return self.close("incomplete" if ev.reason == "length" else "completed")
        raise TypeError(f"unknown reply event {ev!r}")

    def close(self, status: str = "completed") -> list[dict[str, Any]]:
        """End the open item (if any) with ``status``."""
        item, self._open = self._open, None
        if item is None:
            return []
        index = len(self.items) - 1
        item["status"] = status
        events: list[dict[str, Any]] = []
        if item["type"] == "function_call":
            events.append(self._at(index, "response.function_call_arguments.done", arguments=item["arguments"]))
        else:
            part = item["content"][0]
            kind = "reasoning_text" if item["type"] == "reasoning" else "output_text"
            extra = {} if kind == "reasoning_text" else {"logprobs": []}
            events.append(self._at(index, f"response.{kind}.done", content_index=0, text=part["text"], **extra))
            events.append(self._at(index, "response.content_part.done", content_index=0, part=copy.deepcopy(part)))
            if item["type"] == "reasoning" and self.encrypted_reasoning:
                item["encrypted_content"] = opaque_reasoning(part["text"])
        events.append({"type": "response.output_item.done", "output_index": index, "item": copy.deepcopy(item)})
        return events

    def _text(self, kind: str, text: str) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        if self._open is None or self._open["type"] != kind:
            if kind == "reasoning":
                item = {"id": _new_id("rs"), "type": "reasoning", "summary": [], "content": []}
                part = {"type": "reasoning_text", "text": ""}
            else:
                item = {"id": _new_id("msg"), "type": "message", "role": "assistant", "content": []}
                part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            events += self._begin(item)
            item["content"].append(part)
            index = len(self.items) - 1
            events.append(self._at(index, "response.content_part.added", content_index=0, part=copy.deepcopy(part)))
        index = len(self.items) - 1
        self.items[index]["content"][0]["text"] += text
        name = "response.reasoning_text.delta" if kind == "reasoning" else "response.output_text.delta"
        extra = {} if kind == "reasoning" else {"logprobs": []}
        return [*events, self._at(index, name, content_index=0, delta=text, **extra)]

    def _begin(self, item: dict[str, Any]) -> list[dict[str, Any]]:
        events = self.close()
        item["status"] = "in_progress"
        self.items.append(item)
        self._open = item
        return [
            *events,
            {"type": "response.output_item.added", "output_index": len(self.items) - 1, "item": copy.deepcopy(item)},
        ]

    def _at(self, index: int, kind: str, **fields: Any) -> dict[str, Any]:
        return {"type": kind, "item_id": self.items[index]["id"], "output_index": index, **fields}


class _Recorded:
    """A reply stream that keeps the events it hands out, so that a non-streamed response is built from the same
    events, by the same :class:`OutputItems`, as a streamed one. Everything else is the stream's."""

    def __init__(self, stream: ReplyStream):
        self._stream = stream
        self.events: list[ReplyEvent] = []

    def feed(self, *args: Any, **kwargs: Any) -> list[ReplyEvent]:
        events = self._stream.feed(*args, **kwargs)
        self.events += events
        return events

    def finish(self, *args: Any, **kwargs: Any) -> list[ReplyEvent]:
        events = self._stream.finish(*args, **kwargs)
        self.events += events
        return events

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def reasoning_tokens(tokenizer, stream: ReplyStream) -> int:
    """Generated tokens up to and including the one that closes the reasoning (all of them when the reply never
    left its reasoning); 0 for a reply without reasoning."""
    if not stream.message()["reasoning_content"]:  # none, or closed before it began (thinking off, a forced call)
        return 0
    close = tokenizer.token_to_id(THINK_CLOSE)
    ids = stream.token_ids
    return ids.index(close) + 1 if close in ids else len(ids)


@dataclass
class _Context:
    """What a response is built from besides its output."""

    state: Any
    body: ResponsesRequest
    run: Run
    stream: ReplyStream
    items: list[Any]  # the conversation's input items (previous response's included)


def _response(ctx: _Context, status: str, output: list[dict[str, Any]], usage: dict | None = None, error=None):
    body = ctx.body
    reasoning = body.reasoning
    return {
        "id": ctx.run.request_id,
        "object": "response",
        "created_at": ctx.run.created,
        "completed_at": int(time.time()) if status == "completed" else None,
        "status": status,
        "error": error,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens,
        "model": ctx.state.model_name,
        "output": output,
        "parallel_tool_calls": body.parallel_tool_calls,
        "previous_response_id": body.previous_response_id,
        "reasoning": {"effort": reasoning.effort, "summary": reasoning.summary} if reasoning else None,
        "store": body.store,
        "temperature": 1.0 if body.temperature is None else body.temperature,
        "top_p": 1.0 if body.top_p is None else body.top_p,
        "text": {"format": body.text.format.model_dump(by_alias=True, exclude_none=True)}
        if body.text and body.text.format
        else {"format": {"type": "text"}},
        "tool_choice": _echo_choice(body),
        "tools": [t.model_dump(exclude_none=True) for t in body.tools or []],
        "truncation": "disabled",
        "background": False,
        "usage": usage,
        "user": body.user,
        "metadata": body.metadata or {},
    }


def _echo_choice(body: ResponsesRequest) -> Any:
    choice = body.tool_choice
    return choice.model_dump() if hasattr(choice, "model_dump") else choice or "auto"


def _usage(ctx: _Context) -> dict[str, Any]:
    prompt, generated = len(ctx.run.prompt_ids), ctx.run.completion_tokens
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": ctx.run.cached_tokens, "cache_write_tokens": 0},
        "output_tokens": generated,
        "output_tokens_details": {"reasoning_tokens": reasoning_tokens(ctx.state.tokenizer, ctx.stream)},
        "total_tokens": prompt + generated,
    }


def _finished(ctx: _Context, output: list[dict[str, Any]]) -> dict[str, Any]:
    """The finished response; stored for ``previous_response_id`` unless ``store`` is false."""
    reason = ctx.stream.finish_reason
    if reason in ("abort", "error"):
        error = {"code": "server_error", "message": f"generation ended early ({reason})"}
        return _response(ctx, "failed", output, _usage(ctx), error)
    response = _response(ctx, "incomplete" if reason == "length" else "completed", output, _usage(ctx))
    if ctx.body.store:
        ctx.state.responses.put(response["id"], StoredResponse(ctx.items + _ITEMS.validate_python(output), response))
    return response


# ---------------------------------------------------------------------------------------------------- the route
@router.post("/v1/responses")
async def create_response(body: ResponsesRequest, request: Request):
    state = request.app.state.mmx
    check_model(state, body.model)
    previous = state.responses.get(body.previous_response_id).items if body.previous_response_id else []
    items = previous + _input_items(body)
    # instructions belong to one response: a previous response's are not carried over (as OpenAI does)
    system = [{"role": "system", "content": body.instructions}] if body.instructions else []
    messages = system + to_messages(items, stored=len(previous))
    tools, tool_choice = _tools(body)
    effort = body.reasoning.effort if body.reasoning else None
    prepared = await prepare_chat_async(
        state.tokenizer,
        state.chat,
        messages,
        sampling_params(body, body.max_output_tokens, None),
        tools=tools,
        tool_choice=tool_choice,
        max_model_len=state.max_model_len,
        thinking=Thinking(enabled=False) if effort == "none" else None,
        parallel_tool_calls=body.parallel_tool_calls,
    )
    constrain_chat(
        prepared,
        _constraint(body),
        tokenizer=state.tokenizer,
        format=state.chat.format,
        tool_choice=tool_choice,
        parallel_tool_calls=body.parallel_tool_calls,
    )
    (stream,) = prepared.reply_streams(state.tokenizer, state.chat)
    recorded = _Recorded(stream)
    run = start_run(state.engine, prepared.prompt_ids, prepared.params, _new_id("resp"), [recorded])
    ctx = _Context(state, body, run, stream, items)
    encrypted = ENCRYPTED_REASONING in (body.include or [])
    state.metrics.request_started("responses")
    if body.stream:
        return StreamingResponse(_stream(ctx, OutputItems(encrypted)), media_type="text/event-stream")
    start = time.perf_counter()
    await run_all_unless_disconnected(request, state.engine, [run])
    state.metrics.request_finished("responses", time.perf_counter() - start)
    output = OutputItems(encrypted)
    for ev in recorded.events:
        output.feed(ev)
    output.close()
    return _finished(ctx, output.items)


async def _stream(ctx: _Context, output: OutputItems) -> AsyncIterator[str]:
    state = ctx.state
    sequence = 0

    def event(payload: dict[str, Any]) -> str:
        nonlocal sequence
        payload = {**payload, "sequence_number": sequence}
        sequence += 1
        return f"event: {payload['type']}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n"

    start = time.perf_counter()
    started = _response(ctx, "in_progress", [])
    yield event({"type": "response.created", "response": started})
    yield event({"type": "response.in_progress", "response": started})
    first = True
    try:
        async for _, reply_events, _ in follow(state.engine, ctx.run):
            if first:
                state.metrics.first_token(time.perf_counter() - start)
                first = False
            for ev in reply_events:
                for payload in output.feed(ev):
                    yield event(payload)
        for payload in output.close():
            yield event(payload)
        response = _finished(ctx, output.items)
        kind = {"completed": "response.completed", "incomplete": "response.incomplete"}.get(
            response["status"], "response.failed"
        )
        yield event({"type": kind, "response": response})
        state.metrics.request_finished("responses", time.perf_counter() - start)
    except (RequestError, ValueError, RuntimeError) as e:
        state.metrics.request_failed("responses")
        yield event({"type": "error", "code": "server_error", "message": str(e), "param": None})
        failed = _response(ctx, "failed", output.items, error={"code": "server_error", "message": str(e)})
        yield event({"type": "response.failed", "response": failed})
