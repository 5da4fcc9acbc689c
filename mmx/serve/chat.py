"""What the API routes share: a chat request prepared once (:class:`PreparedChat`), and one loop that follows a
request's samples through their :class:`~mmx.chat.reply.ReplyStream` s (:func:`follow`). The routes only turn
reply events into their API's JSON.

``tool_choice`` "required" or a named tool is enforced by pre-filling the start of the format's tool-call syntax
after the generation prompt (the model then completes a call); the routes then hold the rest of the call to the
tools' schemas with a grammar (:func:`mmx.serve.structured_requests.constrain_chat`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request

from mmx.chat.formats import ChatFormat, ChatSetup
from mmx.chat.reasoning import THINK_CLOSE, THINK_OPEN
from mmx.chat.reply import ReplyEvent, ReplyStream
from mmx.chat.template import render_chat
from mmx.chat.tokenizer import Tokenizer
from mmx.engine.outputs import RequestOutput
from mmx.engine.sampling_params import RequestOutputKind, SamplingParams


class RequestError(ValueError):
    """A request the server refuses (HTTP 400); ``param`` names the field at fault."""

    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param = param
        self.status = status


def normalise_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI messages as the templates expect them: ``reasoning`` read as ``reasoning_content``, tool-call
    arguments as dicts (a JSON string is parsed; unparsable text becomes {} as vLLM does), ``developer`` as
    ``system``."""
    out = []
    for message in messages:
        m = {k: v for k, v in message.items() if v is not None}
        if m.get("role") == "developer":
            m["role"] = "system"
        if "reasoning_content" not in m and isinstance(m.get("reasoning"), str):
            m["reasoning_content"] = m["reasoning"]
        if m.get("tool_calls"):
            calls = []
            for call in m["tool_calls"]:
                fn = dict(call.get("function") or {})
                args = fn.get("arguments")
                if isinstance(args, str):
                    try:
                        args = json.loads(args) if args.strip() else {}
                    except ValueError:
                        args = {}
                fn["arguments"] = args if isinstance(args, dict) else {}
                calls.append({**call, "function": fn})
            m["tool_calls"] = calls
        out.append(m)
    return out


# A byte-level BPE token covers a handful of characters; a prompt longer than this many per token of the context
# cannot fit, and is refused before it is rendered or tokenised at length.
MAX_CHARS_PER_TOKEN = 64


def encode_prompt(
    tokenizer: Tokenizer, text: str, max_model_len: int | None = None, param: str = "messages"
) -> list[int]:
    """Token ids of a prompt's text, refusing (400) text that is not valid Unicode (JSON lets a request carry lone
    surrogates) or that is too long to be a prompt of ``max_model_len`` tokens."""
    if max_model_len is not None and len(text) > MAX_CHARS_PER_TOKEN * max_model_len:
        raise RequestError(
            f"the prompt has {len(text)} characters, more than can fit in the context of {max_model_len} tokens",
            param,
        )
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError(
            f"the prompt is not valid Unicode: a lone surrogate {text[e.start]!r} at character {e.start}", param
        ) from None
    return tokenizer.encode(text)


@dataclass
class Thinking:
    """How the reply's reasoning is controlled: switched off (an empty think block is pre-filled, as M2 does when
    thinking is disabled), or ended after ``budget`` tokens (the engine then forces the closing tag)."""

    enabled: bool = True
    budget: int | None = None


@dataclass
class PreparedChat:
    """One chat request, validated and rendered: what to run and how to read its replies."""

    prompt_ids: list[int]
    params: SamplingParams
    tools: list[dict[str, Any]] | None  # the tools whose calls are parsed (None with tool_choice "none")
    prefix: str  # text the replies continue from, read by their parsers (a forced tool-call opening, a closed think)
    inline_reasoning: bool
    max_tool_calls: int | None = None

    def reply_streams(self, tokenizer: Tokenizer, setup: ChatSetup) -> list[ReplyStream]:
        options: dict[str, Any] = {"max_tool_calls": self.max_tool_calls} if self.max_tool_calls is not None else {}
        return [
            ReplyStream.for_params(
                tokenizer,
                self.params,
                setup.format,
                tools=self.tools,
                prefix=self.prefix,
                inline_reasoning=self.inline_reasoning,
                **options,
            )
            for _ in range(self.params.n)
        ]


