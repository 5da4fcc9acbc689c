"""One sequence being generated: its tokens, where its cache lives, and why it stopped."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

import torch

from mmx.engine.sampling_params import SamplingParams
from mmx.engine.structured import SequenceConstraint

_ids = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"  # not in the cache (new, or preempted and to be recomputed)
    RUNNING = "running"  # has a state slot and KV blocks; prefilling or decoding
    FINISHED = "finished"


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob), best first
    rank: int | None = None  # 1 + how many tokens were more likely (prompt tokens; vLLM reports it)


class Sequence:
    """Tokens are ``prompt_token_ids + output_token_ids``; the first ``num_computed_tokens`` of them are in the
    cache (KV blocks for softmax layers, a state slot for lightning layers). The next forward feeds the rest."""

    def __init__(self, request_id: str, index: int, prompt_token_ids: list[int], params: SamplingParams):
        self.seq_id = next(_ids)
        self.request_id = request_id
        self.group = request_id  # whose turn it is when admitting (several engine requests may be one API request)
        self.index = index  # position among the request's n samples
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.params = params
        self.status = Status.WAITING
        self.finish_reason: str | None = None
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        self.slot: int | None = None
        # prefix caching: the chain ids of the full blocks indexed so far (mmx.engine.prefix_cache), the positions
        # where the lightning states are to be kept (ascending), prompt tokens reused at first admission, and the
        # sibling (sample 0 of the same request) whose prompt this sample waits for, to reuse it
        self.block_uids: list[int] = []
        self.snapshot_at: list[int] = []
        self.num_cached_tokens: int | None = None
        self.leader: Sequence | None = None
        self.logprobs: list[TokenLogprob] = []
        self.generator: torch.Generator | None = None
        if params.seed is not None:
            self.generator = torch.Generator().manual_seed(params.seed + index)
        self.confident_run = 0  # consecutive sampled tokens above params.confident_probability
        self.forced_tokens: list[int] = []  # the next tokens, whatever is sampled (a reasoning budget's end)
        self.reasoning_done = False
        self.constraint: SequenceConstraint | None = None  # its place in params.structured_outputs' grammar

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def tokens(self, start: int, end: int) -> list[int]:
        """token_ids[start:end] without building the whole list."""
        split = len(self.prompt_token_ids)
        if start >= split:
            return self.output_token_ids[start - split : end - split]
        if end <= split:
            return self.prompt_token_ids[start:end]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - split]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def samples_at_end(self) -> bool:
        """Whether a token is sampled once the sequence is fed to its end (not for a prefill-only request)."""
        return self.params.max_tokens != 0

    @property
    def num_pending(self) -> int:
        """Tokens not yet in the cache (all of them after a preemption)."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == Status.FINISHED

    def finish(self, reason: str) -> None:
        self.status = Status.FINISHED
        self.finish_reason = reason

    def reset_cache(self) -> None:
        """Forget the cache (preemption by recompute): every token will be fed again."""
        self.num_computed_tokens = 0
        self.block_table = []
        self.block_uids = []
        self.snapshot_at = []
        self.slot = None
        self.status = Status.WAITING

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id}#{self.index}, {self.status.value}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens})"
        )
