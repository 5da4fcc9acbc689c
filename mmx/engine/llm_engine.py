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
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch

from mmx.engine.args import EngineArgs
from mmx.engine.cache import CacheLayout, HybridCache
from mmx.engine.decode_graph import DecodeGraph
from mmx.engine.outputs import CompletionOutput, RequestOutput
from mmx.engine.paged_batch import PagedBatch
from mmx.engine.prefix_cache import PrefixCache
from mmx.engine.prompt_logprobs import PromptScores, plan_jobs, score
from mmx.engine.sampler import Sampler, finite_rows
from mmx.engine.sampling_params import RequestOutputKind, SamplingParams
from mmx.engine.scheduler import Scheduler, StepPlan
from mmx.engine.sequence import Sequence, TokenLogprob
from mmx.engine.structured import CompiledGrammar, GrammarCompiler
from mmx.model.layout import use_decode_layout, warm_onednn
from mmx.model.modeling import MiniMaxForCausalLM
from mmx.model.quantization import quantize_model
from mmx.parallel.sharding import local_config
from mmx.utils.logging import get_logger
from mmx.utils.memory import release_free_memory

if TYPE_CHECKING:
    from mmx.parallel.workers import Workers

logger = get_logger(__name__)


class InvalidRequest(ValueError):
    """A request the engine refuses (empty or too long a prompt, bad ids, duplicate id): the caller's fault."""


class RequestFailed(RuntimeError):
    """The engine could not go on with one request (its numbers went bad); the others in the batch went on."""


