"""Rendering chat templates the way transformers does, so the templates shipped with real checkpoints work unchanged.

Templates from the Hub are untrusted code: they run in jinja2's immutable sandbox with the settings transformers
uses (``trim_blocks``, ``lstrip_blocks``, ``loopcontrols``; a ``tojson`` filter that keeps non-ASCII text;
``raise_exception`` and ``strftime_now``; ``{% generation %}`` blocks). An assistant message's reasoning is offered
under ``reasoning_content``, ``thinking`` and ``reasoning``, whichever name the template reads.

mmx also ships its own templates for the M1 and M2 chat formats (``mmx/chat/templates``), written from the format
rules of the published models.
"""

from __future__ import annotations

import copy
import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from mmx.chat.formats import builtin_template  # noqa: F401  (re-exported: the built-in templates by name)

REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_SPAN_START, _SPAN_END = "\x00mmx-gen-start\x00", "\x00mmx-gen-end\x00"


class _GenerationTracker(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` marks text the assistant produced. Rendering records where
    those spans fall in the output (for loss masks in SFT); otherwise the tag renders its body unchanged."""

    tags = frozenset({"generation"})

    def __init__(self, environment: jinja2.Environment):
        super().__init__(environment)
        environment.extend(generation_spans=None)

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(
            self.call_method("_mark", [jinja2.nodes.ContextReference()]), [], [], body
        ).set_lineno(lineno)

    def _mark(self, context, caller):
        text = caller()
        if context.get("__generation_spans__") is not None:  # delimit the span; render_chat turns marks into offsets
            return _SPAN_START + text + _SPAN_END
        return text


def _raise(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False
):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=32)
def compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTracker, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _alias_reasoning(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for message in messages:
        reasoning = next((message[k] for k in REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def _tool_schemas(tools: list[Any] | None) -> list[dict[str, Any]] | None:
    if tools is None:
        return None
    schemas = []
    for tool in tools:
        if not isinstance(tool, dict):
            raise TypeError(f"tools must be JSON-schema dicts, got {type(tool).__name__}")
        schemas.append(tool)
    return schemas


def render_chat(
    template: str,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    add_generation_prompt: bool = False,
    return_generation_spans: bool = False,
    **kwargs: Any,
) -> str | tuple[str, list[tuple[int, int]]]:
    """Render ``messages`` (OpenAI-style dicts) with a chat template string, as transformers'
    ``apply_chat_template(tokenize=False)`` does. With ``return_generation_spans`` the (start, end) character
    offsets of the template's ``{% generation %}`` blocks (the assistant's own text) come back too."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise TypeError("messages must be a list of dicts")
    compiled = compile_template(template)
    spans: list[str] = []
    context = dict(
        messages=_alias_reasoning(copy.deepcopy(messages)),
        tools=_tool_schemas(copy.deepcopy(tools)),
        documents=None,
        add_generation_prompt=add_generation_prompt,
        **kwargs,
    )
    if return_generation_spans:
        context["__generation_spans__"] = spans
    text = compiled.render(**context)
    if not return_generation_spans:
        return text
    offsets, clean, pos = [], [], 0
    for piece in text.split(_SPAN_START):
        if not clean:  # text before the first span
            clean.append(piece)
            pos = len(piece)
            continue
        inside, _, after = piece.partition(_SPAN_END)
        offsets.append((pos, pos + len(inside)))
        clean += [inside, after]
        pos += len(inside) + len(after)
    return "".join(clean), offsets
