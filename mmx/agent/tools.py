"""Agent tools: a JSON schema each, arguments validated before anything runs, failures returned to the model as
tool results (``ToolError``), never raised through the loop.

The built-in tools act only inside the work directory: paths are resolved (symlinks included) and refused when they
land outside it; shell commands and Python run in :mod:`mmx.sandbox` with a time limit and no network.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mmx.sandbox import Limits, isolation_available, run_command, run_python

MAX_READ_CHARS = 20_000
MAX_RESULT_CHARS = 12_000


class ToolError(Exception):
    """A tool could not do what was asked; the message goes back to the model."""


@dataclass
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]  # JSON schema of the arguments object
    function: Callable[..., str]  # called with the validated arguments as keyword arguments

    def schema(self) -> dict[str, Any]:
        """OpenAI's function-tool shape (the Anthropic client converts it)."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }

    def __call__(self, arguments: Any) -> str:
        if not isinstance(arguments, dict):
            raise ToolError(f"arguments must be a JSON object, got {type(arguments).__name__}")
        problems = validate(arguments, self.parameters)
        if problems:
            raise ToolError("invalid arguments: " + "; ".join(problems))
        return str(self.function(**arguments))


# ---------------------------------------------------------------------------------------------------- validation
_TYPES: dict[str, Callable[[Any], bool]] = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "null": lambda v: v is None,
}


def validate(value: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """The ways ``value`` breaks ``schema`` (the JSON-schema subset tool definitions use)."""
    where = path or "arguments"
    expected = schema.get("type")
    if expected is not None:
        kinds = expected if isinstance(expected, list) else [expected]
        if not any(_TYPES.get(k, lambda v: True)(value) for k in kinds):
            return [f"{where} must be {' or '.join(kinds)}, got {type(value).__name__}"]
    problems = []
    if "enum" in schema and value not in schema["enum"]:
        problems.append(f"{where} must be one of {schema['enum']}")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for key in schema.get("required", []):
            if key not in value:
                problems.append(f"missing required argument {key!r}")
        if schema.get("additionalProperties") is False:
            problems += [f"unexpected argument {key!r}" for key in value if key not in props]
        for key, item in value.items():
            if key in props:
                problems += validate(item, props[key], f"{path}.{key}" if path else key)
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            problems += validate(item, schema["items"], f"{where}[{i}]")
    if isinstance(value, str):
        if "minLength" in schema and len(value) < schema["minLength"]:
            problems.append(f"{where} must have at least {schema['minLength']} characters")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            problems.append(f"{where} must have at most {schema['maxLength']} characters")
    if _TYPES["number"](value):
        if "minimum" in schema and value < schema["minimum"]:
            problems.append(f"{where} must be >= {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            problems.append(f"{where} must be <= {schema['maximum']}")
    return problems


# ---------------------------------------------------------------------------------------------------- built-in tools
@dataclass
class Workspace:
    """The directory the agent works in and the limits of what it may run there."""

    root: str
    command_timeout: float = 30.0
    memory_mb: int = 2048
    allow_unconfined_shell: bool = False  # run shell commands even where namespaces cannot confine them
    _isolated: bool | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.root = os.path.realpath(self.root)
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"work directory {self.root} does not exist")

    def resolve(self, path: str) -> str:
        """An absolute path inside the work directory, or a ToolError."""
        if not isinstance(path, str) or not path:
            raise ToolError("path must be a non-empty string")
        full = os.path.realpath(os.path.join(self.root, path))
        if full != self.root and not full.startswith(self.root + os.sep):
            raise ToolError(f"{path!r} is outside the work directory; use paths relative to it")
        return full

    def relative(self, full: str) -> str:
        return os.path.relpath(full, self.root)

    @property
    def isolated(self) -> bool:
        if self._isolated is None:
            self._isolated = isolation_available()
        return self._isolated

    def limits(self, timeout: float | None) -> Limits:
        seconds = self.command_timeout if timeout is None else min(float(timeout), self.command_timeout)
        return Limits(timeout=seconds, memory_mb=self.memory_mb, max_output=MAX_RESULT_CHARS)


def _report(result) -> str:
    parts = [f"[{result.summary()}]"]
    if result.stdout:
        parts.append("stdout:\n" + result.stdout.rstrip())
    if result.stderr:
        parts.append("stderr:\n" + result.stderr.rstrip())
    return "\n".join(parts)


def file_tools(ws: Workspace) -> list[Tool]:
    def read_file(path: str, offset: int = 0, limit: int = MAX_READ_CHARS) -> str:
        full = ws.resolve(path)
        if not os.path.isfile(full):
            raise ToolError(f"{path!r} is not a file")
        with open(full, encoding="utf-8", errors="replace") as f:
            text = f.read()
        piece = text[offset : offset + min(limit, MAX_READ_CHARS)]
        more = len(text) - offset - len(piece)
        return piece + (
            f"\n... ({more} more characters; read on with offset={offset + len(piece)})" if more > 0 else ""
        )

    def write_file(path: str, content: str) -> str:
        full = ws.resolve(path)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "w", encoding="utf-8") as f:
            f.write(content)
        return f"wrote {len(content)} characters to {ws.relative(full)}"

    def edit_file(path: str, old: str, new: str, replace_all: bool = False) -> str:
        full = ws.resolve(path)
        if not os.path.isfile(full):
            raise ToolError(f"{path!r} is not a file")
        with open(full, encoding="utf-8") as f:
            text = f.read()
        count = text.count(old) if old else 0
        if count == 0:
            raise ToolError(f"the text to replace was not found in {path!r}")
        if count > 1 and not replace_all:
            raise ToolError(f"the text to replace occurs {count} times in {path!r}; add context or set replace_all")
        with open(full, "w", encoding="utf-8") as f:
            f.write(text.replace(old, new) if replace_all else text.replace(old, new, 1))
        return f"replaced {count if replace_all else 1} occurrence(s) in {ws.relative(full)}"

    def list_files(path: str = ".") -> str:
        full = ws.resolve(path)
        if not os.path.isdir(full):
            raise ToolError(f"{path!r} is not a directory")
        entries = sorted(os.listdir(full))
        return "\n".join(e + ("/" if os.path.isdir(os.path.join(full, e)) else "") for e in entries) or "(empty)"

    string = {"type": "string"}
    return [
        Tool(
            "read_file",
            "Read a text file in the work directory.",
            {
                "type": "object",
                "properties": {
                    "path": string,
                    "offset": {"type": "integer", "minimum": 0},
                    "limit": {"type": "integer", "minimum": 1},
                },
                "required": ["path"],
                "additionalProperties": False,
            },
            read_file,
        ),
        Tool(
            "write_file",
            "Create or overwrite a text file in the work directory.",
            {
                "type": "object",
                "properties": {"path": string, "content": string},
                "required": ["path", "content"],
                "additionalProperties": False,
            },
            write_file,
        ),
        Tool(
            "edit_file",
            "Replace an exact piece of text in a file (it must occur once unless replace_all is true).",
            {
                "type": "object",
                "properties": {
                    "path": string,
                    "old": {"type": "string", "minLength": 1},
                    "new": string,
                    "replace_all": {"type": "boolean"},
                },
                "required": ["path", "old", "new"],
                "additionalProperties": False,
            },
            edit_file,
        ),
        Tool(
            "list_files",
            "List a directory of the work directory.",
            {"type": "object", "properties": {"path": string}, "additionalProperties": False},
            list_files,
        ),
    ]


