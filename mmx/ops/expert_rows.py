"""The experts of a few tokens with each expert's weights read once (``expert_rows.c``), for compiled decode steps.

Written as dot products per token (:func:`mmx.model.moe.mix_experts`), a decode step of N sequences reads each
token's k experts: N x k expert matrices per layer, most of them the same few read again (tiny M2 at 16
sequences: 48 MB a layer against 6 MB of experts). Here the (token, slot) pairs are grouped by expert first and
every weight row is read once for all of its expert's rows, gate, up and the activation in one pass, down and the
weighted sum in a second: one parallel region per layer instead of a dozen loops. The same 4 x 4 blocks make
``mmx::dense_rows``, a dense product of 2-16 rows that reads each weight row once for all of them, where dot
products per row read the whole weight again for each row.

The ops are defined here; their CPU kernels are C++ (``expert_rows_op.cpp``: the checks, written against torch's
stable C ABI) over the C kernels, so a graph compiled ahead of time calls them without going through Python. Both
are compiled for this CPU on first use (``gcc``/``g++ -O3 -march=native -fopenmp``, ~3 s; the kernel shares torch's
OpenMP pool) and cached in ``~/.cache/mmx/kernels`` (``MMX_KERNEL_CACHE`` overrides it), keyed by the sources, the
compilers' versions, the CPU's instruction sets and torch's version. Without the compilers it is unavailable and the
callers keep their dot products. ``MMX_EXPERT_ROWS=0`` turns it off, and ``MMX_DENSE_ROWS=0`` the dense op alone
(for comparisons; decode graphs traced either way are cached apart).
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile

import torch

from mmx.utils.logging import get_logger

logger = get_logger(__name__)

HERE = os.path.dirname(os.path.abspath(__file__))
KERNELS = [os.path.join(HERE, name) for name in ("expert_rows.c", "decode_rows.c", "fused_rows.c")]  # plain C
HEADER = os.path.join(HERE, "rows.h")  # their shared vector helpers
OP = os.path.join(HERE, "expert_rows_op.cpp")  # the op's checks and its registration, through torch's stable ABI
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC"]
VECTOR = 16  # floats per vector in the kernel: both dimensions must be multiples of it

_loaded: str | None = None  # the loaded library's path
_failed: str | None = None
_active = False  # set by prepare()
_dense_active = False  # set by prepare()
_threads = 1  # the thread count graphs traced now pass to the kernel (set by prepare())


def enabled() -> bool:
    """Whether decode graphs traced now use the kernel (``MMX_EXPERT_ROWS``, on unless "0")."""
    return os.environ.get("MMX_EXPERT_ROWS", "1") != "0"


def dense_enabled() -> bool:
    """Whether decode graphs traced now use :func:`dense_rows` (``MMX_DENSE_ROWS``, on unless "0"; the kernels'
    ``MMX_EXPERT_ROWS=0`` turns it off too)."""
    return os.environ.get("MMX_DENSE_ROWS", "1") != "0"


def cpu_flags() -> str:
    """The CPU's instruction sets (/proc/cpuinfo's flags line; the processor's name where there is none): code
    compiled for this CPU is cached under them."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def _digest(*parts: bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(hashlib.sha256(part).digest())
    return digest.hexdigest()[:16]


def _build(cc: str, cxx: str) -> str:
    """Path of the op's shared library, compiled first when it is not cached."""
    versions = [subprocess.run([c, "--version"], capture_output=True, text=True, check=True).stdout for c in (cc, cxx)]
    sources = []
    for path in (*KERNELS, HEADER, OP):
        with open(path, "rb") as f:
            sources.append(f.read())
    key = _digest(
        *sources,
        " ".join(FLAGS).encode(),
        *(v.encode() for v in versions),
        cpu_flags().encode(),
        torch.__version__.encode(),
    )
    root = os.environ.get("MMX_KERNEL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mmx", "kernels")
    path = os.path.join(root, f"expert_rows-{key}.so")
    if os.path.exists(path):
        return path
    os.makedirs(root, exist_ok=True)
    torch_dir = os.path.dirname(torch.__file__)
    with tempfile.TemporaryDirectory(dir=root) as work:  # renamed into place: no reader sees half a file
        objects, partial = [], os.path.join(work, "op.so")
        for i, source in enumerate(KERNELS):
            objects.append(os.path.join(work, f"kernel{i}.o"))
            subprocess.run([cc, *FLAGS, "-c", source, "-o", objects[-1]], capture_output=True, text=True, check=True)
        link = ["-L", os.path.join(torch_dir, "lib"), "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{torch_dir}/lib"]
        command = [cxx, *FLAGS, "-std=c++17", "-shared", "-I", os.path.join(torch_dir, "include"), OP, *objects]
        subprocess.run([*command, *link, "-o", partial], capture_output=True, text=True, check=True)
        os.replace(partial, path)
    return path


