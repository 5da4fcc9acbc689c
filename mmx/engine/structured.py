"""Structured outputs: a grammar (JSON schema, regex, choice, Lark / GBNF) held as a token mask while decoding.

The grammar engine is llguidance. Why it and not xgrammar: it is a Rust wheel with no Python dependencies, so it
cannot pull in another torch (xgrammar depends on torch and its builds follow torch versions; mmx pins torch
2.13.0); it reads a byte-level BPE straight from ``tokenizer.json``; it compiles JSON schemas, regexes and Lark
grammars and lets a Lark grammar embed JSON-schema values (``%json {...}``), which is what M2's XML tool calls with
JSON-typed parameters need; and it computes each mask lazily from the parser state (no vocabulary-sized
precomputation per grammar), a few microseconds to a millisecond per token.

How a constraint runs (one :class:`SequenceConstraint` per sequence):

* The request's :class:`StructuredOutputsParams` compile once into an ``LLMatcher`` (cached by grammar text in
  :class:`GrammarCompiler`); each sequence starts from a copy of it.
* Before sampling, every constrained row of the batch gets its mask in one parallel call (:func:`allowed_tokens`);
  the sampler sets the logits of disallowed tokens to -inf. Unconstrained rows are not touched. Reported
  log-probabilities stay those of the model's raw distribution, as for every other sampling adjustment.
* After sampling, the engine feeds the token to the matcher (:meth:`SequenceConstraint.advance`). Once the grammar
  is complete, only EOS is allowed, so the sample ends with finish_reason "stop".
* With a reasoning model (:class:`ReasoningGate`) the reply is free until the model closes its reasoning (only EOS
  is held back: the reply may not end before its answer); the grammar then starts, after at most two layout
  newlines (the chat templates put ``\\n\\n`` after ``</think>``).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

KINDS = ("json", "regex", "choice", "grammar", "json_object")
ANY_JSON_OBJECT = {"type": "object"}
# JSON whitespace between tokens, unless a request says otherwise: one space, or a line break and an indent of up to
# 20 (pretty-printing). Bounded, because a model left free to write whitespace can loop on it to max_tokens (mmx-tiny
# does at once); llguidance's default, any run of whitespace, does not end.
JSON_WHITESPACE = "( |\\r?\\n[ \\t]{0,20})?"
# what may sit between the end of the reasoning and the constrained answer: the template's layout newlines
_AFTER_REASONING = "start: LAYOUT? @body\nLAYOUT: /\\n\\n?/\n"


@dataclass(frozen=True)
class ReasoningGate:
    """Where the constraint of a reasoning model's reply starts: after ``close_id`` (``</think>``). ``opened``: the
    prompt already opened the reasoning (M2 pre-fills ``<think>``), so the reply is free until it closes it.
    Otherwise the model may open it itself (M1): its first token may be ``open_id``, else the grammar starts at
    once."""

    open_id: int
    close_id: int
    opened: bool


@dataclass
class StructuredOutputsParams:
    """One constraint on a reply, as vLLM's ``structured_outputs`` names them; exactly one of ``json`` (a JSON
    schema, as a dict or JSON text), ``regex`` (the whole reply matches it), ``choice`` (the reply is one of these
    strings), ``grammar`` (llguidance's Lark dialect, or GBNF) and ``json_object`` (any JSON object).

    ``disable_any_whitespace`` makes JSON compact; ``whitespace_pattern`` sets the regex of JSON whitespace.
    ``reasoning`` is filled in by whoever knows the chat format (see :class:`ReasoningGate`)."""

    json: dict[str, Any] | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool = False
    disable_any_whitespace: bool = False
    whitespace_pattern: str | None = None
    reasoning: ReasoningGate | None = None

    def __post_init__(self) -> None:
        given = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError(
                f"structured outputs take exactly one of {', '.join(KINDS)}; got {', '.join(given) or 'none'}"
            )
        if isinstance(self.json, str):
            try:
                self.json = json.loads(self.json)
            except ValueError as e:
                raise ValueError(f"json: the schema is not valid JSON ({e})") from None
        if self.json is not None and not isinstance(self.json, dict | bool):
            raise ValueError("json: a JSON schema must be an object")
        if self.choice is not None and (
            not isinstance(self.choice, list) or not self.choice or not all(isinstance(c, str) for c in self.choice)
        ):
            raise ValueError("choice: must be a non-empty list of strings")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{name}: must be a non-empty string")
        if self.regex is not None and ends_in_lone_backslash(self.regex):
            raise ValueError("regex: ends in a lone backslash")  # llguidance would drop it, changing the regex

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    def _json_options(self) -> dict[str, Any]:
        if self.disable_any_whitespace:
            return {"whitespace_flexible": False}
        return {"whitespace_pattern": self.whitespace_pattern or JSON_WHITESPACE}

    def _body(self) -> dict[str, Any]:
        """The constrained text as one llguidance grammar (its JSON form)."""
        import llguidance

        kind = self.kind
        if kind in ("json", "json_object"):
            schema = self.json if kind == "json" else ANY_JSON_OBJECT
            if schema is True:
                schema = {}
            return {"json_schema": with_json_options(schema, self._json_options())}
        if kind == "regex":
            return {"lark_grammar": "start: /" + llguidance.regex_to_lark(self.regex) + "/"}
        if kind == "choice":
            return {"lark_grammar": "start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in self.choice)}
        from llguidance.gbnf_to_lark import any_to_lark

        try:
            return {"lark_grammar": any_to_lark(self.grammar)}
        except Exception as e:  # the GBNF converter's errors: the grammar is neither Lark nor readable GBNF
            raise ValueError(f"grammar: neither a Lark grammar nor GBNF that can be read: {e}") from None

    def grammar_text(self) -> str:
        """The llguidance grammar (TopLevelGrammar JSON) to compile: the body, after the reasoning's layout when
        the reply may reason first."""
        body = self._body()
        if self.reasoning is None:
            return json.dumps({"grammars": [body]}, ensure_ascii=False)
        grammars = [{"lark_grammar": _AFTER_REASONING}, {**body, "name": "body"}]
        return json.dumps({"grammars": grammars}, ensure_ascii=False)

    def check(self) -> None:
        """Raise ValueError (naming the kind) when the grammar cannot be compiled; needs no tokenizer."""
        import llguidance

        try:
            text = self.grammar_text()
        except (TypeError, ValueError) as e:
            raise ValueError(str(e) if str(e).startswith(self.kind) else f"{self.kind}: {e}") from None
        error = llguidance.LLMatcher.validate_grammar(text)
        if error and not error.startswith("WARNING"):
            raise ValueError(f"{self.kind}: {_first_lines(error)}")


def ends_in_lone_backslash(regex: str) -> bool:
    return (len(regex) - len(regex.rstrip("\\"))) % 2 == 1


def with_json_options(schema: Any, options: dict[str, Any]) -> Any:
    """``schema`` with llguidance compile options (its ``x-guidance`` key) that the schema does not set itself."""
    if not isinstance(schema, dict):
        return schema
    return {**schema, "x-guidance": {**options, **(schema.get("x-guidance") or {})}}


def _first_lines(message: str, n: int = 4) -> str:
    return "\n".join(message.strip().splitlines()[:n])


class CompiledGrammar:
    """A grammar compiled against the tokenizer; :meth:`start` gives each sequence its own state."""

    def __init__(self, matcher: Any, reasoning: ReasoningGate | None, eos_token_ids: tuple[int, ...]):
        self._matcher = matcher
        self.reasoning = reasoning
        self.eos_token_ids = eos_token_ids

    def start(self) -> SequenceConstraint:
        return SequenceConstraint(self._matcher.deep_copy(), self.reasoning, self.eos_token_ids)


class GrammarCompiler:
    """Compiles :class:`StructuredOutputsParams` for one tokenizer (``tokenizer.json`` text) and a model vocabulary
    of ``vocab_size`` ids (padding ids past the tokenizer's are never allowed). Compiled grammars are cached by
    their text, so a schema sent with every request is compiled once. Thread-safe: the server validates requests
    on its event loop while the engine thread starts them."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: Sequence[int], cache_size: int = 128):
        import llguidance

        if not eos_token_ids:
            raise ValueError("structured outputs need an EOS token: the grammar's end allows only EOS")
        self.eos_token_ids = tuple(eos_token_ids)
        self.tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=list(eos_token_ids))
        if self.tokenizer.vocab_size != vocab_size:
            raise ValueError(
                f"the tokenizer has {self.tokenizer.vocab_size} tokens, more than the model's {vocab_size} logits"
            )
        self.cache_size = cache_size
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, spec: StructuredOutputsParams) -> CompiledGrammar:
        """The compiled grammar of ``spec``; ValueError naming the constraint's kind when it cannot compile."""
        import llguidance

        try:
            text = spec.grammar_text()
        except (TypeError, ValueError) as e:
            raise ValueError(str(e) if str(e).startswith(spec.kind) else f"{spec.kind}: {e}") from None
        with self._lock:
            matcher = self._cache.get(text)
            if matcher is not None:
                self._cache.move_to_end(text)
        if matcher is None:
            matcher = llguidance.LLMatcher(self.tokenizer, text, log_level=0)
            if matcher.is_error():
                raise ValueError(f"{spec.kind}: {_first_lines(matcher.get_error())}")
            with self._lock:
                self._cache[text] = matcher
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return CompiledGrammar(matcher, spec.reasoning, self.eos_token_ids)


