"""Loading one rank's shard of a checkpoint: only its slices are read, and no rank holds the full model.

The checkpoint is checked against the full model first (the same report as a one-process load), then the model is
sharded on the meta device, given storage for this rank's slices only, and each slice is read from the mapped
safetensors file (:meth:`~mmx.model.safetensors_io.SafetensorsReader.read_slice`). FP8 weights are dequantised
slice by slice with the scale blocks that cover the slice, or, with ``keep_fp8``, kept FP8 with those blocks' factors
(:mod:`mmx.model.fp8_linear`; the slices must then start and end on block boundaries).
"""

from __future__ import annotations

import os

import torch

from mmx.model.checkpoint_io import Target, _Headers, _plan, check_finite, materialize, open_checkpoint
from mmx.model.fp8 import block_size_from
from mmx.model.fp8_linear import keep_fp8_modules
from mmx.model.modeling import MiniMaxForCausalLM
from mmx.parallel.group import ParallelGroup
from mmx.parallel.sharding import Cut, shard_model
from mmx.utils.logging import get_logger

logger = get_logger(__name__)


def dequantize_fp8_part(
    weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], origin: tuple[int, int], dtype: torch.dtype
) -> torch.Tensor:
    """A 2-D part of a block-scaled FP8 matrix whose first element sits at ``origin`` (row, column) of the full
    matrix; ``scale_inv`` is the full matrix's scale grid."""
    rows = (origin[0] + torch.arange(weight.shape[0])) // block[0]
    cols = (origin[1] + torch.arange(weight.shape[1])) // block[1]
    return (weight.float() * scale_inv.float()[rows][:, cols]).to(dtype)


