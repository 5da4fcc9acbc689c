"""The request fields that constrain a reply, read into one :class:`StructuredOutputsParams`, and ``logit_bias``.

Constraints come from OpenAI's ``response_format`` (``json_object``, ``json_schema``), vLLM's ``structured_outputs``
(``json``, ``regex``, ``choice``, ``grammar``, ``json_object``) and its older ``guided_json`` / ``guided_regex`` /
``guided_choice`` / ``guided_grammar``, Anthropic's ``output_config.format`` (and the beta's ``output_format``), and
from a forced ``tool_choice`` ("required" or a named tool), which holds the reply to the chat format's tool-call
syntax (:func:`mmx.chat.constraints.tool_call_grammar`). A request carries at most one; every refusal (two
constraints, a variant mmx does not support, a schema or grammar that does not compile) is a 400 naming the field.

In a chat, the constraint of a reasoning model's reply starts once its reasoning is closed
(:func:`mmx.chat.constraints.answer_start`). ``response_format`` json_schema is enforced whether ``strict`` or not.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from mmx.chat.constraints import added_tokens, answer_start, tool_call_grammar
from mmx.chat.formats import ChatFormat
from mmx.chat.tokenizer import Tokenizer
from mmx.engine.sampling_params import SamplingParams
from mmx.engine.structured import ReasoningGate, StructuredOutputsParams
from mmx.serve.chat import PreparedChat, RequestError

LOGIT_BIAS_LIMIT = 100
# vLLM's structured_outputs keys mmx honours, and those that change nothing here (mmx has one backend, no fallback)
_STRUCTURED_KEYS = ("json", "regex", "choice", "grammar", "json_object", "disable_any_whitespace", "whitespace_pattern")
_HARMLESS_KEYS = ("disable_fallback",)
_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


@dataclass
class RequestedConstraint:
    """A constraint a request asked for, and the field it came from (named in errors)."""

    spec: StructuredOutputsParams
    field: str


def logit_bias(value: dict[str, float] | None) -> dict[int, float] | None:
    """OpenAI's logit_bias (token ids as strings) as the engine takes it; a 400 naming the field when a key is not
    a token id or a value is outside [-100, 100]. Ids past the vocabulary are refused by the engine."""
    if not value:
        return None
    out = {}
    for key, bias in value.items():
        try:
            token = int(key)
        except ValueError:
            raise RequestError(f"logit_bias: {key!r} is not a token id", "logit_bias") from None
        if token < 0:
            raise RequestError(f"logit_bias: token id {token} is negative", "logit_bias")
        if not -LOGIT_BIAS_LIMIT <= bias <= LOGIT_BIAS_LIMIT:
            raise RequestError(f"logit_bias: the bias of token {token} is {bias}, outside [-100, 100]", "logit_bias")
        out[token] = float(bias)
    return out


def _spec(field: str, **fields: Any) -> RequestedConstraint:
    try:
        return RequestedConstraint(StructuredOutputsParams(**fields), field)
    except (TypeError, ValueError) as e:
        raise RequestError(f"{field}: {e}", field) from None


def _response_format(value: dict[str, Any]) -> RequestedConstraint | None:
    kind = value.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return _spec("response_format", json_object=True)
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict):
            raise RequestError("response_format: json_schema needs a 'json_schema' object", "response_format")
        schema = spec.get("schema")
        if schema is None:  # OpenAI's schema is optional: then any JSON object
            return _spec("response_format", json_object=True)
        return _spec("response_format", json=schema)
    raise RequestError(
        f"response_format.type {kind!r} is not supported; use text, json_object or json_schema", "response_format.type"
    )


def _structured_outputs(value: dict[str, Any]) -> RequestedConstraint:
    for key in value:
        if key not in _STRUCTURED_KEYS and key not in _HARMLESS_KEYS and value[key] not in (None, False):
            raise RequestError(
                f"structured_outputs.{key} is not supported; mmx takes {', '.join(_STRUCTURED_KEYS)}",
                f"structured_outputs.{key}",
            )
    fields = {k: value[k] for k in _STRUCTURED_KEYS if value.get(k) is not None}
    return _spec("structured_outputs", **fields)


def openai_constraint(body: Any) -> RequestedConstraint | None:
    """The constraint an OpenAI-style request (chat or completions) asks for, or None."""
    found: list[RequestedConstraint] = []
    response_format = getattr(body, "response_format", None)
    if response_format:
        requested = _response_format(response_format)
        if requested is not None:
            found.append(requested)
    if getattr(body, "structured_outputs", None):
        found.append(_structured_outputs(body.structured_outputs))
    for name, kind in _GUIDED.items():
        value = getattr(body, name, None)
        if value is not None:
            found.append(_spec(name, **{kind: value}))
    if len(found) > 1:
        raise RequestError(f"{found[0].field} and {found[1].field} both constrain the reply; send one", found[1].field)
    pattern = getattr(body, "guided_whitespace_pattern", None)
    if pattern is not None and not (found and found[0].spec.kind in ("json", "json_object")):
        raise RequestError("guided_whitespace_pattern needs a JSON constraint to apply to", "guided_whitespace_pattern")
    if not found:
        return None
    if pattern is not None:
        found[0].spec.whitespace_pattern = pattern
    return found[0]


def anthropic_constraint(body: Any) -> RequestedConstraint | None:
    """Anthropic's ``output_config.format`` (or the beta's ``output_format``): a JSON schema, or None."""
    found: list[tuple[str, Any]] = []
    config = getattr(body, "output_config", None)
    if config is not None:
        if not isinstance(config, dict):
            raise RequestError("output_config must be an object", "output_config")
        for key in config:
            if key != "format" and config[key] is not None:
                raise RequestError(f"output_config.{key} is not supported", f"output_config.{key}")
        if config.get("format") is not None:
            found.append(("output_config.format", config["format"]))
    legacy = getattr(body, "output_format", None)
    if legacy is not None:
        found.append(("output_format", legacy))
    if len(found) > 1:
        raise RequestError("output_config.format and output_format both constrain the reply; send one", "output_format")
    if not found:
        return None
    field, value = found[0]
    if not isinstance(value, dict) or value.get("type") != "json_schema" or not isinstance(value.get("schema"), dict):
        raise RequestError(f'{field} must be {{"type": "json_schema", "schema": {{...}}}}', field)
    return _spec(field, json=value["schema"])


def check(spec: StructuredOutputsParams, field: str) -> None:
    """400 naming ``field`` when the constraint cannot compile."""
    try:
        spec.check()
    except ValueError as e:
        raise RequestError(f"{field}: {e}", field) from None


def constrain(params: SamplingParams, requested: RequestedConstraint | None) -> None:
    """Put a checked constraint on a completion's sampling parameters (no chat format: it starts at once)."""
    if requested is None:
        return
    _attach(params, requested.spec, requested.field)


