"""MiniMax model definition and checkpoint I/O."""

from mmx.model.cache import AttentionCache, DenseCache
from mmx.model.generate import greedy_generate
from mmx.model.modeling import MiniMaxForCausalLM, MiniMaxModel
from mmx.model.weights import CheckpointError, load_model, save_model

__all__ = [
    "AttentionCache",
    "CheckpointError",
    "DenseCache",
    "MiniMaxForCausalLM",
    "MiniMaxModel",
    "greedy_generate",
    "load_model",
    "save_model",
]
