"""Decode graphs compiled ahead of time (AOTInductor) in a child process and run without the compiler.

``torch.compile`` in the serving process costs twice: importing dynamo and inductor adds ~190 MB of resident memory
(more than mmx-tiny's weights, cache and activations together), and every step passes through dynamo's guards and
inductor's Python wrapper (~0.3 ms of a 1-2 ms step on the 16M models). Here the same step (:func:`decode_logits`)
is exported with ``torch.export`` and compiled by AOTInductor into a shared library, in a child process that
imports the compiler; the engine loads the library with torch's C++ runner, which needs neither.

What the child gets is the model's structure with its tensors on the meta device (no weights travel, so the
export costs no memory for large models), the shapes of the cache pools, and the batch ranges to cover. It
exports one graph per kind of batch (one sequence; 2 to FEW_ROWS; more), with the batch size and the block-table
width dynamic, and compiles each with the weights left out of the library. The engine then hands the runner its
own parameters and buffers as user-managed constants: the library reads the model's tensors in place, so an
in-place weight update (an RL sync) is seen by the next step, as with the in-process graphs.

The libraries are cached in ``~/.cache/mmx/aot/<key>`` (``MMX_AOT_CACHE`` overrides the root), keyed by the traced
code, torch's version, the CPU's instruction sets (the code is compiled for this CPU), the model's structure (its
pickled meta copy: classes, attributes, shapes, strides, dtypes; not the weights' values), the pool shapes, the
batch ranges and the thread count; a later start with the same settings loads them in under a second.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import asdict, dataclass

import torch
from torch import nn

from mmx.engine.decode_step import TABLE_STEP, DecodeStep
from mmx.ops.expert_rows import cpu_flags
from mmx.ops.expert_rows import dense_enabled as dense_rows_enabled
from mmx.ops.expert_rows import enabled as expert_rows_enabled
from mmx.ops.expert_rows import prepare as prepare_expert_rows
from mmx.utils.logging import get_logger

logger = get_logger(__name__)

_MODEL_PREFIX = "m."  # the model's attribute in the exported step module


@dataclass
class AotSpec:
    """What the child needs besides the model's structure: one entry per pool (shape, stride, dtype) in the
    order keys, values, states; the batch range of each kind of graph; the widest block table (in TABLE_STEP
    units); and the thread count the kernels are built for."""

    layer_index: dict[int, int]
    num_keys: int
    num_values: int
    pools: list[tuple[list[int], list[int], str]]
    kinds: dict[str, tuple[int, int]]
    max_table_steps: int
    threads: int
    # Inductor's memory planning (MMX_AOT_MEMORY_PLANNING=1): a step's intermediate buffers come out of one
    # allocation per call instead of one allocation each (dozens a layer). Off by default: bench/aot_memory.py finds
    # tiny M2 int8 at one sequence 11-14% faster and the other bench cases within the machine's noise, while
    # mmx-tiny's server holds 16 MiB more after 100 requests (442 against 426 MiB), past its 450 MB budget.
    memory_planning: bool = False
    # Whether the graphs call the grouped expert kernel (mmx.ops.expert_rows; MMX_EXPERT_ROWS=0 turns it off)
    expert_rows: bool = True
    # Whether dense products of 2-16 rows call mmx.ops.expert_rows.dense_rows (MMX_DENSE_ROWS=0 turns it off)
    dense_rows: bool = True


def batch_kinds(max_num_seqs: int, few_rows: int) -> dict[str, tuple[int, int]]:
    """The batch-size range of each graph the engine can need (see DecodeGraph._run)."""
    kinds = {"one": (1, 1)}
    if max_num_seqs >= 2:
        kinds["few"] = (2, min(few_rows, max_num_seqs))
    if max_num_seqs > few_rows:
        kinds["many"] = (few_rows + 1, max_num_seqs)
    return kinds


def _cache_root() -> str:
    return os.environ.get("MMX_AOT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mmx", "aot")


def cache_key(structure: bytes, spec: AotSpec, code_digest: str) -> str:
    """``structure``: the pickled meta copy of the model (its classes, attributes, and its tensors' shapes, strides and
    dtypes; every value the export could write into the code but the weights)."""
    digest = hashlib.sha256()
    for part in (
        code_digest.encode(),
        torch.__version__.encode(),
        platform.machine().encode(),
        cpu_flags().encode(),
        structure,
        json.dumps(asdict(spec), sort_keys=True).encode(),
    ):
        digest.update(hashlib.sha256(part).digest())
    return digest.hexdigest()[:20]


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers are on the meta device (strides kept): its structure and
    every other attribute, without its weights."""
    import copy

    memo: dict[int, object] = {}
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) in memo:
            continue
        meta = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
        memo[id(t)] = nn.Parameter(meta, requires_grad=False) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


