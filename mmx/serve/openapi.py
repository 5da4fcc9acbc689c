"""The OpenAPI document (``/openapi.json``) as the server really answers.

FastAPI documents every body-taking route with a 422 and its own validation-error shape; mmx answers validation
errors with 400 and an OpenAI- or Anthropic-shaped body (by the route's API), refuses oversized bodies with 413,
unknown models with 404, a missing API key with 401, and streams server-sent events. This module rewrites the
generated document to say so, names the one model served as the only value of "model", and describes the responses
of the small routes (health, models, tokenizer).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

# routes that stream server-sent events when the body has "stream": true
STREAMING = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/messages", "/v1/responses"})
# routes that name a model (or a stored response) and answer 404 when there is none
LOOKUPS = frozenset({*STREAMING, "/v1/messages/count_tokens", "/v1/models/{model_id}", "/tokenize", "/detokenize"})

_ERROR_DESCRIPTIONS = {
    400: "The request is invalid, or asks for something mmx does not support; the message names the field.",
    401: "The API key is missing or wrong.",
    404: "No such model (or stored response).",
    413: "The request body, or a text in it, is larger than the server accepts.",
    500: "The engine could not go on with this request (the others in its batch go on).",
}

_NULLABLE_STRING = {"anyOf": [{"type": "string"}, {"type": "null"}]}
SCHEMAS: dict[str, dict[str, Any]] = {
    "OpenAIError": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["message", "type", "param", "code"],
                "properties": {
                    "message": {"type": "string"},
                    "type": {"type": "string"},
                    "param": _NULLABLE_STRING,
                    "code": _NULLABLE_STRING,
                },
            }
        },
    },
    "AnthropicError": {
        "type": "object",
        "required": ["type", "error"],
        "properties": {
            "type": {"const": "error"},
            "error": {
                "type": "object",
                "required": ["type", "message"],
                "properties": {"type": {"type": "string"}, "message": {"type": "string"}},
            },
        },
    },
    "Health": {
        "type": "object",
        "required": ["status"],
        "properties": {"status": {"type": "string", "description": '"ok", or why the server cannot serve'}},
    },
    "Model": {
        "type": "object",
        "required": ["id", "object", "created", "owned_by"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": "model"},
            "created": {"type": "integer"},
            "owned_by": {"type": "string"},
            "max_model_len": {"type": "integer"},
        },
    },
    "ModelList": {
        "type": "object",
        "required": ["object", "data"],
        "properties": {
            "object": {"const": "list"},
            "data": {"type": "array", "items": {"$ref": "#/components/schemas/Model"}},
        },
    },
    "TokenizeResponse": {
        "type": "object",
        "required": ["count", "max_model_len", "tokens"],
        "properties": {
            "count": {"type": "integer", "minimum": 0},
            "max_model_len": {"type": "integer"},
            "tokens": {"type": "array", "items": {"type": "integer", "minimum": 0}},
            "token_strs": {"type": "array", "items": _NULLABLE_STRING},
        },
    },
    "DetokenizeResponse": {"type": "object", "required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
    "TokenizerInfo": {
        "type": "object",
        "required": ["tokenizer_class", "eos_token", "chat_template", "model_max_length"],
        "properties": {
            "tokenizer_class": {"type": "string"},
            "bos_token": _NULLABLE_STRING,
            "eos_token": _NULLABLE_STRING,
            "pad_token": _NULLABLE_STRING,
            "chat_template": {"type": "string"},
            "model_max_length": {"type": "integer"},
            "vocab_size": {"type": "integer"},
        },
    },
    "CountTokensResponse": {
        "type": "object",
        "required": ["input_tokens"],
        "properties": {"input_tokens": {"type": "integer", "minimum": 0}},
    },
}
# request fields whose model takes any JSON and checks it in a validator: the shapes the validator accepts
_TOKEN_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
FIELD_SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("CompletionRequest", "prompt"): {
        "anyOf": [
            {"type": "string", "minLength": 1},
            {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1},
            _TOKEN_IDS,
            {"type": "array", "items": _TOKEN_IDS, "minItems": 1},
        ],
        "description": "a string, a list of strings, a list of token ids, or a list of token-id lists",
    },
}
# the 200 body of the routes whose answer has a fixed shape: (path, method) -> schema name
_OK_BODIES = {
    ("/health", "get"): "Health",
    ("/v1/models", "get"): "ModelList",
    ("/v1/models/{model_id}", "get"): "Model",
    ("/tokenize", "post"): "TokenizeResponse",
    ("/detokenize", "post"): "DetokenizeResponse",
    ("/tokenizer_info", "get"): "TokenizerInfo",
    ("/v1/messages/count_tokens", "post"): "CountTokensResponse",
}
# OpenAPI before 3.2 reads the schema of an event stream as the schema of one event
_EVENT_STREAM = {
    "schema": {
        "type": "object",
        "required": ["data"],
        "properties": {
            "event": {"type": "string", "description": "the event's type (Anthropic and Responses streams)"},
            "data": {
                "type": "string",
                "contentMediaType": "application/json",
                "description": "a JSON object; OpenAI chat and completion streams end with [DONE]",
            },
        },
    },
    "description": 'Server-sent events, sent when the body has "stream": true.',
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(name: str) -> dict[str, Any]:
    return {"application/json": {"schema": _ref(name)}}


def describe(schema: dict[str, Any], open_paths: frozenset[str], secured: bool, model: str) -> dict[str, Any]:
    """Rewrite FastAPI's generated document (in place) to match the server; see the module's docstring.
    ``model``: the one model served, the only value a request's "model" may take (any other is a 404)."""
    schemas = schema.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    for name, body in schemas.items():
        properties = body.get("properties", {})
        _only_model(properties.get("model"), model)
        for field in properties:
            if (name, field) in FIELD_SCHEMAS:
                properties[field] = {"title": properties[field].get("title", field), **FIELD_SCHEMAS[(name, field)]}
    schemas.update(SCHEMAS)
    if secured:
        schema["components"]["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer"},
            "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
        }
        schema["security"] = [{"bearer": []}, {"apiKey": []}]
    paths = schema.get("paths", {})
    # FastAPI writes the {model_id:path} converter into the path; the document names the parameter only
    for raw in [p for p in paths if ":path}" in p]:
        paths[raw.replace(":path}", "}")] = paths.pop(raw)
    for path, operations in paths.items():
        for method, operation in operations.items():
            _describe_operation(path, method, operation, open_paths, secured)
            for parameter in operation.get("parameters", []):
                if parameter.get("name") == "model_id":
                    _only_model(parameter.get("schema"), model)
    return schema


