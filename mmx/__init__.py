"""mmx: MiniMax-M1 / MiniMax-M2 in PyTorch."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mmx.utils.lazy import lazy_exports

__version__ = "0.1.0"

# Public name -> the submodule that defines it. They are imported on first access (PEP 562) so that light entry
# points (`mmx --help`, `import mmx.utils.memory`) do not pay for importing torch.
_EXPORTS = {
    "ConfigError": "mmx.config",
    "MiniMaxConfig": "mmx.config",
    "LLM": "mmx.llm",
    "AsyncLLM": "mmx.engine.async_engine",
    "EngineArgs": "mmx.engine.args",
    "LLMEngine": "mmx.engine.llm_engine",
    "SamplingParams": "mmx.engine.sampling_params",
    "StructuredOutputsParams": "mmx.engine.structured",
    "CheckpointError": "mmx.model",
    "DenseCache": "mmx.model",
    "MiniMaxForCausalLM": "mmx.model",
    "greedy_generate": "mmx.model",
    "load_model": "mmx.model",
    "save_model": "mmx.model",
}

__all__ = [
    "LLM",
    "AsyncLLM",
    "CheckpointError",
    "ConfigError",
    "DenseCache",
    "EngineArgs",
    "LLMEngine",
    "MiniMaxConfig",
    "MiniMaxForCausalLM",
    "SamplingParams",
    "StructuredOutputsParams",
    "greedy_generate",
    "load_model",
    "save_model",
]

if TYPE_CHECKING:  # type checkers and IDEs see the real objects
    from mmx.config import ConfigError, MiniMaxConfig
    from mmx.engine import AsyncLLM, EngineArgs, LLMEngine, SamplingParams
    from mmx.engine.structured import StructuredOutputsParams
    from mmx.llm import LLM
    from mmx.model import CheckpointError, DenseCache, MiniMaxForCausalLM, greedy_generate, load_model, save_model


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
