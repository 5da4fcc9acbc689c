"""The engine loop: requests in, one scheduled forward per step, outputs out.

The engine deals in token ids only (scheduler, cache, runner, sampler): a request is prompt ids and sampling
parameters, and every step reports each sequence's new token ids and log-probabilities. Text lives outside it
(``mmx.chat.reply.ReplyStream``): the output side detokenises, finds stop strings and, on a hit, ends the
sequence with :meth:`LLMEngine.finish_sequence`.
"""

from __future__ import annotations

import math
import operator
import os
from collections.abc import Iterable
from typing import Any

import torch

from mmx.engine.args import EngineArgs
from mmx.engine.cache import CacheLayout, HybridCache
from mmx.engine.outputs import CompletionOutput, RequestOutput
from mmx.engine.paged_batch import PagedBatch
from mmx.engine.sampler import Sampler
from mmx.engine.sampling_params import SamplingParams
from mmx.engine.scheduler import Scheduler, StepPlan
from mmx.engine.sequence import Sequence
from mmx.model.modeling import MiniMaxForCausalLM
from mmx.utils.logging import get_logger

logger = get_logger(__name__)


class InvalidRequest(ValueError):
    """A request the engine refuses (empty or too long a prompt, bad ids, duplicate id): the caller's fault."""


def _default_cache_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.8)
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        total = 8 << 30
    return int(min(total * 0.2, 8 << 30))


class _Request:
    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams):
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.params = params
        self.seqs = [Sequence(request_id, i, prompt_ids, params) for i in range(params.n)]
        self.stop_reasons: list[str | int | None] = [None] * params.n
        self.sent = [0] * params.n  # tokens of each sequence already reported

    @property
    def finished(self) -> bool:
        return all(seq.is_finished for seq in self.seqs)

    def output(self) -> RequestOutput:
        """The request so far; each sample carries the tokens (and log-probs) not reported before."""
        want_logprobs = self.params.logprobs is not None
        outs = []
        for seq in self.seqs:
            sent, self.sent[seq.index] = self.sent[seq.index], len(seq.output_token_ids)
            outs.append(
                CompletionOutput(
                    index=seq.index,
                    text="",
                    token_ids=list(seq.output_token_ids),
                    finish_reason=seq.finish_reason,
                    stop_reason=self.stop_reasons[seq.index],
                    logprobs=list(seq.logprobs) if want_logprobs else None,
                    new_token_ids=seq.output_token_ids[sent:],
                    new_logprobs=seq.logprobs[sent:] if want_logprobs else None,
                )
            )
        return RequestOutput(self.request_id, None, self.prompt_ids, outs, self.finished)


