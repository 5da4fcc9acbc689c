"""Lightning attention entry points: one call for prefill / training, one for decode, one for engine prefill into a
pool of state slots. Each picks a backend: Triton on CUDA when available, the chunked PyTorch path otherwise.

All take token-major q, k [B, T, H, Dk], v [B, T, H, Dv] (or [N, H, D] for one decode token per sequence) and decay
rates [H]; states are float32 [*, H, Dk, Dv].
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from itertools import pairwise

import torch

from mmx.ops.lightning_chunked import lightning_chunked, lightning_step
from mmx.ops.lightning_ref import check_shapes, lightning_blocked

BACKENDS = ("auto", "torch", "triton", "reference")
_default_backend = os.environ.get("MMX_LIGHTNING_BACKEND", "auto")


@contextmanager
def use_backend(name: str):
    """Make ``name`` the backend of every call that asks for "auto" (tests, benchmarks, debugging)."""
    global _default_backend
    if name not in BACKENDS:
        raise ValueError(f"unknown lightning backend {name!r}; use one of {BACKENDS}")
    previous, _default_backend = _default_backend, name
    try:
        yield
    finally:
        _default_backend = previous


def triton_available() -> bool:
    from mmx.ops import lightning_triton

    return lightning_triton.AVAILABLE


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown lightning backend {backend!r}; use one of {BACKENDS}")
    if backend == "auto":
        backend = _default_backend
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "triton" and not triton_available():
        raise RuntimeError("the triton lightning backend needs the `triton` package (pip install 'mmx[gpu]')")
    return backend


def _single(q, k, v, rates, initial_state, chunk_size, backend):
    if backend == "torch":
        return lightning_chunked(q, k, v, rates, initial_state, chunk_size)
    if backend == "triton":
        from mmx.ops.lightning_triton import lightning_triton

        return lightning_triton(q, k, v, rates, initial_state, chunk_size=chunk_size)
    return lightning_blocked(q, k, v, rates, initial_state, chunk_size or 64)


def lightning_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rates: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    *,
    cu_seqlens: torch.Tensor | None = None,
    lengths: torch.Tensor | list[int] | None = None,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lightning attention with an optional initial state; returns (output, final state).

    * dense: all B rows have T tokens; states [B, H, Dk, Dv];
    * ``cu_seqlens`` [N + 1]: N sequences packed along T of a single row (B = 1), each starting from its own
      initial state (or zero); states [N, H, Dk, Dv]; no token sees another sequence;
    * ``lengths`` [B]: right-padded rows; padding neither decays nor feeds the state, its outputs are zero.

    Differentiable in q, k, v and the initial state on every backend."""
    check_shapes(q, k, v, rates)
    backend = resolve_backend(backend, q.device)
    if cu_seqlens is not None and lengths is not None:
        raise ValueError("pass cu_seqlens (packed) or lengths (padded), not both")
    if cu_seqlens is not None:
        if q.shape[0] != 1:
            raise ValueError(f"cu_seqlens needs packed inputs with batch 1, got batch {q.shape[0]}")
        bounds = [int(x) for x in cu_seqlens.tolist()]
        if bounds[0] != 0 or bounds[-1] != q.shape[1] or any(a > b for a, b in pairwise(bounds)):
            raise ValueError(f"cu_seqlens must rise from 0 to T={q.shape[1]}, got {bounds}")
        if backend == "triton":
            from mmx.ops.lightning_triton import lightning_triton

            return lightning_triton(q, k, v, rates, initial_state, cu_seqlens=cu_seqlens, chunk_size=chunk_size)
        spans = list(pairwise(bounds))
        return _per_sequence(q, k, v, rates, initial_state, [(0, a, b) for a, b in spans], chunk_size, backend)
    if lengths is not None:
        lengths = [int(x) for x in (lengths.tolist() if torch.is_tensor(lengths) else lengths)]
        if len(lengths) != q.shape[0] or any(not 0 <= n <= q.shape[1] for n in lengths):
            raise ValueError(f"lengths must give one length in [0, {q.shape[1]}] per row, got {lengths}")
        out, finals = _per_sequence(
            q, k, v, rates, initial_state, [(b, 0, n) for b, n in enumerate(lengths)], chunk_size, backend
        )
        return out, finals
    return _single(q, k, v, rates, initial_state, chunk_size, backend)


