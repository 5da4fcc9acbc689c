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

from mmx.config import ARCH_M1, ConfigError, MiniMaxConfig, read_config_file
from mmx.model.fp8 import FP8_DTYPES, block_size_from, dequantize_fp8, expected_scale_shape
from mmx.model.fp8_linear import keep_fp8_modules
from mmx.model.safetensors_io import SafetensorsReader, TensorInfo
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
        weight_map = _read_weight_map(index_path)
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


def _read_weight_map(index_path: str) -> dict[str, str]:
    """The index's tensor name -> shard file map, each shard a file inside the checkpoint directory."""
    try:
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{index_path}: not valid JSON ({e})") from e
    if not isinstance(index, dict) or "weight_map" not in index:
        raise CheckpointError(f'{index_path}: not a safetensors index (no "weight_map" object)')
    weight_map = index["weight_map"]
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index_path}: weight_map is a {type(weight_map).__name__}, not an object")
    for key, shard in weight_map.items():
        inside = isinstance(shard, str) and shard and not os.path.isabs(shard)
        if not inside or os.path.normpath(shard).split(os.sep)[0] == os.pardir:
            raise CheckpointError(
                f"{index_path}: weight_map places {key!r} in {shard!r}, which is not a file name in the checkpoint"
            )
    return weight_map


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


class _Headers:
    """The headers of a checkpoint's shards, each parsed once per load, and where each tensor lives."""

    def __init__(self, files: dict[str, str]):
        self.files = files
        self._readers: dict[str, SafetensorsReader] = {}

    def reader(self, file: str) -> SafetensorsReader:
        if file not in self._readers:
            self._readers[file] = SafetensorsReader(file)
        return self._readers[file]

    def info(self, key: str) -> TensorInfo:
        file = self.files[key]
        tensors = self.reader(file).tensors
        if key not in tensors:
            raise CheckpointError(f"{INDEX_FILE} places {key!r} in {os.path.basename(file)}, which lacks it")
        return tensors[key]

    def shape(self, *keys: str) -> tuple[str, tuple[int, ...]] | None:
        """(key, shape) of the first of ``keys`` the checkpoint holds."""
        for key in keys:
            if key in self.files:
                return key, self.info(key).shape
        return None


def _layers_held(headers: _Headers) -> set[int]:
    return {int(m[1]) for m in map(_LAYER_KEY.match, headers.files) if m}


def check_layer_count(num_layers: object, headers: _Headers) -> None:
    """``num_hidden_layers`` against the decoder layers the checkpoint holds weights for. Run on the raw config
    value too, before the config itself builds per-layer lists (10 million layers would take seconds; 10**9,
    gigabytes)."""
    if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers < 1:
        return  # the config reader names a value that is not a positive integer
    below = sorted(i for i in _layers_held(headers) if i < num_layers)
    if len(below) < num_layers:
        first_absent = next(i for i in range(len(below) + 1) if i >= len(below) or below[i] != i)
        held = f"layers {below[0]}..{below[-1]} ({len(below)} of them)" if below else "no decoder layers"
        raise ConfigError(
            "num_hidden_layers",
            f"{num_layers}, but the checkpoint holds weights for {held}; model.layers.{first_absent}.* is absent",
        )


def check_config_fits_weights(config: MiniMaxConfig, headers: _Headers) -> None:
    """The config's sizes against the tensors the checkpoint holds, from the shard headers alone.

    Building even an empty model costs time and memory in proportion to the config (one module per layer, one
    decay table per lightning head), so a config that describes another model, or an absurd one, is refused here,
    naming the key. The full tensor-by-tensor comparison follows in :func:`_plan`."""
    n = config.num_hidden_layers
    check_layer_count(n, headers)
    layers = _layers_held(headers)
    if config.architecture == ARCH_M1 and max(layers, default=-1) >= n:
        # M2 numbers its multi-token-prediction modules after the last layer; M1 has none, so these are real layers.
        raise ConfigError("num_hidden_layers", f"{n}, but the checkpoint holds layers up to {max(layers)}")

    def expect(found: tuple[str, tuple[int, ...]] | None, expected: tuple[tuple[str, int], ...]) -> None:
        if found is None or len(found[1]) != len(expected):
            return  # absent tensors and wrong ranks are reported by _plan, with every other problem
        key, shape = found
        for size, (field, value) in zip(shape, expected):
            if size != value:
                raise ConfigError(field.split("*")[0].strip(), f"{field} = {value}, but {key} has shape {list(shape)}")

    vocab, hidden = ("vocab_size", config.vocab_size), ("hidden_size", config.hidden_size)
    expect(headers.shape("model.embed_tokens.weight"), (vocab, hidden))
    if not config.tie_word_embeddings:
        expect(headers.shape("lm_head.weight"), (vocab, hidden))
    heads = config.num_attention_heads * config.head_dim
    for i in range(n):
        prefix = f"model.layers.{i}"
        expect(
            headers.shape(f"{prefix}.block_sparse_moe.gate.weight", f"{prefix}.mlp.gate.weight"),
            (("num_local_experts", config.num_local_experts), hidden),
        )
        expect(headers.shape(f"{prefix}.self_attn.q_proj.weight"), (("num_attention_heads * head_dim", heads), hidden))
        expect(
            headers.shape(f"{prefix}.self_attn.qkv_proj.weight"),
            (("num_attention_heads * head_dim * 3", 3 * heads), hidden),
        )
        expect(
            headers.shape(f"{prefix}.block_sparse_moe.experts.0.w1.weight"),
            (("intermediate_size", config.intermediate_size), hidden),
        )
        expect(
            headers.shape(f"{prefix}.mlp.experts.gate_up_proj"),
            (
                ("num_local_experts", config.num_local_experts),
                ("intermediate_size * 2", 2 * config.intermediate_size),
                hidden,
            ),
        )


