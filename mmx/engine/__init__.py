"""Inference engine: continuous batching over a hybrid cache (paged KV blocks + lightning-state slots)."""

from mmx.engine.async_engine import AsyncLLM
from mmx.engine.llm import LLM
from mmx.engine.llm_engine import EngineArgs, LLMEngine
from mmx.engine.outputs import CompletionOutput, RequestOutput
from mmx.engine.sampling_params import SamplingParams

__all__ = ["LLM", "AsyncLLM", "CompletionOutput", "EngineArgs", "LLMEngine", "RequestOutput", "SamplingParams"]
