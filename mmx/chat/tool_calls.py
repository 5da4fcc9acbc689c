"""Tool calls in MiniMax outputs, as structured data.

M2 (``minimax_m2``) writes XML::

    <minimax:tool_call>
    <invoke name="get_weather">
    <parameter name="city">Paris</parameter>
    <parameter name="days">3</parameter>
    </invoke>
    </minimax:tool_call>

M1 (``minimax_m1``) writes one JSON object per line inside ``<tool_calls> ... </tool_calls>``.

**A call is a call only once it is complete**: its block is closed (``</minimax:tool_call>`` / ``</tool_calls>``)
and, in M2, the call's own ``</invoke>`` came first. A block that never closes (the reply hit the length limit, a
stop string, or an end of sequence too early) yields no call, so a client is never handed a call with a truncated
argument; its text stays in the content exactly as the model wrote it, and the finish reason says why the reply
ended. (MiniMax's reference parser and SGLang also return no call there; SGLang drops the text, mmx keeps it as
it keeps every malformed block, so nothing the model wrote disappears silently.)

Inside a closed block:

* M2: parameter values are raw text typed by the tool's JSON schema (:mod:`mmx.chat.schema`). Tolerated: single-
  quoted or bare names, extra attributes, a missing ``</parameter>`` (the value runs to the next ``<parameter`` or
  ``</invoke>``), a value that itself contains ``</parameter>`` (it runs to the last one before the next
  parameter). One leading and one trailing newline of a value are layout and dropped; spaces are data and kept;
  nothing is XML-unescaped (the template writes raw text). An ``<invoke>`` whose ``</invoke>`` never came (the
  next ``<invoke`` or the block's end came first) is not a call.
* M1: a line with stray extra closing braces is repaired.

Malformed output never raises. A closed block with no usable call stays in the content as written. In a block with
calls, an invoke (M2) or line (M1) that is not a usable call, such as a call to a tool that is not offered (when
tools are given), stays in the content as written instead of becoming a fabricated call; other text between the
calls is layout and dropped. Content is the text outside the blocks, stripped (None if empty).

A ``<think> ... </think>`` region in the content (reasoning that did not open the reply, so the reasoning parser
left it in place) is content: tool-call tags inside it are the model thinking about a call, not a call.

``max_calls`` keeps the first calls and drops every later complete call, neither a call nor content: the client
asked for at most that many (``parallel_tool_calls=false`` is ``max_calls=1``), and a model that writes more has
still written its first one in full.

:class:`ToolCallStreamParser` takes the text piece by piece and holds a block back until it closes, then emits each
call's start and its whole arguments JSON; :func:`parse_tool_calls` is the same parser fed a finished text at once.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from mmx.chat.formats import new_tool_call_id
from mmx.chat.reasoning import THINK_CLOSE, THINK_OPEN, partial_suffix
from mmx.chat.schema import coerce_value, tool_properties

STYLES = ("minimax_m2", "minimax_m1")
M2_OPEN, M2_CLOSE = "<minimax:tool_call>", "</minimax:tool_call>"
M1_OPEN, M1_CLOSE = "<tool_calls>", "</tool_calls>"
INVOKE_CLOSE, PARAM_CLOSE = "</invoke>", "</parameter>"
_INVOKE = re.compile(r"<invoke\s+name\s*=\s*")
_PARAM = re.compile(r"<parameter\s+name\s*=\s*")
_BARE_NAME = re.compile(r"[^\s>]*")

# A block's parse, in order: a usable call ({"name", "arguments"}) or the raw text of something that is not one.
BlockItem = dict[str, Any] | str


# ---------------------------------------------------------------------------------------------------- M2 blocks
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
        match = _BARE_NAME.match(text, start)
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


def _m2_block(body: str, props: dict[str, dict] | None) -> list[BlockItem]:
    """The invokes of a closed M2 block, each a call or its raw text."""
    items: list[BlockItem] = []
    starts = [m.start() for m in _INVOKE.finditer(body)]
    for k, start in enumerate(starts):
        segment = body[start : starts[k + 1] if k + 1 < len(starts) else len(body)]
        close = segment.find(INVOKE_CLOSE)
        if close == -1:  # never closed: another invoke or the block's end came first
            items.append(segment)
            continue
        call = _m2_invoke(segment[:close], props)
        items.append(call if call is not None else segment[: close + len(INVOKE_CLOSE)])
    return items


def _m2_invoke(text: str, props: dict[str, dict] | None) -> dict[str, Any] | None:
    """The call written by one invoke (``text`` runs from ``<invoke`` to just before ``</invoke>``), or None when it
    is not a usable call: a damaged header, or a tool that is not offered."""
    head = _read_name(text, _INVOKE.match(text).end())
    if head is None:
        return None
    name, header_end = head
    if not name or (props is not None and name not in props):
        return None
    schema = props.get(name) if props is not None else None
    params = list(_PARAM.finditer(text, header_end))
    arguments: dict[str, Any] = {}
    for k, match in enumerate(params):
        segment = text[match.end() : params[k + 1].start() if k + 1 < len(params) else len(text)]
        param_head = _read_name(segment, 0)
        if param_head is None:
            return None
        param, value_start = param_head
        value = segment[value_start:]
        end = value.rfind(PARAM_CLOSE)
        if end != -1:
            value = value[:end]
        arguments[param] = coerce_value(_layout_strip(value), (schema or {}).get(param))
    return {"name": name, "arguments": arguments}


# ---------------------------------------------------------------------------------------------------- M1 blocks
def _m1_call(line: str, props: dict[str, dict] | None) -> dict[str, Any] | None:
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
    if not isinstance(args, dict) or (props is not None and obj["name"] not in props):
        return None
    return {"name": obj["name"], "arguments": args}


def _m1_block(body: str, props: dict[str, dict] | None) -> list[BlockItem]:
    """The lines of a closed M1 block, each a call or its raw text (blank lines are layout)."""
    lines = body.split("\n")
    items: list[BlockItem] = []
    for k, line in enumerate(lines):
        if line.strip():
            call = _m1_call(line, props)
            items.append(call if call is not None else line + ("\n" if k + 1 < len(lines) else ""))
    return items


# ---------------------------------------------------------------------------------------------------- results
def parse_tool_calls(
    text: str, tools: list[dict[str, Any]] | None = None, style: str = "minimax_m2", max_calls: int | None = None
) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, calls) of a finished output (its reasoning already split off); each call is
    ``{"name": str, "arguments": dict}``. The streaming parser fed the whole text at once."""
    parser = ToolCallStreamParser(tools, style, max_calls)
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