@dataclass
class _Plan:
    entries: list[tuple[str, str, Target]]  # (checkpoint key, file, target)
    scales: dict[str, tuple[str, str]]  # weight key -> (scale key, file)
    skipped_mtp: int


def _plan(config: MiniMaxConfig, model: nn.Module, headers: _Headers) -> _Plan:
    files = headers.files
    info = headers.info
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
        if dest.is_floating_point() and not meta.dtype.is_floating_point:
            # Integer or boolean bytes would be converted to numbers that were never weights.
            problems.append(f"{key} is stored as {meta.dtype}; a floating-point weight is expected")
            continue
        scale_key = key[: -len("weight")] + "weight_scale_inv" if key.endswith(".weight") else None
        if meta.dtype in FP8_DTYPES:
            if scale_key not in files:
                problems.append(f"{key} is {meta.dtype} but has no {scale_key}")
                continue
            scale = info(scale_key)
            if len(meta.shape) != 2 or scale.shape != expected_scale_shape(meta.shape, block):
                problems.append(f"{scale_key}: shape {list(scale.shape)} does not tile {list(meta.shape)} in {block}")
                continue
            if not scale.dtype.is_floating_point or scale.dtype in FP8_DTYPES:
                problems.append(f"{scale_key} is stored as {scale.dtype}; FP8 scales are float32 (or bfloat16)")
                continue
            scales[key] = (scale_key, files[scale_key])
        entries.append((key, files[key], target))
    for scale_key in sorted(scale_keys):
        weight_key = scale_key[: -len("_scale_inv")]
        if weight_key not in scales and map_key(weight_key, config) not in (SKIP, SKIP_MTP):
            if weight_key in files:
                if info(weight_key).dtype in FP8_DTYPES:
                    continue  # the weight's own problem is reported above
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


def _default_dtype(config: MiniMaxConfig, headers: _Headers) -> torch.dtype:
    configured = parse_dtype(config.torch_dtype) if config.torch_dtype else None
    if configured is not None:
        return configured
    key = "model.embed_tokens.weight"
    if key in headers.files:
        stored = headers.info(key).dtype
        if stored in (torch.float32, torch.bfloat16, torch.float16):
            return stored
    return torch.float32


def check_finite(key: str, file: str, loaded: torch.Tensor, stored: torch.dtype) -> None:
    """Refuse a weight holding NaN or Inf: the model would compute garbage (or NaN) for every token.

    ``aminmax`` is one pass with no temporary tensor, and its min and max are both finite exactly when every
    element is (NaN propagates, an infinity is an extreme); the element counts are taken only for the message."""
    if loaded.numel() == 0:
        return
    low, high = torch.aminmax(loaded)
    if bool(torch.isfinite(low)) and bool(torch.isfinite(high)):
        return
    nan = int(torch.isnan(loaded).sum())
    inf = int(torch.isinf(loaded).sum())
    cast = f" (stored as {stored}, loaded as {loaded.dtype})" if stored != loaded.dtype else ""
    raise CheckpointError(
        f"tensor {key!r} in {os.path.basename(file)} holds {nan} NaN and {inf} infinite values{cast}: the checkpoint "
        "is corrupt; allow_non_finite_weights=True (--allow-non-finite-weights) loads it anyway"
    )


def empty_model(model_cls: type[Model], config: MiniMaxConfig, dtype: torch.dtype, device: str | torch.device) -> Model:
    """The model's structure with uninitialised storage on ``device`` (no time spent on a random init)."""
    with torch.device("meta"):
        model = model_cls(config)
    model.cast(dtype)
    materialize(model, device)
    model.tie_weights()
    return model


