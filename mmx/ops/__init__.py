"""Lightning attention operators. The math lives here only; the model calls :func:`lightning_attention`."""

from mmx.ops.lightning import lightning_attention, lightning_decode, lightning_prefill, lightning_prefix_states
from mmx.ops.lightning_chunked import lightning_chunked
from mmx.ops.lightning_ref import lightning_blocked, lightning_naive, lightning_recurrent
from mmx.ops.slopes import decay_rates

__all__ = [
    "decay_rates",
    "lightning_attention",
    "lightning_blocked",
    "lightning_chunked",
    "lightning_decode",
    "lightning_naive",
    "lightning_prefill",
    "lightning_prefix_states",
    "lightning_recurrent",
]
