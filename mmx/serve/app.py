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
from mmx.engine.llm_engine import InvalidRequest
from mmx.serve.anthropic_api import router as anthropic_router
from mmx.serve.chat import RequestError
from mmx.serve.errors import error_for
from mmx.serve.metrics import Metrics
from mmx.serve.openai_api import router as openai_router
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
    created: int = field(default_factory=lambda: int(time.time()))
    metrics: Metrics = field(default_factory=Metrics)


class _BodyTooLarge(Exception):
    pass


class GuardMiddleware:
    """Authentication (Bearer or x-api-key) and a request-size limit, in front of every /v1 route."""

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

        if self.api_key and path.startswith("/v1/"):
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


def _first_error(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    err = errors[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    if err.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    param = ".".join(loc) or None
    message = err.get("msg", "invalid value").removeprefix("Value error, ")
    return (f"{param}: {message}" if param else message), param


def build_app(state: ServerState, api_key: str | None = None, max_body_bytes: int = 8 << 20) -> FastAPI:
    app = FastAPI(title="mmx", version="0.1.0", docs_url=None, redoc_url=None)
    app.state.mmx = state
    app.include_router(openai_router)
    app.include_router(anthropic_router)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        message, param = _first_error(exc)
        return error_for(request.url.path, 400, message, param)

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError):
        return error_for(request.url.path, exc.status, str(exc), exc.param)

    @app.exception_handler(InvalidRequest)
    async def _engine_refused(request: Request, exc: InvalidRequest):
        return error_for(request.url.path, 400, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return error_for(request.url.path, exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        logger.exception("unhandled error on %s", request.url.path)
        return error_for(request.url.path, 500, f"internal error: {type(exc).__name__}")

    @app.get("/health")
    async def health():
        alive = getattr(state.engine, "alive", True)
        return Response(status_code=200 if alive else 503)

    @app.get("/version")
    async def version():
        return {"version": "0.1.0"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(state.metrics.render(state.engine.stats), media_type="text/plain; version=0.0.4")

    @app.post("/tokenize")
    async def tokenize(body: dict[str, Any]):
        text = body.get("prompt")
        if not isinstance(text, str):
            raise RequestError("tokenize needs a string 'prompt'", "prompt")
        ids = state.tokenizer.encode(text)
        return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": state.max_model_len})

    app.add_middleware(GuardMiddleware, api_key=api_key, max_body_bytes=max_body_bytes, metrics=state.metrics)
    return app
