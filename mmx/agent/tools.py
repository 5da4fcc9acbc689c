"""Agent tools: a JSON schema each, arguments validated before anything runs, failures returned to the model as
tool results (``ToolError``), never raised through the loop.

The built-in file tools act only inside the work directory: every path is opened component by component beneath it
(:mod:`mmx.sandbox.beneath`), so neither a symlink nor a directory swapped for one while the tool runs can lead it
outside. Shell commands and Python run in the bubblewrap sandbox (:mod:`mmx.sandbox`): the work directory is the only
writable place, no network, time and memory limits; without bubblewrap they are refused unless the workspace allows
running unsandboxed.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mmx.sandbox import Limits, run_command, run_python, sandbox_problem
from mmx.sandbox.beneath import OutsideError, open_beneath, regular_file
from mmx.sandbox.process import UNSAFE_HINT

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
    processes: int = 256
    allow_unsandboxed: bool = False  # UNSAFE: run shell commands and Python with no confinement where bwrap is missing

    def __post_init__(self) -> None:
        self.root = os.path.realpath(self.root)
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"work directory {self.root} does not exist")

    def open(self, path: str, flags: int, *, make_parents: bool = False) -> tuple[int, str]:
        """A descriptor for ``path`` opened beneath the work directory, and its path relative to it; or a ToolError."""
        if not isinstance(path, str) or not path:
            raise ToolError("path must be a non-empty string")
        try:
            return open_beneath(self.root, path, flags, 0o666, make_parents=make_parents)
        except OutsideError:
            raise ToolError(f"{path!r} is outside the work directory; use paths relative to it") from None
        except FileNotFoundError:
            raise ToolError(f"{path!r} does not exist") from None
        except IsADirectoryError:
            raise ToolError(f"{path!r} is a directory") from None
        except OSError as e:
            if e.errno == errno.ENXIO:  # a FIFO with no reader, a socket
                raise ToolError(f"{path!r} is not a file") from None
            if e.errno == errno.ENOTDIR:
                raise ToolError(f"{path!r}: a part of the path is not a directory") from None
            raise ToolError(f"{path!r}: {e.strerror or e}") from None

    def open_file(self, path: str, flags: int, *, make_parents: bool = False) -> tuple[int, str]:
        """Like :meth:`open`, refusing anything but a regular file."""
        fd, relative = self.open(path, flags, make_parents=make_parents)
        try:
            regular_file(fd, path)
        except OSError:
            os.close(fd)
            raise ToolError(f"{path!r} is not a file") from None
        os.set_blocking(fd, True)
        return fd, relative

    def check_can_run(self) -> None:
        problem = sandbox_problem()
        if problem and not self.allow_unsandboxed:
            raise ToolError(f"running code is unavailable: {problem}. {UNSAFE_HINT}")

    def limits(self, timeout: float | None) -> Limits:
        seconds = self.command_timeout if timeout is None else min(float(timeout), self.command_timeout)
        return Limits(timeout=seconds, memory_mb=self.memory_mb, processes=self.processes, max_output=MAX_RESULT_CHARS)


def _report(result) -> str:
    parts = [f"[{result.summary()}]"]
    if result.stdout:
        parts.append("stdout:\n" + result.stdout.rstrip())
    if result.stderr:
        parts.append("stderr:\n" + result.stderr.rstrip())
    return "\n".join(parts)


def file_tools(ws: Workspace) -> list[Tool]:
    def read_file(path: str, offset: int = 0, limit: int = MAX_READ_CHARS) -> str:
        fd, _ = ws.open_file(path, os.O_RDONLY)
        with os.fdopen(fd, encoding="utf-8", errors="replace") as f:
            text = f.read()
        piece = text[offset : offset + min(limit, MAX_READ_CHARS)]
        more = len(text) - offset - len(piece)
        return piece + (
            f"\n... ({more} more characters; read on with offset={offset + len(piece)})" if more > 0 else ""
        )

    def write_file(path: str, content: str) -> str:
        fd, relative = ws.open_file(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, make_parents=True)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(content)
        return f"wrote {len(content)} characters to {relative}"

    def edit_file(path: str, old: str, new: str, replace_all: bool = False) -> str:
        fd, relative = ws.open_file(path, os.O_RDWR)
        with os.fdopen(fd, "r+", encoding="utf-8") as f:
            text = f.read()
            count = text.count(old) if old else 0
            if count == 0:
                raise ToolError(f"the text to replace was not found in {path!r}")
            if count > 1 and not replace_all:
                raise ToolError(f"the text to replace occurs {count} times in {path!r}; add context or set replace_all")
            f.seek(0)
            f.truncate()
            f.write(text.replace(old, new) if replace_all else text.replace(old, new, 1))
        return f"replaced {count if replace_all else 1} occurrence(s) in {relative}"

    def list_files(path: str = ".") -> str:
        fd, _ = ws.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            with os.scandir(fd) as it:
                entries = sorted(e.name + ("/" if e.is_dir(follow_symlinks=False) else "") for e in it)
        finally:
            os.close(fd)
        return "\n".join(entries) or "(empty)"

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
        ws.check_can_run()
        return _report(run_command(command, ws.root, ws.limits(timeout), allow_unsandboxed=ws.allow_unsandboxed))

    def python(code: str, timeout: float | None = None) -> str:
        ws.check_can_run()
        return _report(
            run_python(code, workdir=ws.root, limits=ws.limits(timeout), allow_unsandboxed=ws.allow_unsandboxed)
        )

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
