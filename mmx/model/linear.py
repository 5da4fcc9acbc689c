"""Linear maps that a compiled decode step turns into streaming dot products.

A decode step of a few sequences multiplies a handful of rows by each weight matrix, and its time is the time to
stream the weights from memory. Inside a compiled graph (:mod:`mmx.engine.decode_graph`), writing the product as a
broadcast multiply and a sum over the input dimension lets inductor generate one vectorised loop per matrix that
reads the weight once, in its natural row-major order, across all threads: 1.4-2.9x the speed of the BLAS call at
one row, and 2.6-4.2x for the MoE's chosen experts (``bench/decode_gemv.py``, 1-2 threads). At 8 rows the two are
about even; from 16 rows, and in eager code, the BLAS is used. The sum is taken in float32 whatever the weight
dtype (bf16 and int8 weights are widened as they are read).

Outside compiled graphs, float32 products on the CPU go through oneDNN's GEMM when it pays: with the same plain
weights (row- or column-major, never repacked or copied) it runs 1.5-2.2x the speed of the MKL call that
``F.linear`` makes, from 4-8 rows up to prefill sizes, on the AVX-512 CPUs measured (``bench/onednn_linear.py``),
but each call costs ~13 us more, so small products (fewer than ONEDNN_MIN_MACS multiply-adds) stay with MKL. It has
no backward, so anything autograd records keeps ``F.linear``; inductor lowers it only for frozen weights, so
compiled graphs keep their own paths. ``MMX_ONEDNN_LINEAR=0`` turns it off (for A/B measurements).

oneDNN builds (and caches, up to 1024) a kernel for every row count it sees, ~0.4 ms and ~0.5 MB each; a server's
steps have ever-changing row counts, which made the first requests slow and grew a process by hundreds of MB. So
rows go in blocks of ROW_BLOCK times a power of two (up to LARGEST_BLOCK), and a remainder is padded up to one of a
few sizes (ROW_SIZES): at most fifteen kernels per weight shape, for the price of copying the padded rows and, when
there are several blocks, their outputs.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from mmx.ops.expert_rows import dense_rows, dense_takes

# A compiled step writes x @ W.T as dot products, one row of x after the other, each row reading all of W. At one
# row that beats the BLAS at every size; at up to FEW_ROWS rows, while W stays in the cache between rows
# (bench/decode_gemv.py --sizes, 32 MiB L3: 0.54-0.76x the BLAS's time at one row from 1 to 128 MiB; at 8-16 rows
# 0.78-1.08x up to 16 MiB, 1.12-2.03x from 32 MiB). The graphs' batch kinds split at FEW_ROWS: through the engine,
# 12-24 sequences decode 1.2-1.6x faster on the bench models as dot products, experts included, than through the
# BLAS and the grouped-GEMM experts (mmx.engine.decode_graph; docs/benchmarks.md).
FEW_ROWS = 16
STREAMED_WEIGHT_MAX_BYTES = 16 << 20


def streams_rows(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``x @ weight.T`` is to be written as dot products: inside a compiled graph, for one row, or for a
    few rows of a weight small enough to be read again from the cache. For experts, ``weight`` is one expert's."""
    if not torch.compiler.is_compiling() or x.numel() > FEW_ROWS * x.shape[-1]:
        return False
    return x.numel() <= x.shape[-1] or weight.numel() * weight.element_size() <= STREAMED_WEIGHT_MAX_BYTES


def dot_rows(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., in] @ weight[..., out, in].T as a multiply and a float32 sum (for compiled graphs), in x's dtype.
    ``weight`` may carry leading dimensions that broadcast against x's (gathered expert weights)."""
    return (x.float().unsqueeze(-2) * weight.float()).sum(-1).to(x.dtype)


# Below this many multiply-adds per product, MKL's lower call cost wins (bench/onednn_linear.py: even at 4 x 256 x
# 1024, MKL ahead at 16 x 384 x 192, oneDNN ahead from 8 x 256 x 1024).
ONEDNN_MIN_MACS = 1 << 21
# Smaller weights stay with MKL at every row count: the row blocks' copies eat oneDNN's gain (bench/onednn_linear.py:
# 192 x 192 is 0.8x at 64-100 rows and 1.1x at 2048).
ONEDNN_MIN_WEIGHT = 1 << 16


def _onednn_usable() -> bool:
    if os.environ.get("MMX_ONEDNN_LINEAR", "1") == "0" or not torch.backends.mkldnn.is_available():
        return False
    # measured on AVX-512 CPUs only; elsewhere MKL keeps every product
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


