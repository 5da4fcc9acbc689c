"""The agent loop: ask the model, run the tools it calls, send the results back, until it answers without a tool
call or runs out of steps. ``delegate`` starts a sub-agent with its own context on a sub-task and returns its
answer as the tool result. Every event goes to a JSONL transcript and to a live view in the terminal.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from mmx.agent.clients import AgentError, ChatClient, ToolCall
from mmx.agent.tools import Tool, ToolError, Workspace, default_tools

SYSTEM_PROMPT = (
    "You are an agent working in the directory {workdir}. Use the tools to read, write and edit files there and to "
    "run commands and Python; paths are relative to that directory. Think before each step. When the task is done, "
    "reply with the answer and call no tool."
)
SUB_AGENT_PROMPT = (
    "You are a sub-agent: solve the sub-task you are given and reply with a concise result. " + SYSTEM_PROMPT
)


class Transcript:
    """JSONL events from the main agent and its sub-agents (one file, a lock around writes)."""

    def __init__(self, path: str | None):
        self.path = path
        self._lock = threading.Lock()
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            open(path, "w").close()

    def write(self, record: dict[str, Any]) -> None:
        if not self.path:
            return
        with self._lock, open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"time": round(time.time(), 3), **record}, ensure_ascii=False) + "\n")


class LiveView:
    """A readable account of the run on a terminal: thinking dimmed, calls and results marked, the answer in bold."""

    def __init__(self, stream: TextIO | None = None, width: int = 400):
        self.stream = stream or sys.stderr
        self.width = width
        color = hasattr(self.stream, "isatty") and self.stream.isatty() and not os.environ.get("NO_COLOR")
        self.dim, self.bold, self.cyan, self.red, self.reset = (
            ("\033[2m", "\033[1m", "\033[36m", "\033[31m", "\033[0m") if color else ("",) * 5
        )

    def _clip(self, text: str) -> str:
        text = text.strip()
        return text if len(text) <= self.width else text[: self.width] + f" ... (+{len(text) - self.width} chars)"

    def __call__(self, record: dict[str, Any]) -> None:
        who, kind = record["agent"], record["event"]
        lines = {
            "task": lambda: f"{self.bold}[{who}] task:{self.reset} {self._clip(record['text'])}",
            "thinking": lambda: f"{self.dim}[{who}] thinking: {self._clip(record['text'])}{self.reset}",
            "message": lambda: f"[{who}] {self._clip(record['text'])}",
            "tool_call": lambda: (
                f"{self.cyan}[{who}] -> {record['name']}"
                f"({self._clip(json.dumps(record['arguments'], ensure_ascii=False))}){self.reset}"
            ),
            "tool_result": lambda: (
                (self.red if record.get("is_error") else "") + f"[{who}] <- {self._clip(record['text'])}" + self.reset
            ),
            "final": lambda: f"{self.bold}[{who}] answer: {self._clip(record['text'])}{self.reset}",
            "stopped": lambda: f"{self.red}[{who}] stopped: {record['reason']}{self.reset}",
        }
        if kind in lines:
            print(lines[kind](), file=self.stream, flush=True)


@dataclass
class AgentResult:
    answer: str | None
    steps: int
    stopped: str  # "answered", "max_steps" or "error: ..."
    messages: list[dict[str, Any]] = field(default_factory=list)


class Agent:
    """``Agent(client).run(task)``. ``tools`` replaces the built-in file / shell / Python tools; ``extra_tools``
    adds to them. ``delegate`` is offered while ``depth < max_depth``."""

    def __init__(
        self,
        client: ChatClient,
        workdir: str = ".",
        tools: list[Tool] | None = None,
        extra_tools: list[Tool] | None = None,
        max_steps: int = 20,
        system_prompt: str | None = None,
        transcript: Transcript | str | None = None,
        view: Callable[[dict[str, Any]], None] | None = None,
        max_depth: int = 1,
        name: str = "main",
        depth: int = 0,
        workspace: Workspace | None = None,
    ):
        self.client = client
        self.workspace = workspace or Workspace(workdir)
        self.base_tools = list(tools) if tools is not None else default_tools(self.workspace)
        self.extra_tools = list(extra_tools or [])
        self.max_steps = max_steps
        self.system_prompt = system_prompt
        self.transcript = transcript if isinstance(transcript, Transcript) else Transcript(transcript)
        self.view = view
        self.max_depth, self.depth, self.name = max_depth, depth, name
        self._children = 0

    # ------------------------------------------------------------------ tools
    def tools(self) -> list[Tool]:
        tools = self.base_tools + self.extra_tools
        if self.depth < self.max_depth:
            tools.append(self._delegate_tool())
        names = [t.name for t in tools]
        duplicates = {n for n in names if names.count(n) > 1}
        if duplicates:
            raise ValueError(f"two tools are named {sorted(duplicates)[0]!r}")
        return tools

    def _delegate_tool(self) -> Tool:
        def delegate(task: str, context: str = "") -> str:
            self._children += 1
            child = Agent(
                self.client.fork() if hasattr(self.client, "fork") else self.client,
                tools=self.base_tools,
                extra_tools=self.extra_tools,
                max_steps=self.max_steps,
                system_prompt=SUB_AGENT_PROMPT.format(workdir=self.workspace.root),
                transcript=self.transcript,
                view=self.view,
                max_depth=self.max_depth,
                name=f"{self.name}/{self._children}",
                depth=self.depth + 1,
                workspace=self.workspace,
            )
            result = child.run(task + (f"\n\nContext:\n{context}" if context else ""))
            if result.answer is None:
                raise ToolError(f"the sub-agent stopped without an answer ({result.stopped})")
            return result.answer

        return Tool(
            "delegate",
            "Hand a self-contained sub-task to a sub-agent with its own fresh context; returns its final answer.",
            {
                "type": "object",
                "properties": {
                    "task": {"type": "string", "minLength": 1, "description": "what the sub-agent must do"},
                    "context": {"type": "string", "description": "facts it needs (it sees nothing else)"},
                },
                "required": ["task"],
                "additionalProperties": False,
            },
            delegate,
        )

    # ------------------------------------------------------------------ events
    def _emit(self, event: str, **fields: Any) -> None:
        record = {"agent": self.name, "event": event, **fields}
        self.transcript.write(record)
        if self.view is not None:
            self.view(record)

    def _execute(self, call: ToolCall, tools: dict[str, Tool]) -> tuple[str, bool]:
        if call.error:
            return f"error: {call.error}", True
        tool = tools.get(call.name)
        if tool is None:
            return f"error: there is no tool named {call.name!r}; available: {', '.join(sorted(tools))}", True
        try:
            return tool(call.arguments), False
        except ToolError as e:
            return f"error: {e}", True
        except Exception as e:  # a tool's own bug is reported to the model, and the loop goes on
            return f"error: {type(e).__name__}: {e}", True

    # ------------------------------------------------------------------ the loop
    def run(self, task: str) -> AgentResult:
        tools = self.tools()
        by_name = {t.name: t for t in tools}
        system = self.system_prompt or SYSTEM_PROMPT.format(workdir=self.workspace.root)
        messages = self.client.start(system, task)
        self._emit("task", text=task)
        for step in range(1, self.max_steps + 1):
            try:
                turn = self.client.complete(messages, tools)
            except AgentError as e:
                self._emit("stopped", step=step, reason=str(e))
                return AgentResult(None, step - 1, f"error: {e}", messages)
            messages.append(turn.message)
            if turn.reasoning:
                self._emit("thinking", step=step, text=turn.reasoning)
            if not turn.calls:
                self._emit("final", step=step, text=turn.content)
                return AgentResult(turn.content, step, "answered", messages)
            if turn.content.strip():
                self._emit("message", step=step, text=turn.content)
            results = []
            for call in turn.calls:
                self._emit("tool_call", step=step, id=call.id, name=call.name, arguments=call.arguments)
                text, is_error = self._execute(call, by_name)
                self._emit("tool_result", step=step, id=call.id, name=call.name, text=text, is_error=is_error)
                results.append((call, text, is_error))
            messages.extend(self.client.tool_results(results))
        self._emit("stopped", step=self.max_steps, reason=f"reached max_steps={self.max_steps}")
        return AgentResult(None, self.max_steps, "max_steps", messages)