def _continued(text: str, final: dict[str, Any]) -> str:
    """The rendered conversation cut right after the final (assistant) message's content, so the reply continues
    it (transformers' continue_final_message)."""
    content = final.get("content")
    if isinstance(content, list):
        content = "".join(part.get("text", "") for part in content)
    content = (content or "").rstrip()
    at = text.rfind(content) if content else -1
    if at < 0:
        raise RequestError(
            "the final assistant message cannot be continued: the chat template does not render its content", "messages"
        )
    return text[: at + len(content)]


def prepare_chat(
    tokenizer: Tokenizer,
    setup: ChatSetup,
    messages: list[dict[str, Any]],
    params: SamplingParams,
    tools: list[dict[str, Any]] | None = None,
    tool_choice: str = "auto",
    template_kwargs: dict[str, Any] | None = None,
    inline_reasoning: bool = False,
    *,
    max_model_len: int | None = None,
    continue_final_message: bool = False,
    add_generation_prompt: bool = True,
    thinking: Thinking | None = None,
    parallel_tool_calls: bool = True,
) -> PreparedChat:
    """Render the conversation (OpenAI-style messages and tools) into prompt ids. ``tool_choice``: "none",
    "auto", "required" or a tool's name. ``continue_final_message``: the reply continues the final assistant
    message (its content is the start of the reply's content) instead of starting a new turn. CPU-heavy for long
    conversations: the routes call it in a worker thread (:func:`prepare_chat_async`)."""
    offered = None if tool_choice == "none" else tools
    normalised = normalise_messages(messages)
    if continue_final_message:
        if add_generation_prompt:
            raise RequestError(
                "continue_final_message and add_generation_prompt cannot both be true", "continue_final_message"
            )
        if normalised[-1].get("role") != "assistant":
            raise RequestError("continue_final_message needs a final assistant message", "continue_final_message")
    try:
        text = render_chat(
            setup.template,
            normalised,
            tools=offered,
            add_generation_prompt=add_generation_prompt,
            bos_token=tokenizer.bos_token,
            eos_token=tokenizer.eos_token,
            **(template_kwargs or {}),
        )
    except Exception as e:  # template errors (raise_exception, bad structure) are the request's fault
        raise RequestError(f"the chat template rejected the conversation: {e}", "messages") from e
    prefix = prompt_tail = ""
    thinking = thinking or Thinking()
    if continue_final_message:
        text = _continued(text, normalised[-1])
        # the continuation is answer text: the parsers start after the reasoning
        prefix = _closed_think(setup.format) if setup.format.generation_prefill else ""
    elif not thinking.enabled:
        prefix = prompt_tail = _closed_think(setup.format)
    if offered and tool_choice != "auto":
        if continue_final_message:
            raise RequestError("a forced tool_choice cannot continue a final assistant message", "tool_choice")
        forced = setup.format.forced_tool_prefix(None if tool_choice == "required" else tool_choice)
        if THINK_CLOSE in forced:  # the forced opening closes the reasoning itself
            prefix = prompt_tail = ""
        prefix, prompt_tail = prefix + forced, prompt_tail + forced
    # a budget applies while the reply reasons: not when the prompt already closed the reasoning (a continued
    # answer, thinking off, or a forced tool call, whose opening follows the closed think block)
    if thinking.budget is not None and not continue_final_message and THINK_CLOSE not in prompt_tail:
        close = tokenizer.encode(THINK_CLOSE)
        if len(close) != 1:
            raise RequestError(f"a thinking budget needs {THINK_CLOSE} to be one token in this tokenizer", "thinking")
        params.reasoning_budget = thinking.budget
        params.think_close_id = close[0]
        params.reasoning_end_ids = tokenizer.encode("\n" + THINK_CLOSE + "\n\n")
    ids = encode_prompt(tokenizer, text + prompt_tail, max_model_len)
    return PreparedChat(ids, params, offered, prefix, inline_reasoning, None if parallel_tool_calls else 1)