def _only_model(field: dict[str, Any] | None, model: str) -> None:
    """Restrict a string field (or the string branch of an optional one) to the served model's name."""
    if not field:
        return
    for branch in [field, *field.get("anyOf", [])]:
        if branch.get("type") == "string":
            branch["enum"] = [model]


def _describe_operation(path: str, method: str, operation: dict, open_paths: frozenset[str], secured: bool) -> None:
    responses = operation.setdefault("responses", {})
    responses.pop("422", None)
    ok = responses.setdefault("200", {"description": "Successful Response"})
    if (path, method) in _OK_BODIES:
        ok["content"] = _json(_OK_BODIES[(path, method)])
    if path in STREAMING:
        ok.setdefault("content", {"application/json": {"schema": {}}})["text/event-stream"] = _EVENT_STREAM
    if path == "/metrics":
        ok["content"] = {"text/plain": {"schema": {"type": "string"}, "description": "Prometheus text format"}}
    if path == "/health":
        responses["503"] = {"description": "The engine has stopped.", "content": _json("Health")}
    errors = []
    if method == "post":
        errors += [400, 413]
    if path in LOOKUPS:
        errors.append(404)
    if path in STREAMING:
        errors.append(500)
    if path in open_paths:
        operation["security"] = []
    elif secured:
        errors.append(401)
    error_body = _json("AnthropicError" if path.startswith("/v1/messages") else "OpenAIError")
    for status in sorted(errors):
        responses[str(status)] = {"description": _ERROR_DESCRIPTIONS[status], "content": error_body}


def document_api(app: FastAPI, open_paths: frozenset[str], secured: bool, model: str) -> None:
    """Serve the rewritten document at /openapi.json (built once, on first use)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            generated = get_openapi(title=app.title, version=app.version, routes=app.routes)
            app.openapi_schema = describe(generated, open_paths, secured, model)
        return app.openapi_schema

    app.openapi = openapi
