"""One sample's reply, as it is generated: new token ids in, typed events out.

:class:`ReplyStream` owns the way from token ids to what a client sees: incremental detokenisation, stop strings
(text that could still become a stop string is held back, so a stream never shows what the final text drops), and,
for chat replies, the format's reasoning and tool-call parsers. Every consumer (the OpenAI and Anthropic routes,
``mmx chat`` / ``generate``, the RL episodes, :class:`mmx.LLM`) only formats its events; the streamed events of a
sample always add up to its finished reply.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from mmx.chat.formats import ChatFormat
from mmx.chat.reasoning import ReasoningStreamParser, partial_suffix
from mmx.chat.tokenizer import IncrementalDetokenizer, Tokenizer
from mmx.chat.tool_calls import (
    ContentDelta,
    ToolCallArgs,
    ToolCallStart,
    ToolCallStreamParser,
    check_call_limit,
)


@dataclass
class ReasoningDelta:
    text: str


@dataclass
class Finish:
    reason: str  # stop | length | repetition | abort | tool_calls
    stop_reason: str | int | None = None  # the stop string or stop token that ended the sample


ReplyEvent = ReasoningDelta | ContentDelta | ToolCallStart | ToolCallArgs | Finish

__all__ = ["ContentDelta", "Finish", "ReasoningDelta", "ReplyEvent", "ReplyStream", "ToolCallArgs", "ToolCallStart"]


class ReplyStream:
    """A sample's text and, with a chat ``format``, its reasoning, content and tool calls.

    ``feed(token_ids, logprobs)`` after every engine step and ``finish(reason, stop_reason)`` when the engine ends
    the sample return events. When a stop string appears, the stream ends itself (``done``, ``finish_reason``
    "stop") and the caller stops the sequence in the engine; tokens fed after that are ignored.

    ``prefix`` is text the reply continues from (a forced tool-call opening): it goes through the parsers but is
    not part of ``text``. ``inline_reasoning`` keeps the reasoning in the content as ``<think>...</think>`` (for
    clients that send only content back).

    Tool calls come out only complete: a tool-call block is held back until it closes, then its calls are emitted
    (see :mod:`mmx.chat.tool_calls`); a block cut off by the end of the reply is content, and the finish reason
    stays the engine's ("length", ...). ``max_tool_calls`` keeps at most that many calls (1 for
    ``parallel_tool_calls=false``); later complete calls are dropped, neither calls nor content."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        format: ChatFormat | None = None,
        *,
        tools: list[dict[str, Any]] | None = None,
        stop: list[str] | tuple[str, ...] = (),
        include_stop_str_in_output: bool = False,
        skip_special_tokens: bool = True,
        prefix: str = "",
        inline_reasoning: bool = False,
        max_tool_calls: int | None = None,
    ):
        self.detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens)
        self.stops = [s for s in stop if s]
        self.include_stop = include_stop_str_in_output
        self.format = format
        self.reasoner = ReasoningStreamParser(format.name) if format is not None else None
        check_call_limit(max_tool_calls, "max_tool_calls")  # checked even when no tools are offered
        self.tool_parser = (
            ToolCallStreamParser(tools, format.name, max_tool_calls) if format is not None and tools else None
        )
        self.inline = inline_reasoning
        self.token_ids: list[int] = []
        self.logprobs: list[Any] = []
        self.text = ""  # the reply's text so far, held-back characters included (cut at a stop string at the end)
        self.sent = 0  # characters of self.text passed on to the parsers
        self.done = False
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        # what the events have said, for message()
        self.reasoning: list[str] = []
        self.content: list[str] = []
        self.calls: list[dict[str, Any]] = []
        self._think_open = self._think_closed = False
        self._pending: list[ReplyEvent] = self._parse(prefix, final=False) if prefix else []

    @classmethod
    def for_params(cls, tokenizer: Tokenizer, params: Any, format: ChatFormat | None = None, **options: Any):
        """A stream that honours a request's sampling parameters (``stop``, ``include_stop_str_in_output``,
        ``skip_special_tokens``, as :class:`~mmx.engine.SamplingParams` has them)."""
        return cls(
            tokenizer,
            format,
            stop=params.stop,
            include_stop_str_in_output=params.include_stop_str_in_output,
            skip_special_tokens=params.skip_special_tokens,
            **options,
        )

    # ------------------------------------------------------------------ input
    def feed(self, token_ids: list[int], logprobs: list[Any] | None = None) -> list[ReplyEvent]:
        """Events for newly generated tokens (nothing once the reply is done). Tokens after the one that completes
        a stop string are not taken (``token_ids`` and ``logprobs`` stop there), however the tokens came in chunks."""
        if self.done:
            return []
        if self.stops and len(token_ids) > 1:  # one at a time: a stop string may complete before the chunk's end
            events: list[ReplyEvent] = []
            for i, token in enumerate(token_ids):
                events += self.feed([token], logprobs[i : i + 1] if logprobs else None)
                if self.done:
                    break
            return events
        self.token_ids.extend(token_ids)
        if logprobs:
            self.logprobs.extend(logprobs)
        events, self._pending = self._pending, []
        self.text += self.detokenizer.add(token_ids)
        hit = self._find_stop()
        if hit is not None:
            cut, stop = hit
            self.text = self.text[:cut]
            return events + self._end("stop", stop)
        safe = len(self.text) - partial_suffix(self.text[self.sent :], self.stops) if self.stops else len(self.text)
        return events + self._release(safe, final=False)

    def finish(self, reason: str, stop_reason: str | int | None = None) -> list[ReplyEvent]:
        """The engine ended the sample (stop token, EOS, length, ...): flush everything held back."""
        if self.done:
            return []
        events, self._pending = self._pending, []
        self.text += self.detokenizer.flush()
        hit = self._find_stop()
        if hit is not None:
            self.text = self.text[: hit[0]]
            reason, stop_reason = "stop", hit[1]
        return events + self._end(reason, stop_reason)

    def _find_stop(self) -> tuple[int, str] | None:
        """(where the text ends, the stop string) for the earliest stop string in the text not yet released."""
        best = None
        for stop in self.stops:
            i = self.text.find(stop, self.sent)
            if i != -1 and (best is None or i < best[0]):
                best = (i, stop)
        if best is None:
            return None
        i, stop = best
        return (i + len(stop) if self.include_stop else i), stop

    def _end(self, reason: str, stop_reason: str | int | None) -> list[ReplyEvent]:
        events = self._release(len(self.text), final=True)
        self.done = True
        self.finish_reason, self.stop_reason = reason, stop_reason
        return [*events, Finish(self.reply_finish_reason, stop_reason)]

    def _release(self, upto: int, final: bool) -> list[ReplyEvent]:
        piece = self.text[self.sent : upto]
        self.sent = max(self.sent, upto)
        return self._parse(piece, final)

    # ------------------------------------------------------------------ parsing
    def _parse(self, text: str, final: bool) -> list[ReplyEvent]:
        if self.reasoner is None:  # plain text: everything is content, exactly as generated
            return [ContentDelta(text)] if text else []
        reasoning, content = self.reasoner.feed(text) if text else ("", "")
        if final:
            r, c = self.reasoner.finish()
            reasoning, content = reasoning + r, content + c
        events: list[ReplyEvent] = []
        if reasoning or (self.inline and self.reasoner.saw_reasoning):
            events += self._reasoning(reasoning)
        if self.tool_parser is not None:
            parsed = self.tool_parser.feed(content) + (self.tool_parser.finish() if final else [])
        else:
            parsed = [ContentDelta(content)] if content else []
        for ev in parsed:
            if isinstance(ev, ContentDelta):
                events += self._content(ev.text)
            else:
                events.append(ev)
                self._record_call(ev)
        if final and self.inline and self._think_open and not self._think_closed:
            events += self._content("")
        return events

    def _reasoning(self, text: str) -> list[ReplyEvent]:
        if not self.inline:
            self.reasoning.append(text)
            return [ReasoningDelta(text)]
        opening = "" if self._think_open else "<think>\n"
        self._think_open = True
        return self._emit_content(opening + text)

    def _content(self, text: str) -> list[ReplyEvent]:
        if self.inline and self._think_open and not self._think_closed:
            self._think_closed = True
            text = "\n</think>\n\n" + text
        return self._emit_content(text)

    def _emit_content(self, text: str) -> list[ReplyEvent]:
        if not text:
            return []
        self.content.append(text)
        return [ContentDelta(text)]

    def _record_call(self, ev: ToolCallStart | ToolCallArgs) -> None:
        if isinstance(ev, ToolCallStart):
            self.calls.append({"id": ev.id, "name": ev.name, "arguments": ""})
        else:
            self.calls[ev.index]["arguments"] += ev.text

    # ------------------------------------------------------------------ results
    @property
    def reply_finish_reason(self) -> str | None:
        """Why the reply ended, as chat APIs say it: "tool_calls" when it called tools and ended by itself; a reply
        cut off ("length", "abort", ...) says so even after a complete call."""
        return "tool_calls" if self.calls and self.finish_reason == "stop" else self.finish_reason

    @property
    def tool_calls(self) -> list[dict[str, Any]]:
        """The calls so far: ``{"id", "name", "arguments" (dict)}``."""
        return [{"id": c["id"], "name": c["name"], "arguments": json.loads(c["arguments"])} for c in self.calls]

    def message(self) -> dict[str, Any]:
        """The finished assistant message (OpenAI shape; tool-call arguments as dicts). ``reasoning_content`` is
        None when the reply has none; ``content`` is None when it is empty."""
        message: dict[str, Any] = {
            "role": "assistant",
            "content": "".join(self.content) or None,
            "reasoning_content": None,
        }
        if self.reasoner is not None and self.reasoner.saw_reasoning and not self.inline:
            message["reasoning_content"] = "".join(self.reasoning)
        if self.calls:
            message["tool_calls"] = [
                {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
                for c in self.tool_calls
            ]
        return message
