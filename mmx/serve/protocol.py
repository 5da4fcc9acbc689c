"""Request bodies of the OpenAI and Anthropic APIs, as pydantic models.

Validation here is what turns a bad request into a 400 with a clear message: ranges of sampling values, roles,
tool schemas. Fields these APIs define but mmx does not use are accepted and ignored, as vLLM does (unknown fields
are allowed and logged), so existing clients keep working.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

TOOL_NAME = r"^[a-zA-Z0-9_\-.:]{1,64}$"


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


# ---------------------------------------------------------------------------------------------------- OpenAI
class FunctionCall(_Lenient):
    name: str
    arguments: str | dict[str, Any] | None = None


class ToolCall(_Lenient):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None

    @field_validator("content")
    @classmethod
    def _parts(cls, value):
        if isinstance(value, list):
            for part in value:
                kind = part.get("type")
                if kind not in ("text", "input_text", "output_text"):
                    raise ValueError(f"content parts of type {kind!r} are not supported (text only)")
                if not isinstance(part.get("text"), str):
                    raise ValueError("a text content part needs a string 'text'")
        return value


class FunctionDef(_Lenient):
    name: Annotated[str, Field(pattern=TOOL_NAME)]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _schema(cls, value):
        if value is not None:
            if value.get("type", "object") != "object":
                raise ValueError("function parameters must be a JSON schema of type 'object'")
            props = value.get("properties", {})
            if not isinstance(props, dict) or not all(isinstance(v, dict) for v in props.values()):
                raise ValueError("function parameters 'properties' must map names to schemas")
        return value


class Tool(_Lenient):
    type: Literal["function"] = "function"
    function: FunctionDef


class StreamOptions(_Lenient):
    include_usage: bool = False


class SamplingFields(_Lenient):
    """Sampling fields shared by chat and completions (OpenAI names, plus vLLM's extras)."""

    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    n: Annotated[int, Field(ge=1, le=64)] = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0, le=10)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    min_tokens: Annotated[int, Field(ge=0)] = 0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    return_token_ids: bool = False  # vLLM extension: the generated token ids in each choice
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, value):
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > 16 or any(not s for s in stops):
            raise ValueError("stop must be at most 16 non-empty strings")
        return value


class ChatCompletionRequest(SamplingFields):
    model: str
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_mode: Literal["split", "append_think"] | None = None

    @model_validator(mode="after")
    def _tool_choice(self):
        if isinstance(self.tool_choice, dict):
            name = (self.tool_choice.get("function") or {}).get("name")
            if self.tool_choice.get("type") != "function" or not isinstance(name, str):
                raise ValueError('tool_choice must be "none", "auto", "required" or {"type": "function", ...}')
            if not self.tools or name not in {t.function.name for t in self.tools}:
                raise ValueError(f"tool_choice names {name!r}, which is not among the tools")
        elif self.tool_choice == "required" and not self.tools:
            raise ValueError('tool_choice "required" needs tools')
        return self


class CompletionRequest(SamplingFields):
    model: str
    prompt: Any
    max_tokens: Annotated[int, Field(ge=1)] | None = 16
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    echo: bool = False
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value):
        def ids(x) -> bool:
            return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

        ok = (
            isinstance(value, str)
            or ids(value)
            or (isinstance(value, list) and bool(value) and all(isinstance(p, str) for p in value))
            or (isinstance(value, list) and bool(value) and all(ids(p) for p in value))
        )
        if not ok:
            raise ValueError("must be a string, a list of strings, a list of token ids, or a list of token-id lists")
        return value

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, value):
        if value:
            raise ValueError("suffix (fill-in-the-middle) is not supported by MiniMax models")
        return value


# ---------------------------------------------------------------------------------------------------- Anthropic
class AnthropicTool(_Lenient):
    name: Annotated[str, Field(pattern=TOOL_NAME)]
    description: str | None = None
    input_schema: dict[str, Any]

    @field_validator("input_schema")
    @classmethod
    def _schema(cls, value):
        if value.get("type") != "object":
            raise ValueError("input_schema must be a JSON schema of type 'object'")
        return value


class AnthropicMessage(_Lenient):
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]

    @field_validator("content")
    @classmethod
    def _blocks(cls, value):
        if isinstance(value, list):
            for block in value:
                kind = block.get("type")
                if kind not in ("text", "tool_use", "tool_result", "thinking", "redacted_thinking"):
                    raise ValueError(f"content blocks of type {kind!r} are not supported")
        return value


class AnthropicMessagesRequest(_Lenient):
    model: str
    max_tokens: Annotated[int, Field(ge=1)]
    messages: Annotated[list[AnthropicMessage], Field(min_length=1)]
    system: str | list[dict[str, Any]] | None = None
    tools: list[AnthropicTool] | None = None
    tool_choice: dict[str, Any] | None = None
    stop_sequences: list[str] | None = None
    temperature: Annotated[float, Field(ge=0, le=1)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    stream: bool = False
    metadata: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _choice(self):
        if self.tool_choice is not None:
            kind = self.tool_choice.get("type")
            if kind not in ("auto", "any", "tool", "none"):
                raise ValueError("tool_choice.type must be auto, any, tool or none")
            if kind == "tool" and (not self.tools or self.tool_choice.get("name") not in {t.name for t in self.tools}):
                raise ValueError("tool_choice names a tool that is not among the tools")
            if kind == "any" and not self.tools:
                raise ValueError('tool_choice "any" needs tools')
        return self
