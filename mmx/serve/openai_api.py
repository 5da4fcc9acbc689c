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

from mmx.chat.reply import ContentDelta, Finish, ReasoningDelta, ReplyEvent, ReplyStream, ToolCallStart
from mmx.engine.sampling_params import SamplingParams
from mmx.serve.chat import (
    RequestError,
    Run,
    encode_prompt,
    follow,
    prepare_chat_async,
    run_all_unless_disconnected,
    start_run,
)
from mmx.serve.logprobs import StreamedLogprobs, completion_logprobs, join_logprobs, prompt_logprobs
from mmx.serve.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields
from mmx.serve.structured_requests import constrain, constrain_chat, logit_bias, openai_constraint

router = APIRouter()


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else _json(data)}\n\n"


def sampling_params(
    body: SamplingFields, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None = None
) -> SamplingParams:
    bias = logit_bias(body.logit_bias)
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
            prompt_logprobs=prompt_logprobs,
            skip_special_tokens=body.skip_special_tokens,
            stop_token_ids=body.stop_token_ids or [],
            logit_bias=bias,
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
def _model_card(state) -> dict:
    return {
        "id": state.model_name,
        "object": "model",
        "created": state.created,
        "owned_by": "mmx",
        "root": state.model_path,
        "parent": None,
        "max_model_len": state.max_model_len,
    }


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    return {"object": "list", "data": [_model_card(request.app.state.mmx)]}


@router.get("/v1/models/{model_id:path}")  # :path: a served name may hold a slash ("org/model")
async def retrieve_model(model_id: str, request: Request) -> dict:
    state = request.app.state.mmx
    check_model(state, model_id)
    return _model_card(state)


