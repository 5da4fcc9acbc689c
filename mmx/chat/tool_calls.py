"""Tool calls in MiniMax outputs, as structured data.

M2 (``minimax_m2``) writes XML::

    <minimax:tool_call>
    <invoke name="get_weather">
    <parameter name="city">Paris</parameter>
    <parameter name="days">3</parameter>
    </invoke>
    </minimax:tool_call>

Parameter values are raw text typed by the tool's JSON schema (:mod:`mmx.chat.schema`). Tolerated: a missing
``</minimax:tool_call>`` at the end, a missing ``</parameter>`` or ``</invoke>`` before the next element, single-
quoted or bare names, extra attributes. One leading and one trailing newline of a value are layout and dropped;
spaces are data and kept; nothing is XML-unescaped (the template writes raw text).

M1 (``minimax_m1``) writes one JSON object per line inside ``<tool_calls> ... </tool_calls>``; a line with stray
extra closing braces is repaired.

Malformed output never raises: a block with no usable call stays in the content as it was written, and a call to
a tool that is not offered (when tools are given) stays in the content instead of becoming a fabricated call.
Content is the text outside the blocks, stripped (None if empty).

:class:`ToolCallStreamParser` takes the text piece by piece; :func:`parse_tool_calls` is the same parser fed a
finished text at once.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from mmx.chat.formats import new_tool_call_id
from mmx.chat.schema import coerce_value, tool_properties

STYLES = ("minimax_m2", "minimax_m1")
M2_OPEN, M2_CLOSE = "<minimax:tool_call>", "</minimax:tool_call>"
M1_OPEN, M1_CLOSE = "<tool_calls>", "</tool_calls>"
INVOKE_CLOSE, PARAM_CLOSE = "</invoke>", "</parameter>"
_INVOKE = re.compile(r"<invoke\s+name\s*=\s*")
_PARAM = re.compile(r"<parameter\s+name\s*=\s*")


# ---------------------------------------------------------------------------------------------------- shared bits
def _read_name(text: str, start: int) -> tuple[str, int] | None:
    """Name starting at ``start`` ("x", 'x' or bare) and the index just past the tag's closing '>'."""
    while start < len(text) and text[start] in " \t":
        start += 1
    if start >= len(text):
        return None
    quote = text[start]
    if quote in "\"'":
        end = text.find(quote, start + 1)
        if end == -1:
            return None
        name, rest = text[start + 1 : end], end + 1
    else:
        match = re.compile(r"[^\s>]*").match(text, start)
        name, rest = match.group(0), match.end()
    close = text.find(">", rest)
    if close == -1:
        return None
    return name, close + 1


def _layout_strip(value: str) -> str:
    """Drop exactly one leading and one trailing newline."""
    if value.startswith("\n"):
        value = value[1:]
    if value.endswith("\n"):
        value = value[:-1]
    return value


def _typed(name: str, raw: str, props: dict[str, Any] | None) -> Any:
    return coerce_value(_layout_strip(raw), (props or {}).get(name))


def _m1_call(line: str, tools: dict[str, dict] | None) -> dict[str, Any] | None:
    """A call from one JSON line, or None. Repairs runs of extra trailing '}' (a known M1 slip)."""
    text = line.strip()
    if not (text.startswith("{") and text.endswith("}")):
        return None
    while True:
        try:
            obj = json.loads(text)
            break
        except ValueError:
            if not text.endswith("}}"):
                return None
            text = text[:-1]
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or "arguments" not in obj:
        return None
    args = obj["arguments"]
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict) or (tools is not None and obj["name"] not in tools):
        return None
    return {"name": obj["name"], "arguments": args}