def _default_cache_bytes(device: torch.device, needed: int) -> int:
    """On a GPU, 80% of its free memory (as vLLM takes it). On the CPU, what the engine's sequences can use at most
    (``needed``), and no more than 20% of RAM or 8 GB; the pools are committed page by page as they are used."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.8)
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        total = 8 << 30
    return int(min(needed, total * 0.2, 8 << 30))


class _Request:
    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams):
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.params = params
        self.seqs = [Sequence(request_id, i, prompt_ids, params) for i in range(params.n)]
        self.stop_reasons: list[str | int | None] = [None] * params.n
        self.sent = [0] * params.n  # tokens of each sequence already reported
        self.error: str | None = None
        self.prompt_scores = (
            PromptScores(prompt_ids, params.prompt_logprobs) if params.prompt_logprobs is not None else None
        )

    @property
    def finished(self) -> bool:
        return all(seq.is_finished for seq in self.seqs)

    def output(self) -> RequestOutput:
        """The request so far; each sample carries the tokens (and log-probs) not reported before, and, unless the
        request asked for DELTA outputs, all of them."""
        want_logprobs = self.params.logprobs is not None
        delta = self.params.output_kind == RequestOutputKind.DELTA
        outs = []
        for seq in self.seqs:
            sent, self.sent[seq.index] = self.sent[seq.index], len(seq.output_token_ids)
            new_ids = seq.output_token_ids[sent:]
            new_logprobs = seq.logprobs[sent:] if want_logprobs else None
            outs.append(
                CompletionOutput(
                    index=seq.index,
                    text="",
                    token_ids=new_ids if delta else list(seq.output_token_ids),
                    finish_reason=seq.finish_reason,
                    stop_reason=self.stop_reasons[seq.index],
                    logprobs=new_logprobs if delta or not want_logprobs else list(seq.logprobs),
                    new_token_ids=new_ids,
                    new_logprobs=new_logprobs,
                )
            )
        scores = self.prompt_scores
        return RequestOutput(
            self.request_id,
            None,
            self.prompt_ids,
            outs,
            self.finished,
            prompt_logprobs=scores.entries if scores is not None and scores.complete else None,
            error=self.error,
            num_cached_tokens=self.seqs[0].num_cached_tokens or 0,
        )


class LLMEngine:
    def __init__(
        self,
        model: MiniMaxForCausalLM,
        args: EngineArgs | None = None,
        eos_token_ids: Iterable[int] = (),
        workers: Workers | None = None,
        **kwargs: Any,
    ):
        """``eos_token_ids`` add to the model config's (the text side's EOS, when it differs). ``workers``: the
        other ranks of a sharded model (:mod:`mmx.parallel`), which run every forward with this one."""
        if args is None:
            args, rest = EngineArgs.split(kwargs)
            if rest:
                raise TypeError(f"unknown engine argument(s): {', '.join(sorted(rest))}")
        self.args = args
        self.workers = workers
        if workers is None and getattr(model, "parallel", None) is not None and model.parallel.group.size > 1:
            raise ValueError("this model is one shard of a tensor-parallel model: the engine needs its workers")
        if workers is None and args.tensor_parallel_size > 1:
            raise ValueError(
                "tensor_parallel_size > 1 loads each rank's slices from a checkpoint: give a checkpoint path "
                "(mmx.LLM(path, ...), LLMEngine.from_pretrained(path, ...)), not a model already in memory"
            )
        quantize_model(model, args.quantization)  # in place; a no-op when None or already done
        # tensor-parallel steps run eagerly: the compiled graphs hold no collectives
        eager = args.enforce_eager or workers is not None
        if eager:  # the BLAS streams column-major weights fastest at one row; compiled decode steps
            use_decode_layout(model)  # read them row-major (mmx.model.linear)
        self.model = model.eval()
        self.config = model.config
        cache_config = local_config(model)  # one rank's heads when sharded
        self.device = model.device
        self.max_model_len = args.max_model_len or min(self.config.max_position_embeddings, 32768)
        kv_dtype = model.dtype if args.kv_cache_dtype == "auto" else getattr(torch, args.kv_cache_dtype)
        snapshot_bytes = 0
        if args.enable_prefix_caching:
            snapshot_bytes = None if args.snapshot_memory_gb is None else int(args.snapshot_memory_gb * (1 << 30))
        if args.cache_memory_gb:
            budget = int(args.cache_memory_gb * (1 << 30))
        else:
            needed = CacheLayout.bytes_for(
                cache_config, kv_dtype, args.max_num_seqs, self.max_model_len, args.block_size
            )
            if snapshot_bytes is None and CacheLayout.bytes_per_slot(cache_config):
                needed = needed * 4 // 3  # the snapshots' quarter comes out of the budget
            budget = _default_cache_bytes(self.device, needed)
        layout = CacheLayout.plan(
            cache_config, kv_dtype, budget, args.max_num_seqs, self.max_model_len, args.block_size, snapshot_bytes
        )
        # a cache the user sized may fill its memory with cached prefixes; by default it holds what requests need
        grow = True if args.cache_memory_gb else None
        self.cache = HybridCache(cache_config, layout, kv_dtype, self.device, grow_for_prefix_cache=grow)
        self.eos_token_ids = sorted({*self.config.eos_token_ids, *eos_token_ids})
        # the chat formats end every message with their EOS token: where a later turn may depart from this one
        self.prefix_cache = (
            PrefixCache(self.cache, self.eos_token_ids, args.snapshot_interval) if args.enable_prefix_caching else None
        )
        self.scheduler = Scheduler(
            self.cache,
            args.max_num_seqs,
            args.max_num_batched_tokens,
            args.enable_chunked_prefill,
            self.prefix_cache,
        )
        self.sampler = Sampler(self.eos_token_ids, seed=args.seed)
        compiler = args.decode_compiler
        if compiler == "auto":
            compiler = "aot" if self.device.type == "cpu" else "inductor"
        self.decode_graph = (
            None if eager else DecodeGraph(self.model, self.cache, compiler, args.max_num_seqs, self.max_model_len)
        )
        if workers is not None:
            workers.build_cache(layout, kv_dtype, self.prefix_cache is not None)
            self.cache.journal.entries = []  # the copies the workers are to repeat
        self.requests: dict[str, _Request] = {}
        self._tokenizer_json: str | None = None  # what structured outputs compile against, when given
        self._grammars: GrammarCompiler | None = None
        logger.info(
            "engine: %d KV blocks of %d tokens, %d state slots, %d state snapshots, max_model_len %d, "
            "prefix caching %s",
            layout.num_blocks,
            layout.block_size,
            layout.num_slots,
            self.prefix_cache.num_snapshots if self.prefix_cache else 0,
            self.max_model_len,
            "on" if self.prefix_cache else "off",
        )

    @classmethod
    def from_pretrained(cls, path: str, eos_token_ids: Iterable[int] = (), **kwargs: Any) -> LLMEngine:
        from mmx.model.weights import load_model, resolve_model_path

        args, rest = EngineArgs.split(kwargs)
        if rest:
            raise TypeError(f"unknown engine argument(s): {', '.join(sorted(rest))}")
        if args.tensor_parallel_size > 1:
            from mmx.parallel.launch import load_parallel

            model, workers = load_parallel(resolve_model_path(path), args)
            try:
                return cls(model, args, eos_token_ids, workers=workers)
            except BaseException:
                workers.close()
                raise
        model = load_model(
            resolve_model_path(path),
            dtype=args.dtype,
            device=args.device,
            allow_non_finite_weights=args.allow_non_finite_weights,
            quantization=args.quantization,
        )
        return cls(model, args, eos_token_ids)

    def enable_structured_outputs(self, tokenizer_json: str) -> None:
        """Let requests carry ``structured_outputs``: grammars are compiled against this tokenizer (the text of its
        ``tokenizer.json``); the engine itself never sees text otherwise."""
        self._tokenizer_json = tokenizer_json
        self._grammars = None

    def _compile(self, params: SamplingParams) -> CompiledGrammar:
        """The request's grammar, compiled (cached by its text); InvalidRequest when it cannot be."""
        if self._tokenizer_json is None:
            raise InvalidRequest(
                "structured_outputs need the model's tokenizer: use mmx.LLM or the server, or call "
                "LLMEngine.enable_structured_outputs"
            )
        if self._grammars is None or self._grammars.eos_token_ids != tuple(self.eos_token_ids):
            self._grammars = GrammarCompiler(self._tokenizer_json, self.config.vocab_size, self.eos_token_ids)
        try:
            return self._grammars.compile(params.structured_outputs)
        except ValueError as e:
            raise InvalidRequest(f"structured_outputs.{e}") from None

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
        try:
            params.check_constraints()  # again: the fields may have been set after construction
        except ValueError as e:
            raise InvalidRequest(str(e)) from None
        outside = [t for t in params.logit_bias or () if t >= self.config.vocab_size]
        if outside:
            raise InvalidRequest(
                f"logit_bias: token id {outside[0]} is not in the vocabulary [0, {self.config.vocab_size})"
            )
        if params.structured_outputs is not None:
            self._compile(params)  # cached: add_request finds it compiled
        return prompt_ids

    def add_request(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams | None = None, group: str | None = None
    ) -> None:
        """``group``: requests that share it take turns with other groups as one (the prompts of one API request);
        by default each request is its own group."""
        params = params or SamplingParams()
        if request_id in self.requests:
            raise InvalidRequest(f"request id {request_id!r} is already in use")
        request = _Request(request_id, self.validate_request(prompt_ids, params), params)
        if params.structured_outputs is not None:
            grammar = self._compile(params)
            for seq in request.seqs:
                seq.constraint = grammar.start()
        self.requests[request_id] = request
        for seq in request.seqs:
            seq.group = group or request_id
            if self.prefix_cache is not None and seq.index > 0:
                seq.leader = request.seqs[0]  # waits for sample 0's prompt, then reuses it
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

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix. Call it after changing the model's weights in place (an RL step): the cache
        holds what the old weights computed. Requests running now keep their own cache. The native decode step's
        copy of the weights is repacked too (it follows in-place changes by itself, but not writes through
        ``tensor.data``, which torch does not count)."""
        if self.prefix_cache is not None:
            self.prefix_cache.reset()
        if self.decode_graph is not None and self.decode_graph.native is not None:
            self.decode_graph.native.refresh_weights(force=True)

    def warm_up(self) -> None:
        """Build oneDNN's kernels for the model's products and compile the decode graphs now (a server does this
        before taking requests), so that no request waits for them."""
        start = time.perf_counter()
        kernels = warm_onednn(self.model)
        if kernels:
            logger.info("%d oneDNN kernels built in %.1f s", kernels, time.perf_counter() - start)
        if self.decode_graph is not None and not self.requests:
            seconds = self.decode_graph.warm_up(self.args.max_num_seqs, self.max_model_len)
            release_free_memory()  # the compiler's garbage, left free in the heap
            if self.decode_graph.failed is None and seconds:  # 0: every step runs natively (no graph needed)
                logger.info("decode graphs ready in %.1f s", seconds)

    def shutdown(self) -> None:
        """Stop the workers of a tensor-parallel engine (also done at exit); the engine cannot step afterwards."""
        if self.workers is not None:
            self.workers.close()

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    @property
    def num_unfinished_requests(self) -> int:
        return len(self.requests)

    # ------------------------------------------------------------------ one step
    @torch.inference_mode()
    def _forward(self, plan: StepPlan) -> list[tuple[Sequence, int, Any]]:
        if self.decode_graph is not None and not plan.prefill:
            logits = self.decode_graph(plan.decode)
            if logits is not None:
                return self._picks(logits, plan.decode)
        prefix = self.prefix_cache
        captures = prefix.plan_captures(plan.prefill) if prefix is not None else []
        snapshots = prefix.states if prefix is not None else None
        if self.workers is not None:
            self.workers.step(self.cache.journal.drain(), plan.decode, plan.prefill, captures)
        batch = PagedBatch(self.cache, plan.decode, plan.prefill, self.device, captures, snapshots)
        ids = torch.tensor([batch.token_ids], dtype=torch.long, device=self.device)
        hidden = self.model.model(ids, batch.positions_tensor, cache=batch)
        self._score_prompts(batch, hidden[0])
        if not batch.sampled:
            return []
        return self._picks(self._logits(hidden[0, batch.sample_rows]), batch.sampled)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head, with the workers when the vocabulary is split over them."""
        if self.workers is not None:
            return self.workers.logits(self.model, hidden)
        return self.model.compute_logits(hidden)

    def _picks(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[tuple[Sequence, int, Any]]:
        picks = self._sample(logits, seqs)
        for i, seq in enumerate(seqs):
            if seq.forced_tokens and picks[i][0] is not None:
                picks[i] = self._forced(logits[i], seq.forced_tokens.pop(0), picks[i][1])
        return [(seq, token, entry) for seq, (token, entry) in zip(seqs, picks)]

    @staticmethod
    def _forced(logits: torch.Tensor, token: int, sampled: TokenLogprob | None) -> tuple[int, TokenLogprob | None]:
        """A forced token in place of the sampled one; its log-prob entry (when asked for) is the model's."""
        if sampled is None:
            return token, None
        return token, TokenLogprob(token, float(logits.float().log_softmax(-1)[token]), sampled.top)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[tuple[int | None, Any]]:
        """(token, log-prob entry) per sequence, or (None, why) for a sequence that cannot be sampled: logits
        that are not finite, or a sampler error on its row (probabilities that went NaN under its penalties).
        The batch is sampled at once; only when that fails is it retried row by row, so one bad row fails alone."""
        finite = finite_rows(logits)
        if all(finite):
            try:
                return [self._checked(pick) for pick in self.sampler(logits, seqs)]
            except Exception:  # find the row at fault below
                pass
        picks: list[tuple[int | None, Any]] = []
        for i, seq in enumerate(seqs):
            if not finite[i]:
                picks.append((None, "the model's logits for this sequence are not finite (NaN or inf)"))
                continue
            try:
                picks.append(self._checked(self.sampler(logits[i : i + 1], [seq])[0]))
            except Exception as e:
                picks.append((None, f"sampling failed: {e}"))
        return picks

    def _checked(self, pick: tuple[int, Any]) -> tuple[int | None, Any]:
        token, entry = pick
        if not 0 <= token < self.config.vocab_size:
            return None, f"sampling produced token {token}, outside the vocabulary"
        if entry is not None and not math.isfinite(entry.logprob) and entry.logprob != float("-inf"):
            return None, "the sampled token's log-probability is NaN"
        return token, entry

    def _score_prompts(self, batch: PagedBatch, hidden: torch.Tensor) -> None:
        """Prompt log-probs (for the requests that ask) from this forward's rows of their prompts."""

        def scores_of(seq: Sequence) -> PromptScores | None:
            request = self.requests.get(seq.request_id)
            return request.prompt_scores if request is not None else None

        score(self._logits, hidden, plan_jobs(batch.spans, scores_of), self.config.vocab_size)

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
        if self.prefix_cache is not None:
            for seq in [*plan.decode, *(seq for seq, _ in plan.prefill)]:
                self.prefix_cache.record(seq)
        touched: dict[str, _Request] = {}
        for seq in [*plan.decode, *(seq for seq, _ in plan.prefill)]:
            if seq.params.max_tokens == 0 and seq.num_computed_tokens == seq.num_tokens and not seq.is_finished:
                request = self.requests[seq.request_id]  # prefill only: done once the prompt is in
                touched[request.request_id] = request
                self.scheduler.finish(seq, "length")
        for seq, token, logprob in picked:
            request = self.requests.get(seq.request_id)
            if request is None:  # failed earlier in this step by another of its samples
                continue
            touched[request.request_id] = request
            if token is None:
                self._fail(request, logprob)
            else:
                self._append(request, seq, token, logprob)
        outputs = []
        for request in touched.values():
            if request.finished:
                self.requests.pop(request.request_id, None)
            elif request.params.output_kind == RequestOutputKind.FINAL_ONLY:
                continue
            outputs.append(request.output())
        return outputs

    def _fail(self, request: _Request, why: str) -> None:
        """End every sample of ``request`` with finish_reason "error"; the other requests are untouched."""
        logger.warning("request %s failed: %s", request.request_id, why)
        request.error = why
        for seq in request.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq, "error")

    def _append(self, request: _Request, seq: Sequence, token: int, logprob: Any) -> None:
        p = seq.params
        seq.output_token_ids.append(token)
        if seq.constraint is not None and not seq.constraint.advance(token):
            self._fail(request, f"the structured-output grammar rejected token {token}: {seq.constraint.error}")
            return
        if logprob is not None:
            seq.logprobs.append(logprob)
            if p.stop_after_confident_tokens is not None:
                confident = logprob.logprob > math.log(p.confident_probability)
                seq.confident_run = seq.confident_run + 1 if confident else 0
        if p.reasoning_budget is not None and not seq.reasoning_done:
            if token == p.think_close_id:
                seq.reasoning_done = True
            elif len(seq.output_token_ids) >= p.reasoning_budget:
                seq.forced_tokens = list(p.reasoning_end_ids)
                seq.reasoning_done = True
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
