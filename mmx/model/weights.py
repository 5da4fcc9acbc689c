"""Loading and saving :class:`~mmx.model.modeling.MiniMaxForCausalLM` checkpoints.

The checkpoint format itself (tensor names, shards, FP8, streaming, saving) is :mod:`mmx.model.checkpoint_io`,
which takes the model class as an argument so that :mod:`mmx.model.modeling` can build ``from_pretrained`` on it
without importing this module. Here it is bound to the one model class; the names callers import from this module
(``load_model``, ``save_model``, ``CheckpointError``, ...) all stay here.
"""

from __future__ import annotations

import os

import torch

from mmx.config import MiniMaxConfig
from mmx.model.checkpoint_io import (
    DERIVED_SUFFIXES,
    INDEX_FILE,
    SHARD_NAME,
    SINGLE_FILE,
    SKIP,
    SKIP_MTP,
    CheckpointError,
    Target,
    checkpoint_files,
    checkpoint_names,
    empty_model,
    load_checkpoint,
    map_key,
    parse_dtype,
    parse_size,
    resolve_model_path,
    save_model,
)
from mmx.model.modeling import MiniMaxForCausalLM
from mmx.model.params import weight_bytes
from mmx.model.quantization import check_quantization, quantize_model
from mmx.utils.logging import get_logger

logger = get_logger(__name__)

__all__ = [
    "DERIVED_SUFFIXES",
    "INDEX_FILE",
    "SHARD_NAME",
    "SINGLE_FILE",
    "SKIP",
    "SKIP_MTP",
    "CheckpointError",
    "Target",
    "build_empty_model",
    "checkpoint_files",
    "checkpoint_names",
    "load_model",
    "map_key",
    "parse_dtype",
    "parse_size",
    "resolve_model_path",
    "save_model",
]


def build_empty_model(config: MiniMaxConfig, dtype: torch.dtype, device: str | torch.device) -> MiniMaxForCausalLM:
    """The model's structure with uninitialised storage on ``device`` (no time spent on a random init)."""
    return empty_model(MiniMaxForCausalLM, config, dtype, device)


def load_model(
    path: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    progress: bool | None = None,
    allow_non_finite_weights: bool = False,
    quantization: str | None = None,
) -> MiniMaxForCausalLM:
    """Load a MiniMax checkpoint directory (official M1 / Text-01, transformers-native, or M2, FP8 included).

    ``dtype`` None means the config's ``torch_dtype``, else the stored embedding dtype. Peak memory is the model
    plus one tensor. A weight holding NaN or Inf is an error naming it, unless ``allow_non_finite_weights``.
    ``quantization`` "int8" / "experts_int8" then quantises the decoder layers (or only their experts) in place
    (:mod:`mmx.model.quantization`); "fp8" keeps an FP8 checkpoint's weights FP8 in memory as they load (an error for
    a checkpoint without FP8 weights)."""
    model = load_checkpoint(
        MiniMaxForCausalLM,
        path,
        dtype=dtype,
        device=device,
        progress=progress,
        allow_non_finite_weights=allow_non_finite_weights,
        keep_fp8=check_quantization(quantization) == "fp8",
    )
    quantize_model(model, quantization)
    logger.info("model weights in memory: %.1f MB (quantization: %s)", weight_bytes(model) / 1e6, quantization)
    return model
