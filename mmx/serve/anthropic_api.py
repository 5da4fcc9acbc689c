"""Anthropic-compatible route: POST /v1/messages (MiniMax recommends this API for M2's interleaved thinking).

Thinking blocks carry the reasoning both ways: a response's reasoning comes back as a ``thinking`` block, and
``thinking`` blocks sent in assistant turns are rendered back into the prompt.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from mmx.chat.formats import tool_call_id_for
from mmx.chat.reply import ContentDelta, Finish, ReasoningDelta, ToolCallArgs, ToolCallStart
from mmx.engine.sampling_params import SamplingParams
from mmx.serve.chat import (
    PreparedChat,
    RequestError,
    Run,
    Thinking,
    follow,
    prepare_chat_async,
    run_all_unless_disconnected,
    start_run,
)
from mmx.serve.protocol import AnthropicCountTokensRequest, AnthropicMessagesRequest
from mmx.serve.structured_requests import anthropic_constraint, constrain_chat

router = APIRouter()


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(b.get("text", "") for b in content or [] if b.get("type") == "text")


def to_openai(body: AnthropicMessagesRequest) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None, str]:
    """Anthropic messages as the OpenAI-style conversation the templates read: (messages, tools, tool_choice)."""
    messages: list[dict[str, Any]] = []
    if body.system:
        messages.append({"role": "system", "content": _text_of(body.system)})
    for m in body.messages:
        if isinstance(m.content, str):
            messages.append({"role": m.role, "content": m.content})
            continue
        if m.role == "user":
            texts = []
            for block in m.content:
                if block["type"] == "tool_result":
                    result = _text_of(block.get("content"))
                    if block.get("is_error"):
                        result = f"Error: {result}"
                    messages.append({"role": "tool", "tool_call_id": block.get("tool_use_id"), "content": result})
                elif block["type"] == "text":
                    texts.append(block["text"])
            if texts:
                messages.append({"role": "user", "content": "".join(texts)})
        else:
            reasoning = "".join(b.get("thinking", "") for b in m.content if b["type"] == "thinking")
            calls = [
                {
                    "id": b.get("id"),
                    "type": "function",
                    "function": {"name": b["name"], "arguments": b.get("input") or {}},
                }
                for b in m.content
                if b["type"] == "tool_use"
            ]
            message: dict[str, Any] = {"role": "assistant", "content": _text_of(m.content)}
            if reasoning:
                message["reasoning_content"] = reasoning
            if calls:
                message["tool_calls"] = calls
            messages.append(message)
    tools = None
    if body.tools:
        tools = [
            {
                "type": "function",
                "function": {"name": t.name, "description": t.description or "", "parameters": t.input_schema},
            }
            for t in body.tools
        ]
    choice = (body.tool_choice or {}).get("type", "auto")
    tool_choice = {"auto": "auto", "any": "required", "none": "none"}.get(choice) or body.tool_choice["name"]
    return messages, tools, tool_choice if tools else "none"


def _stop(reason: str, stop_reason) -> tuple[str, str | None]:
    if reason == "tool_calls":
        return "tool_use", None
    if reason == "length":
        return "max_tokens", None
    if isinstance(stop_reason, str):
        return "stop_sequence", stop_reason
    return "end_turn", None


async def _prepare(state, body: AnthropicMessagesRequest) -> PreparedChat:
    """The request rendered into its prompt: what /v1/messages runs and /v1/messages/count_tokens counts."""
    if body.model != state.model_name:
        raise RequestError(f"model {body.model!r} not found; this server serves {state.model_name!r}", "model", 404)
    try:
        params = SamplingParams(
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=body.top_p or 1.0,
            top_k=body.top_k or 0,
            max_tokens=body.max_tokens,
            stop=body.stop_sequences or [],
        )
    except ValueError as e:
        raise RequestError(str(e)) from e
    conversation, tools, tool_choice = to_openai(body)
    # a final assistant message is a prefill: the reply continues it (and holds only what follows it)
    prefill = body.messages[-1].role == "assistant"
    thinking = body.thinking or {}
    parallel = not (body.tool_choice or {}).get("disable_parallel_tool_use", False)
    prepared = await prepare_chat_async(
        state.tokenizer,
        state.chat,
        conversation,
        params,
        tools,
        tool_choice,
        max_model_len=state.max_model_len,
        continue_final_message=prefill,
        add_generation_prompt=not prefill,
        thinking=Thinking(enabled=thinking.get("type") != "disabled", budget=thinking.get("budget_tokens")),
        parallel_tool_calls=parallel,
    )
    constrain_chat(
        prepared,
        anthropic_constraint(body),
        tokenizer=state.tokenizer,
        format=state.chat.format,
        tool_choice=tool_choice,
        parallel_tool_calls=parallel,
    )
    return prepared


@router.post("/v1/messages/count_tokens")
async def count_tokens(body: AnthropicCountTokensRequest, request: Request):
    """The prompt tokens the same /v1/messages request would be charged (its usage.input_tokens)."""
    prepared = await _prepare(request.app.state.mmx, body)
    return {"input_tokens": len(prepared.prompt_ids)}


@router.post("/v1/messages")
async def messages(body: AnthropicMessagesRequest, request: Request):
    state = request.app.state.mmx
    prepared = await _prepare(state, body)
    params = prepared.params
    (stream,) = prepared.reply_streams(state.tokenizer, state.chat)
    run = start_run(state.engine, prepared.prompt_ids, params, f"msg_{uuid.uuid4().hex[:24]}", [stream])
    state.metrics.request_started("messages")
    if body.stream:
        return StreamingResponse(_stream(state, run), media_type="text/event-stream")
    start = time.perf_counter()
    await run_all_unless_disconnected(request, state.engine, [run])
    state.metrics.request_finished("messages", time.perf_counter() - start)
    reply = stream.message()
    content: list[dict[str, Any]] = []
    if reply["reasoning_content"]:
        content.append({"type": "thinking", "thinking": reply["reasoning_content"], "signature": ""})
    if reply["content"]:
        content.append({"type": "text", "text": reply["content"]})
    for call in reply.get("tool_calls", []):
        content.append(_tool_use(call["id"], call["function"]["name"], call["function"]["arguments"]))
    stop_reason, stop_sequence = _stop(stream.reply_finish_reason, stream.stop_reason)
    return {
        "id": run.request_id,
        "type": "message",
        "role": "assistant",
        "model": state.model_name,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "usage": _usage(len(run.prompt_ids), run.completion_tokens, run.cached_tokens),
    }


def _usage(prompt_tokens: int, output_tokens: int, cached_tokens: int = 0) -> dict:
    """Anthropic usage: as in Anthropic's API, ``input_tokens`` counts the prompt tokens not read from the cache, so
    that the prompt is input_tokens + cache_read_input_tokens (mmx never charges for writing a cache)."""
    return {
        "input_tokens": prompt_tokens - cached_tokens,
        "output_tokens": output_tokens,
        "cache_read_input_tokens": cached_tokens,
        "cache_creation_input_tokens": 0,
    }


def _tool_use(call_id: str, name: str, arguments: dict) -> dict:
    return {"type": "tool_use", "id": tool_call_id_for("anthropic", call_id), "name": name, "input": arguments}


def _event(kind: str, data: dict) -> str:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data}, ensure_ascii=False)}\n\n"


async def _stream(state, run: Run) -> AsyncIterator[str]:
    start = time.perf_counter()
    message = {
        "id": run.request_id,
        "type": "message",
        "role": "assistant",
        "model": state.model_name,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": _usage(len(run.prompt_ids), 0),
    }
    yield _event("message_start", {"message": message})
    index, open_kind, first = -1, None, True

    def close():
        nonlocal open_kind
        if open_kind is None:
            return []
        out = []
        if open_kind == "thinking":
            out.append(
                _event("content_block_delta", {"index": index, "delta": {"type": "signature_delta", "signature": ""}})
            )
        out.append(_event("content_block_stop", {"index": index}))
        open_kind = None
        return out

    def open_block(kind: str, block: dict):
        nonlocal index, open_kind
        out = close()
        index += 1
        open_kind = kind
        out.append(_event("content_block_start", {"index": index, "content_block": block}))
        return out

    def delta(payload: dict) -> str:
        return _event("content_block_delta", {"index": index, "delta": payload})

    try:
        async for _, reply_events, _ in follow(state.engine, run):
            if first:
                state.metrics.first_token(time.perf_counter() - start)
                first = False
            events: list[str] = []
            for ev in reply_events:
                if isinstance(ev, ReasoningDelta) and ev.text:
                    if open_kind != "thinking":
                        events += open_block("thinking", {"type": "thinking", "thinking": ""})
                    events.append(delta({"type": "thinking_delta", "thinking": ev.text}))
                elif isinstance(ev, ContentDelta) and ev.text:
                    if open_kind != "text":
                        events += open_block("text", {"type": "text", "text": ""})
                    events.append(delta({"type": "text_delta", "text": ev.text}))
                elif isinstance(ev, ToolCallStart):
                    events += open_block("tool_use", _tool_use(ev.id, ev.name, {}))
                elif isinstance(ev, ToolCallArgs):
                    events.append(delta({"type": "input_json_delta", "partial_json": ev.text}))
                elif isinstance(ev, Finish):
                    events += close()
                    stop_reason, stop_sequence = _stop(ev.reason, ev.stop_reason)
                    events.append(
                        _event(
                            "message_delta",
                            {
                                "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                                # cumulative, as Anthropic sends it; the cache read is known only now
                                "usage": _usage(len(run.prompt_ids), run.completion_tokens, run.cached_tokens),
                            },
                        )
                    )
            for e in events:
                yield e
        yield _event("message_stop", {})
        state.metrics.request_finished("messages", time.perf_counter() - start)
    except (RequestError, ValueError, RuntimeError) as e:
        state.metrics.request_failed("messages")
        yield _event("error", {"error": {"type": "api_error", "message": str(e)}})