def parse_tool_calls(
    text: str, tools: list[dict[str, Any]] | None = None, style: str = "minimax_m2"
) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, calls) of a finished output (its reasoning already split off); each call is
    ``{"name": str, "arguments": dict}``. The streaming parser fed the whole text at once."""
    parser = ToolCallStreamParser(tools, style)
    return collect_tool_events(parser.feed(text) + parser.finish())


def collect_tool_events(events: list) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, calls) from a whole stream of :class:`ToolCallStreamParser` events."""
    content, names, args = [], [], []
    for ev in events:
        if isinstance(ev, ContentDelta):
            content.append(ev.text)
        elif isinstance(ev, ToolCallStart):
            names.append(ev.name)
            args.append("")
        else:
            args[ev.index] += ev.text
    calls = [{"name": name, "arguments": json.loads(a)} for name, a in zip(names, args)]
    return ("".join(content) or None), calls


# ---------------------------------------------------------------------------------------------------- streaming
@dataclass
class ContentDelta:
    text: str


@dataclass
class ToolCallStart:
    index: int
    id: str
    name: str


@dataclass
class ToolCallArgs:
    index: int
    text: str  # a fragment of the arguments' JSON


class _Content:
    """Emits content so that the concatenation equals str.strip() of everything given."""

    def __init__(self):
        self.started = False
        self.pending = ""  # whitespace that is kept only if more text follows

    def add(self, text: str) -> str:
        if not self.started:
            text = text.lstrip()
            if not text:
                return ""
            self.started = True
        body = text.rstrip()
        if not body:
            self.pending += text
            return ""
        out = self.pending + body
        self.pending = text[len(body) :]
        return out


def _could_start(tail: str, patterns: tuple[str, ...]) -> bool:
    """Whether ``tail`` (text from a '<') might still grow into one of the tags / openers."""
    for pattern in patterns:
        if pattern.startswith(tail):
            return True
    return bool(re.fullmatch(r"<(i(n(v(o(k(e(\s+(n(a(m(e\s*)?)?)?)?)?)?)?)?)?)?)?", tail)) or bool(
        re.fullmatch(r"<(p(a(r(a(m(e(t(e(r(\s+(n(a(m(e\s*)?)?)?)?)?)?)?)?)?)?)?)?)?)?", tail)
    )