def materialize(model: nn.Module, device: str | torch.device) -> None:
    """``model.to_empty(device)``, with ``torch.empty`` instead of ``torch.empty_like`` of meta tensors: that goes
    through torch's reference implementations, which import its symbolic shapes and so sympy, ~40 MB of Python
    objects kept for the life of every process that loads a model (a server's resident memory)."""
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None and param.device.type == "meta":
                fresh = torch.empty(param.shape, dtype=param.dtype, device=device)
                module._parameters[name] = nn.Parameter(fresh, requires_grad=param.requires_grad)
        for name, buffer in module._buffers.items():
            if buffer is not None and buffer.device.type == "meta":
                module._buffers[name] = torch.empty(buffer.shape, dtype=buffer.dtype, device=device)


def open_checkpoint(
    path: str | os.PathLike, dtype: torch.dtype | str | None
) -> tuple[str, MiniMaxConfig, _Headers, torch.dtype]:
    """(directory, config, shard headers, load dtype) of a checkpoint, its config checked against its tensors."""
    directory = resolve_model_path(path)
    raw_config = read_config_file(directory)
    headers = _Headers(checkpoint_files(directory))
    if isinstance(raw_config, dict):
        check_layer_count(raw_config.get("num_hidden_layers"), headers)
    config = MiniMaxConfig.from_dict(raw_config)
    check_config_fits_weights(config, headers)
    return directory, config, headers, parse_dtype(dtype) or _default_dtype(config, headers)


def load_checkpoint(
    model_cls: type[Model],
    path: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    progress: bool | None = None,
    allow_non_finite_weights: bool = False,
    keep_fp8: bool = False,
) -> Model:
    """Load a MiniMax checkpoint directory (official M1 / Text-01, transformers-native, or M2, FP8 included) into
    a new ``model_cls`` built from its config.json.

    ``dtype`` None means the config's ``torch_dtype``, else the stored embedding dtype. Peak memory is the model
    plus one tensor. A weight holding NaN or Inf (as loaded, so also one that overflows ``dtype``) is an error
    naming it, unless ``allow_non_finite_weights``. FP8 weights are dequantised to ``dtype``, unless ``keep_fp8``:
    then the decoder layers' FP8 linear maps and experts stay FP8 in memory (:mod:`mmx.model.fp8_linear`)."""
    directory, config, headers, dtype = open_checkpoint(path, dtype)
    with torch.device("meta"):
        meta_model = model_cls(config)
    plan = _plan(config, meta_model, headers)
    if plan.skipped_mtp:
        logger.info("skipping %d multi-token-prediction (MTP) tensors: mmx runs the main model only", plan.skipped_mtp)
    block = block_size_from(config.quantization_config)
    fp8_kept: dict[str, nn.Module] = {}
    if keep_fp8:
        if not plan.scales:
            raise CheckpointError(
                f"keep_fp8 (quantization='fp8') keeps a checkpoint's FP8 weights in FP8, but {directory} holds no "
                "FP8 weights: load it without quantization='fp8' (or with 'int8' / 'experts_int8')"
            )
        # Swap the FP8 modules in while the model is still on the meta device: no dense copy is ever allocated.
        model = empty_model(model_cls, config, dtype, "meta")
        fp8 = [(t.name, t.expert, headers.info(k).dtype) for k, _, t in plan.entries if k in plan.scales]
        fp8_kept = keep_fp8_modules(model, fp8, block)
        materialize(model, device)
        model.tie_weights()
    else:
        model = empty_model(model_cls, config, dtype, device)
    destinations = dict(model.state_dict(keep_vars=True))
    total_bytes = sum(headers.info(key).nbytes for key, _, _ in plan.entries)
    show = progress if progress is not None else total_bytes > 2**30
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="loading weights", disable=not show)
    # Sequential reads: by file, then by position in the file.
    ordered = sorted(plan.entries, key=lambda e: (e[1], headers.info(e[0]).begin))
    with torch.no_grad():
        for key, file, target in ordered:
            src = headers.reader(file)
            meta = src.tensors[key]
            if target.name in fp8_kept:
                scale_key, scale_file = plan.scales[key]
                scale = headers.reader(scale_file).read(scale_key)
                loaded = fp8_kept[target.name].store(target.expert, target.part, src.read(key), scale)
            else:
                loaded = dest = target.view(destinations[target.name].data)
                if key in plan.scales:
                    scale_key, scale_file = plan.scales[key]
                    scale = headers.reader(scale_file).read(scale_key)
                    dest.copy_(dequantize_fp8(src.read(key), scale, block, dest.dtype))
                elif dest.device.type == "cpu" and dest.dtype == meta.dtype and dest.is_contiguous():
                    src.read(key, out=dest)
                else:
                    dest.copy_(src.read(key))
            if not allow_non_finite_weights:
                check_finite(key, file, loaded, meta.dtype)
            bar.update(meta.nbytes)
    bar.close()
    if config.quantization_config and not fp8_kept:
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