def materialize(model: nn.Module) -> nn.Module:
    """Give every meta parameter and buffer of ``model`` uninitialised CPU memory of the same shape and strides
    (tied tensors stay tied). The export reads shapes only; the values the graphs run with are the engine's."""
    done: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for group in (module._parameters, module._buffers):
            for name, t in group.items():
                if t is None or t.device.type != "meta":
                    continue
                if id(t) not in done:
                    new = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype)
                    done[id(t)] = nn.Parameter(new, requires_grad=False) if isinstance(t, nn.Parameter) else new
                group[name] = done[id(t)]
    return model


def _keep_weights_out_of_the_code(model: nn.Module) -> None:
    """Inductor writes the values of small 1-D constants (up to 8 elements) into the generated code. That is right
    for constants of the code (rotary frequencies) and wrong for the model's own tensors (a router's bias, decay
    rates), whose values here are not the engine's: those stay tensors the engine hands over."""
    from torch._inductor.graph import GraphLowering

    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    inline = GraphLowering.can_inline_constant

    def can_inline_constant(t: torch.Tensor) -> bool:
        return inline(t) and t.untyped_storage().data_ptr() not in own

    GraphLowering.can_inline_constant = staticmethod(can_inline_constant)


# ------------------------------------------------------------------------------------------- in the child process
def build(folder: str, kinds: list[str]) -> None:
    """Export and compile the graphs ``kinds`` of ``folder``'s spec (written by :class:`AotDecode`); writes
    ``<kind>.so`` (with its ``.json`` of calls back into torch, when it has any) and ``<kind>.constants.pt`` (tensors
    the graph holds that are not the model's)."""
    import torch._inductor

    with open(os.path.join(folder, "spec.json")) as f:
        raw = json.load(f)
    raw["layer_index"] = {int(k): v for k, v in raw["layer_index"].items()}
    spec = AotSpec(**raw)
    torch.set_num_threads(spec.threads)  # inductor writes the thread count into the kernels
    os.environ["MMX_EXPERT_ROWS"] = "1" if spec.expert_rows else "0"
    os.environ["MMX_DENSE_ROWS"] = "1" if spec.dense_rows else "0"
    prepare_expert_rows()
    model = materialize(torch.load(os.path.join(folder, "model.pt"), weights_only=False)).eval()
    _keep_weights_out_of_the_code(model)
    step = DecodeStep(model, spec.layer_index, spec.num_keys, spec.num_values).eval()
    pools = [torch.zeros(shape, dtype=getattr(torch, dtype.split(".")[-1])) for shape, _, dtype in spec.pools]
    width = torch.export.Dim("table_steps", min=1, max=max(spec.max_table_steps, 2))
    for kind in kinds:
        low, high = spec.kinds[kind]
        n = low if kind == "one" else max(low, 2)
        long = dict(dtype=torch.long)
        args = (
            torch.zeros(n, **long),
            torch.zeros(n, **long),
            torch.arange(n, **long),  # distinct: inputs that alias each other would get a graph of their own
            torch.zeros(n, 2 * TABLE_STEP, **long),
            torch.ones(n, **long),
            torch.arange(n, **long),
        )
        rows = None if kind == "one" else torch.export.Dim(f"rows_{kind}", min=low, max=max(high, low + 1))
        batch = None if rows is None else {0: rows}
        shapes = (
            batch,
            batch,
            batch,
            {1: TABLE_STEP * width} if rows is None else {0: rows, 1: TABLE_STEP * width},
            batch,
            batch,
        )
        with torch.inference_mode():
            program = torch.export.export(step, (*args, *pools), dynamic_shapes=(*shapes, (None,) * len(pools)))
        _name_the_constants(program)
        package = os.path.join(folder, f"{kind}.pt2")
        torch._inductor.aoti_compile_and_package(
            program,
            package_path=package,
            # the weights stay out of the library: the engine hands over its own tensors at load time
            inductor_configs={
                "aot_inductor.package_constants_in_so": False,
                "memory_planning": spec.memory_planning,
            },
        )
        _unpack(package, folder, kind)
        constants = {name: t for name, t in program.constants.items() if isinstance(t, torch.Tensor)}
        torch.save(constants, os.path.join(folder, f"{kind}.constants.pt"))
        os.remove(package)


