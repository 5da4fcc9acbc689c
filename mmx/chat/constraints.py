"""What a chat format contributes to constrained decoding (structured outputs, :mod:`mmx.engine.structured`):
where a reasoning model's answer starts (:func:`answer_start`), and the grammar of a forced tool call
(:func:`tool_call_grammar`).

A forced ``tool_choice`` ("required" or a named tool) pre-fills the call's opening
(:meth:`ChatFormat.forced_tool_prefix`, which the prompt ends with); the grammar holds the rest of the reply to
calls of the offered tools, each with its parameter schema. Required parameters always appear.

* M2 (XML): parameters come in the schema's order, one ``<parameter name="P">VALUE</parameter>`` line each. A value
  is written the way :mod:`mmx.chat.schema` reads it back: a parameter whose schema admits no string is JSON
  (``%json {schema}``); one that admits a string is raw text (an ``enum`` / ``const`` one of its values;
  ``pattern``, ``minLength`` and ``maxLength`` honoured) that never holds a tag that would end it early to the
  parser (``<parameter``, ``</parameter``, ``<invoke``, ``</invoke``, ``<minimax:tool_call>``,
  ``</minimax:tool_call>``). A parameter admitting strings and other types is raw text too, which the parser types.
* M1 (JSON lines): the arguments are ``%json {the tool's parameters}``; the line closes the call object.

With ``parallel`` a "required" reply may hold several calls; a named tool is called once.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from typing import Any

from mmx.chat.formats import ChatFormat
from mmx.chat.reasoning import THINK_CLOSE, THINK_OPEN
from mmx.chat.schema import schema_types

# JSON inside tool calls: compact-or-pretty whitespace, bounded (see mmx.engine.structured.JSON_WHITESPACE), and
# schema keywords llguidance does not implement ignored rather than refused (tools are often written loosely)
_JSON_OPTIONS = {"whitespace_pattern": "( |\\r?\\n[ \\t]{0,20})?", "lenient": True}
_NO_TAGS = "~/(?s:.*)<(\\/?(parameter|invoke)|\\/?minimax:tool_call>)(?s:.*)/"


def _lit(text: str) -> str:
    """A Lark string literal."""
    return json.dumps(text, ensure_ascii=False)


def added_tokens(tokenizer: Any) -> set[str]:
    """The texts of a tokenizer's added tokens (a :class:`~mmx.chat.tokenizer.Tokenizer`)."""
    return {t.content for t in tokenizer.backend.get_added_tokens_decoder().values()}


def answer_start(
    tokenizer: Any, format: ChatFormat, prompt_ids: list[int], free_start: bool = True
) -> tuple[int, int, bool] | None:
    """Where a chat reply's answer (what a constraint holds) starts, as ``(think open id, think close id, opened)``:
    after ``</think>``, with ``opened`` when the prompt leaves a think block open (M2's pre-filled ``<think>``);
    without it when the format lets the model open one itself (M1) and the reply starts free (``free_start``: no
    forced opening), its first token may then open it. None: at once (no think block to wait for, or think tags
    that are not single tokens, which a constraint cannot follow)."""
    added = added_tokens(tokenizer)
    if THINK_OPEN not in added or THINK_CLOSE not in added:
        return None
    open_id, close_id = tokenizer.token_to_id(THINK_OPEN), tokenizer.token_to_id(THINK_CLOSE)
    last_open = max((i for i, t in enumerate(prompt_ids) if t == open_id), default=-1)
    last_close = max((i for i, t in enumerate(prompt_ids) if t == close_id), default=-1)
    if last_open > last_close:
        return open_id, close_id, True
    if free_start and THINK_OPEN not in format.generation_prefill:
        return open_id, close_id, False
    return None


def _tag(text: str, single_tokens: Collection[str]) -> str:
    """A tag as a grammar symbol: the token itself when the tokenizer has it as one (added) token, which a grammar
    must name as ``<tag>`` (llguidance does not match an added token's text byte by byte), else its text."""
    return text if text in single_tokens else _lit(text)


def _function(tool: dict[str, Any]) -> dict[str, Any]:
    return tool.get("function", tool) if isinstance(tool, dict) else {}


def _embedded(schema: Any, root: dict[str, Any]) -> str:
    """A sub-schema for ``%json``, carrying the root's definitions (its ``$ref`` s point at the root)."""
    schema = dict(schema) if isinstance(schema, dict) else {}
    for key in ("$defs", "definitions"):
        if key in root and key not in schema:
            schema[key] = root[key]
    schema["x-guidance"] = {**_JSON_OPTIONS, **(schema.get("x-guidance") or {})}
    return json.dumps(schema, ensure_ascii=False)


