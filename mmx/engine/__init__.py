"""Inference engine: continuous batching over a hybrid cache (paged KV blocks + lightning-state slots), in token
ids. Text (tokenising prompts, detokenising replies, stop strings) is :class:`mmx.LLM`'s and the server's."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mmx.utils.lazy import lazy_exports

_EXPORTS = {
    "AsyncLLM": "mmx.engine.async_engine",
    "CompletionOutput": "mmx.engine.outputs",
    "EngineArgs": "mmx.engine.args",
    "InvalidRequest": "mmx.engine.llm_engine",
    "LLMEngine": "mmx.engine.llm_engine",
    "RequestFailed": "mmx.engine.llm_engine",
    "RequestOutput": "mmx.engine.outputs",
    "RequestOutputKind": "mmx.engine.sampling_params",
    "SamplingParams": "mmx.engine.sampling_params",
}
__all__ = [
    "AsyncLLM",
    "CompletionOutput",
    "EngineArgs",
    "InvalidRequest",
    "LLMEngine",
    "RequestFailed",
    "RequestOutput",
    "RequestOutputKind",
    "SamplingParams",
]

if TYPE_CHECKING:
    from mmx.engine.args import EngineArgs
    from mmx.engine.async_engine import AsyncLLM
    from mmx.engine.llm_engine import InvalidRequest, LLMEngine, RequestFailed
    from mmx.engine.outputs import CompletionOutput, RequestOutput
    from mmx.engine.sampling_params import RequestOutputKind, SamplingParams

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
