"""Parameter counts, total and active per token.

"Active" follows the published figures: the parameters one token passes through, without the input embedding
and the LM head (M1: 45.9B of 456B). ``active_with_embeddings`` adds both back.
"""

from __future__ import annotations

from torch import nn


def parameter_counts(model: nn.Module) -> dict[str, int]:
    config = model.config
    seen: set[int] = set()
    total = embedding = experts = 0
    for name, param in model.named_parameters():
        if id(param) in seen:  # tied embeddings count once
            continue
        seen.add(id(param))
        n = param.numel()
        total += n
        if name.endswith(("embed_tokens.weight", "lm_head.weight")):
            embedding += n
        elif ".mlp.experts." in name:
            experts += n
    for name, buf in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            total += buf.numel()
        elif name.endswith("qweight"):  # an int8 or kept-FP8 weight (quantization, fp8_linear): still the parameters
            total += buf.numel()
            if ".mlp.experts." in name:
                experts += buf.numel()
    share = config.num_experts_per_tok / config.num_local_experts
    idle_experts = experts - round(experts * share)
    active = total - embedding - idle_experts
    return {
        "total": total,
        "active": active,
        "active_with_embeddings": active + embedding,
        "embedding": embedding,
        "experts": experts,
    }


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (quantised weights and their scales included), each tensor
    once (a tied LM head shares the embedding's)."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def format_count(n: int) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)
