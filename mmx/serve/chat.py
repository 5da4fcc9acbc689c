"""What the OpenAI and Anthropic chat endpoints share: render the conversation, run it, and split each sample into
reasoning, content and tool calls (whole, or as a stream of events).

``tool_choice`` "required" or a named tool is enforced by pre-filling the start of the tool-call syntax after the
generation prompt (the model then completes a call), which needs no constrained decoding.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from mmx.chat import (
    ContentDelta,
    ReasoningStreamParser,
    ToolCallArgs,
    ToolCallStart,
    ToolCallStreamParser,
    parse_tool_calls,
    split_reasoning,
)
from mmx.chat.template import render_chat
from mmx.chat.tool_calls import new_call_id
from mmx.engine.outputs import RequestOutput
from mmx.engine.sampling_params import SamplingParams


class RequestError(ValueError):
    """A request the server refuses (HTTP 400); ``param`` names the field at fault."""

    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param = param
        self.status = status


@dataclass
class ChatTurn:
    messages: list[dict[str, Any]]  # OpenAI-style messages, ready for the template
    tools: list[dict[str, Any]] | None  # OpenAI-style tools ({"type": "function", "function": {...}})
    tool_choice: str = "auto"  # "none" | "auto" | "required" | a tool name
    template_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class ChoiceResult:
    index: int
    reasoning: str | None
    content: str | None
    tool_calls: list[dict[str, Any]]  # {"id", "name", "arguments" (dict)}
    finish_reason: str  # stop | length | tool_calls | abort
    stop_reason: str | int | None
    token_ids: list[int]
    logprobs: list | None
    raw_text: str


@dataclass
class StreamEvent:
    index: int  # choice
    kind: str  # "reasoning" | "content" | "tool_start" | "tool_args" | "finish"
    text: str = ""
    tool_index: int = 0
    tool_id: str = ""
    tool_name: str = ""
    finish_reason: str | None = None
    output: RequestOutput | None = None


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


class ChatRunner:
    def __init__(self, engine, template: str, style: str, max_model_len: int, reasoning_mode: str = "split"):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.template = template
        self.style = style
        self.max_model_len = max_model_len
        self.reasoning_mode = reasoning_mode

    # ------------------------------------------------------------------ prompt
    def forced_prefix(self, turn: ChatTurn) -> str:
        if turn.tool_choice in ("none", "auto") or not turn.tools:
            return ""
        named = turn.tool_choice != "required"
        if self.style == "minimax_m2":
            head = '</think>\n\n<minimax:tool_call>\n<invoke name="'
            return head + (f'{turn.tool_choice}">\n' if named else "")
        head = '<tool_calls>\n{"name": "'
        return head + (f'{turn.tool_choice}", "arguments": ' if named else "")

    def build_prompt(self, turn: ChatTurn) -> tuple[str, list[int], str]:
        tools = None if turn.tool_choice == "none" else turn.tools
        try:
            text = render_chat(
                self.template,
                normalise_messages(turn.messages),
                tools=tools,
                add_generation_prompt=True,
                bos_token=self.tokenizer.bos_token,
                eos_token=self.tokenizer.eos_token,
                **turn.template_kwargs,
            )
        except Exception as e:  # template errors (raise_exception, bad structure) are the request's fault
            raise RequestError(f"the chat template rejected the conversation: {e}", "messages") from e
        prefix = self.forced_prefix(turn)
        ids = self.tokenizer.encode(text + prefix)
        self.check_length(ids)
        return text + prefix, ids, prefix

    def check_length(self, ids: list[int]) -> None:
        if len(ids) >= self.max_model_len:
            raise RequestError(
                f"the prompt has {len(ids)} tokens; this model's context is {self.max_model_len} tokens",
                "messages",
            )

    @staticmethod
    def clamp_max_tokens(params: SamplingParams, prompt_len: int, max_model_len: int) -> None:
        room = max_model_len - prompt_len
        params.max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)

    # ------------------------------------------------------------------ whole answers
    def split(self, text: str, turn: ChatTurn, prefix: str) -> tuple[str | None, str | None, list[dict]]:
        """(reasoning, content, calls) of one finished sample. In append-think mode the reasoning stays in the
        content as ``<think>\n...\n</think>\n\n`` (for clients that only send content back)."""
        reasoning, content = split_reasoning(prefix + text, self.style)
        calls = []
        if turn.tools and turn.tool_choice != "none":
            content, parsed = parse_tool_calls(content, turn.tools, self.style)
            calls = [{"id": new_call_id(), **call} for call in parsed]
        else:
            content = content or None
        if self.append_think and reasoning is not None:
            return None, f"<think>\n{reasoning}\n</think>\n\n" + (content or ""), calls
        return reasoning, content, calls

    @property
    def append_think(self) -> bool:
        return self.reasoning_mode == "append_think"

    async def complete(self, prompt_ids: list[int], params: SamplingParams, turn: ChatTurn, prefix: str, rid: str):
        final = None
        async for out in self.engine.generate(prompt_ids, params, rid):
            final = out
        results = []
        for sample in final.outputs:
            reasoning, content, calls = self.split(sample.text, turn, prefix)
            reason = "tool_calls" if calls else sample.finish_reason
            results.append(
                ChoiceResult(
                    sample.index,
                    reasoning,
                    content,
                    calls,
                    reason,
                    sample.stop_reason,
                    sample.token_ids,
                    sample.logprobs,
                    sample.text,
                )
            )
        return results, final

    # ------------------------------------------------------------------ streams
    async def stream(
        self, prompt_ids: list[int], params: SamplingParams, turn: ChatTurn, prefix: str, rid: str
    ) -> AsyncIterator[StreamEvent]:
        """Events whose concatenation per choice equals :meth:`split` of the finished sample."""
        choices = [_StreamState(i, self, turn) for i in range(params.n)]
        if prefix:
            for state in choices:
                for ev in state.feed(prefix, final=False):
                    yield ev
        async for out in self.engine.generate(prompt_ids, params, rid):
            for sample in out.outputs:
                state = choices[sample.index]
                if state.done:
                    continue
                delta = sample.text[state.seen :]
                state.seen = len(sample.text)
                finished = sample.finish_reason is not None
                for ev in state.feed(delta, final=finished):
                    yield ev
                if finished:
                    state.done = True
                    reason = "tool_calls" if state.calls else sample.finish_reason
                    yield StreamEvent(sample.index, "finish", finish_reason=reason, output=out)


class _StreamState:
    """One choice's incremental reasoning / content / tool-call split."""

    def __init__(self, index: int, runner: ChatRunner, turn: ChatTurn):
        self.index = index
        self.append = runner.append_think
        self.parse_tools = bool(turn.tools) and turn.tool_choice != "none"
        self.reasoner = ReasoningStreamParser(runner.style)
        self.tools = ToolCallStreamParser(turn.tools, runner.style) if self.parse_tools else None
        self.has_reasoning = runner.style == "minimax_m2"  # M1 has reasoning only if it opens <think>
        self.opened = self.closed = False
        self.seen = 0
        self.calls = 0
        self.done = False

    def _content(self, text: str) -> list[StreamEvent]:
        out = []
        if self.append and self.opened and not self.closed and text:
            self.closed = True
            out.append(StreamEvent(self.index, "content", "\n</think>\n\n"))
        if text:
            out.append(StreamEvent(self.index, "content", text))
        return out

    def feed(self, delta: str, final: bool) -> list[StreamEvent]:
        out: list[StreamEvent] = []
        r, c = self.reasoner.feed(delta) if delta else ("", "")
        if final:
            r2, c2 = self.reasoner.finish()
            r, c = r + r2, c + c2
        if self.append and not self.opened and (r or self.reasoner.saw_reasoning):
            self.opened = True
            out.append(StreamEvent(self.index, "content", "<think>\n"))
        if r:
            out.append(StreamEvent(self.index, "content" if self.append else "reasoning", r))
        if self.tools is not None:
            events = self.tools.feed(c) + (self.tools.finish() if final else [])
        else:
            events = [ContentDelta(c)] if c else []
        for ev in events:
            if isinstance(ev, ContentDelta):
                out += self._content(ev.text)
            elif isinstance(ev, ToolCallStart):
                self.calls += 1
                out.append(StreamEvent(self.index, "tool_start", tool_index=ev.index, tool_id=ev.id, tool_name=ev.name))
            elif isinstance(ev, ToolCallArgs):
                out.append(StreamEvent(self.index, "tool_args", ev.text, tool_index=ev.index))
        if final and self.append and self.opened and not self.closed:
            self.closed = True
            out.append(StreamEvent(self.index, "content", "\n</think>\n\n"))
        return out
