"""What the engine hands back, shaped like vLLM's outputs."""

from __future__ import annotations

from dataclasses import dataclass, field

from mmx.engine.sequence import TokenLogprob


@dataclass
class CompletionOutput:
    """One of a request's n samples, so far (``finish_reason`` is None until it ends). The engine fills the token
    fields; ``text`` (and ``message`` for chat) come from the output side, :class:`mmx.LLM`."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "repetition" | "abort" | "error"
    stop_reason: str | int | None = None  # the stop string or stop token that ended it
    logprobs: list[TokenLogprob] | None = None
    new_token_ids: list[int] = field(default_factory=list)  # generated since the previous output
    new_logprobs: list[TokenLogprob] | None = None
    message: dict | None = None  # a chat reply parsed: reasoning_content, content, tool_calls


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    # with SamplingParams.prompt_logprobs: one entry per prompt token (None for the first), on every output from
    # the one where the prompt's prefill completed
    prompt_logprobs: list[TokenLogprob | None] | None = None
    error: str | None = None  # why the engine failed this request (it alone; the rest of the batch goes on)
    num_cached_tokens: int = 0  # prompt tokens whose cache was reused from earlier requests (prefix caching)

    # the first sample, for the common n = 1 case
    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason
