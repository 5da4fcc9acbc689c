"""Picking the next token of each sequence from its logits.

Order: raw log-probabilities (reported, before anything else), penalties, EOS suppression under ``min_tokens``,
then greedy argmax or temperature / top-k / top-p / min-p sampling. A request with a seed samples from its own
generator, row by row, so its tokens do not depend on what else is in the batch.
"""

from __future__ import annotations

import torch

from mmx.engine.sequence import Sequence, TokenLogprob


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


class Sampler:
    def __init__(self, eos_token_ids: list[int], seed: int = 0):
        self.eos_token_ids = list(eos_token_ids)
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[tuple[int, TokenLogprob | None]]:
        """logits [n, vocab] (float32) of the sequences ``seqs`` -> one (token, logprob entry) per sequence."""
        logits = logits.float().cpu()
        want_logprobs = any(s.params.logprobs is not None for s in seqs)
        raw = logits.log_softmax(-1) if want_logprobs else None
        plain = [
            s.params.greedy
            and not s.params.needs_token_counts
            and len(s.output_token_ids) >= s.params.min_tokens
            and s.params.logprobs is None
            for s in seqs
        ]
        if all(plain):  # the common greedy batch: one argmax for every row
            return [(int(t), None) for t in logits.argmax(-1).tolist()]
        results = []
        for i, seq in enumerate(seqs):
            row = logits[i].clone()
            p = seq.params
            if p.needs_token_counts:
                row = apply_penalties(row, seq)
            if len(seq.output_token_ids) < p.min_tokens:
                banned = ([] if p.ignore_eos else self.eos_token_ids) + p.stop_token_ids
                row[[t for t in banned if t < row.shape[-1]]] = float("-inf")
            if p.greedy:
                token = int(row.argmax())
            else:
                row = filter_logits(row / p.temperature, p.top_k, p.top_p, p.min_p)
                probs = row.softmax(-1)
                generator = seq.generator if seq.generator is not None else self.generator
                token = int(torch.multinomial(probs, 1, generator=generator))
            entry = None
            if p.logprobs is not None:
                top = raw[i].topk(p.logprobs) if p.logprobs else None
                ranked = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
                entry = TokenLogprob(token, float(raw[i, token]), ranked)
            results.append((token, entry))
        return results
