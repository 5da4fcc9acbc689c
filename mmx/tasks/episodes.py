"""Multi-turn tool-use episodes run in-process on an :class:`~mmx.LLM`: ``LLM.chat`` renders each conversation
and parses each reply (reasoning, content, tool calls); the tools run and their results go back, until the model
answers without calling a tool. Many episodes advance together, one batched generate call
per round, so the engine sees them as concurrent requests."""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mmx.engine import SamplingParams
from mmx.llm import LLM

ToolFunction = Callable[[dict[str, Any]], str]


@dataclass
class Turn:
    prompt_ids: list[int]
    output_ids: list[int]
    text: str  # raw output (special tokens kept out)
    reasoning: str | None
    content: str
    calls: list[dict[str, Any]]
    results: list[str] = field(default_factory=list)
    logprobs: list[float] | None = None  # sampler log-probabilities of output_ids
    finish_reason: str | None = None


@dataclass
class Episode:
    messages: list[dict[str, Any]]  # the conversation so far, the model's turns and tool results included
    tools: list[dict[str, Any]] | None
    turns: list[Turn] = field(default_factory=list)
    done: bool = False
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def final_content(self) -> str:
        return self.turns[-1].content if self.turns else ""

    @property
    def generated_tokens(self) -> int:
        return sum(len(t.output_ids) for t in self.turns)


def run_tool(functions: dict[str, ToolFunction], call: dict[str, Any]) -> str:
    """A tool's result as text; unknown tools and failing tools become error text the model can read."""
    fn = functions.get(call["name"])
    if fn is None:
        return f"error: unknown tool {call['name']!r}"
    try:
        return str(fn(call["arguments"]))
    except Exception as e:  # a tool's failure is the model's information, not the loop's crash
        return f"error: {type(e).__name__}: {e}"


def _turn_params(sampling: SamplingParams, episode: Episode) -> SamplingParams:
    """An episode with a "seed" in its metadata samples from its own generator (one per turn), so its tokens do not
    depend on which other episodes share the batch."""
    seed = episode.metadata.get("seed")
    if seed is None:
        return sampling
    return dataclasses.replace(sampling, seed=(seed * 1009 + len(episode.turns)) % 2**62)


def run_episodes(
    llm: LLM,
    episodes: list[Episode],
    functions: dict[str, ToolFunction],
    sampling: SamplingParams,
    max_turns: int = 4,
    template: str | None = None,
) -> dict[str, float]:
    """Advance every episode until it answers or reaches ``max_turns`` model turns; returns timing figures."""
    started, generated = time.perf_counter(), 0
    for _ in range(max_turns):
        active = [e for e in episodes if not e.done]
        if not active:
            break
        outputs = llm.chat(
            [e.messages for e in active],
            [_turn_params(sampling, e) for e in active],
            tools=[e.tools for e in active],
            chat_template=template,
            use_tqdm=False,
        )
        for episode, out in zip(active, outputs):
            completion = out.outputs[0]
            generated += len(completion.token_ids)
            reply = completion.message
            calls = [
                {"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                for c in reply.get("tool_calls", [])
            ]
            turn = Turn(
                prompt_ids=list(out.prompt_token_ids),
                output_ids=list(completion.token_ids),
                text=completion.text,
                reasoning=reply["reasoning_content"],
                content=(reply["content"] or "").strip(),
                calls=calls,
                logprobs=[lp.logprob for lp in completion.logprobs] if completion.logprobs else None,
                finish_reason=completion.finish_reason,
            )
            episode.turns.append(turn)
            message: dict[str, Any] = {
                "role": "assistant",
                "content": turn.content,
                "reasoning_content": turn.reasoning or "",
            }
            if calls and completion.finish_reason == "stop":
                message["tool_calls"] = [
                    {"type": "function", "function": {"name": c["name"], "arguments": copy.deepcopy(c["arguments"])}}
                    for c in calls
                ]
                episode.messages.append(message)
                for call in calls:
                    result = run_tool(functions, call)
                    turn.results.append(result)
                    episode.messages.append({"role": "tool", "content": result})
            else:
                episode.messages.append(message)
                episode.done = True
    for e in episodes:
        e.done = True
    elapsed = time.perf_counter() - started
    return {"seconds": elapsed, "generated_tokens": generated, "tokens_per_s": generated / max(elapsed, 1e-9)}


def describe_call(call: dict[str, Any]) -> str:
    return f"{call['name']}({json.dumps(call['arguments'], ensure_ascii=False)})"