class _SliceReader:
    """Reads (parts of) checkpoint tensors, dequantising FP8 ones."""

    def __init__(self, headers: _Headers, scales: dict[str, tuple[str, str]], block: tuple[int, int]):
        self.headers = headers
        self.scales = scales
        self.block = block

    def read(self, key: str, file: str, dim: int | None, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        """``key``'s elements [start, stop) along ``dim`` (the whole tensor when ``dim`` is None)."""
        reader = self.headers.reader(file)
        shape = reader.tensors[key].shape
        if dim is None:
            dim, start, stop = 0, 0, shape[0]
        part = reader.read_slice(key, dim, start, stop)
        if key in self.scales:
            scale_key, scale_file = self.scales[key]
            scale = self.headers.reader(scale_file).read(scale_key)
            origin = (start, 0) if dim == 0 else (0, start)
            return dequantize_fp8_part(part, scale, self.block, origin, dtype)
        return part.to(dtype)

    def read_fp8(
        self, key: str, file: str, dim: int | None, start: int, stop: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The FP8 bytes of ``key``'s part [start, stop) along ``dim`` and the factors of the blocks it covers; the
        part must be whole blocks (or end where the matrix ends)."""
        reader = self.headers.reader(file)
        shape = reader.tensors[key].shape
        scale_key, scale_file = self.scales[key]
        scale = self.headers.reader(scale_file).read(scale_key)
        if dim is None:
            return reader.read_slice(key, 0, 0, shape[0]), scale
        size = self.block[dim]
        if start % size or (stop % size and stop != shape[dim]):
            raise ValueError(
                f"{key}: this rank's rows [{start}, {stop}) of dimension {dim} cut through {size}-wide FP8 scale "
                "blocks, so the weight cannot stay FP8 split this way: load it without quantization='fp8' (it is "
                "then dequantised slice by slice) or choose another tensor_parallel_size"
            )
        first, last = start // size, -(-stop // size)
        return reader.read_slice(key, dim, start, stop), scale.narrow(dim, first, last - first)


def _expert_slice(target: Target, cut: Cut | None) -> tuple[int, int | None, int, int] | None:
    """For one expert's stored gate / up / down matrix: (this rank's index of the expert, dimension of the matrix to
    slice or None for all of it, start, stop); None when another rank holds that expert."""
    expert = _local_expert(target, cut)
    if expert is None:
        return None
    if cut is None or cut.dim == 0:  # replicated, or expert parallel: the whole matrix
        return expert, None, 0, 0
    start, stop = cut.ranges[0]  # gate and up rows (each its own matrix in the checkpoint), down columns
    return expert, 1 if target.part == "down" else 0, start, stop


def load_shard(
    path: str | os.PathLike,
    group: ParallelGroup,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    allow_non_finite_weights: bool = False,
    keep_fp8: bool = False,
) -> MiniMaxForCausalLM:
    """This rank's shard of the checkpoint at ``path`` as a sharded model (:func:`shard_model`); ``keep_fp8`` keeps
    FP8 weights FP8 in memory, as ``quantization="fp8"`` does in one process."""
    directory, config, headers, dtype = open_checkpoint(path, dtype)
    with torch.device("meta"):
        model = MiniMaxForCausalLM(config)
    plan = _plan(config, model, headers)  # the whole checkpoint against the whole model
    info = shard_model(model, group)
    model.cast(dtype)
    block = block_size_from(config.quantization_config)
    kept = {}
    if keep_fp8:
        if not plan.scales:
            raise ValueError(f"quantization='fp8' keeps FP8 weights in FP8, but {directory} holds no FP8 weights")
        kept = keep_fp8_modules(model, _local_fp8_entries(plan, info.cuts, headers), block)
    materialize(model, device)
    model.tie_weights()
    destinations = dict(model.state_dict(keep_vars=True))
    reader = _SliceReader(headers, plan.scales, block)
    ordered = sorted(plan.entries, key=lambda e: (e[1], headers.info(e[0]).begin))
    with torch.no_grad():
        for key, file, target in ordered:
            cut = info.cuts.get(target.name)
            if target.name in kept:
                _store_fp8(kept[target.name], reader, key, file, target, cut)
                continue
            local = destinations[target.name].data
            if target.expert is not None:
                found = _expert_slice(target, cut)
                if found is None:
                    continue
                expert, dim, a, b = found
                dest = Target(target.name, expert, target.part).view(local)
                value = reader.read(key, file, dim, a, b, dest.dtype)
            elif cut is None:
                dest, value = local, reader.read(key, file, None, 0, 0, local.dtype)
            else:
                dest = local
                value = torch.cat([reader.read(key, file, cut.dim, a, b, local.dtype) for a, b in cut.ranges], cut.dim)
            dest.copy_(value.to(dest.device))
            if not allow_non_finite_weights:
                check_finite(key, file, dest, headers.info(key).dtype)
    if not kept:
        config.quantization_config = None  # the weights are dense now
    config.torch_dtype = str(dtype).replace("torch.", "")
    held = sum(t.nbytes for t in {id(t): t for t in [*model.parameters(), *model.buffers()]}.values())
    logger.info("rank %d of %d: %.1f MiB of weights", group.rank, group.size, held / 2**20)
    return model.eval()


def _local_expert(target: Target, cut: Cut | None) -> int | None:
    """The index of ``target``'s expert among this rank's (None: another rank's)."""
    if cut is None or cut.dim != 0:
        return target.expert
    first, last = cut.ranges[0]
    return target.expert - first if first <= target.expert < last else None


def _local_fp8_entries(plan, cuts: dict[str, Cut], headers: _Headers) -> list[tuple[str, int | None, torch.dtype]]:
    """The FP8 checkpoint tensors this rank holds, as :func:`keep_fp8_modules` takes them (experts by local index)."""
    entries = []
    for key, _, target in plan.entries:
        if key not in plan.scales:
            continue
        expert = target.expert
        if expert is not None:
            expert = _local_expert(target, cuts.get(target.name))
            if expert is None:
                continue
        entries.append((target.name, expert, headers.info(key).dtype))
    return entries


def _store_fp8(module, reader: _SliceReader, key: str, file: str, target: Target, cut: Cut | None) -> None:
    """This rank's part of an FP8 checkpoint tensor into an FP8 module, with its blocks' factors."""
    expert, dim, start, stop = None, None, 0, 0
    if target.expert is not None:
        found = _expert_slice(target, cut)
        if found is None:
            return
        expert, dim, start, stop = found
    elif cut is not None:
        (start, stop), dim = cut.ranges[0], cut.dim
    q, scale = reader.read_fp8(key, file, dim, start, stop)
    module.store(expert, target.part, q, scale)