class ToolCallStreamParser:
    """Incremental :func:`parse_tool_calls`. ``feed(delta)`` / ``finish()`` return events: content deltas, a
    call's start (index, id, name) once its name is complete, and argument JSON fragments (one per completed
    parameter, then the closing brace); the fragments of a call concatenate to ``json.dumps(arguments)``."""

    def __init__(self, tools: list[dict[str, Any]] | None = None, style: str = "minimax_m2"):
        if style not in STYLES:
            raise ValueError(f"unknown tool-call style {style!r}; use one of {STYLES}")
        self.style = style
        self.props = tool_properties(tools)
        self.opener, self.closer = (M2_OPEN, M2_CLOSE) if style == "minimax_m2" else (M1_OPEN, M1_CLOSE)
        self.buffer = ""
        self.state = "outside"
        self.content = _Content()
        self.block_raw = ""  # raw text of the current block (emitted as content if it yields no call)
        self.block_calls = 0
        self.pending_rejected: list[str] = []
        self.index = -1  # index of the last call started
        self.args_open = False
        self.params: dict[str, Any] | None = None
        self.invoke_raw = ""
        self.param_name = ""
        self.call_name = ""

    # ------------------------------------------------------------------ public
    def feed(self, delta: str) -> list:
        self.buffer += delta
        return self._run(final=False)

    def finish(self) -> list:
        return self._run(final=True)

    # ------------------------------------------------------------------ machinery
    def _emit_content(self, events: list, text: str) -> None:
        out = self.content.add(text)
        if out:
            events.append(ContentDelta(out))

    def _reject(self, events: list, raw: str) -> None:
        if self.block_calls:
            self._emit_content(events, raw)
        else:
            self.pending_rejected.append(raw)

    def _start_call(self, events: list, name: str) -> None:
        self.index += 1
        self.block_calls += 1
        if self.block_calls == 1:
            for raw in self.pending_rejected:
                self._emit_content(events, raw)
            self.pending_rejected = []
        self.call_name = name
        events.append(ToolCallStart(self.index, new_tool_call_id(), name))

    def _end_block(self, events: list, raw_tail: str) -> None:
        self.block_raw += raw_tail
        if not self.block_calls:
            self._emit_content(events, self.block_raw)
        self.block_raw, self.block_calls, self.pending_rejected = "", 0, []
        self.state = "outside"

    def _take(self, n: int) -> str:
        piece, self.buffer = self.buffer[:n], self.buffer[n:]
        self.block_raw += piece
        return piece

    def _run(self, final: bool) -> list:
        """Step the state machine until it needs more input; every step that returns True made progress."""
        events: list = []
        while getattr(self, f"_{self.state}")(events, final):
            pass
        if final:
            self._finish(events)
        return events

    def _outside(self, events: list, final: bool) -> bool:
        start = self.buffer.find(self.opener)
        if start != -1:
            self._emit_content(events, self.buffer[:start])
            self.buffer = self.buffer[start + len(self.opener) :]
            self.block_raw = self.opener
            self.state = "block"
            return True
        if final:
            self._emit_content(events, self.buffer)
            self.buffer = ""
            return False
        hold = self.buffer.rfind("<")
        if hold != -1 and self.opener.startswith(self.buffer[hold:]):
            self._emit_content(events, self.buffer[:hold])
            self.buffer = self.buffer[hold:]
        else:
            self._emit_content(events, self.buffer)
            self.buffer = ""
        return False

    # -- M1: JSON lines -------------------------------------------------------------------------------
    def _block(self, events: list, final: bool) -> bool:
        if self.style == "minimax_m1":
            return self._m1_block(events, final)
        return self._m2_block(events, final)

    def _m1_block(self, events: list, final: bool) -> bool:
        close = self.buffer.find(self.closer)
        newline = self.buffer.find("\n")
        if newline != -1 and (close == -1 or newline < close):
            line = self._take(newline + 1)[:-1]
            self._m1_line(events, line)
            return True
        if close != -1:
            self._m1_line(events, self._take(close))
            self._take(len(self.closer))
            self._end_block(events, "")
            return True
        if final:
            self._m1_line(events, self._take(len(self.buffer)))
            return False
        return False

    def _m1_line(self, events: list, line: str) -> None:
        if not line.strip():
            return
        call = _m1_call(line, self.props)
        if call is None:
            self._reject(events, line + "\n")
            return
        self._start_call(events, call["name"])
        events.append(ToolCallArgs(self.index, json.dumps(call["arguments"], ensure_ascii=False)))

    # -- M2: XML --------------------------------------------------------------------------------------
    def _first(self, patterns: list[tuple[str, re.Pattern | str]]) -> tuple[int, str, int] | None:
        """Earliest (position, kind, end of match) among literal strings and regexes in the buffer."""
        best = None
        for kind, pattern in patterns:
            if isinstance(pattern, str):
                i = self.buffer.find(pattern)
                hit = (i, kind, i + len(pattern)) if i != -1 else None
            else:
                m = pattern.search(self.buffer)
                hit = (m.start(), kind, m.end()) if m else None
            if hit and (best is None or hit[0] < best[0]):
                best = hit
        return best

    def _safe_prefix(self, patterns: tuple[str, ...]) -> int:
        """How much of the buffer cannot be the start of a tag still arriving."""
        hold = self.buffer.rfind("<")
        if hold != -1 and _could_start(self.buffer[hold:], patterns):
            return hold
        return len(self.buffer)

    def _m2_block(self, events: list, final: bool) -> bool:
        hit = self._first([("invoke", _INVOKE), ("close", self.closer)])
        if hit is None:
            keep = len(self.buffer) if final else self._safe_prefix((self.closer,))
            self._take(keep)
            return False
        pos, kind, end = hit
        self._take(pos)
        if kind == "close":
            self._take(end - pos)
            self._end_block(events, "")
            return True
        self.invoke_raw = self._take(end - pos)
        self.state = "invoke_header"
        return True

    def _invoke_header(self, events: list, final: bool) -> bool:
        # the header ends at '>' (a quoted name may hold '>'); stop early if another element begins
        head = _read_name(self.buffer, 0)
        interrupt = self._first([("invoke", _INVOKE), ("close", self.closer), ("end", INVOKE_CLOSE)])
        if head is not None and (interrupt is None or head[1] <= interrupt[0]):
            name, end = head
            self.invoke_raw += self._take(end)
            if not name or (self.props is not None and name not in self.props):
                self.state = "invoke_rejected"
            else:
                self._start_call(events, name)
                self.params = {}
                self.state = "invoke"
            return True
        if interrupt is not None or final:
            upto = interrupt[0] if interrupt is not None else len(self.buffer)
            if interrupt is not None and interrupt[1] == "end":
                upto = interrupt[2]
            self._reject(events, self.invoke_raw + self._take(upto))
            self.state = "block"
            return True
        return False

    def _invoke_rejected(self, events: list, final: bool) -> bool:
        hit = self._first([("end", INVOKE_CLOSE), ("invoke", _INVOKE), ("close", self.closer)])
        if hit is None:
            if final:
                self._reject(events, self.invoke_raw + self._take(len(self.buffer)))
                self.state = "block"
            return False
        pos, kind, end = hit
        self._reject(events, self.invoke_raw + self._take(end if kind == "end" else pos))
        self.state = "block"
        return True

    def _close_invoke(self, events: list) -> None:
        events.append(ToolCallArgs(self.index, "}" if self.args_open else "{}"))
        self.args_open = False
        self.params = None
        self.state = "block"

    def _invoke(self, events: list, final: bool) -> bool:
        hit = self._first([("param", _PARAM), ("end", INVOKE_CLOSE), ("invoke", _INVOKE), ("close", self.closer)])
        if hit is None:
            keep = len(self.buffer) if final else self._safe_prefix((INVOKE_CLOSE, self.closer))
            self._take(keep)
            if final:
                self._close_invoke(events)
            return False
        pos, kind, end = hit
        self._take(pos)
        if kind == "param":
            self._take(end - pos)
            self.state = "param_header"
        elif kind == "end":
            self._take(end - pos)
            self._close_invoke(events)
        else:
            self._close_invoke(events)
        return True

    def _param_header(self, events: list, final: bool) -> bool:
        head = _read_name(self.buffer, 0)
        if head is None:
            if final:  # an unfinished parameter header: the call ends without it
                self._take(len(self.buffer))
                self._close_invoke(events)
            return False
        self.param_name = head[0]
        self._take(head[1])
        self.state = "param"
        return True

    def _param(self, events: list, final: bool) -> bool:
        hit = self._first(
            [
                ("pclose", PARAM_CLOSE),
                ("param", _PARAM),
                ("end", INVOKE_CLOSE),
                ("invoke", _INVOKE),
                ("close", self.closer),
            ]
        )
        if hit is None and not final:
            return False
        pos = hit[0] if hit is not None else len(self.buffer)
        value = self._take(pos)
        self._add_param(events, self.param_name, value)
        if hit is not None and hit[1] == "pclose":
            self._take(len(PARAM_CLOSE))
        self.state = "invoke"
        return True

    def _add_param(self, events: list, name: str, raw: str) -> None:
        props = self.props.get(self.call_name) if self.props is not None else None
        value = _typed(name, raw, props)
        prefix = ", " if self.args_open else "{"
        self.args_open = True
        events.append(
            ToolCallArgs(
                self.index, prefix + json.dumps(name, ensure_ascii=False) + ": " + json.dumps(value, ensure_ascii=False)
            )
        )

    def _finish(self, events: list) -> None:
        if self.state != "outside":
            self._end_block(events, self._take(len(self.buffer)))
        self.buffer = ""