def execution_tools(ws: Workspace) -> list[Tool]:
    def run_shell(command: str, timeout: float | None = None) -> str:
        if not ws.isolated and not ws.allow_unconfined_shell:
            raise ToolError("run_shell is unavailable: this machine cannot confine commands (no kernel namespaces)")
        return _report(run_command(command, ws.root, ws.limits(timeout), isolate=ws.isolated))

    def python(code: str, timeout: float | None = None) -> str:
        return _report(run_python(code, workdir=ws.root, limits=ws.limits(timeout), isolate=ws.isolated))

    timeout = {"type": "number", "minimum": 0.1, "description": "seconds (capped by the agent's limit)"}
    return [
        Tool(
            "run_shell",
            "Run a shell command in the work directory (no network; time-limited). Returns exit status and output.",
            {
                "type": "object",
                "properties": {"command": {"type": "string", "minLength": 1}, "timeout": timeout},
                "required": ["command"],
                "additionalProperties": False,
            },
            run_shell,
        ),
        Tool(
            "run_python",
            "Run a Python program in the work directory (no network, no subprocesses; time-limited).",
            {
                "type": "object",
                "properties": {"code": {"type": "string", "minLength": 1}, "timeout": timeout},
                "required": ["code"],
                "additionalProperties": False,
            },
            python,
        ),
    ]


def default_tools(ws: Workspace) -> list[Tool]:
    return file_tools(ws) + execution_tools(ws)
