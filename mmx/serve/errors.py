"""Error bodies in the shapes the OpenAI and Anthropic SDKs parse."""

from __future__ import annotations

from fastapi.responses import JSONResponse

_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
}


def openai_error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    body = {
        "error": {"message": message, "type": _OPENAI_TYPES.get(status, "server_error"), "param": param, "code": code}
    }
    return JSONResponse(body, status_code=status)


def anthropic_error(status: int, message: str) -> JSONResponse:
    body = {"type": "error", "error": {"type": _ANTHROPIC_TYPES.get(status, "api_error"), "message": message}}
    return JSONResponse(body, status_code=status)


def error_for(path: str, status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    """The error shape of the API the path belongs to."""
    if path.startswith("/v1/messages"):
        return anthropic_error(status, message)
    return openai_error(status, message, param, code)
