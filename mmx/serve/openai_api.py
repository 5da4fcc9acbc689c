"""OpenAI-compatible routes: /v1/models, /v1/chat/completions, /v1/completions."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from mmx.engine.sampling_params import SamplingParams
from mmx.serve.chat import ChatRunner, ChatTurn, RequestError, StreamEvent
from mmx.serve.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields

router = APIRouter()


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def sampling_params(body: SamplingFields, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
    try:
        return SamplingParams(
            n=body.n,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=body.top_k or 0,
            min_p=body.min_p or 0.0,
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            repetition_penalty=body.repetition_penalty or 1.0,
            seed=body.seed,
            max_tokens=max_tokens,
            min_tokens=body.min_tokens,
            stop=body.stop,
            ignore_eos=body.ignore_eos,
            include_stop_str_in_output=body.include_stop_str_in_output,
            logprobs=logprobs,
            skip_special_tokens=body.skip_special_tokens,
        )
    except ValueError as e:
        raise RequestError(str(e)) from e


def check_model(state, name: str) -> None:
    if name != state.model_name:
        raise RequestError(
            f"the model {name!r} does not exist; this server serves {state.model_name!r}", "model", status=404
        )


def _token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def chat_logprobs(tokenizer, entries) -> dict | None:
    if entries is None:
        return None

    def item(token_id: int, logprob: float) -> dict:
        text = _token_text(tokenizer, token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {
        "content": [{**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]} for e in entries]
    }


# ---------------------------------------------------------------------------------------------------- models
@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    state = request.app.state.mmx
    card = {
        "id": state.model_name,
        "object": "model",
        "created": state.created,
        "owned_by": "mmx",
        "root": state.model_path,
        "parent": None,
        "max_model_len": state.max_model_len,
    }
    return {"object": "list", "data": [card]}


# ---------------------------------------------------------------------------------------------------- chat
def _tool_choice(body: ChatCompletionRequest) -> str:
    if isinstance(body.tool_choice, dict):
        return body.tool_choice["function"]["name"]
    return body.tool_choice or ("auto" if body.tools else "none")


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    state = request.app.state.mmx
    check_model(state, body.model)
    runner: ChatRunner = state.runner if body.reasoning_mode is None else state.runner_for(body.reasoning_mode)
    turn = ChatTurn(
        messages=[m.model_dump(exclude_none=True) for m in body.messages],
        tools=[t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None,
        tool_choice=_tool_choice(body),
        template_kwargs=body.chat_template_kwargs or {},
    )
    _, ids, prefix = runner.build_prompt(turn)
    max_tokens = body.max_completion_tokens or body.max_tokens
    params = sampling_params(body, max_tokens, (body.top_logprobs or 0) if body.logprobs else None)
    ChatRunner.clamp_max_tokens(params, len(ids), state.max_model_len)
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    state.metrics.request_started("chat")
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            _chat_stream(state, runner, ids, params, turn, prefix, rid, created, include_usage, body.return_token_ids),
            media_type="text/event-stream",
        )
    start = time.perf_counter()
    results, _final = await runner.complete(ids, params, turn, prefix, rid)
    state.metrics.request_finished("chat", time.perf_counter() - start)
    choices = []
    for r in results:
        message: dict[str, Any] = {"role": "assistant", "content": r.content}
        if r.reasoning is not None:
            message["reasoning_content"] = message["reasoning"] = r.reasoning
        if r.tool_calls:
            message["tool_calls"] = [
                {
                    "id": c["id"],
                    "type": "function",
                    "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)},
                }
                for c in r.tool_calls
            ]
        choice = {
            "index": r.index,
            "message": message,
            "logprobs": chat_logprobs(state.tokenizer, r.logprobs),
            "finish_reason": r.finish_reason,
            "stop_reason": r.stop_reason,
        }
        if body.return_token_ids:
            choice["token_ids"] = r.token_ids
        choices.append(choice)
    completion = sum(len(r.token_ids) for r in results)
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": state.model_name,
        "choices": choices,
        "usage": {"prompt_tokens": len(ids), "completion_tokens": completion, "total_tokens": len(ids) + completion},
    }


async def _chat_stream(
    state, runner, ids, params, turn, prefix, rid, created, include_usage, return_token_ids=False
) -> AsyncIterator[str]:
    base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": state.model_name}

    def chunk(index: int, delta: dict, finish: str | None = None, logprobs=None, token_ids=None) -> str:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        if token_ids is not None:
            choice["token_ids"] = token_ids
        return sse({**base, "choices": [choice]})

    start = time.perf_counter()
    first_token = True
    completion_tokens = [0] * params.n
    sent_logprobs = [0] * params.n
    try:
        for i in range(params.n):
            yield chunk(i, {"role": "assistant", "content": ""})
        async for ev in runner.stream(ids, params, turn, prefix, rid):
            if first_token:
                state.metrics.first_token(time.perf_counter() - start)
                first_token = False
            if ev.kind == "finish":
                sample = ev.output.outputs[ev.index]
                completion_tokens[ev.index] = len(sample.token_ids)
                if sample.logprobs is not None and len(sample.logprobs) > sent_logprobs[ev.index]:
                    yield chunk(
                        ev.index,
                        {},
                        logprobs=chat_logprobs(state.tokenizer, sample.logprobs[sent_logprobs[ev.index] :]),
                    )
                yield chunk(ev.index, {}, ev.finish_reason, token_ids=sample.token_ids if return_token_ids else None)
                continue
            yield chunk(ev.index, _delta(ev))
        if include_usage:
            total = sum(completion_tokens)
            yield sse(
                {
                    **base,
                    "choices": [],
                    "usage": {"prompt_tokens": len(ids), "completion_tokens": total, "total_tokens": len(ids) + total},
                }
            )
        state.metrics.request_finished("chat", time.perf_counter() - start)
    except (RequestError, ValueError, RuntimeError) as e:
        state.metrics.request_failed("chat")
        yield sse(
            {
                "error": {
                    "message": str(e),
                    "type": "invalid_request_error" if isinstance(e, ValueError) else "server_error",
                    "param": None,
                    "code": None,
                }
            }
        )
    yield sse("[DONE]")


def _delta(ev: StreamEvent) -> dict:
    if ev.kind == "reasoning":
        return {"reasoning_content": ev.text, "reasoning": ev.text}
    if ev.kind == "content":
        return {"content": ev.text}
    if ev.kind == "tool_start":
        return {
            "tool_calls": [
                {
                    "index": ev.tool_index,
                    "id": ev.tool_id,
                    "type": "function",
                    "function": {"name": ev.tool_name, "arguments": ""},
                }
            ]
        }
    return {"tool_calls": [{"index": ev.tool_index, "function": {"arguments": ev.text}}]}


# ---------------------------------------------------------------------------------------------------- completions
def _prompts(state, prompt) -> list[tuple[str | None, list[int]]]:
    if isinstance(prompt, str):
        prompt = [prompt]
    if prompt and isinstance(prompt[0], int):
        prompt = [prompt]
    out = []
    for p in prompt:
        if isinstance(p, str):
            ids = state.tokenizer.encode(p)
            if not ids:
                raise RequestError("prompt must not be empty", "prompt")
            out.append((p, ids))
        else:
            if any(t < 0 or t >= state.vocab_size for t in p):
                raise RequestError(f"prompt token ids must lie in [0, {state.vocab_size})", "prompt")
            out.append((None, list(p)))
    for _, ids in out:
        state.runner.check_length(ids)
    return out


def completion_logprobs(tokenizer, entries, offset: int) -> dict | None:
    if entries is None:
        return None
    tokens = [_token_text(tokenizer, e.token_id) for e in entries]
    offsets, pos = [], offset
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{_token_text(tokenizer, t): lp for t, lp in e.top} for e in entries],
        "text_offset": offsets,
    }


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    state = request.app.state.mmx
    check_model(state, body.model)
    prompts = _prompts(state, body.prompt)
    rid = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    runs = []
    for i, (text, ids) in enumerate(prompts):
        params = sampling_params(body, body.max_tokens, body.logprobs)
        ChatRunner.clamp_max_tokens(params, len(ids), state.max_model_len)
        runs.append((i, text, ids, params))
    state.metrics.request_started("completions")
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            _completion_stream(state, body, runs, rid, created, include_usage), media_type="text/event-stream"
        )
    start = time.perf_counter()

    async def run(i, text, ids, params):
        final = None
        async for out in state.engine.generate(ids, params, f"{rid}-{i}"):
            final = out
        return i, text, ids, final

    finals = await asyncio.gather(*(run(*r) for r in runs))
    state.metrics.request_finished("completions", time.perf_counter() - start)
    choices, prompt_tokens, completion_tokens = [], 0, 0
    for i, text, ids, final in finals:
        prompt_tokens += len(ids)
        prompt_text = text if text is not None else state.tokenizer.decode(ids)
        for sample in final.outputs:
            completion_tokens += len(sample.token_ids)
            echo = prompt_text if body.echo else ""
            choices.append(
                {
                    "index": i * body.n + sample.index,
                    "text": echo + sample.text,
                    "logprobs": completion_logprobs(state.tokenizer, sample.logprobs, len(echo)),
                    "finish_reason": sample.finish_reason,
                    "stop_reason": sample.stop_reason,
                }
            )
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": state.model_name,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


async def _completion_stream(state, body, runs, rid, created, include_usage) -> AsyncIterator[str]:
    base = {"id": rid, "object": "text_completion", "created": created, "model": state.model_name}
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i, text, ids, params):
        try:
            async for out in state.engine.generate(ids, params, f"{rid}-{i}"):
                await queue.put((i, text, ids, out))
        except Exception as e:
            await queue.put(e)
        finally:
            await queue.put(None)

    tasks = [asyncio.create_task(pump(*r)) for r in runs]
    start = time.perf_counter()
    seen: dict[tuple[int, int], tuple[int, int]] = {}  # (prompt, sample) -> (chars, logprobs) sent
    prompt_tokens = completion_tokens = 0
    remaining = len(tasks)
    try:
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
                continue
            if isinstance(item, Exception):
                raise item
            i, text, ids, out = item
            for sample in out.outputs:
                key = (i, sample.index)
                if key not in seen:
                    seen[key] = (0, 0)
                    if body.echo:
                        yield sse(
                            {
                                **base,
                                "choices": [
                                    {
                                        "index": i * body.n + sample.index,
                                        "text": text if text is not None else state.tokenizer.decode(ids),
                                        "logprobs": None,
                                        "finish_reason": None,
                                    }
                                ],
                            }
                        )
                chars, lps = seen[key]
                delta = sample.text[chars:]
                new_lps = sample.logprobs[lps:] if sample.logprobs is not None else None
                if delta or sample.finish_reason or new_lps:
                    yield sse(
                        {
                            **base,
                            "choices": [
                                {
                                    "index": i * body.n + sample.index,
                                    "text": delta,
                                    "logprobs": completion_logprobs(state.tokenizer, new_lps, chars),
                                    "finish_reason": sample.finish_reason,
                                }
                            ],
                        }
                    )
                seen[key] = (len(sample.text), len(sample.logprobs or []))
            if out.finished:
                prompt_tokens += len(ids)
                completion_tokens += sum(len(s.token_ids) for s in out.outputs)
        if include_usage:
            yield sse(
                {
                    **base,
                    "choices": [],
                    "usage": {
                        "prompt_tokens": prompt_tokens,
                        "completion_tokens": completion_tokens,
                        "total_tokens": prompt_tokens + completion_tokens,
                    },
                }
            )
        state.metrics.request_finished("completions", time.perf_counter() - start)
    except Exception as e:
        state.metrics.request_failed("completions")
        yield sse({"error": {"message": str(e), "type": "invalid_request_error", "param": None, "code": None}})
    finally:
        for task in tasks:
            task.cancel()
    yield sse("[DONE]")
