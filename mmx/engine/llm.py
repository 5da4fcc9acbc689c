"""Offline generation in the style of vLLM: ``LLM(model).generate(prompts, SamplingParams(...))``."""

from __future__ import annotations

import itertools
from typing import Any

from tqdm.auto import tqdm

from mmx.engine.llm_engine import LLMEngine
from mmx.engine.outputs import RequestOutput
from mmx.engine.sampling_params import SamplingParams
from mmx.model.modeling import MiniMaxForCausalLM


class LLM:
    """``model`` is a checkpoint directory (or a loaded :class:`MiniMaxForCausalLM`, with ``tokenizer``);
    keyword arguments are :class:`EngineArgs` (max_model_len, max_num_seqs, dtype, device, ...)."""

    def __init__(self, model: str | MiniMaxForCausalLM, tokenizer=None, **engine_args: Any):
        if isinstance(model, MiniMaxForCausalLM):
            self.engine = LLMEngine(model, tokenizer, **engine_args)
        else:
            self.engine = LLMEngine.from_pretrained(model, **engine_args)
            if tokenizer is not None:
                self.engine.tokenizer = tokenizer
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: str | list[int] | list[str] | list[list[int]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text, or token ids) and return the outputs in prompt order."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
        order = []
        for prompt, p in zip(prompts, params):
            request_id = f"gen-{next(self._ids)}"
            self.engine.add_request(request_id, prompt, p or SamplingParams())
            order.append(request_id)
        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(order), desc="generating", unit="req", disable=not use_tqdm)
        try:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        done[out.request_id] = out
                        bar.update(1)
        finally:
            bar.close()
            for request_id in order:
                if request_id not in done:
                    self.engine.abort_request(request_id)
        return [done[r] for r in order]

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | None = None,
        tools: list[dict[str, Any]] | None = None,
        chat_template: str | None = None,
        use_tqdm: bool = True,
        **template_kwargs: Any,
    ) -> list[RequestOutput]:
        """Render conversations with the chat template and generate a reply to each."""
        if self.tokenizer is None:
            raise ValueError("chat needs a tokenizer")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [
            self.tokenizer.apply_chat_template(c, tools=tools, chat_template=chat_template, **template_kwargs)
            for c in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)