def _per_sequence(q, k, v, rates, initial_state, spans, chunk_size, backend):
    """Run each (row, start, end) span on its own and lay the outputs back where the tokens were."""
    b_size, t, h, _ = q.shape
    padded = any(b > 0 for b, _, _ in spans) or b_size > 1
    outs, finals = [], []
    for i, (b, start, end) in enumerate(spans):
        init = None if initial_state is None else initial_state[i : i + 1]
        o, final = _single(
            q[b : b + 1, start:end], k[b : b + 1, start:end], v[b : b + 1, start:end], rates, init, chunk_size, backend
        )
        if padded and end - start < t:
            o = torch.cat((o, o.new_zeros(1, t - (end - start), h, o.shape[-1])), dim=1)
        outs.append(o)
        finals.append(final)
    out = torch.cat(outs, dim=0 if padded else 1)
    return out, torch.cat(finals, dim=0)


def lightning_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rates: torch.Tensor,
    state: torch.Tensor,
    slots: torch.Tensor | slice | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """One token for each of N sequences: q, k [N, H, Dk], v [N, H, Dv] -> output [N, H, Dv].

    ``state`` is either [N, H, Dk, Dv] (updated in place), or a pool [S, H, Dk, Dv] with ``slots`` naming the row
    of each sequence: a slice (a contiguous run of rows, updated in place) or an index tensor [N] (gathered,
    updated, scattered back). Cost per token is independent of context length."""
    backend = resolve_backend(backend, q.device)
    if isinstance(slots, slice):
        state, slots = state[slots], None
    if backend == "triton":
        from mmx.ops.lightning_triton import lightning_decode_triton

        return lightning_decode_triton(q, k, v, rates, state, slots)
    if slots is None:
        return lightning_step(q, k, v, rates, state)
    gathered = state.index_select(0, slots)
    out = lightning_step(q, k, v, rates, gathered)
    state.index_copy_(0, slots, gathered)
    return out


def lightning_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rates: torch.Tensor,
    cu_seqlens: torch.Tensor,
    pool: torch.Tensor,
    slots: torch.Tensor,
    has_state: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Prefill N packed sequences (B = 1) whose states live in ``pool`` [S, H, Dk, Dv] at rows ``slots`` [N].

    A sequence with ``has_state[i]`` true continues from its slot (chunked prefill); the others start from zero.
    Final states are written back to the slots."""
    initial = pool.index_select(0, slots)
    if has_state is None:
        initial.zero_()
    else:  # where, not a multiply: a recycled slot may hold anything, even NaN
        initial = torch.where(has_state[:, None, None, None], initial, torch.zeros((), dtype=initial.dtype))
    with torch.no_grad():
        out, finals = lightning_attention(q, k, v, rates, initial, cu_seqlens=cu_seqlens, backend=backend)
    pool.index_copy_(0, slots, finals.to(pool.dtype))
    return out


def lightning_prefix_states(
    k: torch.Tensor, v: torch.Tensor, rates: torch.Tensor, initial: torch.Tensor | None, ends: list[int]
) -> torch.Tensor:
    """The states after the first ``e`` tokens of one sequence, for each ``e`` in ``ends``: k [T, H, Dk],
    v [T, H, Dv], ``initial`` [H, Dk, Dv] float32 (None: zero) -> [len(ends), H, Dk, Dv] float32.

    The recurrence S = lambda S + k^T v (lambda = exp(-rate) per head) summed in closed form:
    S_e = lambda^e S_0 + sum_{j<e} lambda^(e-1-j) k_j^T v_j; one product per end, so that a prefill can keep
    states from inside its chunk (prefix caching) without being cut there."""
    rates = rates.float()
    keys, values = k.float(), v.float()
    positions = torch.arange(max(ends), device=k.device, dtype=torch.float32)
    states = []
    for e in ends:
        weights = torch.exp(-rates[None, :] * (e - 1 - positions[:e])[:, None])  # [e, H]
        state = torch.einsum("jhd,jhe->hde", keys[:e] * weights[..., None], values[:e])
        if initial is not None:
            state += torch.exp(-rates * e)[:, None, None] * initial
        states.append(state)
    return torch.stack(states)
