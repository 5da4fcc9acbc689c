"""Continuous batching: which sequences run this step, and how many of their tokens.

Every step fills a token budget. Running sequences come first, oldest first: a decoding sequence feeds its one
new token, a sequence still prefilling feeds the next chunk of its prompt. Waiting sequences are admitted while
the budget, the state slots and the KV blocks allow, fairly across requests (:meth:`Scheduler._next_waiting`).
When a running sequence cannot get the block it needs, the newest running sequences are preempted: their cache
is dropped and they go back to the front of the queue, to be recomputed later (a lightning state cannot be
swapped out piecewise, and recomputing is what vLLM does too).

With a :class:`~mmx.engine.prefix_cache.PrefixCache`, an admitted sequence starts after the longest prefix of its
tokens that is cached, the states of a sequence that finishes or is preempted are kept (a preempted one usually
resumes where it stopped), and the other samples of a request wait until the first has fed its prompt, to reuse it.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field

from mmx.engine.cache import HybridCache
from mmx.engine.prefix_cache import PrefixCache
from mmx.engine.sequence import Sequence, Status


@dataclass
class StepPlan:
    decode: list[Sequence] = field(default_factory=list)  # one token each
    prefill: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, tokens fed)

    @property
    def num_tokens(self) -> int:
        return len(self.decode) + sum(n for _, n in self.prefill)

    @property
    def empty(self) -> bool:
        return not self.decode and not self.prefill


class Scheduler:
    def __init__(
        self,
        cache: HybridCache,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        chunked_prefill: bool = True,
        prefix_cache: PrefixCache | None = None,
    ):
        if max_num_batched_tokens < 1 or max_num_seqs < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be positive")
        self.cache = cache
        self.max_num_seqs = min(max_num_seqs, cache.layout.num_slots) if cache.uses_slots else max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.chunked_prefill = chunked_prefill
        self.prefix_cache = prefix_cache
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._live: Counter[str] = Counter()  # unfinished sequences of each group
        self._admitted: Counter[str] = Counter()  # sequences of each live group admitted so far
        self._preempted: set[int] = set()
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)
        self._live[seq.group] += 1

    def _tokens_for(self, seq: Sequence, budget: int) -> int:
        """How many pending tokens ``seq`` feeds with ``budget`` left (0: it must wait for a later step)."""
        if seq.num_pending <= budget:
            return seq.num_pending
        return budget if self.chunked_prefill else 0

    def schedule(self) -> StepPlan:
        plan = StepPlan()
        budget = self.max_num_batched_tokens
        scheduled: set[int] = set()
        for seq in list(self.running):
            if seq.status != Status.RUNNING:  # preempted earlier in this loop
                continue
            n = self._tokens_for(seq, budget)
            if n == 0:
                continue
            while not self.cache.can_admit(seq, seq.num_computed_tokens + n):
                victim = next((s for s in reversed(self.running) if s.seq_id not in scheduled), None)
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status != Status.RUNNING:
                continue
            self.cache.grow(seq, seq.num_computed_tokens + n)
            scheduled.add(seq.seq_id)
            if n == 1 and seq.num_computed_tokens > 0:
                plan.decode.append(seq)
            else:
                plan.prefill.append((seq, n))
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self._next_waiting()
            if seq is None:
                break
            cached = self._attach(seq)
            n = self._tokens_for(seq, budget)
            if n == 0 or not self.cache.can_admit(seq, seq.num_computed_tokens + n):
                if cached:  # give the shared prefix back; it stays cached
                    self.cache.release(seq)
                seq.reset_cache()
                break
            self.waiting.remove(seq)
            if seq.seq_id in self._preempted:
                self._preempted.discard(seq.seq_id)
            else:
                self._admitted[seq.group] += 1
            if seq.num_cached_tokens is None:  # its first admission: what the request's usage reports
                seq.num_cached_tokens = cached
                if self.prefix_cache is not None:
                    self.prefix_cache.stats.queried_tokens += len(seq.prompt_token_ids)
                    self.prefix_cache.stats.hit_tokens += cached
            self.cache.grow(seq, seq.num_computed_tokens + n)
            seq.status = Status.RUNNING
            self.running.append(seq)
            plan.prefill.append((seq, n))
            budget -= n
        if plan.empty and self.waiting and not self.running:
            seq = self._next_waiting() or self.waiting[0]
            raise RuntimeError(
                f"cannot schedule {seq}: the cache has {self.cache.num_free_blocks} free blocks and "
                f"{self.cache.num_free_slots} free slots; the engine's cache is too small for this request"
            )
        return plan

    def _attach(self, seq: Sequence) -> int:
        """Start ``seq`` (nothing of it in the cache) after its longest cached prefix; the tokens reused."""
        if self.prefix_cache is None:
            return 0
        cached = self.prefix_cache.attach(seq)
        self.prefix_cache.plan_snapshots(seq)
        return cached

    def _next_waiting(self) -> Sequence | None:
        """Fair admission. A preempted sequence comes back first (its work is being redone); otherwise the next
        sequence is the one whose group (an API request: its prompts x n samples) has had the fewest sequences
        admitted so far, the longest waiting among equals. A request of many sequences thus takes turns with the
        others instead of going ahead of them: a small request that arrives behind it gets the next free place.
        A sample that waits for its first sibling's prompt (prefix caching) is passed over; None if all are."""
        head = self.waiting[0]
        if head.seq_id in self._preempted:
            return head
        best, fewest = None, 0
        for seq in self.waiting:
            if not self._ready(seq):
                continue
            count = self._admitted[seq.group]
            if best is None or count < fewest:
                best, fewest = seq, count
            if fewest == 0:
                break
        return best

    @staticmethod
    def _ready(seq: Sequence) -> bool:
        leader = seq.leader
        return leader is None or leader.is_finished or leader.num_computed_tokens >= len(leader.prompt_token_ids) - 1

    def _preempt(self, seq: Sequence) -> None:
        if self.prefix_cache is not None:
            self.prefix_cache.snapshot(seq)  # it resumes from here if the snapshot is still there
        self.cache.release(seq)
        self.running.remove(seq)
        seq.reset_cache()
        self.waiting.appendleft(seq)
        self._preempted.add(seq.seq_id)
        self.num_preemptions += 1

    def finish(self, seq: Sequence, reason: str) -> None:
        """Stop ``seq`` (end of generation or abort) and give its cache back."""
        if seq.is_finished:
            return
        if seq in self.running:
            self.running.remove(seq)
            if self.prefix_cache is not None and reason != "error":
                self.prefix_cache.snapshot(seq)  # the next turn of a conversation resumes here
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.cache.release(seq)
        seq.finish(reason)
        self._preempted.discard(seq.seq_id)
        self._live[seq.group] -= 1
        if self._live[seq.group] <= 0:
            del self._live[seq.group]
            self._admitted.pop(seq.group, None)