def _name_the_constants(program: torch.export.ExportedProgram) -> None:
    """Tensors the code holds that are not the model's (rotary frequencies, over 8 of them so not inlined) reach
    the library as constants; AOTInductor names plain constants ``_tensor_constant<i>`` and keeps a buffer's own
    name. As non-persistent buffers they keep theirs, which is what ``<kind>.constants.pt`` files them under."""
    from torch.export.graph_signature import InputKind

    for spec in program.graph_signature.input_specs:
        if spec.kind == InputKind.CONSTANT_TENSOR:
            spec.kind, spec.persistent = InputKind.BUFFER, False


def _unpack(package: str, folder: str, kind: str) -> None:
    """The library of ``package`` as ``<kind>.so``, and its proxy-call table as ``<kind>.json`` when it has one (the
    runner finds it next to the library)."""
    with zipfile.ZipFile(package) as z:
        names = z.namelist()
        (library,) = [n for n in names if n.endswith(".wrapper.so") or (n.endswith(".so") and "/model/" in n)]
        stem = library[: -len(".wrapper.so")] if library.endswith(".wrapper.so") else library[: -len(".so")]
        with open(os.path.join(folder, f"{kind}.so"), "wb") as out:
            out.write(z.read(library))
        table = [n for n in names if n.startswith(stem) and n.endswith(".json") and "metadata" not in n]
        if table:
            with open(os.path.join(folder, f"{kind}.json"), "wb") as out:
                out.write(z.read(table[0]))