# ---------------------------------------------------------------------------------------------------- chat
def _tool_choice(body: ChatCompletionRequest) -> str:
    if isinstance(body.tool_choice, dict):
        return body.tool_choice["function"]["name"]
    return body.tool_choice or ("auto" if body.tools else "none")


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI usage; ``cached_tokens``: prompt tokens whose cache was reused (prefix caching), counted in
    ``prompt_tokens`` too."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def _openai_message(reply: dict) -> dict:
    message: dict[str, Any] = {"role": "assistant", "content": reply["content"]}
    if reply["reasoning_content"] is not None:
        message["reasoning_content"] = message["reasoning"] = reply["reasoning_content"]
    if reply.get("tool_calls"):
        message["tool_calls"] = [
            {**call, "function": {**call["function"], "arguments": _json(call["function"]["arguments"])}}
            for call in reply["tool_calls"]
        ]
    return message


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    state = request.app.state.mmx
    check_model(state, body.model)
    mode = body.reasoning_mode or state.reasoning_mode
    max_tokens = body.max_completion_tokens or body.max_tokens
    prepared = await prepare_chat_async(
        state.tokenizer,
        state.chat,
        [m.model_dump(exclude_none=True) for m in body.messages],
        sampling_params(
            body,
            max_tokens,
            (body.top_logprobs or 0) if body.logprobs else None,
            prompt_logprobs=_chat_prompt_logprobs(body),
        ),
        tools=[t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None,
        tool_choice=_tool_choice(body),
        template_kwargs=body.chat_template_kwargs,
        inline_reasoning=mode == "append_think",
        max_model_len=state.max_model_len,
        continue_final_message=body.continue_final_message,
        add_generation_prompt=body.add_generation_prompt,
        parallel_tool_calls=body.parallel_tool_calls,
    )
    constrain_chat(
        prepared,
        openai_constraint(body),
        tokenizer=state.tokenizer,
        format=state.chat.format,
        tool_choice=_tool_choice(body),
        parallel_tool_calls=body.parallel_tool_calls,
    )
    streams = prepared.reply_streams(state.tokenizer, state.chat)
    run = start_run(state.engine, prepared.prompt_ids, prepared.params, f"chatcmpl-{uuid.uuid4().hex}", streams)
    state.metrics.request_started("chat")
    if body.stream:
        return StreamingResponse(_chat_stream(state, run, body), media_type="text/event-stream")
    start = time.perf_counter()
    await run_all_unless_disconnected(request, state.engine, [run])
    state.metrics.request_finished("chat", time.perf_counter() - start)
    choices = []
    for index, stream in enumerate(streams):
        choice = {
            "index": index,
            "message": _openai_message(stream.message()),
            "logprobs": chat_logprobs(state.tokenizer, stream.logprobs if body.logprobs else None),
            "finish_reason": stream.reply_finish_reason,
            "stop_reason": stream.stop_reason,
        }
        if body.return_token_ids:
            choice["token_ids"] = stream.token_ids
        choices.append(choice)
    response = {
        "id": run.request_id,
        "object": "chat.completion",
        "created": run.created,
        "model": state.model_name,
        "choices": choices,
        "usage": usage(len(run.prompt_ids), run.completion_tokens, run.cached_tokens),
    }
    if body.prompt_logprobs is not None:  # vLLM: the rendered prompt's, top-level
        response["prompt_logprobs"] = prompt_logprobs(
            state.tokenizer, run.prompt_ids, run.prompt_logprobs, body.prompt_logprobs
        )
    return response


def _chat_prompt_logprobs(body: ChatCompletionRequest) -> int | None:
    if body.prompt_logprobs is not None and body.stream:
        raise RequestError("prompt_logprobs is not available when streaming", "prompt_logprobs")
    return body.prompt_logprobs


def _include_usage(body) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


async def _chat_stream(state, run: Run, body: ChatCompletionRequest) -> AsyncIterator[str]:
    base = {"id": run.request_id, "object": "chat.completion.chunk", "created": run.created, "model": state.model_name}
    streams = run.streams

    def chunk(index: int, delta: dict, finish: str | None = None, logprobs=None, token_ids=None) -> str:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        if token_ids is not None:
            choice["token_ids"] = token_ids
        return sse({**base, "choices": [choice]})

    start = time.perf_counter()
    first_token = True
    try:
        for i in range(len(streams)):
            yield chunk(i, {"role": "assistant", "content": ""})
        async for index, events, logprobs in follow(state.engine, run):
            if first_token:
                state.metrics.first_token(time.perf_counter() - start)
                first_token = False
            # the step's log-probs ride on its first chunk (an empty delta when all its text is held back)
            pending = chat_logprobs(state.tokenizer, logprobs) if body.logprobs and logprobs else None
            for ev in events:
                if isinstance(ev, Finish):
                    if pending is not None:
                        yield chunk(index, {}, logprobs=pending)
                        pending = None
                    ids = streams[index].token_ids if body.return_token_ids else None
                    yield chunk(index, {}, ev.reason, token_ids=ids)
                else:
                    yield chunk(index, _delta(ev), logprobs=pending)
                    pending = None
            if pending is not None:
                yield chunk(index, {}, logprobs=pending)
        if _include_usage(body):
            yield sse(
                {**base, "choices": [], "usage": usage(len(run.prompt_ids), run.completion_tokens, run.cached_tokens)}
            )
        state.metrics.request_finished("chat", time.perf_counter() - start)
    except (RequestError, ValueError, RuntimeError) as e:
        state.metrics.request_failed("chat")
        yield sse_error(e)
    yield sse("[DONE]")


def sse_error(e: Exception) -> str:
    kind = "invalid_request_error" if isinstance(e, ValueError) else "server_error"
    return sse({"error": {"message": str(e), "type": kind, "param": None, "code": None}})


def _delta(ev: ReplyEvent) -> dict:
    if isinstance(ev, ReasoningDelta):
        return {"reasoning_content": ev.text, "reasoning": ev.text}
    if isinstance(ev, ContentDelta):
        return {"content": ev.text}
    if isinstance(ev, ToolCallStart):
        return {
            "tool_calls": [
                {"index": ev.index, "id": ev.id, "type": "function", "function": {"name": ev.name, "arguments": ""}}
            ]
        }
    return {"tool_calls": [{"index": ev.index, "function": {"arguments": ev.text}}]}


# ---------------------------------------------------------------------------------------------------- completions
def _prompts(state, prompt, n: int) -> list[tuple[str | None, list[int]]]:
    """(text, token ids) of each prompt of a completions request (one of several shapes); CPU-heavy for long
    prompts: the route runs it in a worker thread."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if prompt and isinstance(prompt[0], int):
        prompt = [prompt]
    if len(prompt) * n > state.max_sequences_per_request:
        raise RequestError(
            f"{len(prompt)} prompts x n={n} is {len(prompt) * n} sequences; one request may run at most "
            f"{state.max_sequences_per_request}",
            "prompt",
        )
    return [
        (p, encode_prompt(state.tokenizer, p, state.max_model_len, "prompt")) if isinstance(p, str) else (None, list(p))
        for p in prompt
    ]


def _completion_prompt_logprobs(body: CompletionRequest) -> int | None:
    """Alternatives per prompt token the engine computes (echo with logprobs returns the prompt's log-probs, vLLM's
    prompt_logprobs asks for them directly); refuses the combinations that cannot be honoured."""
    if body.max_tokens == 0 and not body.echo:
        raise RequestError(
            "max_tokens must be at least 1; 0 is allowed only with echo (the prompt alone, nothing generated)",
            "max_tokens",
        )
    if body.prompt_logprobs is not None and body.stream:
        raise RequestError(
            "prompt_logprobs is not available when streaming (echo with logprobs streams the prompt's)",
            "prompt_logprobs",
        )
    wanted = [k for k in (body.logprobs if body.echo else None, body.prompt_logprobs) if k is not None]
    return max(wanted) if wanted else None


def _echoed_logprobs(tokenizer, body: CompletionRequest, run: Run) -> dict:
    """The completions logprobs object of an echoed prompt (its first token has None: nothing predicts it)."""
    entries = run.prompt_logprobs or [None] * len(run.prompt_ids)
    return completion_logprobs(tokenizer, run.prompt_ids, entries, 0, body.logprobs)


def _choice_logprobs(tokenizer, body: CompletionRequest, run: Run, stream: ReplyStream) -> dict | None:
    if body.logprobs is None:
        return None
    entries = stream.logprobs
    generated = completion_logprobs(tokenizer, [e.token_id for e in entries], entries, len(run.echo), body.logprobs)
    return join_logprobs(_echoed_logprobs(tokenizer, body, run), generated) if body.echo else generated


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    state = request.app.state.mmx
    check_model(state, body.model)
    rid = f"cmpl-{uuid.uuid4().hex}"
    params = sampling_params(body, body.max_tokens, body.logprobs, prompt_logprobs=_completion_prompt_logprobs(body))
    constrain(params, openai_constraint(body))
    runs: list[Run] = []
    try:
        for i, (text, ids) in enumerate(await asyncio.to_thread(_prompts, state, body.prompt, params.n)):
            streams = [ReplyStream.for_params(state.tokenizer, params) for _ in range(params.n)]
            echo = (text if text is not None else state.tokenizer.decode(ids)) if body.echo else ""
            runs.append(start_run(state.engine, ids, params, f"{rid}-{i}", streams, rid, number=i, echo=echo))
    except Exception:
        for run in runs:  # the prompts before the bad one never started: close their streams
            await run.outputs.aclose()
        raise
    state.metrics.request_started("completions")
    if body.stream:
        return StreamingResponse(_completion_stream(state, body, rid, runs), media_type="text/event-stream")
    start = time.perf_counter()
    await run_all_unless_disconnected(request, state.engine, runs)
    state.metrics.request_finished("completions", time.perf_counter() - start)
    choices = []
    for r in runs:
        for index, stream in enumerate(r.streams):
            choice = {
                "index": r.number * body.n + index,
                "text": r.echo + stream.text,
                "logprobs": _choice_logprobs(state.tokenizer, body, r, stream),
                "finish_reason": stream.finish_reason,
                "stop_reason": stream.stop_reason,
            }
            if body.prompt_logprobs is not None:  # vLLM puts it in each choice
                choice["prompt_logprobs"] = prompt_logprobs(
                    state.tokenizer, r.prompt_ids, r.prompt_logprobs, body.prompt_logprobs
                )
            choices.append(choice)
    return {
        "id": rid,
        "object": "text_completion",
        "created": runs[0].created,
        "model": state.model_name,
        "choices": choices,
        "usage": _completion_usage(runs),
    }


def _completion_usage(runs: list[Run]) -> dict:
    return usage(
        sum(len(r.prompt_ids) for r in runs),
        sum(r.completion_tokens for r in runs),
        sum(r.cached_tokens for r in runs),
    )


async def _completion_stream(state, body: CompletionRequest, rid: str, runs: list[Run]) -> AsyncIterator[str]:
    base = {"id": rid, "object": "text_completion", "created": runs[0].created, "model": state.model_name}

    def choice(index: int, text: str, logprobs=None, finish: str | None = None) -> str:
        return sse({**base, "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}]})

    queue: asyncio.Queue = asyncio.Queue()

    async def pump(run: Run):
        try:
            async for index, events, logprobs in follow(state.engine, run):
                # the text's length now (held-back characters included) says which text completes these tokens
                await queue.put((run, index, events, logprobs, len(run.streams[index].text)))
        except Exception as e:
            await queue.put(e)
        finally:
            await queue.put(None)

    tasks = [asyncio.create_task(pump(r)) for r in runs]
    start = time.perf_counter()
    samples: dict[tuple[int, int], StreamedLogprobs] = {}  # (prompt, sample) -> its log-probs not yet sent
    remaining = len(tasks)
    try:
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
                continue
            if isinstance(item, Exception):
                raise item
            run, index, events, logprobs, text_end = item
            number = run.number * body.n + index
            sample = samples.get((run.number, index))
            if sample is None:  # its first chunk: the echo goes first, with the prompt's log-probs (now known)
                sample = samples[run.number, index] = StreamedLogprobs(len(run.echo))
                if body.echo:
                    echoed = _echoed_logprobs(state.tokenizer, body, run) if body.logprobs is not None else None
                    yield choice(number, run.echo, echoed)
            text = "".join(ev.text for ev in events if isinstance(ev, ContentDelta))
            finish = next((ev.reason for ev in events if isinstance(ev, Finish)), None)
            lps = None
            if body.logprobs is not None:
                sample.add(logprobs, text_end)
                lps = sample.release(state.tokenizer, text, finish is not None, body.logprobs)
            if text or lps or finish:
                yield choice(number, text, lps, finish)
        if _include_usage(body):
            yield sse({**base, "choices": [], "usage": _completion_usage(runs)})
        state.metrics.request_finished("completions", time.perf_counter() - start)
    except Exception as e:
        state.metrics.request_failed("completions")
        yield sse_error(e)
    finally:
        for task in tasks:
            task.cancel()
    yield sse("[DONE]")
