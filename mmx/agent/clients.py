"""Chat clients for the agent loop: OpenAI chat completions and Anthropic messages, over plain HTTP (stdlib only).

Interleaved thinking (specs/m2_and_formats.md §6.3): M2 must see its earlier reasoning again. So each assistant
turn goes back into the history exactly as the server sent it: for OpenAI the message with its ``content`` (which
may hold its reasoning inline), ``tool_calls`` and whichever reasoning field the server used
(``reasoning_content``, ``reasoning`` or ``reasoning_details``); for Anthropic the full list of content blocks,
``thinking`` blocks included.
"""

from __future__ import annotations

import dataclasses
import json
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Protocol

from mmx.agent.tools import Tool
from mmx.chat.reasoning import split_inline_think

REASONING_FIELDS = ("reasoning_content", "reasoning", "reasoning_details")


class AgentError(RuntimeError):
    """The model endpoint failed (HTTP error, unreachable, or an answer the loop cannot read)."""


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: Any  # parsed JSON (normally a dict)
    error: str | None = None  # why the arguments could not be read


@dataclass
class ModelTurn:
    reasoning: str | None
    content: str
    calls: list[ToolCall]
    message: dict[str, Any]  # the assistant message to append to the history, as the server sent it
    stop_reason: str | None = None
    usage: dict[str, Any] = field(default_factory=dict)


class ChatClient(Protocol):
    def start(self, system: str, task: str) -> list[dict[str, Any]]:
        """The opening messages of a conversation."""
        ...

    def complete(self, messages: list[dict[str, Any]], tools: list[Tool]) -> ModelTurn: ...

    def tool_results(self, results: list[tuple[ToolCall, str, bool]]) -> list[dict[str, Any]]:
        """Messages that carry (call, result text, is_error) back to the model."""
        ...


def _root(base_url: str) -> str:
    url = base_url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def _post(url: str, body: dict[str, Any], headers: dict[str, str], timeout: float) -> dict[str, Any]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"content-type": "application/json", **headers}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace")[:500]
        raise AgentError(f"{url} answered HTTP {e.code}: {detail}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
        raise AgentError(f"cannot reach {url}: {getattr(e, 'reason', e)}") from None
    except json.JSONDecodeError:
        raise AgentError(f"{url} did not answer with JSON") from None


def served_model(root: str, headers: dict[str, str], timeout: float) -> str:
    """The first model a server lists at /v1/models (what ``--model`` defaults to)."""
    request = urllib.request.Request(root + "/v1/models", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())["data"][0]["id"]
    except (urllib.error.URLError, TimeoutError, ConnectionError, KeyError, IndexError, json.JSONDecodeError) as e:
        raise AgentError(f"no model given and {root}/v1/models did not name one ({e}); pass a model name") from None


@dataclass
class _HTTPClient:
    base_url: str
    model: str | None = None  # None: the first model the server lists
    api_key: str | None = None
    max_tokens: int = 4096
    temperature: float | None = None
    timeout: float = 600.0
    extra_body: dict[str, Any] = field(default_factory=dict)

    def fork(self):
        """A client for a sub-agent's separate conversation."""
        return dataclasses.replace(self)


@dataclass
class OpenAIClient(_HTTPClient):
    base_url: str = "http://127.0.0.1:8000/v1"

    def start(self, system: str, task: str) -> list[dict[str, Any]]:
        return [{"role": "system", "content": system}, {"role": "user", "content": task}]

    def complete(self, messages: list[dict[str, Any]], tools: list[Tool]) -> ModelTurn:
        headers = {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        if self.model is None:
            self.model = served_model(_root(self.base_url), headers, self.timeout)
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "max_tokens": self.max_tokens,
            **self.extra_body,
        }
        if tools:
            body["tools"] = [t.schema() for t in tools]
        if self.temperature is not None:
            body["temperature"] = self.temperature
        data = _post(_root(self.base_url) + "/v1/chat/completions", body, headers, self.timeout)
        try:
            choice = data["choices"][0]
            reply = choice["message"]
        except (KeyError, IndexError, TypeError):
            raise AgentError(f"unexpected chat completion: {json.dumps(data)[:300]}") from None
        message: dict[str, Any] = {"role": "assistant", "content": reply.get("content") or ""}
        for key in REASONING_FIELDS:
            if reply.get(key):
                message[key] = reply[key]
        calls = []
        if reply.get("tool_calls"):
            message["tool_calls"] = reply["tool_calls"]
            for raw in reply["tool_calls"]:
                function = raw.get("function", {})
                try:
                    arguments, error = json.loads(function.get("arguments") or "{}"), None
                except json.JSONDecodeError as e:
                    arguments, error = function.get("arguments"), f"the arguments are not valid JSON ({e.msg})"
                calls.append(ToolCall(raw.get("id", ""), function.get("name", ""), arguments, error))
        reasoning = reply.get("reasoning_content") or reply.get("reasoning")
        if not reasoning and reply.get("reasoning_details"):
            reasoning = "".join(d.get("text", "") for d in reply["reasoning_details"] if isinstance(d, dict))
        content = message["content"]
        if not reasoning:
            reasoning, content = split_inline_think(content)
        return ModelTurn(reasoning, content, calls, message, choice.get("finish_reason"), data.get("usage") or {})

    def tool_results(self, results: list[tuple[ToolCall, str, bool]]) -> list[dict[str, Any]]:
        return [{"role": "tool", "tool_call_id": call.id, "content": text} for call, text, _ in results]


@dataclass
class AnthropicClient(_HTTPClient):
    base_url: str = "http://127.0.0.1:8000"
    _system: str = ""  # Anthropic takes the system prompt beside the messages

    def start(self, system: str, task: str) -> list[dict[str, Any]]:
        self._system = system
        return [{"role": "user", "content": task}]

    def complete(self, messages: list[dict[str, Any]], tools: list[Tool]) -> ModelTurn:
        headers = {"anthropic-version": "2023-06-01"}
        if self.api_key:
            headers["x-api-key"] = self.api_key
        if self.model is None:
            self.model = served_model(_root(self.base_url), headers, self.timeout)
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": self.max_tokens,
            "system": self._system,
            "messages": messages,
            **self.extra_body,
        }
        if tools:
            body["tools"] = [
                {"name": t.name, "description": t.description, "input_schema": t.parameters} for t in tools
            ]
        if self.temperature is not None:
            body["temperature"] = self.temperature
        data = _post(_root(self.base_url) + "/v1/messages", body, headers, self.timeout)
        blocks = data.get("content")
        if not isinstance(blocks, list):
            raise AgentError(f"unexpected messages response: {json.dumps(data)[:300]}")
        reasoning = "".join(b.get("thinking", "") for b in blocks if b.get("type") == "thinking") or None
        text = "".join(b.get("text", "") for b in blocks if b.get("type") == "text")
        calls = [
            ToolCall(
                b.get("id", ""),
                b.get("name", ""),
                b.get("input"),
                None if isinstance(b.get("input"), dict) else "the input is not an object",
            )
            for b in blocks
            if b.get("type") == "tool_use"
        ]
        message = {"role": "assistant", "content": blocks}
        return ModelTurn(reasoning, text, calls, message, data.get("stop_reason"), data.get("usage") or {})

    def tool_results(self, results: list[tuple[ToolCall, str, bool]]) -> list[dict[str, Any]]:
        content = [
            {"type": "tool_result", "tool_use_id": call.id, "content": text, **({"is_error": True} if error else {})}
            for call, text, error in results
        ]
        return [{"role": "user", "content": content}]
