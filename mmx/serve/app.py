"""The server: one FastAPI app over an async engine. The server never touches tensors; the engine never sees text:
the server tokenises prompts and reads replies through :class:`~mmx.chat.reply.ReplyStream`."""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from mmx.chat.formats import ChatSetup
from mmx.chat.tokenizer import Tokenizer
from mmx.engine.llm_engine import InvalidRequest, RequestFailed
from mmx.serve.anthropic_api import router as anthropic_router
from mmx.serve.chat import ClientDisconnected, RequestError
from mmx.serve.errors import error_for
from mmx.serve.metrics import Metrics
from mmx.serve.openai_api import router as openai_router
from mmx.serve.openapi import document_api
from mmx.serve.responses_api import ResponseStore
from mmx.serve.responses_api import router as responses_router
from mmx.serve.tokenizer_api import router as tokenizer_router
from mmx.utils.logging import get_logger

logger = get_logger(__name__)


@dataclass
class ServerState:
    engine: Any  # AsyncLLM, or anything with the same generate / finish_sequence / abort / stats
    tokenizer: Tokenizer
    chat: ChatSetup  # the template prompts are rendered with and the format replies are parsed in
    model_name: str
    model_path: str
    max_model_len: int
    reasoning_mode: str = "split"  # or "append_think": reasoning kept inline in the content
    max_sequences_per_request: int = 256  # prompts x n of one request
    max_tokenize_chars: int = 8 << 20  # the longest /tokenize prompt, in characters
    responses: ResponseStore = field(default_factory=ResponseStore)  # finished /v1/responses (previous_response_id)
    created: int = field(default_factory=lambda: int(time.time()))
    metrics: Metrics = field(default_factory=Metrics)


class _BodyTooLarge(Exception):
    pass


# Routes anyone may call when the server has an API key: probes and scrapers (and the API's description).
OPEN_PATHS = frozenset({"/health", "/version", "/metrics", "/openapi.json"})


class GuardMiddleware:
    """Authentication (Bearer or x-api-key) in front of every route but OPEN_PATHS, and a request-size limit."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int, metrics: Metrics):
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        started = False

        async def send_tracking(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                self.metrics.http_status(message["status"])
            await send(message)

        if self.api_key and path not in OPEN_PATHS:
            given = headers.get("x-api-key") or headers.get("authorization", "").removeprefix("Bearer ").strip()
            if not given or not hmac.compare_digest(given.encode(), self.api_key.encode()):
                return await error_for(path, 401, "invalid or missing API key", code="invalid_api_key")(
                    scope, receive, send_tracking
                )
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return await error_for(path, 413, f"request body over {self.max_body_bytes} bytes")(
                scope, receive, send_tracking
            )
        received = 0

        async def receive_limited():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise _BodyTooLarge
            return message

        try:
            await self.app(scope, receive_limited, send_tracking)
        except _BodyTooLarge:
            if not started:
                await error_for(path, 413, f"request body over {self.max_body_bytes} bytes")(
                    scope, receive, send_tracking
                )


def _field_path(loc) -> list[str]:
    """An error's location as the request's field names: without "body" and without the names pydantic gives the
    branches of a union ("str", "list[...]", a model's class name)."""
    return [
        str(p)
        for p in loc
        if p != "body" and not (isinstance(p, str) and ("[" in p or p in _TYPE_LABELS or p[:1].isupper()))
    ]


_TYPE_LABELS = frozenset({"str", "int", "float", "bool", "dict", "list", "none", "bytes"})


def _first_error(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    # the deepest error: for a field of several shapes (a string or a list of items), the branch that got furthest
    # is the one the client meant
    err = max(errors, key=lambda e: len(_field_path(e.get("loc", ()))))
    loc = _field_path(err.get("loc", ()))
    if err.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    param = ".".join(loc) or None
    message = err.get("msg", "invalid value").removeprefix("Value error, ")
    if err.get("type") == "unsupported_field":  # raised by the whole body's validator: the message names the field
        return message, err["ctx"]["param"]
    return (f"{param}: {message}" if param else message), param


def build_app(state: ServerState, api_key: str | None = None, max_body_bytes: int = 8 << 20) -> FastAPI:
    app = FastAPI(title="mmx", version="0.1.0", docs_url=None, redoc_url=None)
    app.state.mmx = state
    app.include_router(openai_router)
    app.include_router(anthropic_router)
    app.include_router(responses_router)
    app.include_router(tokenizer_router)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        message, param = _first_error(exc)
        return error_for(request.url.path, 400, message, param)

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError):
        return error_for(request.url.path, exc.status, str(exc), exc.param)

    @app.exception_handler(ClientDisconnected)
    async def _gone(request: Request, exc: ClientDisconnected):
        return Response(status_code=499)  # nobody reads it: the client closed the connection (nginx's code)

    @app.exception_handler(RequestFailed)
    async def _engine_failed(request: Request, exc: RequestFailed):
        return error_for(request.url.path, 500, str(exc))

    @app.exception_handler(InvalidRequest)
    async def _engine_refused(request: Request, exc: InvalidRequest):
        return error_for(request.url.path, 400, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        response = error_for(request.url.path, exc.status_code, str(exc.detail))
        response.headers.update(exc.headers or {})  # a 405 says which methods the route takes (Allow)
        return response

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        logger.exception("unhandled error on %s", request.url.path)
        return error_for(request.url.path, 500, f"internal error: {type(exc).__name__}")

    @app.get("/health")
    async def health():
        alive = getattr(state.engine, "alive", True)
        return JSONResponse({"status": "ok" if alive else "engine stopped"}, status_code=200 if alive else 503)

    @app.get("/version")
    async def version():
        return {"version": "0.1.0"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(state.metrics.render(state.engine.stats), media_type="text/plain; version=0.0.4")

    document_api(app, OPEN_PATHS, secured=bool(api_key), model=state.model_name)
    app.add_middleware(GuardMiddleware, api_key=api_key, max_body_bytes=max_body_bytes, metrics=state.metrics)
    return app
