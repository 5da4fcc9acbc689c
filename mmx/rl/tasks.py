"""RL tasks: where prompts come from, which tools the model may call, and how an episode is scored.

* ``arithmetic``: generated word problems like those mmx-tiny was trained on, 5 steps long by default (one more than
  it saw), fresh ones every step and never the held-out ones, with or without the calculator tool; reward 1 for the
  right number.
* a ``.jsonl`` file: one prompt per line, ``{"prompt": str}`` or ``{"messages": [...]}``, with ``"answer"`` (math,
  checked for equivalence) or ``"tests"`` (Python asserts the response's code must pass in the sandbox), or any
  fields a custom reward function reads.
"""

from __future__ import annotations

import json
import random
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from mmx.rl.rewards import RewardFunction, code_reward, load_reward_function, math_reward, tool_use_success
from mmx.tasks import arithmetic
from mmx.tasks.episodes import Episode, ToolFunction
from mmx.tasks.solve import TOOLS, grade, problem_episode


@dataclass
class Score:
    reward: float
    correct: bool


class Task(ABC):
    tools: dict[str, ToolFunction]  # the functions behind the tools the episodes declare

    @abstractmethod
    def sample(self, rng: random.Random, count: int) -> list[Episode]:
        """``count`` fresh training prompts."""

    @abstractmethod
    def eval_episodes(self, count: int) -> list[Episode]:
        """The first ``count`` held-out prompts (the same every call)."""

    @abstractmethod
    def score(self, episode: Episode) -> Score:
        """Reward and correctness of a finished episode."""


class ArithmeticTask(Task):
    # 5-step problems by default: mmx-tiny was trained on 2-4 steps and solves those (99.8% with the tool), so RL
    # out of the box would see equal rewards in every group; on 5 steps it starts near 0.2 and has room to learn.
    def __init__(self, use_tools: bool = True, min_steps: int = 5, max_steps: int = 5, eval_seed: int = 1000):
        self.use_tools = use_tools
        self.kwargs = {"min_steps": min_steps, "max_steps": max_steps}
        self.eval_seed = eval_seed
        self.tools = TOOLS if use_tools else {}
        self._held_out: set[str] = set()

    def eval_episodes(self, count: int) -> list[Episode]:
        problems = arithmetic.make_problems(self.eval_seed, count, **self.kwargs)
        self._held_out |= {p.question for p in problems}
        return [problem_episode(p, self.use_tools) for p in problems]

    def sample(self, rng: random.Random, count: int) -> list[Episode]:
        if not self._held_out:
            self.eval_episodes(500)  # the held-out set is fixed: never train on it
        out = []
        while len(out) < count:
            problem = arithmetic.make_problem(rng, **self.kwargs)
            if problem.question not in self._held_out:
                out.append(problem_episode(problem, self.use_tools))
        return out

    def score(self, episode: Episode) -> Score:
        grade(episode)
        correct = bool(episode.metadata["correct"])
        if self.use_tools:
            episode.metadata["tool_success"] = tool_use_success(episode, "calculator", correct)
        return Score(float(correct), correct)


class JsonlTask(Task):
    def __init__(self, path: str, eval_path: str | None = None, reward: str | None = None):
        self.records = self._read(path)
        self.eval_records = self._read(eval_path) if eval_path else self.records[: min(200, len(self.records))]
        self.reward_fn: RewardFunction | None = load_reward_function(reward) if reward else None
        self.tools = {}

    @staticmethod
    def _read(path: str) -> list[dict[str, Any]]:
        records = []
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                record = json.loads(line)
                if "prompt" not in record and "messages" not in record:
                    raise ValueError(f"{path}:{number}: a task record needs 'prompt' or 'messages'")
                records.append(record)
        if not records:
            raise ValueError(f"{path}: no task records")
        return records

    @staticmethod
    def _episode(record: dict[str, Any]) -> Episode:
        messages = record.get("messages") or [{"role": "user", "content": record["prompt"]}]
        return Episode([dict(m) for m in messages], record.get("tools"), metadata={"record": record})

    def sample(self, rng: random.Random, count: int) -> list[Episode]:
        return [self._episode(rng.choice(self.records)) for _ in range(count)]

    def eval_episodes(self, count: int) -> list[Episode]:
        return [self._episode(r) for r in self.eval_records[:count]]

    def score(self, episode: Episode) -> Score:
        record = episode.metadata["record"]
        if self.reward_fn is not None:
            value = self.reward_fn(episode, record)
            reward, correct = value if isinstance(value, tuple) else (float(value), float(value) > 0)
        elif "tests" in record:
            reward, correct = code_reward(episode, record)
        elif "answer" in record:
            reward, correct = math_reward(episode, record)
        else:
            raise ValueError("a task record needs 'answer' or 'tests' unless a custom reward function is given")
        episode.metadata["correct"] = correct
        return Score(float(reward), bool(correct))


def build_task(name: str, options: dict[str, Any], reward: str | None = None) -> Task:
    if name == "arithmetic":
        return ArithmeticTask(**options)
    if name.endswith(".jsonl"):
        return JsonlTask(name, reward=reward, **options)
    raise ValueError(f"rl config key 'task': {name!r} is not 'arithmetic' or a .jsonl file")
