"""What the API routes share: a chat request prepared once (:class:`PreparedChat`), and one loop that follows a
request's samples through their :class:`~mmx.chat.reply.ReplyStream` s (:func:`follow`). The routes only turn
reply events into their API's JSON.

``tool_choice`` "required" or a named tool is enforced by pre-filling the start of the format's tool-call syntax
after the generation prompt (the model then completes a call), which needs no constrained decoding.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from mmx.chat.formats import ChatSetup
from mmx.chat.reply import ReplyEvent, ReplyStream
from mmx.chat.template import render_chat
from mmx.chat.tokenizer import Tokenizer
from mmx.engine.outputs import RequestOutput
from mmx.engine.sampling_params import SamplingParams


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


@dataclass
class PreparedChat:
    """One chat request, validated and rendered: what to run and how to read its replies."""

    prompt_ids: list[int]
    params: SamplingParams
    tools: list[dict[str, Any]] | None  # the tools whose calls are parsed (None with tool_choice "none")
    prefix: str  # forced tool-call opening the replies continue from
    inline_reasoning: bool

    def reply_streams(self, tokenizer: Tokenizer, setup: ChatSetup) -> list[ReplyStream]:
        return [
            ReplyStream.for_params(
                tokenizer,
                self.params,
                setup.format,
                tools=self.tools,
                prefix=self.prefix,
                inline_reasoning=self.inline_reasoning,
            )
            for _ in range(self.params.n)
        ]


def prepare_chat(
    tokenizer: Tokenizer,
    setup: ChatSetup,
    messages: list[dict[str, Any]],
    params: SamplingParams,
    tools: list[dict[str, Any]] | None = None,
    tool_choice: str = "auto",
    template_kwargs: dict[str, Any] | None = None,
    inline_reasoning: bool = False,
) -> PreparedChat:
    """Render the conversation (OpenAI-style messages and tools) into prompt ids. ``tool_choice``: "none",
    "auto", "required" or a tool's name."""
    offered = None if tool_choice == "none" else tools
    try:
        text = render_chat(
            setup.template,
            normalise_messages(messages),
            tools=offered,
            add_generation_prompt=True,
            bos_token=tokenizer.bos_token,
            eos_token=tokenizer.eos_token,
            **(template_kwargs or {}),
        )
    except Exception as e:  # template errors (raise_exception, bad structure) are the request's fault
        raise RequestError(f"the chat template rejected the conversation: {e}", "messages") from e
    prefix = ""
    if offered and tool_choice != "auto":
        prefix = setup.format.forced_tool_prefix(None if tool_choice == "required" else tool_choice)
    return PreparedChat(tokenizer.encode(text + prefix), params, offered, prefix, inline_reasoning)


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

    @property
    def completion_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.streams)


def start_run(engine, prompt_ids: list[int], params: SamplingParams, request_id: str, streams, **fields) -> Run:
    """Hand a prompt to the engine, which refuses a bad request here, before any response has started."""
    return Run(request_id, prompt_ids, engine.generate(prompt_ids, params, request_id), streams, **fields)


async def follow(engine, run: Run) -> AsyncIterator[tuple[int, list[ReplyEvent], list]]:
    """Feed a run's outputs to its samples' reply streams. Yields (sample index, events, log-probs of the tokens
    those events came from) as they happen; a sample whose stream finds a stop string is ended in the engine.
    Returns once every stream is done (closing the outputs aborts whatever is left of the request)."""
    streams = run.streams
    try:
        async for out in run.outputs:
            for sample in out.outputs:
                stream = streams[sample.index]
                if stream.done:
                    continue
                events = stream.feed(sample.new_token_ids, sample.new_logprobs)
                logprobs = list(sample.new_logprobs or ())
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