def library() -> bool:
    """Whether the op's kernel is loaded (built first when needed); when it cannot be built here, says why once."""
    global _loaded, _failed
    if _loaded or _failed is not None:
        return _loaded is not None
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    try:
        if cc is None or cxx is None:
            raise RuntimeError("no C and C++ compilers (gcc and g++) on PATH")
        path = _build(cc, cxx)
        torch.ops.load_library(path)
    except (OSError, RuntimeError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        _failed = f"{type(e).__name__}: {detail.strip().splitlines()[-1] if detail.strip() else ''}"
        logger.warning("grouped expert kernel unavailable, experts run as dot products (%s)", _failed)
        return False
    _loaded = path
    return True


def library_path() -> str | None:
    """The loaded kernels' shared library (built and loaded first when needed), or None where it cannot be built
    (:mod:`mmx.engine.native_step` calls ``mmx_decode_rows`` in it through ctypes)."""
    return _loaded if library() else None


def prepare() -> bool:
    """Decide, before a graph is traced, whether it uses the kernel (enabled and built here); :func:`supports`
    reads that decision, so tracing (dynamo's included) never runs the compiler or reads the environment."""
    global _active, _dense_active, _threads
    _active = enabled() and library()
    _dense_active = _active and dense_enabled()
    _threads = torch.get_num_threads()
    return _active


def supports(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, scale: torch.Tensor | None = None) -> bool:
    """Whether the kernel takes these experts: :func:`prepare` said yes, CPU, float32 activations, float32 weights
    (or int8 with float32 / bfloat16 scales, from two tokens up), both dimensions multiples of VECTOR, SiLU (the
    caller checks the activation).

    At one token, float32 weights take the kernel: its single parallel region beats the graph's fused dot products
    (tiny M2 at one sequence, two engines alternating in one process: 0.85-0.95x the step time). int8 weights keep
    the dot products there: their loops are cheap enough that the op's call costs what it saves (1.00x on tiny M2,
    1.12x slower on the tiny hybrid; docs/benchmarks.md)."""
    if not _active or x.device.type != "cpu" or x.dtype != torch.float32 or gate_up.device.type != "cpu":
        return False
    if scale is not None and x.shape[0] < 2:  # see the docstring
        return False
    weight_dtype = torch.int8 if scale is not None else torch.float32
    if gate_up.dtype != weight_dtype or down.dtype != weight_dtype:
        return False
    if scale is not None and scale.dtype not in (torch.float32, torch.bfloat16):
        return False
    return down.shape[1] % VECTOR == 0 and down.shape[2] % VECTOR == 0


torch.library.define(
    "mmx::expert_rows",
    "(Tensor x, Tensor ids, Tensor weights, Tensor gate_up, Tensor down, Tensor? gate_up_scale, Tensor? down_scale, "
    "int threads) -> Tensor",
)


torch.library.define("mmx::dense_rows", "(Tensor x, Tensor weight, Tensor? scale, int threads) -> Tensor")


@torch.library.register_fake("mmx::dense_rows")
def _(x, weight, scale, threads):
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.register_fake("mmx::expert_rows")
def _(x, ids, weights, gate_up, down, gate_up_scale, down_scale, threads):
    return torch.empty_like(x)


def _threads_now() -> int:
    """The thread count an op call passes: :func:`prepare`'s in a graph being traced (inductor's kernels bake
    theirs in too), torch's current one when called eagerly (the kernels built first, or why not)."""
    if torch.compiler.is_compiling():
        return _threads
    if not library():
        raise RuntimeError(f"the grouped expert kernel is unavailable ({_failed})")
    return torch.get_num_threads()


def expert_rows(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    gate_up_scale: torch.Tensor | None = None,
    down_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """sum_k weights[t, k] * down_e(silu(gate_e x_t) * up_e x_t), e = ids[t, k]: x [N, D] float32, ids [N, k] int64,
    weights [N, k] float32, gate|up [E, 2I, D], down [E, D, I]; int8 weights come with their per-row scales [E, 2I]
    and [E, D] (float32 or bfloat16). One op in a traced graph, run on the thread count of :func:`prepare`'s time
    (as inductor's own kernels are); called eagerly, on torch's current count. Bad input raises a ValueError."""
    return torch.ops.mmx.expert_rows(x, ids, weights, gate_up, down, gate_up_scale, down_scale, _threads_now())


def dense_takes(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`dense_rows` takes ``x @ weight.T`` in a graph traced now: the kernel prepared, 2 to 16 float32
    CPU rows (one row streams the weight at memory speed as dot products already), a float32 or int8 [O, D] weight
    with D a multiple of VECTOR and O of 4, and :func:`prepare` found ``MMX_DENSE_ROWS`` not "0"."""
    if not _dense_active:
        return False
    rows = x.numel() // x.shape[-1]
    return (
        2 <= rows <= 16
        and x.dtype == torch.float32
        and weight.dtype in (torch.float32, torch.int8)
        and x.device.type == weight.device.type == "cpu"
        and weight.dim() == 2
        and weight.shape[1] % VECTOR == 0
        and weight.shape[0] % 4 == 0
    )


def dense_rows(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., D] @ weight [O, D].T (int8 weights times their per-row ``scale`` [O], float32 or bfloat16) for a
    few rows: each block of 4 weight rows read once for every row (``dense_f32`` / ``dense_i8`` in expert_rows.c).
    Threads as in :func:`expert_rows`; bad input raises a ValueError."""
    out = torch.ops.mmx.dense_rows(x.reshape(-1, x.shape[-1]), weight, scale, _threads_now())
    return out.view(*x.shape[:-1], weight.shape[0])
