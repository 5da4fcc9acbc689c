"""OpenAI- and Anthropic-compatible HTTP server (FastAPI)."""

from mmx.serve.app import ServerState, build_app

__all__ = ["ServerState", "build_app"]
