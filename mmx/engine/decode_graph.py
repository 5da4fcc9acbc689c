"""A compiled decode step: the model's forward for a batch of one-token sequences as a compiled graph.

A decode step is overhead-bound on small models: thousands of tiny eager ops around a few matrix products. Here a
decode-only step (:func:`mmx.engine.decode_step.decode_logits`) runs compiled: the elementwise chains fuse into a
few generated loops, attention reads the paged K/V through the block tables inside its own loops (no gathered
copy), the lightning states are updated in their slots, and with few sequences the weight products are written as
dot products, each sequence streaming weights small enough to stay in the cache
(:func:`mmx.model.linear.streams_rows`). Everything the step depends on is a tensor argument, and the batch size
and the number of context blocks are dynamic dimensions, so three graphs serve every step: one sequence (torch
specialises size 1), 2 to FEW_ROWS sequences (dot products where they pay), and more (BLAS). Steps that prefill,
score prompts or capture prefix-cache states stay eager. Models the native step takes (M1 and M2 on the CPU:
:mod:`mmx.engine.native_step`) run their steps of up to NATIVE_ROWS sequences there instead, and need no graph
unless the engine runs larger batches.

Two compilers build the graphs. "aot" (the CPU's default) compiles them ahead of time in a child process
(:mod:`mmx.engine.aot_decode`) and runs them without the compiler in this process. "inductor" runs the step through
``torch.compile`` here; inductor caches the compiled code in ``~/.cache/mmx/inductor/<code digest>`` unless
``TORCHINDUCTOR_CACHE_DIR`` is set (mmx sets that variable for the process when it is unset). The digest covers the
model and engine code the graphs are traced from: inductor keys its cache on the traced graph, and an entry saved
by other code can carry that code's guards (a size test since moved out of the trace made a cached graph demand a
rebuild at 16 sequences).
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import math
import os
import time
import types

import torch

from mmx.engine import native_step
from mmx.engine.aot_decode import AotDecode
from mmx.engine.cache import HybridCache
from mmx.engine.decode_step import TABLE_STEP, decode_logits
from mmx.engine.sequence import Sequence
from mmx.model.linear import FEW_ROWS
from mmx.model.modeling import MiniMaxForCausalLM
from mmx.ops.expert_rows import prepare as prepare_expert_rows
from mmx.utils.logging import get_logger

logger = get_logger(__name__)

_engine_ids = itertools.count()
COMPILERS = ("inductor", "aot")


def _cache_dir() -> None:
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        root = os.path.join(os.path.expanduser("~"), ".cache", "mmx", "inductor")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(root, _code_digest())


def _code_digest() -> str:
    """A digest of the sources decode graphs are traced from (mmx.model, mmx.ops with its C kernels, and the decode
    modules) and torch's version: a change to either starts a cache of its own."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    digest = hashlib.sha256(torch.__version__.encode())
    here = os.path.dirname(os.path.abspath(__file__))
    paths = [os.path.join(here, name) for name in ("decode_graph.py", "decode_step.py", "aot_decode.py")]
    for folder in ("model", "ops"):
        paths += sorted(glob.glob(os.path.join(package, folder, "*.py")))
    paths += sorted(glob.glob(os.path.join(package, "ops", "*.[ch]*")))  # kernels the graphs call (.c, .cpp, .h)
    for path in paths:
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:16]


def _graphs_built() -> int:
    """Graphs torch.compile has built in this process (a change after a step means that step compiled one)."""
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


