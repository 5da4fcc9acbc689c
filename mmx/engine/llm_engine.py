"""The engine loop: requests in, one scheduled forward per step, outputs out.

The engine core deals in token ids (scheduler, cache, runner, sampler). Text enters only at the edges: prompts are
tokenised on the way in, and each sample is detokenised incrementally on the way out, where stop strings are found.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from typing import Any

import torch

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


@dataclass
class EngineArgs:
    """Engine settings (the names follow vLLM's)."""

    dtype: str | None = None  # model dtype when loading from a path; None: the checkpoint's
    device: str = "cpu"
    max_model_len: int | None = None  # None: the model's context, capped at 32768
    max_num_seqs: int = 64  # sequences decoded together (each holds one lightning-state slot)
    max_num_batched_tokens: int = 2048  # tokens per forward, prefill chunks included
    block_size: int = 16  # tokens per KV block
    cache_memory_gb: float | None = None  # KV blocks + state slots; None: 20% of RAM (at most 8 GB)
    enable_chunked_prefill: bool = True
    seed: int = 0

    @classmethod
    def split(cls, kwargs: dict[str, Any]) -> tuple[EngineArgs, dict[str, Any]]:
        """(engine args, the rest) from a flat keyword dict; a misspelt engine argument is an error."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in kwargs.items() if k in names}), {
            k: v for k, v in kwargs.items() if k not in names
        }


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
    def __init__(self, request_id: str, prompt: str | None, prompt_ids: list[int], params: SamplingParams, engine):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_ids = prompt_ids
        self.params = params
        self.seqs = [Sequence(request_id, i, prompt_ids, params, engine.step_count) for i in range(params.n)]
        self.texts = [""] * params.n
        self.stop_reasons: list[str | int | None] = [None] * params.n
        self.detokenizers = None
        if engine.tokenizer is not None:
            from mmx.chat.tokenizer import IncrementalDetokenizer

            self.detokenizers = [
                IncrementalDetokenizer(engine.tokenizer, params.skip_special_tokens) for _ in self.seqs
            ]

    @property
    def finished(self) -> bool:
        return all(seq.is_finished for seq in self.seqs)

    def output(self) -> RequestOutput:
        outs = [
            CompletionOutput(
                index=seq.index,
                text=self.texts[seq.index],
                token_ids=list(seq.output_token_ids),
                finish_reason=seq.finish_reason,
                stop_reason=self.stop_reasons[seq.index],
                logprobs=list(seq.logprobs) if self.params.logprobs is not None else None,
            )
            for seq in self.seqs
        ]
        return RequestOutput(self.request_id, self.prompt, self.prompt_ids, outs, self.finished)


class LLMEngine:
    def __init__(self, model: MiniMaxForCausalLM, tokenizer=None, args: EngineArgs | None = None, **kwargs: Any):
        if args is None:
            args, rest = EngineArgs.split(kwargs)
            if rest:
                raise TypeError(f"unknown engine argument(s): {', '.join(sorted(rest))}")
        self.args = args
        self.model = model.eval()
        self.config = model.config
        self.tokenizer = tokenizer
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
        eos = list(self.config.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            eos.append(tokenizer.eos_token_id)
        self.eos_token_ids = sorted(set(eos))
        self.sampler = Sampler(self.eos_token_ids, seed=args.seed)
        self.requests: dict[str, _Request] = {}
        self.step_count = 0
        logger.info(
            "engine: %d KV blocks of %d tokens, %d state slots, max_model_len %d",
            layout.num_blocks,
            layout.block_size,
            layout.num_slots,
            self.max_model_len,
        )

    @classmethod
    def from_pretrained(cls, path: str, **kwargs: Any) -> LLMEngine:
        from mmx.chat.tokenizer import Tokenizer
        from mmx.model.weights import load_model, resolve_model_path

        args, rest = EngineArgs.split(kwargs)
        if rest:
            raise TypeError(f"unknown engine argument(s): {', '.join(sorted(rest))}")
        directory = resolve_model_path(path)
        model = load_model(directory, dtype=args.dtype, device=args.device)
        tokenizer = (
            Tokenizer.from_pretrained(directory) if os.path.exists(os.path.join(directory, "tokenizer.json")) else None
        )
        return cls(model, tokenizer, args)

    # ------------------------------------------------------------------ requests
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None) -> None:
        params = params or SamplingParams()
        if request_id in self.requests:
            raise InvalidRequest(f"request id {request_id!r} is already in use")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequest(
                    "a text prompt needs a tokenizer; pass token ids or load a checkpoint with tokenizer.json"
                )
            text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, ids = None, [int(t) for t in prompt]
        if not ids:
            raise InvalidRequest("the prompt is empty")
        if min(ids) < 0 or max(ids) >= self.config.vocab_size:
            raise InvalidRequest(f"prompt token ids must lie in [0, {self.config.vocab_size})")
        if len(ids) >= self.max_model_len:
            raise InvalidRequest(
                f"the prompt has {len(ids)} tokens; max_model_len is {self.max_model_len}, leaving no room to generate"
            )
        request = _Request(request_id, text, ids, params, self)
        self.requests[request_id] = request
        for seq in request.seqs:
            self.scheduler.add(seq)

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
        self.step_count += 1
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
        if request.detokenizers is not None:
            detok = request.detokenizers[seq.index]
            delta = detok.add([token])
            if reason is not None:
                delta += detok.flush()
            text = request.texts[seq.index] + delta
            hit = self._find_stop(text, len(delta), p) if p.stop else None
            if hit is not None:
                cut, stop = hit
                text, reason, stop_reason = text[:cut], "stop", stop
            request.texts[seq.index] = text
        if reason is not None:
            request.stop_reasons[seq.index] = stop_reason
            self.scheduler.finish(seq, reason)

    @staticmethod
    def _find_stop(text: str, new_chars: int, params: SamplingParams) -> tuple[int, str] | None:
        """(where the text ends, the stop string) if a stop string appears in the newly added text."""
        longest = max(len(s) for s in params.stop)
        window_start = max(0, len(text) - new_chars - longest + 1)
        best = None
        for stop in params.stop:
            i = text.find(stop, window_start)
            if i != -1 and (best is None or i < best[0]):
                best = (i, stop)
        if best is None:
            return None
        i, stop = best
        return (i + len(stop) if params.include_stop_str_in_output else i), stop