class SequenceConstraint:
    """One sequence's place in its grammar. Phases: "reasoning" (free until the reasoning closes), "may_reason"
    (first token: the grammar's tokens or the reasoning's opening), "grammar" (masked by the matcher)."""

    def __init__(self, matcher: Any, reasoning: ReasoningGate | None, eos_token_ids: tuple[int, ...]):
        self.matcher = matcher
        self.reasoning = reasoning
        self.eos_token_ids = eos_token_ids
        if reasoning is None:
            self.phase = "grammar"
        else:
            self.phase = "reasoning" if reasoning.opened else "may_reason"

    @property
    def error(self) -> str:
        return self.matcher.get_error()

    def advance(self, token: int) -> bool:
        """Take the sampled token; False when the grammar cannot (the matcher is then in an error state)."""
        if self.phase == "reasoning":
            if token == self.reasoning.close_id:
                self.phase = "grammar"
            return True
        if self.phase == "may_reason":
            if token == self.reasoning.open_id:
                self.phase = "reasoning"
                return True
            self.phase = "grammar"
        return self.matcher.consume_token(token)


_executor: Any = None


def _parallel_executor() -> Any:
    global _executor
    if _executor is None:
        import llguidance

        _executor = llguidance.LLExecutor()
    return _executor


def allowed_tokens(constraints: list[SequenceConstraint], vocab_size: int) -> torch.Tensor:
    """[len(constraints), vocab_size] bool: the tokens each constraint allows next, the grammar's masks computed in
    one parallel call. While a reply reasons, anything but EOS (it may not end before its constrained answer). A row
    the grammar leaves empty (a matcher in an error state) allows EOS, so it ends."""
    allowed = torch.ones((len(constraints), vocab_size), dtype=torch.bool)
    rows = [i for i, c in enumerate(constraints) if c.phase != "reasoning"]
    if rows:
        words = (vocab_size + 31) // 32
        bits = torch.zeros((len(rows), words), dtype=torch.int32)
        _parallel_executor().unsafe_compute_mask_ptr(
            [(constraints[i].matcher, k) for k, i in enumerate(rows)], bits.data_ptr(), words * 4, len(rows)
        )
        # bit j of 32-bit word w is token 32 w + j
        shifts = torch.arange(32, dtype=torch.int32)
        unpacked = ((bits.unsqueeze(-1) >> shifts) & 1).bool().reshape(len(rows), -1)
        allowed[rows] = unpacked[:, :vocab_size]
    for i, c in enumerate(constraints):
        eos = [t for t in c.eos_token_ids if t < vocab_size]
        if c.phase == "reasoning":
            allowed[i, eos] = False
            continue
        if c.phase == "may_reason" and c.reasoning.open_id < vocab_size:
            allowed[i, c.reasoning.open_id] = True
        if not allowed[i].any():
            allowed[i, eos] = True
    return allowed
