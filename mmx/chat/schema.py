"""Typing M2 tool-call parameter values with the tool's JSON schema.

M2 writes every parameter as raw text (strings unquoted, numbers and booleans bare, arrays and objects as JSON),
so the server recovers types from the schema. Candidate types come from ``type`` (a name or a list), ``enum`` values
and ``anyOf`` / ``oneOf`` / ``allOf``; they are tried in the order null, integer, number, boolean, object, array,
string, and a value no candidate accepts is read as JSON if it parses, else kept as text.

Deliberately unlike some upstream parsers (specs/m2_and_formats.md §8): a list ``type`` such as
``["string", "null"]`` works; "none" / "nil" are strings, never null; a nullable parameter keeps non-null values.
"""

from __future__ import annotations

import json
import math
from typing import Any

_ALIASES = {
    "int": "integer",
    "integer": "integer",
    "float": "number",
    "double": "number",
    "number": "number",
    "bool": "boolean",
    "boolean": "boolean",
    "dict": "object",
    "object": "object",
    "list": "array",
    "array": "array",
    "str": "string",
    "string": "string",
    "text": "string",
    "null": "null",
    "none": "null",
}
_ORDER = ("null", "integer", "number", "boolean", "object", "array", "string")
_NO_MATCH = object()


def schema_types(schema: Any) -> list[str]:
    """The JSON types a schema admits, normalised and in trial order; ["string"] when it says nothing."""
    found: set[str] = set()

    def visit(node: Any) -> None:
        if not isinstance(node, dict):
            return
        kind = node.get("type")
        for name in kind if isinstance(kind, list) else [kind]:
            if isinstance(name, str) and name.lower() in _ALIASES:
                found.add(_ALIASES[name.lower()])
        for value in node.get("enum") or []:
            found.add(_json_type(value))
        for key in ("anyOf", "oneOf", "allOf"):
            for sub in node.get(key) or []:
                visit(sub)

    visit(schema)
    return [t for t in _ORDER if t in found] or ["string"]


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "array"
    return "string"


def _finite(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    return True


def _try(kind: str, text: str) -> Any:
    stripped = text.strip()
    if kind == "null":
        return None if stripped == "null" else _NO_MATCH
    if kind == "integer":
        try:
            return int(stripped)
        except ValueError:
            return _NO_MATCH
    if kind == "number":
        try:
            return int(stripped)
        except ValueError:
            pass
        try:
            number = float(stripped)
        except ValueError:
            return _NO_MATCH
        if not math.isfinite(number):
            return _NO_MATCH
        return int(number) if number.is_integer() else number
    if kind == "boolean":
        lowered = stripped.lower()
        return {"true": True, "1": True, "false": False, "0": False}.get(lowered, _NO_MATCH)
    if kind in ("object", "array"):
        try:
            value = json.loads(stripped)
        except ValueError:
            return _NO_MATCH
        wanted = dict if kind == "object" else list
        return value if isinstance(value, wanted) and _finite(value) else _NO_MATCH
    return text  # string: kept verbatim


def coerce_value(text: str, schema: Any = None) -> Any:
    """The typed value of a parameter written as ``text``, per ``schema`` (the property's JSON schema)."""
    for kind in schema_types(schema):
        value = _try(kind, text)
        if value is not _NO_MATCH:
            return _coerce_nested(value, schema)
    try:
        value = json.loads(text)
        return value if _finite(value) else text
    except ValueError:
        return text


def _coerce_nested(value: Any, schema: Any) -> Any:
    """Inside parsed objects and arrays, fix strings whose schema wants another type (e.g. "3" for an integer)."""
    if not isinstance(schema, dict):
        return value
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        return {k: _fix(v, props.get(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_fix(v, schema.get("items")) for v in value]
    return value


def _fix(value: Any, schema: Any) -> Any:
    if isinstance(value, str) and schema is not None and "string" not in schema_types(schema):
        return coerce_value(value, schema)
    return _coerce_nested(value, schema)


def tool_properties(tools: list[dict[str, Any]] | None) -> dict[str, dict[str, Any]] | None:
    """name -> parameter properties, from OpenAI-style tools ({"type": "function", "function": {...}}) or bare
    function schemas; None when no tools were given (then every tool name is accepted)."""
    if tools is None:
        return None
    out = {}
    for tool in tools:
        fn = tool.get("function", tool) if isinstance(tool, dict) else {}
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            params = fn.get("parameters") or {}
            out[fn["name"]] = params.get("properties") or {} if isinstance(params, dict) else {}
    return out
