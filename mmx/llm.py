"""Offline generation in the style of vLLM: ``LLM(model).generate(prompts, SamplingParams(...))`` and
``LLM(model).chat(conversations, ...)``.

The engine works in token ids; this class is its text side: it tokenises prompts (rendering conversations with the
chat template), follows every sample with a :class:`~mmx.chat.reply.ReplyStream` (detokenisation, stop strings,
and for chats the reasoning and tool-call parsing), and ends a sample in the engine when a stop string appears.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Callable
from typing import Any

from tqdm.auto import tqdm

from mmx.chat.constraints import answer_start
from mmx.chat.formats import ChatFormat, chat_for
from mmx.chat.reply import ReplyStream
from mmx.chat.tokenizer import Tokenizer
from mmx.engine.llm_engine import EngineArgs, LLMEngine
from mmx.engine.outputs import RequestOutput
from mmx.engine.sampling_params import RequestOutputKind, SamplingParams
from mmx.engine.structured import ReasoningGate
from mmx.model.modeling import MiniMaxForCausalLM
from mmx.model.weights import load_model, resolve_model_path

StreamFactory = Callable[[SamplingParams], ReplyStream]


def load_tokenizer(directory: str) -> Tokenizer | None:
    """A checkpoint's tokenizer, or None when it ships none (the model then takes token ids only)."""
    return Tokenizer.from_pretrained(directory) if os.path.exists(os.path.join(directory, "tokenizer.json")) else None


def load_engine(model: str, **engine_args: Any) -> tuple[LLMEngine, Tokenizer | None]:
    """The engine over a checkpoint directory (or cached Hub repo id) and the checkpoint's tokenizer; the
    tokenizer's EOS ends generation too."""
    args, rest = EngineArgs.split(engine_args)
    if rest:
        raise TypeError(f"unknown engine argument(s): {', '.join(sorted(rest))}")
    directory = resolve_model_path(model)
    tokenizer = load_tokenizer(directory)
    if args.tensor_parallel_size > 1:
        from mmx.parallel.launch import load_parallel

        network, workers = load_parallel(directory, args)
        try:
            engine = LLMEngine(network, args, _eos_ids(tokenizer), workers=workers)
        except BaseException:
            workers.close()
            raise
    else:
        network = load_model(
            directory,
            dtype=args.dtype,
            device=args.device,
            allow_non_finite_weights=args.allow_non_finite_weights,
            quantization=args.quantization,
        )
        engine = LLMEngine(network, args, _eos_ids(tokenizer))
    if tokenizer is not None:  # structured outputs compile their grammars against it
        engine.enable_structured_outputs(tokenizer.backend.to_str())
    return engine, tokenizer


def _eos_ids(tokenizer: Tokenizer | None) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer is not None and tokenizer.eos_token_id is not None else []


