"""Separating reasoning from the answer in MiniMax outputs.

* ``minimax_m2``: the M2 prompt ends with a pre-filled ``<think>\\n``, so the output starts inside the reasoning. A
  redundant leading ``<think>`` is skipped; reasoning ends at the first ``</think>``, or at ``<minimax:tool_call>``
  if the model starts calling tools without closing it; with neither, everything is reasoning.
* ``minimax_m1``: M1 writes ``<think>`` itself; without a leading ``<think>`` there is no reasoning at all.

Newlines around the boundary are layout, not text: the reasoning loses leading / trailing newlines and the answer
its leading ones (the M2 template adds them back when the turn is rendered again).

:class:`ReasoningStreamParser` takes the text piece by piece; :func:`split_reasoning` is the same parser fed a
finished text at once.
"""

from __future__ import annotations

STYLES = ("minimax_m2", "minimax_m1")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
M2_TOOL_OPEN = "<minimax:tool_call>"


def _check_style(style: str) -> None:
    if style not in STYLES:
        raise ValueError(f"unknown reasoning style {style!r}; use one of {STYLES}")


def split_reasoning(text: str, style: str = "minimax_m2") -> tuple[str | None, str]:
    """(reasoning, content) of a finished text. Reasoning is None when the output has none (M1 without
    ``<think>``). The streaming parser fed the whole text at once."""
    parser = ReasoningStreamParser(style)
    r1, c1 = parser.feed(text)
    r2, c2 = parser.finish()
    return (r1 + r2 if parser.saw_reasoning else None), c1 + c2


def split_inline_think(text: str) -> tuple[str | None, str]:
    """(reasoning, visible text) of a reply that carries its reasoning inline as ``<think>...</think>`` (what
    append-think servers send back); reasoning is None when the text has no closed think block."""
    if THINK_CLOSE not in text:
        return None, text
    return split_reasoning(text, "minimax_m2")


def partial_suffix(text: str, tags: tuple[str, ...] | list[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of one of ``tags``: what a stream holds
    back because the next piece may complete a tag (or a stop string)."""
    best = 0
    for tag in tags:
        for n in range(min(len(tag) - 1, len(text)), best, -1):
            if text.endswith(tag[:n]):
                best = n
                break
    return best


class ReasoningStreamParser:
    """Incremental :func:`split_reasoning`: ``feed(delta)`` and ``finish()`` return (reasoning delta, content
    delta); the concatenations equal the non-streaming result."""

    def __init__(self, style: str = "minimax_m2"):
        _check_style(style)
        self.style = style
        self.state = "start"  # start -> reasoning -> content_start -> content, or start -> content (M1)
        self.buffer = ""  # text seen but not yet emitted
        self.reasoning_started = False  # leading newlines of the reasoning are dropped until text arrives
        self.ends = (THINK_CLOSE, M2_TOOL_OPEN) if style == "minimax_m2" else (THINK_CLOSE,)
        self.saw_reasoning = False

    def feed(self, delta: str) -> tuple[str, str]:
        self.buffer += delta
        return self._drain(final=False)

    def finish(self) -> tuple[str, str]:
        return self._drain(final=True)

    def _drain(self, final: bool) -> tuple[str, str]:
        reasoning, content = "", ""
        while True:
            if self.state == "start":
                if not self._resolve_start(final):
                    break
            elif self.state == "reasoning":
                piece, done = self._reasoning_step(final)
                reasoning += piece
                if not done:
                    break
            elif self.state == "content_start":
                self.buffer = self.buffer.lstrip("\n")
                if not self.buffer:
                    break
                self.state = "content"
            else:
                content += self.buffer
                self.buffer = ""
                break
        return reasoning, content

    def _resolve_start(self, final: bool) -> bool:
        """Decide whether the output opens with <think>; False while the buffer could still become one."""
        head = self.buffer.lstrip() if self.style == "minimax_m1" else self.buffer.lstrip("\n")
        if head.startswith(THINK_OPEN):
            self.buffer = head[len(THINK_OPEN) :]
            self.state = "reasoning"
            self.saw_reasoning = True
            return True
        if THINK_OPEN.startswith(head) and not final:
            return False  # empty or a partial "<think>": wait
        if self.style == "minimax_m1":
            self.state = "content"
        else:
            self.state = "reasoning"
            self.saw_reasoning = True
        return True

    def _reasoning_step(self, final: bool) -> tuple[str, bool]:
        """Emit what is certainly reasoning; True once reasoning has ended (state changed)."""
        if not self.reasoning_started:
            self.buffer = self.buffer.lstrip("\n")
            if not self.buffer:
                return "", False
            self.reasoning_started = True
        hits = [(self.buffer.find(tag), tag) for tag in self.ends]
        hits = [(i, tag) for i, tag in hits if i != -1]
        if hits:
            i, tag = min(hits)
            piece = self.buffer[:i].rstrip("\n")
            # the tool-call tag belongs to the content; </think> is dropped
            self.buffer = self.buffer[i + len(THINK_CLOSE) :] if tag == THINK_CLOSE else self.buffer[i:]
            self.state = "content_start"
            return piece, True
        if final:
            piece = self.buffer.rstrip("\n")
            self.buffer = ""
            return piece, False
        # hold back a possible partial end tag and trailing newlines (stripped if the reasoning ends here)
        keep = partial_suffix(self.buffer, self.ends)
        safe = self.buffer[: len(self.buffer) - keep]
        stripped = safe.rstrip("\n")
        self.buffer = self.buffer[len(stripped) :]
        return stripped, False
