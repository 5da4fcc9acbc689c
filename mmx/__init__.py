"""mmx: MiniMax-M1 / MiniMax-M2 in PyTorch."""

from mmx.config import ConfigError, MiniMaxConfig
from mmx.engine import LLM, AsyncLLM, EngineArgs, LLMEngine, SamplingParams
from mmx.model import CheckpointError, DenseCache, MiniMaxForCausalLM, greedy_generate, load_model, save_model

__version__ = "0.1.0"

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
    "greedy_generate",
    "load_model",
    "save_model",
]