class LLM:
    """``model`` is a checkpoint directory (or a loaded :class:`MiniMaxForCausalLM`, with ``tokenizer``);
    keyword arguments are :class:`EngineArgs` (max_model_len, max_num_seqs, dtype, device, ...)."""

    def __init__(self, model: str | MiniMaxForCausalLM, tokenizer: Tokenizer | None = None, **engine_args: Any):
        if isinstance(model, MiniMaxForCausalLM):
            self.engine = LLMEngine(model, eos_token_ids=_eos_ids(tokenizer), **engine_args)
            self.tokenizer = tokenizer
        else:
            self.engine, loaded = load_engine(model, **engine_args)
            self.tokenizer = tokenizer or loaded
            self.engine.eos_token_ids = sorted({*self.engine.eos_token_ids, *_eos_ids(self.tokenizer)})
        if self.tokenizer is not None:
            self.engine.enable_structured_outputs(self.tokenizer.backend.to_str())
        self._ids = itertools.count()

    # ------------------------------------------------------------------ public
    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix: call it after changing the model's weights in place."""
        self.engine.reset_prefix_cache()

    def generate(
        self,
        prompts: str | list[int] | list[str] | list[list[int]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text, or token ids) and return the outputs in prompt order."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = self._params_for(sampling_params, len(prompts))
        plain = self._plain_stream if self.tokenizer is not None else None
        return self._run([(p, params[i], plain) for i, p in enumerate(prompts)], use_tqdm)

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        tools: list[dict[str, Any]] | list[list[dict[str, Any]] | None] | None = None,
        chat_template: str | None = None,
        use_tqdm: bool = True,
        **template_kwargs: Any,
    ) -> list[RequestOutput]:
        """Render conversations with the chat template and generate a reply to each. Every sample also carries its
        parsed reply in ``message`` (``reasoning_content``, ``content``, ``tool_calls``). ``tools`` is one list of
        OpenAI-style tools for every conversation, or one list (or None) per conversation."""
        if self.tokenizer is None:
            raise ValueError("chat needs a tokenizer")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        per_conversation = bool(tools) and all(t is None or isinstance(t, list) for t in tools)
        tool_lists = list(tools) if per_conversation else [tools] * len(conversations)
        if len(tool_lists) != len(conversations):
            raise ValueError(f"{len(tool_lists)} tool lists for {len(conversations)} conversations")
        setup = chat_for(self.tokenizer, self.engine.config.architecture, chat_template)
        params = self._params_for(sampling_params, len(conversations))
        runs = []
        for conversation, p, conv_tools in zip(conversations, params, tool_lists):
            prompt = self.tokenizer.apply_chat_template(
                conversation,
                tools=conv_tools,
                chat_template=setup.template,
                add_generation_prompt=True,
                **template_kwargs,
            )
            p = self._answer_constrained(p, prompt, setup.format)

            def stream(p: SamplingParams, conv_tools=conv_tools) -> ReplyStream:
                return ReplyStream.for_params(self.tokenizer, p, setup.format, tools=conv_tools)

            runs.append((prompt, p, stream))
        return self._run(runs, use_tqdm, chat=True)

    # ------------------------------------------------------------------ machinery
    def _answer_constrained(self, p: SamplingParams, prompt: str, format: ChatFormat) -> SamplingParams:
        """A chat's structured-output constraint holds its answer: it starts after the reasoning (unless the
        caller placed it)."""
        constraint = p.structured_outputs
        if constraint is None or constraint.reasoning is not None:
            return p
        start = answer_start(self.tokenizer, format, self.tokenizer.encode(prompt))
        if start is None:
            return p
        placed = dataclasses.replace(constraint, reasoning=ReasoningGate(*start))
        return dataclasses.replace(p, structured_outputs=placed)

    @staticmethod
    def _params_for(sampling_params, count: int) -> list[SamplingParams]:
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * count
        if len(params) != count:
            raise ValueError(f"{len(params)} sampling params for {count} prompts")
        return [p or SamplingParams() for p in params]

    def _plain_stream(self, p: SamplingParams) -> ReplyStream:
        return ReplyStream.for_params(self.tokenizer, p)

    def _run(
        self, runs: list[tuple[str | list[int], SamplingParams, StreamFactory | None]], use_tqdm: bool, chat=False
    ) -> list[RequestOutput]:
        if self.tokenizer is None and any(isinstance(prompt, str) or p.stop for prompt, p, _ in runs):
            raise ValueError("text prompts and stop strings need a tokenizer (pass token ids, or give LLM one)")
        order, texts, streams = [], {}, {}
        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(runs), desc="generating", unit="req", disable=not use_tqdm)
        try:
            for prompt, p, factory in runs:
                text, ids = (prompt, self.tokenizer.encode(prompt)) if isinstance(prompt, str) else (None, prompt)
                request_id = f"gen-{next(self._ids)}"
                # only the final outputs are returned: followed by reply streams, each step's new tokens are all
                # that is read (DELTA); otherwise only the last output is (FINAL_ONLY)
                kind = RequestOutputKind.DELTA if factory is not None else RequestOutputKind.FINAL_ONLY
                self.engine.add_request(request_id, ids, dataclasses.replace(p, output_kind=kind))
                order.append(request_id)
                texts[request_id] = text
                if factory is not None:
                    for i in range(p.n):
                        streams[request_id, i] = factory(p)
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if streams:
                        out = self._follow(out, streams) or out
                    if out.finished:
                        done[out.request_id] = out
                        bar.update(1)
        finally:  # an error (a refused prompt, an interrupt) leaves nothing of this call in the engine
            bar.close()
            for request_id in order:
                if request_id not in done:
                    self.engine.abort_request(request_id)
        results = [done[r] for r in order]
        for out in results:
            out.prompt = texts[out.request_id]
            for sample in out.outputs if streams else ():
                self._fill(sample, streams[out.request_id, sample.index], chat)
        return results

    def _follow(self, out: RequestOutput, streams: dict) -> RequestOutput | None:
        """Feed the step's tokens to the samples' reply streams; a stop string ends its sample in the engine.
        Returns the request's final output when that ended the request."""
        final = None
        for sample in out.outputs:
            stream = streams[out.request_id, sample.index]
            if stream.done:
                continue
            stream.feed(sample.new_token_ids, sample.new_logprobs)
            if stream.done:
                final = self.engine.finish_sequence(out.request_id, sample.index, stream.stop_reason) or final
            elif sample.finish_reason is not None:
                stream.finish(sample.finish_reason, sample.stop_reason)
        return final

    @staticmethod
    def _fill(sample, stream: ReplyStream, chat: bool) -> None:
        sample.text = stream.text
        sample.token_ids = list(stream.token_ids)
        sample.finish_reason, sample.stop_reason = stream.finish_reason, stream.stop_reason
        if sample.logprobs is not None:
            sample.logprobs = list(stream.logprobs)
        sample.new_token_ids, sample.new_logprobs = [], None
        if chat:
            sample.message = stream.message()
