"""Request bodies of the OpenAI and Anthropic APIs, as pydantic models.

Validation here is what turns a bad request into a 400 with a clear message: ranges of sampling values, roles,
tool schemas. Fields these APIs define but mmx does not use are accepted and ignored, as vLLM does (unknown fields
are allowed and logged), so existing clients keep working.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from mmx.engine.sampling_params import MAX_SEED, MIN_REPETITION_PENALTY

TOOL_NAME = r"^[a-zA-Z0-9_\-.:]{1,64}$"


class _Lenient(BaseModel):
    # allow_inf_nan: json.loads reads NaN and Infinity. strict: JSON types as the OpenAPI document states them, as
    # OpenAI's and Anthropic's servers take them (no "2" for 2, no 0 for false)
    model_config = ConfigDict(extra="allow", allow_inf_nan=False, strict=True)


# Fields of these APIs that cannot change what is generated: accepted and ignored. Any other field a request body
# carries that its model does not declare is refused (400 naming it), as OpenAI's and Anthropic's servers do,
# rather than silently ignored.
HARMLESS_FIELDS = frozenset(
    {
        "user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key",
        "prompt_cache_retention", "request_id", "priority", "cache_salt", "stream_options",
    }
)  # fmt: skip
# Known fields mmx does not implement, with what to do instead.
UNSUPPORTED_FIELDS = {
    "functions": "the legacy 'functions' field is not supported; use 'tools'",
    "function_call": "the legacy 'function_call' field is not supported; use 'tool_choice'",
    "audio": "audio output is not supported",
    "modalities": "only text output is supported",
    "prediction": "predicted outputs are not supported",
    "web_search_options": "web search is not supported",
    "reasoning_effort": "MiniMax models have no reasoning effort setting; use max_tokens (or Anthropic budget_tokens)",
    "verbosity": "verbosity is not supported",
    "use_beam_search": "beam search is not supported",
    "best_of": "best_of is not supported; use n",
    "length_penalty": "length_penalty (beam search) is not supported",
    "bad_words": "bad_words is not supported; use logit_bias",
    "allowed_token_ids": "allowed_token_ids is not supported",
    "truncate_prompt_tokens": "prompt truncation is not supported",
    "echo": "echo is not supported here",
    "documents": "documents are not supported",
    "mcp_servers": "MCP servers are not supported",
    "container": "containers are not supported",
    "context_management": "context management is not supported",
}


class _Request(_Lenient):
    """A request body: undeclared fields are refused unless they are harmless (see HARMLESS_FIELDS)."""

    @model_validator(mode="after")
    def _refuse_unknown_fields(self):
        for name in sorted(self.model_extra or {}):
            if name in HARMLESS_FIELDS:
                continue
            reason = UNSUPPORTED_FIELDS.get(name, "mmx does not support this field (refused rather than ignored)")
            raise PydanticCustomError("unsupported_field", "{param}: {reason}", {"param": name, "reason": reason})
        return self


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


class SamplingFields(_Request):
    """Sampling fields shared by chat and completions (OpenAI names, plus vLLM's extras)."""

    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    n: Annotated[int, Field(ge=1, le=64)] = 1
    stop: str | list[str] | None = None
    seed: Annotated[int, Field(ge=0, lt=MAX_SEED)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    repetition_penalty: Annotated[float, Field(ge=MIN_REPETITION_PENALTY, le=10)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    min_tokens: Annotated[int, Field(ge=0)] = 0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None  # vLLM: token ids that end a sample
    return_token_ids: bool = False  # vLLM extension: the generated token ids in each choice
    user: str | None = None
    # OpenAI's logit_bias, and what constrains the reply (read by mmx.serve.structured_requests)
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None  # vLLM
    guided_json: dict[str, Any] | str | None = None  # vLLM's older names
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_whitespace_pattern: str | None = None
    guided_decoding_backend: str | None = None  # mmx has one grammar engine: accepted, changes nothing

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
    prompt_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None  # vLLM: the response's prompt_logprobs
    add_generation_prompt: bool = True  # vLLM: false renders the conversation without opening a reply turn
    continue_final_message: bool = False  # vLLM: the reply continues the final assistant message

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
    max_tokens: Annotated[int, Field(ge=0)] | None = 16  # 0 only with echo: the prompt alone, nothing generated
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    prompt_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None  # vLLM: each choice's prompt_logprobs
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
                check_anthropic_block(block, ANTHROPIC_BLOCK_FIELDS)
        return value


# What each content block must carry: field -> accepted types (the Anthropic API's shapes).
ANTHROPIC_BLOCK_FIELDS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "text": {"text": str},
    "tool_use": {"id": str, "name": str, "input": dict},
    "tool_result": {"tool_use_id": str},
    "thinking": {"thinking": str},
    "redacted_thinking": {"data": str},
}


def check_anthropic_block(block: Any, kinds: dict[str, dict[str, type | tuple[type, ...]]]) -> None:
    """A ValueError naming what is wrong with one content block (its type, a missing or mistyped field)."""
    if not isinstance(block, dict):
        raise ValueError("each content block must be an object")
    kind = block.get("type")
    if kind not in kinds:
        raise ValueError(f"content blocks of type {kind!r} are not supported here (supported: {', '.join(kinds)})")
    for name, types in kinds[kind].items():
        if not isinstance(block.get(name), types):
            raise ValueError(f"a {kind} block needs {name!r} of type {getattr(types, '__name__', types)}")
    if kind == "tool_result":
        content = block.get("content")
        if isinstance(content, list):
            for part in content:
                check_anthropic_block(part, {"text": {"text": str}})
        elif content is not None and not isinstance(content, str):
            raise ValueError("a tool_result block's content must be a string or a list of text blocks")
        if not isinstance(block.get("is_error", False), bool):
            raise ValueError("a tool_result block's is_error must be a boolean")


class AnthropicMessagesRequest(_Request):
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
    output_config: dict[str, Any] | None = None  # its "format" constrains the reply (structured outputs)
    output_format: dict[str, Any] | None = None  # the structured-outputs beta's name for output_config.format

    @field_validator("system")
    @classmethod
    def _system(cls, value):
        if isinstance(value, list):
            for block in value:
                check_anthropic_block(block, {"text": {"text": str}})
        return value

    @field_validator("thinking")
    @classmethod
    def _thinking(cls, value):
        if value is not None:
            kind = value.get("type")
            if kind not in ("enabled", "disabled"):
                raise ValueError('thinking.type must be "enabled" or "disabled"')
            budget = value.get("budget_tokens")
            if kind == "enabled" and (not isinstance(budget, int) or isinstance(budget, bool) or budget < 1):
                raise ValueError("thinking.budget_tokens must be a positive integer when thinking is enabled")
        return value

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
            if not isinstance(self.tool_choice.get("disable_parallel_tool_use", False), bool):
                raise ValueError("tool_choice.disable_parallel_tool_use must be a boolean")
        enabled = self.thinking and self.thinking["type"] == "enabled"
        if enabled and self.max_tokens is not None and self.thinking["budget_tokens"] >= self.max_tokens:
            raise ValueError("thinking.budget_tokens must be less than max_tokens")
        return self


class AnthropicCountTokensRequest(AnthropicMessagesRequest):
    """POST /v1/messages/count_tokens: a /v1/messages body without max_tokens, and nothing to stream."""

    max_tokens: Annotated[int, Field(ge=1)] | None = None
    stream: Literal[False] = False

    @field_validator("stream", mode="before")
    @classmethod
    def _no_stream(cls, value):
        if value is not False:  # a Literal[False] would take 0
            raise ValueError("count_tokens does not stream; leave stream out or false")
        return value
