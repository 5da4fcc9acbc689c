"""Checkpoint I/O: official, transformers-native and M2 tensor names; shards; FP8; lazy loading; saving.

Loading first reads every shard's header and checks the whole checkpoint against the model (missing shards,
unknown, missing and wrongly shaped tensors are all reported together), then builds the model on the meta
device, allocates it once on the target device and streams tensors into it one at a time.

The model class is an argument (``model_cls``), not an import: :mod:`mmx.model.modeling` builds its
``from_pretrained`` / ``save_pretrained`` on this module, and :mod:`mmx.model.weights` binds it to
:class:`~mmx.model.modeling.MiniMaxForCausalLM`, so the dependencies run one way.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn
from tqdm.auto import tqdm

from mmx.config import MiniMaxConfig
from mmx.model.fp8 import FP8_DTYPES, block_size_from, dequantize_fp8, expected_scale_shape
from mmx.model.safetensors_io import SafetensorsReader
from mmx.utils.io import atomic_write_text, atomic_write_with
from mmx.utils.logging import get_logger

logger = get_logger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
SHARD_NAME = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
# Tensors some writers add that are recomputed from the config (transformers' lightning decay tables, RoPE).
DERIVED_SUFFIXES = (
    "self_attn.slope_rate",
    "self_attn.query_decay",
    "self_attn.key_decay",
    "self_attn.diagonal_decay",
    "rotary_emb.inv_freq",
)
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_OFFICIAL_EXPERT = re.compile(r"^block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.weight$")
_STACKED = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
_EXPERT_PART = {"w1": "gate", "w3": "up", "w2": "down"}
_MAX_LISTED = 12
# The model class a checkpoint is loaded into (MiniMaxForCausalLM): built from a MiniMaxConfig, with ``cast``
# and ``tie_weights`` methods.
Model = TypeVar("Model", bound=nn.Module)


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model; the message lists every problem found."""