def _attach(params: SamplingParams, spec: StructuredOutputsParams, field: str) -> None:
    check(spec, field)
    if params.ignore_eos:
        raise RequestError(f"ignore_eos cannot be used with {field}: a finished reply must end", "ignore_eos")
    params.structured_outputs = spec


def constrain_chat(
    prepared: PreparedChat,
    requested: RequestedConstraint | None,
    *,
    tokenizer: Tokenizer,
    format: ChatFormat,
    tool_choice: str,
    parallel_tool_calls: bool = True,
) -> None:
    """Put a prepared chat's constraint on its sampling parameters: the tool-call grammar of a forced
    ``tool_choice`` (the prompt ends with the call's forced opening, see :func:`~mmx.serve.chat.prepare_chat`), else
    the requested constraint, starting after the reasoning."""
    params, tools = prepared.params, prepared.tools
    if tools and tool_choice not in ("auto", "none"):
        if requested is not None:
            raise RequestError(
                f"{requested.field} cannot be combined with tool_choice {tool_choice!r}: both constrain the reply",
                requested.field,
            )
        name = None if tool_choice == "required" else tool_choice
        try:
            grammar = tool_call_grammar(format, tools, name, parallel_tool_calls, added_tokens(tokenizer))
        except ValueError as e:
            raise RequestError(f"tools: {e}", "tools") from None
        _attach(params, StructuredOutputsParams(grammar=grammar), "tools")
    elif requested is not None:
        # a reply that continues a forced opening (a closed think block, a continued message) does not start free
        start = answer_start(tokenizer, format, prepared.prompt_ids, free_start=not prepared.prefix)
        gate = ReasoningGate(*start) if start is not None else None
        _attach(params, dataclasses.replace(requested.spec, reasoning=gate), requested.field)
