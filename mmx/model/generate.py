"""Plain greedy generation with a :class:`DenseCache`: the simple reference path (the engine is the fast one)."""

from __future__ import annotations

import torch

from mmx.model.cache import DenseCache
from mmx.model.modeling import MiniMaxForCausalLM


@torch.no_grad()
def greedy_generate(
    model: MiniMaxForCausalLM,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    eos_token_ids: list[int] | None = None,
) -> torch.Tensor:
    """Prefill once, then decode one token at a time; returns [batch, new tokens]. Rows that emit an EOS keep
    emitting it (the batch stops when every row has)."""
    if max_new_tokens < 0:
        raise ValueError("max_new_tokens must be >= 0")
    cache = DenseCache()
    logits = model(input_ids, cache=cache)[:, -1]
    eos = torch.tensor(eos_token_ids or [], dtype=torch.long, device=input_ids.device)
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    out = []
    for step in range(max_new_tokens):
        token = logits.argmax(dim=-1)
        if out:
            token = torch.where(done, out[-1], token)
        out.append(token)
        done |= torch.isin(token, eos)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        logits = model(token[:, None], cache=cache)[:, -1]
    if not out:
        return input_ids.new_zeros(input_ids.shape[0], 0)
    return torch.stack(out, dim=1)


@torch.no_grad()
def greedy_generate_recompute(model: MiniMaxForCausalLM, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Greedy decoding that re-runs the whole sequence every step: slow, cache-free, the oracle for caches."""
    ids = input_ids
    for _ in range(max_new_tokens):
        ids = torch.cat((ids, model(ids)[:, -1].argmax(dim=-1, keepdim=True)), dim=1)
    return ids[:, input_ids.shape[1] :]
