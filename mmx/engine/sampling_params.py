"""Sampling parameters of one request, as vLLM users know them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import IntEnum

from mmx.engine.structured import StructuredOutputsParams

GREEDY_TEMPERATURE = 1e-5  # temperatures below this mean greedy decoding
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 100.0
MAX_SEED = 2**63 - 2**16  # each sample seeds its own generator with seed + index, which must fit in 64 bits


class RequestOutputKind(IntEnum):
    """What each of a request's outputs carries (vLLM's names and values)."""

    CUMULATIVE = 0  # everything so far, after every step (``new_token_ids``: what the step added)
    DELTA = 1  # only what is new since the previous output: ``token_ids`` and ``logprobs`` as ``new_*``
    FINAL_ONLY = 2  # one output, when the request finishes, with everything


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop.

    temperature 0 is greedy; top_k <= 0 and top_p = 1 and min_p = 0 switch those filters off. Penalties follow
    OpenAI (presence / frequency, on generated tokens) and CTRL / transformers (repetition, on prompt and generated
    tokens). ``seed`` makes a request's samples independent of whatever else is in the batch. ``logprobs`` asks for
    the log-probability of each chosen token plus that many top alternatives (0: the chosen token only); they are
    computed from the model's raw distribution, before temperature and filters."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None
    # vLLM's prompt_logprobs: each prompt token's log-probability (None for the first, which nothing predicts)
    # plus that many top alternatives, read from the prefill's logits
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    # MiniMax-M1's early truncation for RL: stop once this many consecutive tokens were each sampled with probability
    # above confident_probability (a repetition loop); the output ends with finish_reason "repetition".
    stop_after_confident_tokens: int | None = None
    confident_probability: float = 0.99
    # a reasoning budget (Anthropic's thinking.budget_tokens): once this many tokens were generated without
    # think_close_id, the engine forces reasoning_end_ids (the closing tag) and the answer follows
    reasoning_budget: int | None = None
    think_close_id: int | None = None
    reasoning_end_ids: list[int] = field(default_factory=list)
    # OpenAI's logit_bias: token id -> value in [-100, 100] added to its logit (-100 bans the token)
    logit_bias: dict[int, float] | None = None
    # a grammar the reply must follow (JSON schema, regex, choice, Lark / GBNF); see mmx.engine.structured
    structured_outputs: StructuredOutputsParams | None = None
    # DELTA and FINAL_ONLY spare the engine copying a long sample's tokens and log-probs into every output
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self._check("n", self.n >= 1, "must be at least 1")
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
            self._check(name, isinstance(getattr(self, name), (int, float)), "must be a number")
            self._check(name, math.isfinite(getattr(self, name)), "must be finite")
        self._check("temperature", self.temperature >= 0, "must be >= 0")
        self._check("top_p", 0 < self.top_p <= 1, "must be in (0, 1]")
        self._check("top_k", isinstance(self.top_k, int) and self.top_k >= -1, "must be -1, 0 (off) or positive")
        self._check("min_p", 0 <= self.min_p <= 1, "must be in [0, 1]")
        self._check("presence_penalty", -2 <= self.presence_penalty <= 2, "must be in [-2, 2]")
        self._check("frequency_penalty", -2 <= self.frequency_penalty <= 2, "must be in [-2, 2]")
        # bounded so that dividing or multiplying real logits by it cannot overflow to inf (and then NaN)
        self._check(
            "repetition_penalty",
            MIN_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY,
            f"must be in [{MIN_REPETITION_PENALTY}, {MAX_REPETITION_PENALTY}]",
        )
        self._check(
            "seed",
            self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed < MAX_SEED),
            "must be an integer in [0, 2**63 - 2**16)",
        )
        # 0: prefill only, nothing generated (scoring a prompt with prompt_logprobs)
        self._check("max_tokens", self.max_tokens is None or self.max_tokens >= 0, "must be >= 0")
        self._check("min_tokens", self.min_tokens >= 0, "must be >= 0")
        self._check(
            "min_tokens", self.max_tokens is None or self.min_tokens <= self.max_tokens, "must not exceed max_tokens"
        )
        self._check("logprobs", self.logprobs is None or 0 <= self.logprobs <= 20, "must be in [0, 20]")
        self._check(
            "prompt_logprobs", self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20, "must be in [0, 20]"
        )
        self._check(
            "stop_after_confident_tokens",
            self.stop_after_confident_tokens is None or self.stop_after_confident_tokens >= 1,
            "must be at least 1",
        )
        self._check("confident_probability", 0 < self.confident_probability < 1, "must be in (0, 1)")
        if self.stop_after_confident_tokens is not None and self.logprobs is None:
            self.logprobs = 0  # the rule reads each sampled token's probability
        self._check(
            "reasoning_budget",
            self.reasoning_budget is None
            or (self.reasoning_budget >= 1 and self.think_close_id is not None and bool(self.reasoning_end_ids)),
            "must be at least 1, with think_close_id and reasoning_end_ids",
        )
        self._check("stop", all(isinstance(s, str) and s for s in self.stop), "must be non-empty strings")
        self._check("stop_token_ids", all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "bad id")
        self.check_constraints()

    def check_constraints(self) -> None:
        """logit_bias and structured_outputs (also run by the engine on every request, for fields set later)."""
        bias = self.logit_bias or {}
        self._check(
            "logit_bias",
            isinstance(bias, dict) and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in bias),
            "must map token ids (ints >= 0) to values",
        )
        self._check(
            "logit_bias",
            all(isinstance(v, int | float) and math.isfinite(v) and -100 <= v <= 100 for v in bias.values()),
            "values must be numbers in [-100, 100]",
        )
        self._check(
            "structured_outputs",
            self.structured_outputs is None or isinstance(self.structured_outputs, StructuredOutputsParams),
            "must be a StructuredOutputsParams",
        )
        self._check(
            "output_kind",
            not isinstance(self.output_kind, bool) and self.output_kind in tuple(RequestOutputKind),
            "must be a RequestOutputKind (0, 1 or 2)",
        )
        self.output_kind = RequestOutputKind(self.output_kind)
        # a finished grammar allows only EOS: with ignore_eos the sample could never end
        self._check(
            "ignore_eos",
            not (self.ignore_eos and self.structured_outputs is not None),
            "cannot be used with structured_outputs",
        )

    def _check(self, name: str, ok: bool, message: str) -> None:
        if not ok:
            raise ValueError(f"SamplingParams.{name} {message}; got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def needs_token_counts(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1
