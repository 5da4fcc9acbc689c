"""Sampling parameters of one request, as vLLM users know them."""

from __future__ import annotations

from dataclasses import dataclass, field

GREEDY_TEMPERATURE = 1e-5  # temperatures below this mean greedy decoding


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
    skip_special_tokens: bool = True
    # MiniMax-M1's early truncation for RL: stop once this many consecutive tokens were each sampled with probability
    # above confident_probability (a repetition loop); the output ends with finish_reason "repetition".
    stop_after_confident_tokens: int | None = None
    confident_probability: float = 0.99

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self._check("n", self.n >= 1, "must be at least 1")
        self._check("temperature", self.temperature >= 0, "must be >= 0")
        self._check("top_p", 0 < self.top_p <= 1, "must be in (0, 1]")
        self._check("top_k", isinstance(self.top_k, int) and self.top_k >= -1, "must be -1, 0 (off) or positive")
        self._check("min_p", 0 <= self.min_p <= 1, "must be in [0, 1]")
        self._check("presence_penalty", -2 <= self.presence_penalty <= 2, "must be in [-2, 2]")
        self._check("frequency_penalty", -2 <= self.frequency_penalty <= 2, "must be in [-2, 2]")
        self._check("repetition_penalty", self.repetition_penalty > 0, "must be > 0")
        self._check("max_tokens", self.max_tokens is None or self.max_tokens >= 1, "must be at least 1")
        self._check("min_tokens", self.min_tokens >= 0, "must be >= 0")
        self._check(
            "min_tokens", self.max_tokens is None or self.min_tokens <= self.max_tokens, "must not exceed max_tokens"
        )
        self._check("logprobs", self.logprobs is None or 0 <= self.logprobs <= 20, "must be in [0, 20]")
        self._check(
            "stop_after_confident_tokens",
            self.stop_after_confident_tokens is None or self.stop_after_confident_tokens >= 1,
            "must be at least 1",
        )
        self._check("confident_probability", 0 < self.confident_probability < 1, "must be in (0, 1)")
        if self.stop_after_confident_tokens is not None and self.logprobs is None:
            self.logprobs = 0  # the rule reads each sampled token's probability
        self._check("stop", all(isinstance(s, str) and s for s in self.stop), "must be non-empty strings")
        self._check("stop_token_ids", all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "bad id")

    def _check(self, name: str, ok: bool, message: str) -> None:
        if not ok:
            raise ValueError(f"SamplingParams.{name} {message}; got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def needs_token_counts(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1
