"""Solving arithmetic word problems with a model: the calculator-tool loop used by the demo, the evaluation
script and RL. The model does all the work (reasoning, tool call, answer); code only runs the calculator it asks
for and grades the final answer against the generated ground truth."""

from __future__ import annotations

from typing import Any

from mmx.engine import SamplingParams
from mmx.llm import LLM
from mmx.tasks.arithmetic import (
    CALCULATOR_TOOL,
    ITEMS,
    NAMES,
    SYSTEM_PROMPT,
    Problem,
    calculate,
    extract_answer,
    mentioned,
)
from mmx.tasks.episodes import Episode, run_episodes

TOOLS = {"calculator": lambda args: calculate(str(args.get("expression", "")))}


def problem_episode(problem: Problem, use_tool: bool, system: bool = True) -> Episode:
    messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM_PROMPT}] if system else []
    messages.append({"role": "user", "content": problem.question})
    return Episode(messages, [CALCULATOR_TOOL] if use_tool else None, metadata={"problem": problem})


def grade(episode: Episode) -> None:
    """``correct``: the final answer's number is right (the reward); ``item_right`` / ``name_right``: it names the
    counted item and the person of the question, and no other."""
    problem: Problem = episode.metadata["problem"]
    content = episode.final_content
    answer = extract_answer(content)
    episode.metadata.update(
        answer=answer,
        correct=answer == problem.answer,
        item_right=mentioned(content, ITEMS) == {problem.item},
        name_right=mentioned(content, NAMES) == {problem.name},
    )


def solve_problems(
    llm: LLM,
    problems: list[Problem],
    use_tool: bool,
    sampling: SamplingParams | None = None,
    system: bool = True,
) -> tuple[list[Episode], dict[str, float]]:
    """Greedy by default; returns the graded episodes and timing figures."""
    sampling = sampling or SamplingParams(temperature=0.0, max_tokens=192)
    episodes = [problem_episode(p, use_tool, system) for p in problems]
    stats = run_episodes(llm, episodes, TOOLS, sampling, max_turns=3)
    for e in episodes:
        grade(e)
    stats["accuracy"] = sum(e.metadata["correct"] for e in episodes) / max(1, len(episodes))
    stats["tool_calls"] = sum(len(t.calls) for e in episodes for t in e.turns)
    return episodes, stats