def check_call_limit(value: Any, field: str = "max_calls") -> None:
    """A limit on the number of calls is None (no limit) or a positive integer."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{field} must be a positive integer or None, got {value!r}")


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
    text: str  # the arguments as JSON text (a client concatenates the fragments of a call)


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


class ToolCallStreamParser:
    """Incremental :func:`parse_tool_calls`. ``feed(delta)`` / ``finish()`` return events: content deltas and, when
    a block closes, each call's start (index, id, name) followed by its arguments as one JSON text
    (``json.dumps(arguments)``)."""

    def __init__(
        self, tools: list[dict[str, Any]] | None = None, style: str = "minimax_m2", max_calls: int | None = None
    ):
        if style not in STYLES:
            raise ValueError(f"unknown tool-call style {style!r}; use one of {STYLES}")
        check_call_limit(max_calls)
        self.props = tool_properties(tools)
        self.opener, self.closer = (M2_OPEN, M2_CLOSE) if style == "minimax_m2" else (M1_OPEN, M1_CLOSE)
        self.parse_block = _m2_block if style == "minimax_m2" else _m1_block
        self.max_calls = max_calls
        self.buffer = ""  # text not yet emitted: a possible partial tag, or an open block's body
        self.state = "outside"  # outside | think | block
        self.content = _Content()
        self.calls = 0  # calls emitted (the next call's index)
        self.scanned = 0  # how much of an open block's buffer is known to hold no closer

    def feed(self, delta: str) -> list:
        self.buffer += delta
        return self._run(final=False)

    def finish(self) -> list:
        return self._run(final=True)

    # ------------------------------------------------------------------ machinery
    def _run(self, final: bool) -> list:
        """Step the state machine until it needs more input; every step that returns True made progress."""
        events: list = []
        while getattr(self, f"_{self.state}")(events, final):
            pass
        return events

    def _emit_content(self, events: list, text: str) -> None:
        out = self.content.add(text)
        if out:
            events.append(ContentDelta(out))

    def _pass_through(self, events: list, final: bool, tags: tuple[str, ...]) -> None:
        """Emit the buffer as content, except a suffix that may still grow into one of ``tags``."""
        keep = 0 if final else partial_suffix(self.buffer, tags)
        self._emit_content(events, self.buffer[: len(self.buffer) - keep])
        self.buffer = self.buffer[len(self.buffer) - keep :]

    def _outside(self, events: list, final: bool) -> bool:
        hits = [(i, tag) for tag in (self.opener, THINK_OPEN) if (i := self.buffer.find(tag)) != -1]
        if not hits:
            self._pass_through(events, final, (self.opener, THINK_OPEN))
            return False
        i, tag = min(hits)
        self._emit_content(events, self.buffer[: i if tag == self.opener else i + len(tag)])
        self.buffer = self.buffer[i + len(tag) :]
        self.state = "block" if tag == self.opener else "think"
        return True

    def _think(self, events: list, final: bool) -> bool:
        i = self.buffer.find(THINK_CLOSE)
        if i == -1:
            self._pass_through(events, final, (THINK_CLOSE,))
            return False
        self._emit_content(events, self.buffer[: i + len(THINK_CLOSE)])
        self.buffer = self.buffer[i + len(THINK_CLOSE) :]
        self.state = "outside"
        return True

    def _block(self, events: list, final: bool) -> bool:
        i = self.buffer.find(self.closer, self.scanned)
        if i == -1:
            if final:  # never closed: no call, the text stays as written
                self._emit_content(events, self.opener + self.buffer)
                self.buffer = ""
                self.state = "outside"
            # a long argument arrives token by token: look for the closer only in what is new
            self.scanned = max(0, len(self.buffer) - len(self.closer) + 1)
            return False
        body = self.buffer[:i]
        self.buffer = self.buffer[i + len(self.closer) :]
        self.state = "outside"
        self.scanned = 0
        items = self.parse_block(body, self.props)
        if not any(isinstance(item, dict) for item in items):
            self._emit_content(events, self.opener + body + self.closer)
            return True
        for item in items:
            if isinstance(item, str):
                self._emit_content(events, item)
            elif self.max_calls is None or self.calls < self.max_calls:
                arguments = json.dumps(item["arguments"], ensure_ascii=False)
                events.append(ToolCallStart(self.calls, new_tool_call_id(), item["name"]))
                events.append(ToolCallArgs(self.calls, arguments))
                self.calls += 1
        return True