def _regex(pattern: str) -> str:
    """A JSON-schema ``pattern`` (a search, unless anchored) as a whole-value Lark regex."""
    from llguidance import regex_to_lark

    if (len(pattern) - len(pattern.rstrip("\\"))) % 2 == 1:
        raise ValueError(f"the pattern {pattern!r} ends in a lone backslash")
    anchored_start = pattern.startswith("^")
    anchored_end = pattern.endswith("$") and not pattern.endswith("\\$")
    core = pattern[1 if anchored_start else 0 : -1 if anchored_end else None]
    before = "" if anchored_start else "(?s:.*)"
    after = "" if anchored_end else "(?s:.*)"
    return f"/{before}({regex_to_lark(core)}){after}/"


def _m2_value(rule: str, schema: Any, root: dict[str, Any]) -> list[str]:
    """Rules for one parameter's value followed by its ``</parameter>``; the first defines ``rule``."""
    schema = schema if isinstance(schema, dict) else {}
    if "string" not in schema_types(schema):
        return [f'{rule}: %json {_embedded(schema, root)} "</parameter>"']
    values = [schema["const"]] if "const" in schema else schema.get("enum")
    if values and all(isinstance(v, str) for v in values):
        return [f'{rule}: ({" | ".join(_lit(v) for v in values)}) "</parameter>"']
    terminal = rule.upper()
    parts = ["/(?s:.*)/", _NO_TAGS]
    low, high = schema.get("minLength"), schema.get("maxLength")
    if isinstance(low, int) or isinstance(high, int):
        parts.append(f"/(?s:.{{{low if isinstance(low, int) else 0},{high if isinstance(high, int) else ''}}})/")
    if isinstance(schema.get("pattern"), str):
        parts.append(_regex(schema["pattern"]))
    return [f'{rule}[suffix="</parameter>"]: {terminal}', f"{terminal}: {' & '.join(parts)}"]


def _m2_tool(rule: str, fn: dict[str, Any]) -> list[str]:
    """``rule``: a tool's parameters and the closing ``</invoke>``, after its ``<invoke name="...">`` line."""
    params = fn.get("parameters") if isinstance(fn.get("parameters"), dict) else {}
    props = params.get("properties") or {}
    required = set(params.get("required") or [])
    rules, body = [], []
    for j, (name, schema) in enumerate(props.items()):
        if '"' in name or "\n" in name:
            raise ValueError(f"tool {fn.get('name')!r}: parameter name {name!r} cannot be written in M2's XML")
        param, value = f"{rule}_p{j}", f"{rule}_v{j}"
        rules.append(f'{param}: "<parameter name=\\"" {_lit(name)} "\\">" {value} "\\n"')
        rules += _m2_value(value, schema, params)
        body.append(param if name in required else f"{param}?")
    rules.insert(0, f"{rule}: " + " ".join([*body, _lit("</invoke>\n")]))
    return rules


def _m1_tool(rule: str, fn: dict[str, Any]) -> list[str]:
    """``rule``: a tool's arguments object and the brace closing the call."""
    params = fn.get("parameters") if isinstance(fn.get("parameters"), dict) else {"type": "object"}
    return [f'{rule}: %json {_embedded(params, params)} "}}"']


def tool_call_grammar(
    format: ChatFormat,
    tools: list[dict[str, Any]],
    tool_name: str | None = None,
    parallel: bool = True,
    single_tokens: Collection[str] = (),
) -> str:
    """The Lark grammar of what follows ``format.forced_tool_prefix(tool_name)``: calls to ``tools`` (OpenAI-style),
    the named tool's alone when ``tool_name`` is given. ``single_tokens``: the format's tags the tokenizer has as
    single tokens. ValueError when a tool cannot be expressed."""
    functions = [_function(t) for t in tools]
    if tool_name is not None:
        functions = [fn for fn in functions if fn.get("name") == tool_name]
        if not functions:
            raise ValueError(f"tool_choice names {tool_name!r}, which is not among the tools")
    m2 = format.name == "minimax_m2"
    tool_rules = _m2_tool if m2 else _m1_tool
    rules: list[str] = []
    for i, fn in enumerate(functions):
        rules += tool_rules(f"t{i}", fn)
    close = _tag("</minimax:tool_call>", single_tokens) if m2 else '"\\n" ' + _tag("</tool_calls>", single_tokens)
    if tool_name is not None:  # the prefix already wrote the call's name: its parameters follow
        return "\n".join([f"start: t0 {close}", *rules]) + "\n"
    names = []
    for i, fn in enumerate(functions):
        name = fn.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[^\"\n]+", name):
            raise ValueError(f"tool name {name!r} cannot be written in the tool-call syntax")
        # the prefix ends inside the call's name: the rest of its header, then the tool's own part
        header = f'{name}">\n' if m2 else f'{name}", "arguments": '
        names.append(f"{_lit(header)} t{i}")
    again = '<invoke name="' if m2 else '\n{"name": "'
    more = f" ({_lit(again)} call)*" if parallel else ""
    return "\n".join([f"start: call{more} {close}", f"call: {' | '.join(names)}", *rules]) + "\n"
