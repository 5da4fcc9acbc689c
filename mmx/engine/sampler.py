"""Picking the next token of each sequence from its logits.

Order: raw log-probabilities (reported, before anything else), penalties, ``logit_bias``, EOS suppression under
``min_tokens``, the structured-output mask (:mod:`mmx.engine.structured`), then greedy argmax or temperature /
top-k / top-p / min-p sampling. A request with a seed samples from its own generator, row by row, so its tokens do
not depend on what else is in the batch. Rows that need none of the adjustments (greedy, no penalties, bias,
constraint or log-probabilities) are picked by one argmax over them all.
"""

from __future__ import annotations

import math

import torch

from mmx.engine.sequence import Sequence, TokenLogprob
from mmx.engine.structured import allowed_tokens

BANNED_BIAS = -100.0  # OpenAI: -100 "should result in a ban"; mmx makes it one (-inf), whatever the logits


def apply_penalties(logits: torch.Tensor, seq: Sequence) -> torch.Tensor:
    """OpenAI presence / frequency penalties on generated tokens; repetition penalty (divide positive logits,
    multiply negative ones) on every token seen, prompt included, as transformers does."""
    p = seq.params
    vocab = logits.shape[-1]
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(seq.token_ids, dtype=torch.long, device=logits.device).unique()
        seen = seen[seen < vocab]
        picked = logits[seen]
        logits[seen] = torch.where(picked > 0, picked / p.repetition_penalty, picked * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and seq.output_token_ids:
        out = torch.tensor(seq.output_token_ids, dtype=torch.long, device=logits.device)
        counts = torch.bincount(out, minlength=vocab)[:vocab].to(logits.dtype)
        logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def apply_logit_bias(logits: torch.Tensor, bias: dict[int, float]) -> torch.Tensor:
    """OpenAI's logit_bias: each value added to its token's logit; -100 bans the token outright."""
    ids = torch.tensor(list(bias), dtype=torch.long)
    values = torch.tensor([float("-inf") if v <= BANNED_BIAS else v for v in bias.values()], dtype=logits.dtype)
    keep = ids < logits.shape[-1]
    logits[ids[keep]] += values[keep]
    return logits


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """Mask (to -inf) what top-k, top-p (nucleus) and min-p exclude; one row, already divided by temperature."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass strictly above each token
        drop = before > top_p
        drop[0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    if min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.max(), float("-inf"))
    return logits


def _plain(seq: Sequence) -> bool:
    """Greedy with nothing to adjust: the row's argmax is its token."""
    p = seq.params
    return (
        p.greedy
        and not p.needs_token_counts
        and not p.logit_bias
        and seq.constraint is None
        and len(seq.output_token_ids) >= p.min_tokens
        and p.logprobs is None
    )


def finite_rows(logits: torch.Tensor) -> list[bool]:
    """Whether each row of ``logits`` [n, vocab] is all finite. A NaN or an infinity makes its row's sum NaN or
    infinite, so a finite sum clears a row with one reduction (a quarter of the time of the two-op test, which is
    a few percent of a small model's decode step); rows whose sum is not finite (an overflowing sum included) are
    then tested entry by entry."""
    sums = logits.sum(-1).tolist()
    if all(math.isfinite(total) for total in sums):
        return [True] * len(sums)
    return torch.isfinite(logits).all(-1).tolist()


class Sampler:
    def __init__(self, eos_token_ids: list[int], seed: int = 0):
        self.eos_token_ids = list(eos_token_ids)
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[tuple[int, TokenLogprob | None]]:
        """logits [n, vocab] (float32) of the sequences ``seqs`` -> one (token, logprob entry) per sequence."""
        logits = logits.float().cpu()
        plain = [_plain(s) for s in seqs]
        if all(plain):  # the common greedy batch: one argmax for every row
            return [(int(t), None) for t in logits.argmax(-1).tolist()]
        argmax = logits.argmax(-1).tolist() if any(plain) else None
        masked = [i for i, s in enumerate(seqs) if s.constraint is not None]
        allowed = {}
        if masked:
            allowed = dict(zip(masked, allowed_tokens([seqs[i].constraint for i in masked], logits.shape[-1])))
        raw = logits.log_softmax(-1) if any(s.params.logprobs is not None for s in seqs) else None
        results = []
        for i, seq in enumerate(seqs):
            if plain[i]:
                results.append((int(argmax[i]), None))
                continue
            p = seq.params
            row = self._adjusted(logits[i], seq, allowed.get(i))
            if p.greedy:
                token = int(row.argmax())
            else:
                row = filter_logits(row / p.temperature, p.top_k, p.top_p, p.min_p)
                probs = row.softmax(-1)
                generator = seq.generator if seq.generator is not None else self.generator
                token = int(torch.multinomial(probs, 1, generator=generator))
            entry = None
            if p.logprobs is not None:  # the model's own distribution, before any of the adjustments above
                top = raw[i].topk(p.logprobs) if p.logprobs else None
                ranked = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
                entry = TokenLogprob(token, float(raw[i, token]), ranked)
            results.append((token, entry))
        return results

    def _adjusted(self, logits: torch.Tensor, seq: Sequence, allowed: torch.Tensor | None) -> torch.Tensor:
        """One row's logits after penalties, bias, min_tokens and the grammar's mask. The grammar wins every
        conflict: when min_tokens or a -100 bias would leave no token the grammar allows (its end, where only EOS
        may follow), they give way."""
        p = seq.params
        row = logits.clone()
        if p.needs_token_counts:
            row = apply_penalties(row, seq)
        if p.logit_bias:
            row = apply_logit_bias(row, p.logit_bias)
        if len(seq.output_token_ids) < p.min_tokens:
            banned = ([] if p.ignore_eos else self.eos_token_ids) + p.stop_token_ids
            row[[t for t in banned if t < row.shape[-1]]] = float("-inf")
        if allowed is None:
            return row
        row = row.masked_fill(~allowed, float("-inf"))
        if not torch.isfinite(row).any():
            row = logits.masked_fill(~allowed, float("-inf"))
        return row