def _closed_think(format: ChatFormat) -> str:
    """An empty think block after the generation prompt (which already opens one where the format pre-fills it)."""
    opened = format.generation_prefill.rstrip("\n").endswith(THINK_OPEN)
    return ("" if opened else THINK_OPEN + "\n") + THINK_CLOSE + "\n\n"


async def prepare_chat_async(*args: Any, **kwargs: Any) -> PreparedChat:
    """:func:`prepare_chat` in a worker thread: rendering and tokenising a long conversation must not stall the
    event loop (health checks and every other stream)."""
    return await asyncio.to_thread(prepare_chat, *args, **kwargs)


@dataclass
class Run:
    """One prompt in generation: the engine's outputs for it and a reply stream per sample."""

    request_id: str
    prompt_ids: list[int]
    outputs: AsyncIterator[RequestOutput]
    streams: list[ReplyStream]
    number: int = 0  # the prompt's position in a request of several (completions)
    echo: str = ""  # prompt text returned before the completion (completions' echo)
    created: int = field(default_factory=lambda: int(time.time()))
    prompt_logprobs: list | None = None  # the engine's, once the prompt is prefilled (params.prompt_logprobs)
    cached_tokens: int = 0  # prompt tokens whose cache the engine reused (prefix caching)

    @property
    def completion_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.streams)


def start_run(
    engine, prompt_ids: list[int], params: SamplingParams, request_id: str, streams, group: str | None = None, **fields
) -> Run:
    """Hand a prompt to the engine, which refuses a bad request here, before any response has started. The prompts
    of one API request share a ``group``: they take turns with other requests as one. The run reads each output's
    new tokens only (:func:`follow`), so it asks for DELTA outputs: no copy of the whole sample every step."""
    grouped = {"group": group} if group else {}
    params = dataclasses.replace(params, output_kind=RequestOutputKind.DELTA)
    return Run(request_id, prompt_ids, engine.generate(prompt_ids, params, request_id, **grouped), streams, **fields)


async def follow(engine, run: Run) -> AsyncIterator[tuple[int, list[ReplyEvent], list]]:
    """Feed a run's outputs to its samples' reply streams. Yields (sample index, events, log-probs of the tokens
    those events came from) as they happen; a sample whose stream finds a stop string is ended in the engine.
    Returns once every stream is done (closing the outputs aborts whatever is left of the request)."""
    streams = run.streams
    try:
        async for out in run.outputs:
            if run.prompt_logprobs is None:
                run.prompt_logprobs = out.prompt_logprobs
            run.cached_tokens = out.num_cached_tokens
            for sample in out.outputs:
                stream = streams[sample.index]
                if stream.done:
                    continue
                taken = len(stream.token_ids)
                events = stream.feed(sample.new_token_ids, sample.new_logprobs)
                logprobs = list(sample.new_logprobs or ())[: len(stream.token_ids) - taken]  # none past a stop
                if stream.done:
                    engine.finish_sequence(out.request_id, sample.index, stream.stop_reason)
                elif sample.finish_reason is not None:
                    events += stream.finish(sample.finish_reason, sample.stop_reason)
                if events or logprobs:
                    yield sample.index, events, logprobs
            if all(s.done for s in streams):
                return
    finally:
        await run.outputs.aclose()  # an unfinished request is aborted and its cache freed


async def run_to_end(engine, run: Run) -> None:
    """:func:`follow` without streaming: the run's streams hold the finished replies afterwards."""
    async for _ in follow(engine, run):
        pass


async def run_all_unless_disconnected(request: Request, engine, runs: list[Run]) -> None:
    """Run ``runs`` to the end for a non-streaming response, aborting them (their sequences freed) when the client
    goes away first: nobody would read the answer."""
    work = asyncio.ensure_future(asyncio.gather(*(run_to_end(engine, r) for r in runs)))
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():
            raise ClientDisconnected
        work.result()
    finally:
        for task in (work, watch):
            task.cancel()
        await asyncio.gather(work, watch, return_exceptions=True)


class ClientDisconnected(Exception):
    """The client of a non-streaming request went away; its generation was aborted."""


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body has been read, so the next message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