@dataclass(frozen=True)
class Target:
    """Where a checkpoint tensor goes: a model tensor, or one expert's gate / up / down part of a stacked one."""

    name: str
    expert: int | None = None
    part: str | None = None  # "gate" | "up" | "down" for a single expert's slice

    def view(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.expert is None:
            return tensor
        matrix = tensor[self.expert]
        if self.part == "gate":
            return matrix[: matrix.shape[0] // 2]
        if self.part == "up":
            return matrix[matrix.shape[0] // 2 :]
        return matrix

    def units(self, tensor: torch.Tensor) -> set:
        """The pieces of ``self.name`` this target fills (for finding what a checkpoint leaves missing)."""
        if self.expert is not None:
            return {(self.expert, self.part)}
        return _all_units(self.name, tensor)


def _all_units(name: str, tensor: torch.Tensor) -> set:
    if name.endswith("experts.gate_up_proj"):
        return {(e, p) for e in range(tensor.shape[0]) for p in ("gate", "up")}
    if name.endswith("experts.down_proj"):
        return {(e, "down") for e in range(tensor.shape[0])}
    return {None}


SKIP = "skip"
SKIP_MTP = "mtp"


def map_key(key: str, config: MiniMaxConfig) -> Target | str:
    """Checkpoint tensor name -> :class:`Target`, or SKIP / SKIP_MTP for tensors the model does not hold."""
    if key.endswith(DERIVED_SUFFIXES):
        return SKIP
    if key.startswith("mtp.") or ".mtp." in key or key.startswith("model.mtp"):
        return SKIP_MTP
    match = _LAYER_KEY.match(key)
    if not match:
        if key == "lm_head.weight" and config.tie_word_embeddings:
            return SKIP
        return Target(key)
    layer, rest = int(match[1]), match[2]
    if layer >= config.num_hidden_layers:
        return SKIP_MTP  # M2 declares MTP modules as layers past the last decoder layer
    expert = _OFFICIAL_EXPERT.match(rest)
    if expert:
        part = _EXPERT_PART[expert[2]]
        stacked = "gate_up_proj" if part in ("gate", "up") else "down_proj"
        return Target(f"model.layers.{layer}.mlp.experts.{stacked}", int(expert[1]), part)
    if rest.startswith("block_sparse_moe."):
        rest = "mlp." + rest[len("block_sparse_moe.") :]
    return Target(f"model.layers.{layer}.{rest}")


def checkpoint_names(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's tensors under the official checkpoint names (per-expert w1 / w3 / w2, ``block_sparse_moe``),
    which transformers, vLLM, SGLang and the remote code all load."""
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        stacked = _STACKED.match(name)
        if stacked:
            layer, kind = stacked[1], stacked[2]
            prefix = f"model.layers.{layer}.block_sparse_moe.experts"
            for e in range(tensor.shape[0]):
                if kind == "gate_up_proj":
                    half = tensor.shape[1] // 2
                    yield f"{prefix}.{e}.w1.weight", tensor[e, :half]
                    yield f"{prefix}.{e}.w3.weight", tensor[e, half:]
                else:
                    yield f"{prefix}.{e}.w2.weight", tensor[e]
            continue
        layer = _LAYER_KEY.match(name)
        if layer and layer[2].startswith("mlp."):
            name = f"model.layers.{layer[1]}.block_sparse_moe.{layer[2][4:]}"
        yield name, tensor


# ---------------------------------------------------------------------------------------------------- files
def resolve_model_path(name_or_path: str | os.PathLike) -> str:
    """A local checkpoint directory, or a Hub repo id already in the local Hugging Face cache (never downloads)."""
    path = os.fspath(name_or_path)
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise FileNotFoundError(f"{path!r} is a file; pass the checkpoint directory")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(f"no checkpoint directory {path!r}") from None
    try:
        return snapshot_download(path, local_files_only=True)
    except Exception as e:  # any hub error means: not available offline
        raise FileNotFoundError(
            f"no checkpoint directory {path!r}, and no such repo in the local Hugging Face cache ({type(e).__name__})"
        ) from None


def checkpoint_files(directory: str) -> dict[str, str]:
    """Tensor name -> shard path, from the index when there is one. Missing shards are named in the error."""
    index_path = os.path.join(directory, INDEX_FILE)
    if os.path.exists(index_path):
        with open(index_path, encoding="utf-8") as f:
            try:
                weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index_path}: not a safetensors index ({e})") from e
        missing = sorted({shard for shard in weight_map.values() if not os.path.exists(os.path.join(directory, shard))})
        if missing:
            raise FileNotFoundError(
                f"checkpoint {directory} is missing shard file(s) listed in {INDEX_FILE}: " + ", ".join(missing)
            )
        return {key: os.path.join(directory, shard) for key, shard in weight_map.items()}
    single = os.path.join(directory, SINGLE_FILE)
    files = (
        [single]
        if os.path.exists(single)
        else sorted(os.path.join(directory, f) for f in os.listdir(directory) if f.endswith(".safetensors"))
    )
    if not files:
        raise FileNotFoundError(f"no {SINGLE_FILE}, {INDEX_FILE} or *.safetensors file in {directory}")
    out: dict[str, str] = {}
    for file in files:
        for key in SafetensorsReader(file).tensors:
            out[key] = file
    return out


# ---------------------------------------------------------------------------------------------------- loading
def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "float": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
        "half": torch.float16,
    }
    key = dtype.replace("torch.", "").lower()
    if key == "auto":
        return None
    if key not in names:
        raise ValueError(f"unsupported dtype {dtype!r}; use float32, bfloat16 or float16")
    return names[key]


@dataclass
class _Plan:
    entries: list[tuple[str, str, Target]]  # (checkpoint key, file, target)
    scales: dict[str, tuple[str, str]]  # weight key -> (scale key, file)
    skipped_mtp: int


def _plan(config: MiniMaxConfig, model: nn.Module, files: dict[str, str]) -> _Plan:
    readers: dict[str, SafetensorsReader] = {}

    def info(key: str):
        file = files[key]
        if file not in readers:
            readers[file] = SafetensorsReader(file)
        if key not in readers[file].tensors:
            raise CheckpointError(f"{INDEX_FILE} places {key!r} in {os.path.basename(file)}, which lacks it")
        return readers[file].tensors[key]

    tensors = dict(model.state_dict(keep_vars=True))
    block = block_size_from(config.quantization_config)
    unexpected, mismatched, problems = [], [], []
    covered: dict[str, set] = {}
    entries, scales = [], {}
    skipped_mtp = 0
    scale_keys = {k for k in files if k.endswith(".weight_scale_inv")}
    for key in sorted(files):
        if key in scale_keys:
            continue
        target = map_key(key, config)
        if target == SKIP_MTP:
            skipped_mtp += 1
            continue
        if target == SKIP:
            continue
        if target.name not in tensors:
            unexpected.append(key)
            continue
        dest = target.view(tensors[target.name])
        meta = info(key)
        # Present, even if unusable: report it once, as mismatched or as a problem, not also as missing.
        covered.setdefault(target.name, set()).update(target.units(tensors[target.name]))
        if tuple(dest.shape) != meta.shape:
            mismatched.append(f"{key}: checkpoint {list(meta.shape)}, model expects {list(dest.shape)}")
            continue
        scale_key = key[: -len("weight")] + "weight_scale_inv" if key.endswith(".weight") else None
        if meta.dtype in FP8_DTYPES:
            if scale_key not in files:
                problems.append(f"{key} is {meta.dtype} but has no {scale_key}")
                continue
            scale_shape = info(scale_key).shape
            if len(meta.shape) != 2 or scale_shape != expected_scale_shape(meta.shape, block):
                problems.append(f"{scale_key}: shape {list(scale_shape)} does not tile {list(meta.shape)} in {block}")
                continue
            scales[key] = (scale_key, files[scale_key])
        entries.append((key, files[key], target))
    for scale_key in sorted(scale_keys):
        weight_key = scale_key[: -len("_scale_inv")]
        if weight_key not in scales and map_key(weight_key, config) not in (SKIP, SKIP_MTP):
            if weight_key in files:
                problems.append(f"{scale_key} belongs to {weight_key}, which is not FP8")
            else:
                unexpected.append(scale_key)
    missing = []
    for name, tensor in tensors.items():
        if config.tie_word_embeddings and name == "lm_head.weight":
            continue
        absent = _all_units(name, tensor) - covered.get(name, set())
        if absent:
            detail = "" if absent == {None} else f" ({len(absent)} expert slices, e.g. {sorted(absent)[0]})"
            missing.append(name + detail)
    report = []
    for title, items in (
        ("missing tensors", missing),
        ("unexpected tensors", unexpected),
        ("tensors with the wrong shape", mismatched),
        ("other problems", problems),
    ):
        if items:
            listed = "\n  ".join(items[:_MAX_LISTED])
            more = f"\n  ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
            report.append(f"{len(items)} {title}:\n  {listed}{more}")
    if report:
        raise CheckpointError("checkpoint does not match the model config:\n" + "\n".join(report))
    return _Plan(entries, scales, skipped_mtp)


def _default_dtype(config: MiniMaxConfig, files: dict[str, str]) -> torch.dtype:
    configured = parse_dtype(config.torch_dtype) if config.torch_dtype else None
    if configured is not None:
        return configured
    key = "model.embed_tokens.weight"
    if key in files:
        stored = SafetensorsReader(files[key]).tensors[key].dtype
        if stored in (torch.float32, torch.bfloat16, torch.float16):
            return stored
    return torch.float32


def empty_model(model_cls: type[Model], config: MiniMaxConfig, dtype: torch.dtype, device: str | torch.device) -> Model:
    """The model's structure with uninitialised storage on ``device`` (no time spent on a random init)."""
    with torch.device("meta"):
        model = model_cls(config)
    model.cast(dtype)
    model.to_empty(device=device)
    model.tie_weights()
    return model


def load_checkpoint(
    model_cls: type[Model],
    path: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    progress: bool | None = None,
) -> Model:
    """Load a MiniMax checkpoint directory (official M1 / Text-01, transformers-native, or M2, FP8 included) into
    a new ``model_cls`` built from its config.json.

    ``dtype`` None means the config's ``torch_dtype``, else the stored embedding dtype. Peak memory is the model
    plus one tensor."""
    directory = resolve_model_path(path)
    config = MiniMaxConfig.from_pretrained(directory)
    files = checkpoint_files(directory)
    dtype = parse_dtype(dtype) or _default_dtype(config, files)
    with torch.device("meta"):
        meta_model = model_cls(config)
    plan = _plan(config, meta_model, files)
    if plan.skipped_mtp:
        logger.info("skipping %d multi-token-prediction (MTP) tensors: mmx runs the main model only", plan.skipped_mtp)
    model = empty_model(model_cls, config, dtype, device)
    destinations = dict(model.state_dict(keep_vars=True))
    block = block_size_from(config.quantization_config)
    readers: dict[str, SafetensorsReader] = {}

    def reader(file: str) -> SafetensorsReader:
        if file not in readers:
            readers[file] = SafetensorsReader(file)
        return readers[file]

    total_bytes = sum(reader(file).tensors[key].nbytes for key, file, _ in plan.entries)
    show = progress if progress is not None else total_bytes > 2**30
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="loading weights", disable=not show)
    # Sequential reads: by file, then by position in the file.
    ordered = sorted(plan.entries, key=lambda e: (e[1], reader(e[1]).tensors[e[0]].begin))
    with torch.no_grad():
        for key, file, target in ordered:
            dest = target.view(destinations[target.name].data)
            src = reader(file)
            meta = src.tensors[key]
            if key in plan.scales:
                scale_key, scale_file = plan.scales[key]
                value = dequantize_fp8(src.read(key), reader(scale_file).read(scale_key), block, dest.dtype)
                dest.copy_(value)
            elif dest.device.type == "cpu" and dest.dtype == meta.dtype and dest.is_contiguous():
                src.read(key, out=dest)
            else:
                dest.copy_(src.read(key))
            bar.update(meta.nbytes)
    bar.close()
    if config.quantization_config:
        # The weights are dense now; a re-save must not claim they are quantised.
        config.quantization_config = None
    config.torch_dtype = str(dtype).replace("torch.", "")
    model.eval()
    return model


# ---------------------------------------------------------------------------------------------------- saving
def parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", size, flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"cannot parse size {size!r}; use e.g. 5GB or 500MB")
    unit = (match[2] or "B").upper().replace("I", "")
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}[unit]
    return int(float(match[1]) * scale)


def save_model(
    model: nn.Module,
    path: str | os.PathLike,
    dialect: str | None = None,
    max_shard_size: int | str = "5GB",
) -> None:
    """Write config.json and safetensors shards (official tensor names) that transformers and mmx both load.
    Every file is written to a temporary name and renamed, so an interrupted save never leaves a torn file."""
    from safetensors.torch import save_file

    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    limit = parse_size(max_shard_size)
    shards: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    for key, tensor in checkpoint_names(model):
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append((key, tensor))
        size += nbytes
    names = (
        [SINGLE_FILE]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    weight_map, total = {}, 0
    for name, shard in zip(names, shards):
        # Clone: per-expert views share storage, which safetensors refuses; one shard is in memory at a time.
        tensors = {key: t.detach().to("cpu").contiguous().clone() for key, t in shard}
        atomic_write_with(os.path.join(path, name), lambda tmp, t=tensors: save_file(t, tmp, metadata={"format": "pt"}))
        for key, t in tensors.items():
            weight_map[key] = name
            total += t.numel() * t.element_size()
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        atomic_write_text(os.path.join(path, INDEX_FILE), json.dumps(index, indent=2) + "\n")
    config = model.config.replace(torch_dtype=str(model.dtype).replace("torch.", ""), quantization_config=None)
    config.save_pretrained(path, dialect=dialect)
    # Drop weight files of an earlier save into the same directory that this save does not use.
    for file in os.listdir(path):
        stale = (SHARD_NAME.match(file) or file in (SINGLE_FILE, INDEX_FILE)) and file not in names
        if stale and not (file == INDEX_FILE and len(shards) > 1):
            os.unlink(os.path.join(path, file))