# ------------------------------------------------------------------------------------------ in the engine process
class AotDecode:
    """The engine side: builds the libraries (once, in a child process) and runs them."""

    def __init__(
        self,
        model: nn.Module,
        layer_index: dict[int, int],
        pools: tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]],
        max_num_seqs: int,
        max_model_len: int,
        block_size: int,
        few_rows: int,
        code_digest: str,
    ):
        keys, values, states = pools
        self.model = model
        self.pools = [*keys, *values, *states]
        self.spec = AotSpec(
            layer_index=dict(layer_index),
            num_keys=len(keys),
            num_values=len(values),
            pools=[(list(t.shape), list(t.stride()), str(t.dtype)) for t in self.pools],
            kinds=batch_kinds(max_num_seqs, few_rows),
            max_table_steps=math.ceil(math.ceil(max_model_len / block_size) / TABLE_STEP),
            threads=torch.get_num_threads(),
            memory_planning=os.environ.get("MMX_AOT_MEMORY_PLANNING", "0") == "1",
            expert_rows=expert_rows_enabled(),
            dense_rows=dense_rows_enabled(),
        )
        buffer = io.BytesIO()
        torch.save(meta_copy(model), buffer)
        self.structure = buffer.getvalue()
        self.folder = os.path.join(_cache_root(), cache_key(self.structure, self.spec, code_digest))
        self.runners: dict[str, object] = {}
        self.built = False  # True when this process compiled them (False: loaded from the cache)

    def prepare(self) -> float:
        """Build the libraries if they are not cached, then load them; returns the seconds spent. Raises
        RuntimeError with the child's error when compiling fails."""
        start = time.perf_counter()
        if not all(os.path.exists(os.path.join(self.folder, f"{kind}.so")) for kind in self.spec.kinds):
            self._build()
            self.built = True
        for kind in self.spec.kinds:
            self.runners[kind] = self._load(kind)
        return time.perf_counter() - start

    def _build(self) -> None:
        staging = f"{self.folder}.partial-{os.getpid()}"
        os.makedirs(staging, exist_ok=True)
        with open(os.path.join(staging, "spec.json"), "w") as f:
            json.dump(asdict(self.spec), f)
        with open(os.path.join(staging, "model.pt"), "wb") as f:
            f.write(self.structure)
        # the child imports mmx from where this process did (a source checkout on sys.path, not installed)
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
        env = {**os.environ, "OMP_NUM_THREADS": str(self.spec.threads), "PYTHONPATH": path}
        # one child per graph, as many at once as there are CPUs: compiling is single-threaded C++ (g++)
        command = [sys.executable, "-m", "mmx.engine.aot_decode", staging]
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        waiting, running, failed = list(self.spec.kinds), [], []
        while waiting or running:
            while waiting and len(running) < cpus:
                kind = waiting.pop(0)
                with open(os.path.join(staging, f"{kind}.log"), "w") as log:  # a file: a full pipe would stall it
                    child = subprocess.Popen([*command, kind], env=env, stdout=subprocess.DEVNULL, stderr=log)
                running.append((kind, child))
            kind, child = running.pop(0)
            if child.wait() != 0:
                failed.append((kind, child.returncode))
        if failed:
            kind, code = failed[0]
            with open(os.path.join(staging, f"{kind}.log")) as log:
                tail = "\n".join(log.read().strip().splitlines()[-15:])
            shutil.rmtree(staging, ignore_errors=True)
            raise RuntimeError(f"ahead-of-time compilation of the {kind} graph failed (exit {code}):\n{tail}")
        os.remove(os.path.join(staging, "model.pt"))
        try:
            os.rename(staging, self.folder)
        except OSError:  # another process finished the same build first: theirs is as good
            shutil.rmtree(staging, ignore_errors=True)

    def _load(self, kind: str) -> object:
        runner = torch._C._aoti.AOTIModelContainerRunnerCpu(os.path.join(self.folder, f"{kind}.so"), 1)
        own = dict(torch.load(os.path.join(self.folder, f"{kind}.constants.pt"), weights_only=True))
        tensors = {
            _MODEL_PREFIX + name: t.detach()
            for name, t in [
                *self.model.named_parameters(remove_duplicate=False),
                *self.model.named_buffers(remove_duplicate=False),
            ]
        }
        constants = {}
        for name, fqn in runner.get_constant_names_to_original_fqns().items():
            found = tensors.get(fqn, own.get(fqn, own.get(name)))
            if found is None:
                raise RuntimeError(f"the {kind} decode library needs a tensor {fqn!r} that the model does not have")
            constants[name] = found
        # user-managed: the runner reads these tensors in place (no copy; in-place weight updates are seen)
        runner.update_constant_buffer(constants, False, True, True)
        return runner

    def run(self, kind: str, args: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return self.runners[kind].run([*args, *self.pools])[0]


if __name__ == "__main__":
    build(sys.argv[1], sys.argv[2:])
