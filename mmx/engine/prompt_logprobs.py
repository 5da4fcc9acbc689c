"""Log-probabilities of a prompt's own tokens (vLLM's ``prompt_logprobs``), read off the prefill's forward.

The hidden state at position q predicts token q + 1, so a forward that feeds positions [a, a + n) of a prompt of
P tokens scores prompt tokens a + 1 .. min(a + n, P - 1): the prediction at the last prompt position is the first
generated token's, which the sampler reports. Chunks of a prompt are fed in order, so a chunk boundary needs no
special case (the last row of one chunk scores the first token of the next), and only the requests that ask pay
for the extra rows of the LM head. The first prompt token has nothing before it: its entry is None.

A request's n samples each prefill the prompt (and a preempted sample prefills it again): each position is
scored once, by whichever forward feeds it first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from mmx.engine.sequence import Sequence, TokenLogprob

# LM-head rows are computed this many logits at a time (about 128 MB of float32), so that a long prompt never holds
# [prompt length, vocab] logits at once.
LOGITS_PER_SLICE = 1 << 25


@dataclass
class PromptScores:
    """One request's prompt log-probabilities so far: ``entries[i]`` for prompt token i, with ``top_k``
    alternatives each."""

    prompt_ids: list[int]
    top_k: int
    entries: list[TokenLogprob | None] = field(default_factory=lambda: [None])

    @property
    def complete(self) -> bool:
        return len(self.entries) == len(self.prompt_ids)

    @property
    def next_position(self) -> int:
        """The position whose prediction scores the first prompt token not scored yet."""
        return len(self.entries) - 1


@dataclass
class _Job:
    scores: PromptScores
    rows: list[int]  # rows of the step's hidden state
    targets: list[int]  # the prompt tokens those rows predict


def plan_jobs(
    spans: Iterable[tuple[Sequence, int, int, int]], scores_of: Callable[[Sequence], PromptScores | None]
) -> list[_Job]:
    """What to score in one forward: ``spans`` are (sequence, first position fed, tokens fed, first row in the
    hidden state) of every sequence in it."""
    jobs = []
    claimed: dict[int, int] = {}  # id(scores) -> next position, counting the jobs planned in this step
    for seq, start, n, row in spans:
        scores = scores_of(seq)
        if scores is None or scores.complete:
            continue
        first = max(start, claimed.get(id(scores), scores.next_position))
        last = min(start + n, len(scores.prompt_ids) - 1)
        if first >= last:
            continue
        if first != claimed.get(id(scores), scores.next_position):
            raise RuntimeError(f"prompt log-probs of {seq} would skip positions: the prefill went out of order")
        claimed[id(scores)] = last
        rows = [row + q - start for q in range(first, last)]
        jobs.append(_Job(scores, rows, scores.prompt_ids[first + 1 : last + 1]))
    return jobs


def score(
    compute_logits: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, jobs: list[_Job], vocab_size: int
) -> None:
    """Append the planned entries to their requests' scores. ``hidden`` is the forward's [tokens, hidden] output
    and ``compute_logits`` the LM head; log-probabilities are of the raw distribution (float32 log-softmax)."""
    if not jobs:
        return
    rows = torch.tensor([r for job in jobs for r in job.rows], dtype=torch.long, device=hidden.device)
    targets = torch.tensor([t for job in jobs for t in job.targets], dtype=torch.long, device=hidden.device)
    k = max(job.scores.top_k for job in jobs)
    chosen, ranks, top_values, top_ids = [], [], [], []
    per_slice = max(1, LOGITS_PER_SLICE // vocab_size)
    for begin in range(0, len(rows), per_slice):
        logprobs = compute_logits(hidden[rows[begin : begin + per_slice]]).float().log_softmax(-1)
        picked = logprobs.gather(1, targets[begin : begin + per_slice, None])
        chosen += picked[:, 0].tolist()
        ranks += ((logprobs > picked).sum(-1) + 1).tolist()
        if k:
            top = logprobs.topk(k, dim=-1)
            top_values += top.values.tolist()
            top_ids += top.indices.tolist()
    i = 0
    for job in jobs:
        kj = job.scores.top_k
        for target in job.targets:
            top = list(zip(top_ids[i][:kj], top_values[i][:kj])) if kj else []
            job.scores.entries.append(TokenLogprob(target, chosen[i], top, rank=ranks[i]))
            i += 1