ONEDNN_LINEAR = _onednn_usable()


def onednn_takes(x: torch.Tensor) -> bool:
    """Whether oneDNN can take products of ``x``: eager, float32, on the CPU, not recorded by autograd."""
    if not ONEDNN_LINEAR or torch.compiler.is_compiling():
        return False
    if x.dtype != torch.float32 or x.device.type != "cpu":
        return False
    return not (torch.is_grad_enabled() and x.requires_grad)


def onednn_pays(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``x @ weight.T`` goes through oneDNN (see the module's notes): :func:`onednn_takes` x, a float32
    matrix autograd does not record of at least ONEDNN_MIN_WEIGHT elements, at least two rows and ONEDNN_MIN_MACS
    multiply-adds."""
    if weight.dim() != 2 or weight.dtype != torch.float32 or (torch.is_grad_enabled() and weight.requires_grad):
        return False
    if not onednn_takes(x):  # first: in a compiled graph, the size test below would become a guard on the batch
        return False
    rows = x.numel() // max(x.shape[-1], 1)
    return weight.numel() >= ONEDNN_MIN_WEIGHT and rows >= 2 and rows * weight.numel() >= ONEDNN_MIN_MACS


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, through oneDNN when :func:`onednn_pays`."""
    if onednn_pays(x, weight):
        return onednn_linear(x, weight, bias)
    return F.linear(x, weight, bias)


# Row counts oneDNN is called with: blocks of ROW_BLOCK rows times a power of two, the largest that fits, up to
# LARGEST_BLOCK, and a last block under ROW_BLOCK padded up to the next of ROW_SIZES. A prefill chunk of 4096 rows is
# then one call, not sixteen calls of 256 rows and a copy of their outputs into one tensor (8% of a tiny hybrid's
# 4096-token prefill went to that copy: docs/benchmarks.md, "Prefill products in one call").
ROW_BLOCK = 256
LARGEST_BLOCK = ROW_BLOCK << 5
ROW_SIZES = (8, 16, 32, 64, 96, 128, 160, 192, 224, 256)


def _padded_rows(rows: int) -> int:
    return next(size for size in ROW_SIZES if size >= rows)


def row_blocks(rows: int) -> list[tuple[int, int]]:
    """(first row, rows oneDNN is called with) of each block of a product of ``rows`` rows (see the notes above)."""
    blocks, start = [], 0
    while start < rows:
        left = rows - start
        if left < ROW_BLOCK:
            blocks.append((start, _padded_rows(left)))
            break
        size = ROW_BLOCK << ((min(left, LARGEST_BLOCK) // ROW_BLOCK).bit_length() - 1)  # largest power of two
        blocks.append((start, size))
        start += size
    return blocks


def padded_blocks(flat: torch.Tensor) -> list[torch.Tensor]:
    """The rows of ``flat`` [rows, cols] in the blocks of :func:`row_blocks`, the last one padded with zero rows."""
    blocks = []
    for start, size in row_blocks(flat.shape[0]):
        block = flat[start : start + size]
        if size != block.shape[0]:
            block = torch.cat([block, block.new_zeros(size - block.shape[0], block.shape[1])])
        blocks.append(block)
    return blocks


def onednn_product(block: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """block @ weight.T + bias by oneDNN, with the weight as it is stored (no packing, no copy); ``block`` has one of
    the row counts of :func:`row_blocks` (see the module's notes)."""
    return torch.ops.mkldnn._linear_pointwise(block, weight, bias, "none", [], "")


def joined(blocks: list[torch.Tensor], rows: int) -> torch.Tensor:
    """The first ``rows`` rows of the blocks' products, one after the other."""
    return (blocks[0] if len(blocks) == 1 else torch.cat(blocks))[:rows]


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias by oneDNN, in the row blocks of :func:`padded_blocks`."""
    flat = x.reshape(-1, x.shape[-1])
    products = [onednn_product(block, weight, bias) for block in padded_blocks(flat)]
    return joined(products, flat.shape[0]).view(*x.shape[:-1], weight.shape[0])


def project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, as dot products when :func:`streams_rows`, through oneDNN when :func:`onednn_pays`."""
    if weight.dim() == 2 and streams_rows(x, weight):
        out = dense_rows(x, weight) if dense_takes(x, weight) else dot_rows(x, weight)
        return out if bias is None else out + bias
    return linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and names) whose product takes :func:`project`'s path."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return project(x, self.weight, self.bias)