class LLMEngine:
    def __init__(
        self,
        model: MiniMaxForCausalLM,
        args: EngineArgs | None = None,
        eos_token_ids: Iterable[int] = (),
        **kwargs: Any,
    ):
        """``eos_token_ids`` add to the model config's (the text side's EOS, when it differs)."""
        if args is None:
            args, rest = EngineArgs.split(kwargs)
            if rest:
                raise TypeError(f"unknown engine argument(s): {', '.join(sorted(rest))}")
        self.args = args
        self.model = model.eval()
        self.config = model.config
        self.device = model.device
        self.max_model_len = args.max_model_len or min(self.config.max_position_embeddings, 32768)
        budget = int(args.cache_memory_gb * (1 << 30)) if args.cache_memory_gb else _default_cache_bytes(self.device)
        layout = CacheLayout.plan(
            self.config, model.dtype, budget, args.max_num_seqs, self.max_model_len, args.block_size
        )
        self.cache = HybridCache(self.config, layout, model.dtype, self.device)
        self.scheduler = Scheduler(
            self.cache, args.max_num_seqs, args.max_num_batched_tokens, args.enable_chunked_prefill
        )
        self.eos_token_ids = sorted({*self.config.eos_token_ids, *eos_token_ids})
        self.sampler = Sampler(self.eos_token_ids, seed=args.seed)
        self.requests: dict[str, _Request] = {}
        logger.info(
            "engine: %d KV blocks of %d tokens, %d state slots, max_model_len %d",
            layout.num_blocks,
            layout.block_size,
            layout.num_slots,
            self.max_model_len,
        )

    @classmethod
    def from_pretrained(cls, path: str, eos_token_ids: Iterable[int] = (), **kwargs: Any) -> LLMEngine:
        from mmx.model.weights import load_model, resolve_model_path

        args, rest = EngineArgs.split(kwargs)
        if rest:
            raise TypeError(f"unknown engine argument(s): {', '.join(sorted(rest))}")
        model = load_model(resolve_model_path(path), dtype=args.dtype, device=args.device)
        return cls(model, args, eos_token_ids)

    # ------------------------------------------------------------------ requests
    def validate_request(self, prompt_ids: list[int], params: SamplingParams) -> list[int]:
        """The prompt as a list of ints, or :class:`InvalidRequest` for a request the engine cannot run: the one
        place requests are checked."""
        try:
            if isinstance(prompt_ids, str):
                raise TypeError
            prompt_ids = [operator.index(t) for t in prompt_ids]
        except TypeError:
            raise InvalidRequest(
                "the engine takes token ids: a text prompt needs a tokenizer (mmx.LLM and the server have one)"
            ) from None
        if not prompt_ids:
            raise InvalidRequest("the prompt is empty")
        if min(prompt_ids) < 0 or max(prompt_ids) >= self.config.vocab_size:
            raise InvalidRequest(f"prompt token ids must lie in [0, {self.config.vocab_size})")
        if len(prompt_ids) >= self.max_model_len:
            raise InvalidRequest(
                f"the prompt has {len(prompt_ids)} tokens; the context (max_model_len) is {self.max_model_len} "
                "tokens, leaving no room to generate"
            )
        if not isinstance(params, SamplingParams):
            raise InvalidRequest(f"sampling params must be SamplingParams, got {type(params).__name__}")
        return prompt_ids

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams | None = None) -> None:
        params = params or SamplingParams()
        if request_id in self.requests:
            raise InvalidRequest(f"request id {request_id!r} is already in use")
        request = _Request(request_id, self.validate_request(prompt_ids, params), params)
        self.requests[request_id] = request
        for seq in request.seqs:
            self.scheduler.add(seq)

    def finish_sequence(
        self, request_id: str, index: int, stop_reason: str | int | None = None
    ) -> RequestOutput | None:
        """End one sample now with reason "stop" (the output side found a stop string); frees its cache. Returns
        the request's final output when this was its last running sample, else None."""
        request = self.requests.get(request_id)
        if request is None:
            return None
        seq = request.seqs[index]
        if not seq.is_finished:
            request.stop_reasons[index] = stop_reason
            self.scheduler.finish(seq, "stop")
        if not request.finished:
            return None
        del self.requests[request_id]
        return request.output()

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its cache; returns its final output (None if unknown)."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        for seq in request.seqs:
            self.scheduler.finish(seq, "abort")
        return request.output()

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    @property
    def num_unfinished_requests(self) -> int:
        return len(self.requests)

    # ------------------------------------------------------------------ one step
    @torch.inference_mode()
    def _forward(self, plan: StepPlan) -> list[tuple[Sequence, int, Any]]:
        batch = PagedBatch(self.cache, plan.decode, plan.prefill, self.device)
        ids = torch.tensor([batch.token_ids], dtype=torch.long, device=self.device)
        hidden = self.model.model(ids, batch.positions_tensor, cache=batch)
        if not batch.sampled:
            return []
        logits = self.model.compute_logits(hidden[0, batch.sample_rows])
        picks = self.sampler(logits, batch.sampled)
        return [(seq, token, logprob) for seq, (token, logprob) in zip(batch.sampled, picks)]

    def step(self) -> list[RequestOutput]:
        """Run one forward over the scheduled tokens; return outputs of the requests that changed."""
        plan = self.scheduler.schedule()
        if plan.empty:
            return []
        picked = self._forward(plan)
        for seq in plan.decode:
            seq.num_computed_tokens += 1
        for seq, n in plan.prefill:
            seq.num_computed_tokens += n
        touched: dict[str, _Request] = {}
        for seq, token, logprob in picked:
            request = self.requests[seq.request_id]
            touched[request.request_id] = request
            self._append(request, seq, token, logprob)
        outputs = []
        for request in touched.values():
            outputs.append(request.output())
            if request.finished:
                del self.requests[request.request_id]
        return outputs

    def _append(self, request: _Request, seq: Sequence, token: int, logprob: Any) -> None:
        p = seq.params
        seq.output_token_ids.append(token)
        if logprob is not None:
            seq.logprobs.append(logprob)
            if p.stop_after_confident_tokens is not None:
                confident = logprob.logprob > math.log(p.confident_probability)
                seq.confident_run = seq.confident_run + 1 if confident else 0
        reason, stop_reason = None, None
        if token in p.stop_token_ids:
            reason, stop_reason = "stop", token
        elif not p.ignore_eos and token in self.eos_token_ids:
            reason = "stop"
        elif (
            p.max_tokens is not None and len(seq.output_token_ids) >= p.max_tokens
        ) or seq.num_tokens >= self.max_model_len:
            reason = "length"
        elif p.stop_after_confident_tokens is not None and seq.confident_run >= p.stop_after_confident_tokens:
            reason = "repetition"
        if reason is not None:
            request.stop_reasons[seq.index] = stop_reason
            self.scheduler.finish(seq, reason)
