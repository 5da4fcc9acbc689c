"""The request body of OpenAI's Responses API (``POST /v1/responses``), as pydantic models.

Input items are the API's own shapes: messages (a string or ``input_text`` / ``output_text`` parts),
``function_call`` and ``function_call_output`` items, and ``reasoning`` items that carry a model's thinking back.
Fields of the API that would change the result and that mmx does not implement (built-in tools, background runs,
reasoning efforts other than the model's own, prompt templates, conversations) are refused with a 400 naming the
field; ``text.format`` (JSON object or schema) is honoured by constrained decoding; sampling extras (and vLLM's
``structured_outputs``) are the chat route's.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Discriminator, Field, Tag, field_validator, model_validator
from pydantic_core import PydanticCustomError

from mmx.serve.protocol import TOOL_NAME, FunctionDef, SamplingFields, _Lenient

# include values mmx honours: the reasoning item's text, opaque, for clients that keep no server-side state
ENCRYPTED_REASONING = "reasoning.encrypted_content"


def _refuse(param: str, reason: str) -> PydanticCustomError:
    """A validation error that names the field at fault (the server's error body carries it as ``param``)."""
    return PydanticCustomError("unsupported_field", "{param}: {reason}", {"param": param, "reason": reason})


# ---------------------------------------------------------------------------------------------------- content
class TextPart(_Lenient):
    type: Literal["input_text", "output_text"]
    text: str


class RefusalPart(_Lenient):
    type: Literal["refusal"]
    refusal: str


ContentPart = Annotated[TextPart | RefusalPart, Field(discriminator="type")]


def text_of(content: str | list[TextPart | RefusalPart]) -> str:
    if isinstance(content, str):
        return content
    return "".join(p.text if isinstance(p, TextPart) else p.refusal for p in content)


# ---------------------------------------------------------------------------------------------------- input items
class MessageItem(_Lenient):
    """A message; ``type`` may be left out (the API's "easy" input message)."""

    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[ContentPart]


class FunctionCallItem(_Lenient):
    """A call the model made (sent back so the next turn sees it)."""

    type: Literal["function_call"]
    call_id: Annotated[str, Field(min_length=1)]
    name: Annotated[str, Field(pattern=TOOL_NAME)]
    arguments: str


class FunctionCallOutputItem(_Lenient):
    """The result of a call, matched to it by ``call_id``."""

    type: Literal["function_call_output"]
    call_id: Annotated[str, Field(min_length=1)]
    output: str | list[ContentPart]


class SummaryText(_Lenient):
    type: Literal["summary_text"]
    text: str


class ReasoningText(_Lenient):
    type: Literal["reasoning_text"]
    text: str


class ReasoningItem(_Lenient):
    """The model's thinking: ``content`` (reasoning_text, as mmx returns it), else mmx's ``encrypted_content``,
    else the ``summary``."""

    type: Literal["reasoning"]
    summary: list[SummaryText] = Field(default_factory=list)
    content: list[ReasoningText] | None = None
    encrypted_content: str | None = None


# an item's type -> its model; the union's tags are the class names, which error locations leave out
ITEM_MODELS = {
    "message": MessageItem,
    "function_call": FunctionCallItem,
    "function_call_output": FunctionCallOutputItem,
    "reasoning": ReasoningItem,
}
ITEM_TYPES = tuple(ITEM_MODELS)


def _item_type(value: Any) -> str | None:
    kind = value.get("type", "message") if isinstance(value, dict) else getattr(value, "type", None)
    model = ITEM_MODELS.get(kind) if isinstance(kind, str) else None
    return model.__name__ if model else None


InputItem = Annotated[
    Annotated[MessageItem, Tag("MessageItem")]
    | Annotated[FunctionCallItem, Tag("FunctionCallItem")]
    | Annotated[FunctionCallOutputItem, Tag("FunctionCallOutputItem")]
    | Annotated[ReasoningItem, Tag("ReasoningItem")],
    Discriminator(
        _item_type,
        custom_error_type="unsupported_item",
        custom_error_message="input items must be of type " + ", ".join(ITEM_TYPES) + " (mmx has no built-in tools)",
    ),
]


# ---------------------------------------------------------------------------------------------------- tools
class FunctionTool(_Lenient):
    """A function tool in the Responses API's flat shape."""

    type: Literal["function"]
    name: Annotated[str, Field(pattern=TOOL_NAME)]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @field_validator("type", mode="before")
    @classmethod
    def _only_functions(cls, value):
        if value != "function":
            raise ValueError(f"tools of type {value!r} (built-in tools) are not supported; only function tools are")
        return value

    @field_validator("parameters")
    @classmethod
    def _schema(cls, value):
        return FunctionDef._schema(value)  # the chat route's checks of a parameters schema

    def as_chat_tool(self) -> dict[str, Any]:
        """The tool in the chat shape the templates read."""
        function = {"name": self.name, "description": self.description or "", "parameters": self.parameters or {}}
        return {"type": "function", "function": function}


class NamedFunction(_Lenient):
    type: Literal["function"]
    name: str


class ToolChoiceFunction(NamedFunction):
    """Force a call of this function."""


class ToolChoiceAllowed(_Lenient):
    """Only these tools may be called: "auto" (the model decides) or "required" (it must call one)."""

    type: Literal["allowed_tools"]
    mode: Literal["auto", "required"]
    tools: Annotated[list[NamedFunction], Field(min_length=1)]


class ReasoningConfig(_Lenient):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None
    generate_summary: Literal["auto", "concise", "detailed"] | None = None

    @field_validator("effort")
    @classmethod
    def _effort(cls, value):
        if value not in (None, "medium", "none"):
            raise ValueError(
                f"{value!r} is not supported: MiniMax models reason at their own length; use 'medium' (the model's "
                "default) or 'none' (no thinking), or bound the reply with max_output_tokens"
            )
        return value

    @field_validator("summary", "generate_summary")
    @classmethod
    def _summary(cls, value):
        if value == "concise":
            raise ValueError("'concise' is not supported: mmx returns the full reasoning text, not a summary")
        return value


class TextFormat(_Lenient):
    """Plain text, any JSON object, or JSON valid under ``schema`` (decoding is constrained to it)."""

    model_config = ConfigDict(populate_by_name=True)

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None
    description: str | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise _refuse("text.format.schema", 'a "json_schema" format needs a JSON schema object in "schema"')
        return self


class TextConfig(_Lenient):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None

    @field_validator("verbosity")
    @classmethod
    def _verbosity(cls, value):
        if value not in (None, "medium"):
            raise ValueError(f"{value!r} is not supported: the model has no verbosity setting")
        return value


# ---------------------------------------------------------------------------------------------------- request
class ResponsesRequest(SamplingFields):
    model: str
    input: str | Annotated[list[InputItem], Field(min_length=1)]
    instructions: str | None = None
    max_output_tokens: Annotated[int, Field(ge=1)] | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceFunction | ToolChoiceAllowed | None = None
    parallel_tool_calls: bool = True
    previous_response_id: str | None = None
    store: bool = True
    metadata: dict[str, str] | None = None
    include: list[str] | None = None
    reasoning: ReasoningConfig | None = None
    text: TextConfig | None = None
    truncation: Literal["auto", "disabled"] | None = None
    background: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    max_tool_calls: Annotated[int, Field(ge=1)] | None = None  # counts built-in tool calls; mmx has none
    prompt: dict[str, Any] | None = None
    conversation: str | dict[str, Any] | None = None

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _known_choice(cls, value):
        if isinstance(value, dict) and value.get("type") not in ("function", "allowed_tools"):
            raise ValueError(
                f"tool_choice of type {value.get('type')!r} is not supported; use none, auto, required, "
                '{"type": "function", "name": ...} or {"type": "allowed_tools", ...}'
            )
        return value

    @field_validator("include")
    @classmethod
    def _include(cls, value):
        for name in value or []:
            if name != ENCRYPTED_REASONING:
                raise ValueError(f"{name!r} is not supported (mmx can include only {ENCRYPTED_REASONING!r})")
        return value

    @model_validator(mode="after")
    def _supported(self):
        refusals = {
            "n": (self.n != 1, "a response has one output; n must be 1"),
            "return_token_ids": (self.return_token_ids, "token ids are not returned on /v1/responses"),
            "background": (bool(self.background), "background responses are not supported"),
            "truncation": (self.truncation == "auto", "'auto' truncation is not supported; the input must fit"),
            "top_logprobs": (bool(self.top_logprobs), "log-probabilities are not returned on /v1/responses"),
            "prompt": (self.prompt is not None, "prompt templates are not supported; send input and instructions"),
            "conversation": (
                self.conversation is not None,
                "conversations are not supported; use previous_response_id",
            ),
        }
        for param, (refused, reason) in refusals.items():
            if refused:
                raise _refuse(param, reason)
        names = {t.name for t in self.tools or []}
        if isinstance(self.tool_choice, ToolChoiceFunction) and self.tool_choice.name not in names:
            raise _refuse("tool_choice", f"names {self.tool_choice.name!r}, which is not among the tools")
        if isinstance(self.tool_choice, ToolChoiceAllowed):
            missing = [t.name for t in self.tool_choice.tools if t.name not in names]
            if missing:
                raise _refuse("tool_choice.tools", f"{missing[0]!r} is not among the tools")
        if self.tool_choice == "required" and not self.tools:
            raise _refuse("tool_choice", '"required" needs tools')
        return self
