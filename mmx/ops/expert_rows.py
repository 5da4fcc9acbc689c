"""The experts of a few tokens with each expert's weights read once (``expert_rows.c``), for compiled decode steps.

Written as dot products per token (:func:`mmx.model.moe.mix_experts`), a decode step of N sequences reads each
token's k experts: N x k expert matrices per layer, most of them the same few read again (tiny M2 at 16
sequences: 48 MB a layer against 6 MB of experts). Here the (token, slot) pairs are grouped by expert first and
every weight row is read once for all of its expert's rows, gate, up and the activation in one pass, down and the
weighted sum in a second: one parallel region per layer instead of a dozen loops.

The kernel is C compiled for this CPU on first use (``gcc -O3 -march=native -fopenmp``; it shares torch's OpenMP
pool) and cached in ``~/.cache/mmx/kernels`` (``MMX_KERNEL_CACHE`` overrides it), keyed by its source, the
compiler's version and the CPU's instruction sets. Without a C compiler it is unavailable and the callers keep
their dot products. ``MMX_EXPERT_ROWS=0`` turns it off (for comparisons; decode graphs traced with it on and off
are cached apart).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile

import torch

from mmx.utils.logging import get_logger

logger = get_logger(__name__)

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "expert_rows.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
VECTOR = 16  # floats per vector in the kernel: both dimensions must be multiples of it

_library: ctypes.CDLL | None = None
_failed: str | None = None
_active = False  # set by prepare()


def enabled() -> bool:
    """Whether decode graphs traced now use the kernel (``MMX_EXPERT_ROWS``, on unless "0")."""
    return os.environ.get("MMX_EXPERT_ROWS", "1") != "0"


def cpu_flags() -> str:
    """The CPU's instruction sets (/proc/cpuinfo's flags line; the processor's name where there is none): code
    compiled for this CPU is cached under them."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def _build(compiler: str) -> str:
    """Path of the kernel's shared library, compiled first when it is not cached."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    with open(SOURCE, "rb") as f:
        source = f.read()
    digest = hashlib.sha256()
    for part in (source, " ".join(FLAGS).encode(), version.encode(), cpu_flags().encode()):
        digest.update(hashlib.sha256(part).digest())
    root = os.environ.get("MMX_KERNEL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mmx", "kernels")
    path = os.path.join(root, f"expert_rows-{digest.hexdigest()[:16]}.so")
    if not os.path.exists(path):
        os.makedirs(root, exist_ok=True)
        fd, partial = tempfile.mkstemp(suffix=".so", dir=root)  # renamed into place: no reader sees half a file
        os.close(fd)
        try:
            subprocess.run([compiler, *FLAGS, SOURCE, "-o", partial], capture_output=True, text=True, check=True)
            os.replace(partial, path)
        finally:
            if os.path.exists(partial):
                os.remove(partial)
    return path


def library() -> ctypes.CDLL | None:
    """The loaded kernel, or None when it cannot be built here (said once, with the reason)."""
    global _library, _failed
    if _library is not None or _failed is not None:
        return _library
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    try:
        if compiler is None:
            raise RuntimeError("no C compiler (gcc or cc) on PATH")
        lib = ctypes.CDLL(_build(compiler))
    except (OSError, RuntimeError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        _failed = f"{type(e).__name__}: {detail.strip().splitlines()[-1] if detail.strip() else ''}"
        logger.warning("grouped expert kernel unavailable, experts run as dot products (%s)", _failed)
        return None
    for name in ("experts_f32", "experts_i8"):
        getattr(lib, name).restype = ctypes.c_int
    _library = lib
    return _library


def prepare() -> bool:
    """Decide, before a graph is traced, whether it uses the kernel (enabled and built here); :func:`supports`
    reads that decision, so tracing (dynamo's included) never runs the compiler or reads the environment."""
    global _active
    _active = enabled() and library() is not None
    return _active


def supports(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, scale: torch.Tensor | None = None) -> bool:
    """Whether the kernel takes these experts: :func:`prepare` said yes, two tokens or more, CPU, float32
    activations, float32 weights (or int8 with float32 / bfloat16 scales), both dimensions
    multiples of VECTOR, SiLU (the caller checks the activation).

    One token stays with the dot products: it reads each of its experts once either way, and there the dot
    products fuse with the layer's other loops while the op is a call back into Python from the graph
    (tiny M2 at one sequence, two engines alternating in one process: 1.07x slower in float32 and 1.45x in int8
    with the kernel; docs/benchmarks.md)."""
    if not _active or x.device.type != "cpu" or x.dtype != torch.float32 or gate_up.device.type != "cpu":
        return False
    if x.shape[0] < 2:  # one token reads each of its experts once anyway (see the docstring)
        return False
    weight_dtype = torch.int8 if scale is not None else torch.float32
    if gate_up.dtype != weight_dtype or down.dtype != weight_dtype:
        return False
    if scale is not None and scale.dtype not in (torch.float32, torch.bfloat16):
        return False
    return down.shape[1] % VECTOR == 0 and down.shape[2] % VECTOR == 0


def _address(t: torch.Tensor | None) -> ctypes.c_void_p | None:
    return None if t is None else ctypes.c_void_p(t.data_ptr())


# Defined through torch.library directly rather than torch.library.custom_op: a call then costs ~1.5 us of
# dispatch instead of ~9 (custom_op's Python wrappers), which is most of a one-sequence layer's kernel time.
torch.library.define(
    "mmx::expert_rows",
    "(Tensor x, Tensor ids, Tensor weights, Tensor gate_up, Tensor down, Tensor? gate_up_scale=None, "
    "Tensor? down_scale=None) -> Tensor",
)


def _expert_rows(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    gate_up_scale: torch.Tensor | None = None,
    down_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    lib = library()
    if lib is None:
        raise RuntimeError(f"the grouped expert kernel is unavailable ({_failed})")
    n, k = ids.shape
    experts, d, i = down.shape
    quantized = gate_up.dtype == torch.int8
    scales = [t for t in (gate_up_scale, down_scale) if t is not None]
    if (
        x.dtype != torch.float32
        or x.shape != (n, d)
        or weights.shape != (n, k)
        or gate_up.shape != (experts, 2 * i, d)
        or d % VECTOR
        or i % VECTOR
        or gate_up.dtype not in (torch.float32, torch.int8)
        or down.dtype != gate_up.dtype
        or any(t.device.type != "cpu" for t in (x, ids, weights, gate_up, down, *scales))
        or len(scales) != (2 if quantized else 0)
        or (quantized and (gate_up_scale.shape != (experts, 2 * i) or down_scale.shape != (experts, d)))
        or any(t.dtype not in (torch.float32, torch.bfloat16) or t.dtype != scales[0].dtype for t in scales)
    ):
        raise ValueError(
            "mmx::expert_rows takes float32 CPU rows [N, D], routing ids and weights [N, k], and gate|up [E, 2I, D] / "
            f"down [E, D, I] weights, float32 or int8 with both scales ([E, 2I], [E, D], one dtype), D and I multiples "
            f"of {VECTOR}; got rows {x.dtype} {list(x.shape)} on {x.device}, ids {list(ids.shape)}, weights "
            f"{list(weights.shape)}, gate|up {gate_up.dtype} {list(gate_up.shape)}, down {down.dtype} "
            f"{list(down.shape)}, scales {[f'{t.dtype} {list(t.shape)}' for t in scales]}"
        )
    ids, mix = ids.to(torch.int64).contiguous(), weights.to(torch.float32).contiguous()
    tensors = [x, gate_up, down, gate_up_scale, down_scale]
    x, gate_up, down, gate_up_scale, down_scale = (t if t is None else t.contiguous() for t in tensors)
    out = torch.empty(n, d, dtype=torch.float32)
    kernel = lib.experts_i8 if gate_up.dtype == torch.int8 else lib.experts_f32
    bf16 = int(gate_up_scale is not None and gate_up_scale.dtype == torch.bfloat16)
    failed = kernel(
        *map(_address, (x, ids, mix, gate_up, gate_up_scale, down, down_scale)),
        bf16,
        _address(out),
        *(n, k, experts, d, i, torch.get_num_threads()),
    )
    if failed == 2:
        raise ValueError(f"mmx::expert_rows: an expert id is outside [0, {experts})")
    if failed:
        raise MemoryError(f"the grouped expert kernel could not allocate its scratch for {n * k} rows of {i}")
    return out


torch.library.impl("mmx::expert_rows", "CPU", _expert_rows)


@torch.library.register_fake("mmx::expert_rows")
def _(x, ids, weights, gate_up, down, gate_up_scale=None, down_scale=None):
    return torch.empty_like(x)


# sum_k weights[t, k] * down_e(silu(gate_e x_t) * up_e x_t), e = ids[t, k]: x [N, D] float32, ids [N, k],
# weights [N, k], gate|up [E, 2I, D], down [E, D, I]; int8 weights come with their per-row scales [E, 2I] and [E, D]
# (float32 or bfloat16). One op in a traced graph.
expert_rows = torch.ops.mmx.expert_rows