class DecodeGraph:
    """Runs decode-only steps of ``model`` over ``cache`` through compiled graphs, built by ``compiler``: "inductor"
    (torch.compile in this process) or "aot" (AOTInductor in a child process, :mod:`mmx.engine.aot_decode`; the
    graphs then run without the compiler in this process). If building fails (no C++ compiler, an op the compiler
    cannot take), it says why once: "aot" falls back to "inductor", and "inductor" to eager steps."""

    def __init__(
        self,
        model: MiniMaxForCausalLM,
        cache: HybridCache,
        compiler: str = "inductor",
        max_num_seqs: int = 64,
        max_model_len: int = 32768,
    ):
        if compiler not in COMPILERS:
            raise ValueError(f"decode_compiler must be one of {', '.join(COMPILERS)}; got {compiler!r}")
        if compiler == "aot" and model.device.type != "cpu":
            raise ValueError(f"decode_compiler 'aot' runs on the CPU; this model is on {model.device}")
        self.model = model
        self.cache = cache
        self.compiler = compiler
        self.layer_index = {layer: i for i, layer in enumerate(sorted(cache.keys))}
        self.layer_index.update({layer: i for i, layer in enumerate(sorted(cache.states))})
        self._keys = [cache.keys[i] for i in sorted(cache.keys)]
        self._values = [cache.values[i] for i in sorted(cache.values)]
        self._states = [cache.states[i] for i in sorted(cache.states)]
        self._device = model.device
        self._compiled = None  # torch.compile'd step (compiler "inductor", or "aot" after it failed)
        self._aot: AotDecode | None = None
        self._sizes = (max_num_seqs, max_model_len)  # the batches and contexts the ahead-of-time graphs cover
        self.failed: str | None = None  # why compiling failed; decode steps then run eagerly
        self.compile_seconds = 0.0  # first calls of each graph (compiling, or loading from the on-disk cache)
        self._seen: set[str] = set()
        self._graphs = 0
        # built (or loaded) before any trace: the traced code only reads the decision (the ahead-of-time child
        # decides again from its spec)
        prepare_expert_rows()
        # steps of up to NATIVE_ROWS sequences in one C call where it takes the model (mmx.engine.native_step)
        self.native = native_step.build(model, cache)
        if compiler == "inductor":
            self._use_inductor()

    def _use_inductor(self) -> None:
        _cache_dir()
        self.compiler = "inductor"
        # Each engine compiles its own copy of the step's code: torch keeps compiled graphs per code object, so
        # engines in one process (tests, benchmarks) neither share nor crowd out each other's graphs, and they go
        # with the engine. Guards on the model's modules are then skipped (they cost ~0.3 ms a step): the graph
        # takes the parameters as inputs (never baked in), and an engine's model keeps its structure for its
        # lifetime (an RL weight sync copies values in place).
        code = DecodeGraph._step.__code__.replace(co_name=f"decode_step_{next(_engine_ids)}")
        step = types.FunctionType(code, DecodeGraph._step.__globals__, code.co_name)
        self._compiled = torch.compile(
            types.MethodType(step, self),
            fullgraph=True,
            options={
                "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe,
                # the generated Python wrapper checks every buffer's sizes and alignment each call: ~0.2 ms a step
                "size_asserts": False,
                "alignment_asserts": False,
            },
        )
        self._graphs = _graphs_built()

    def _step(self, ids, positions, write_at, tables, lengths, slots, keys, values, states):
        step = (ids, positions, write_at, tables, lengths, slots)
        return decode_logits(self.model, self.layer_index, *step, keys, values, states)

    def inputs(self, seqs: list[Sequence]) -> tuple[torch.Tensor, ...]:
        """(ids, positions, K/V write addresses, block tables, context lengths, state slots) of the step, [N] each
        but the tables [N, W]; W is a multiple of TABLE_STEP, padded with block 0 (masked out)."""
        cache, bs = self.cache, self.cache.block_size
        starts = [seq.num_computed_tokens for seq in seqs]
        long = dict(dtype=torch.long)
        if cache.uses_blocks:
            width = math.ceil(max(a // bs + 1 for a in starts) / TABLE_STEP) * TABLE_STEP
            rows = [seq.block_table[: a // bs + 1] for seq, a in zip(seqs, starts)]
            tables = torch.tensor([row + [0] * (width - len(row)) for row in rows], **long)
            write_at = torch.tensor([row[-1] * bs + a % bs for row, a in zip(rows, starts)], **long)
        else:
            tables = torch.zeros(len(seqs), TABLE_STEP, **long)
            write_at = torch.zeros(len(seqs), **long)
        ids = torch.tensor([seq.tokens(a, a + 1)[0] for seq, a in zip(seqs, starts)], **long)
        positions = torch.tensor(starts, **long)
        slots = torch.tensor([seq.slot or 0 for seq in seqs], **long)
        out = (ids, positions, write_at, tables, positions + 1, slots)
        if self._device.type != "cpu":
            out = tuple(t.to(self._device, non_blocking=True) for t in out)
        return out

    def __call__(self, seqs: list[Sequence]) -> torch.Tensor | None:
        """Logits [len(seqs), vocab] of the next token of each decoding sequence (their caches updated), or None
        when the compiled path is unavailable (the caller runs the step eagerly)."""
        if self.native is not None and len(seqs) <= native_step.NATIVE_ROWS:
            return self.native(seqs)
        if self.failed is not None:
            return None
        return self._run(self.inputs(seqs))

    def needs_graphs(self, max_num_seqs: int) -> bool:
        """Whether an engine of up to ``max_num_seqs`` sequences a step needs compiled graphs: not when the native
        step takes every batch it can run."""
        return self.native is None or max_num_seqs > native_step.NATIVE_ROWS

    @torch.inference_mode()  # as in the engine's steps: inference tensors get graphs of their own
    def warm_up(self, max_num_seqs: int, max_model_len: int) -> float:
        """Build every graph the engine can need (one sequence, a few, many; short and full-length contexts)
        before serving, so that no request waits for a compilation; returns the seconds spent. Writes one token's
        K/V into block 0 and a state into slot 0, so it must run before any sequence holds them (at start-up)."""
        start = time.perf_counter()
        if not self.needs_graphs(max_num_seqs):
            return 0.0
        if self.compiler == "aot":
            self._prepare_aot()
        longest = math.ceil(math.ceil(max_model_len / self.cache.block_size) / TABLE_STEP) * TABLE_STEP
        for n in sorted({1, min(2, max_num_seqs), min(FEW_ROWS + 1, max_num_seqs)}):
            for width in sorted({TABLE_STEP, max(TABLE_STEP, longest)}):
                if self.failed is None:  # distinct tensors: inputs that alias each other would get a graph of their own
                    args = [torch.zeros(n, dtype=torch.long, device=self._device) for _ in range(6)]
                    args[3] = torch.zeros(n, width, dtype=torch.long, device=self._device)
                    args[4] += 1
                    self._run(tuple(args))
        return time.perf_counter() - start

    def _prepare_aot(self) -> None:
        """Load the ahead-of-time libraries (building them first when they are not cached); on failure, say why
        and switch to torch.compile in this process."""
        if self._aot is not None or self.compiler != "aot":
            return
        max_num_seqs, max_model_len = self._sizes
        try:  # a model that cannot be pickled (its structure goes to the child) falls back as a failed build does
            aot = AotDecode(
                self.model,
                self.layer_index,
                (self._keys, self._values, self._states),
                max_num_seqs,
                max_model_len,
                self.cache.block_size,
                FEW_ROWS,
                _code_digest(),
            )
            spent = aot.prepare()
        except Exception as e:
            why = str(e).strip().splitlines()
            logger.warning(
                "ahead-of-time decode graphs unavailable, compiling in this process instead (%s: %s)",
                type(e).__name__,
                "\n".join(why[-6:]),
            )
            self._use_inductor()
            return
        self._aot = aot
        self.compile_seconds += spent
        logger.info(
            "decode graphs for %s: %s in %.1f s (ahead of time, %s)",
            ", ".join(aot.spec.kinds),
            "compiled" if aot.built else "loaded",
            spent,
            aot.folder,
        )

    def _run(self, args: tuple[torch.Tensor, ...]) -> torch.Tensor | None:
        n = args[0].shape[0]
        # one graph per kind of batch: one sequence (torch specialises size 1), a few (dot products), many (BLAS)
        kind = "one" if n == 1 else "few" if n <= FEW_ROWS else "many"
        if self.compiler == "aot":
            self._prepare_aot()
        if self._aot is not None:
            try:
                logits = self._aot.run(kind, args)
            except Exception as e:
                if kind in self._seen:
                    raise
                logger.warning("ahead-of-time decode graph failed, compiling in this process instead (%s)", e)
                self._aot = None
                self._use_inductor()
            else:
                self._seen.add(kind)
                return logits
        if kind != "one":  # the graphs' own guards tell "few" from "many" (see mmx.model.linear.streams_rows)
            for t in args:
                torch._dynamo.maybe_mark_dynamic(t, 0)
        torch._dynamo.maybe_mark_dynamic(args[3], 1)
        first = kind not in self._seen
        start = time.perf_counter()
        try:
            with torch.inference_mode():
                logits = self._compiled(*args, self._keys, self._values, self._states)
        except Exception as e:
            if not first:
                raise
            self.failed = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            logger.warning("compiled decode unavailable, decoding eagerly (%s)", self.failed)
            return None
        spent = time.perf_counter() - start
        graphs = _graphs_built()
        if first or graphs != self._graphs:
            self._seen.add(kind)
            self.compile_seconds += spent
            logger.info(
                "decode graph for %s (%d sequence(s), %d context blocks): ready in %.1f s (%s, cache %s)",
                {"one": "one sequence", "few": f"2-{FEW_ROWS} sequences", "many": "larger batches"}[kind],
                n,
                args[3].shape[1],
                spent,
                "compiled" if graphs != self._graphs else "already built",
                os.environ["TORCHINDUCTOR_CACHE_DIR"],
            )
            self._graphs = graphs
        return logits
