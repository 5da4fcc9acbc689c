"""Custom ops whose kernels can be called without importing dynamo.

``torch.library.custom_op`` wraps every kernel in ``torch._disable_dynamo``, which imports ``torch._dynamo`` (and
with it most of inductor, ~190 MB resident) on the kernel's first call. A process that runs graphs compiled ahead
of time (:mod:`mmx.engine.aot_decode`) calls mmx's ops from those graphs and has no use for dynamo. The wrapper
caches the function it would call on the kernel itself, under ``__dynamo_disable``; setting that to the kernel
skips the import. Nothing changes where dynamo runs: it traces an op through its fake kernel, never into its body.
"""

from __future__ import annotations

from typing import Any


def without_dynamo_import(op: Any) -> Any:
    """``op`` (a ``torch.library.custom_op``), its kernels callable without importing dynamo; returns ``op``."""
    for kernel in op._backend_fns.values():
        inner = getattr(kernel, "__wrapped__", None)
        if inner is not None:
            inner.__dynamo_disable = inner
    return op
