"""Accuracy of mmx-tiny (or any checkpoint trained on the arithmetic task) on the held-out test problems, with and
without the calculator tool, greedy decoding through the engine and the full tool loop. The final answer is graded
three ways: its number, the item it names and the person it names must be the question's.

    python scripts/eval_mmx_tiny.py                        # the embedded model, 500 held-out problems
    python scripts/eval_mmx_tiny.py runs/mmx-tiny/export --problems 200 --json results.json

The test problems are those ``scripts/train_mmx_tiny.py`` held out (seed + 1000); none is in the training data.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from mmx.cli.common import resolve_model
from mmx.engine import SamplingParams
from mmx.llm import LLM
from mmx.tasks.arithmetic import make_problems
from mmx.tasks.solve import solve_problems

TEST_SEED_OFFSET = 1000  # as in scripts/train_mmx_tiny.py


def failure_kind(episode) -> str:
    if episode.metadata["correct"]:
        return "correct"
    calls = [c for t in episode.turns for c in t.calls]
    if episode.tools and not calls:
        return "no tool call"
    if episode.metadata["answer"] is None:
        return "no answer"
    if calls and any(r.startswith("error") for t in episode.turns for r in t.results):
        return "calculator error"
    return "wrong answer"


def share(episodes, *keys: str) -> float:
    """The fraction of episodes graded right on all of ``keys``."""
    return sum(all(e.metadata[k] for k in keys) for e in episodes) / len(episodes)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default=None)
    p.add_argument("--problems", type=int, default=500)
    p.add_argument("--seed", type=int, default=0, help="the training seed (test problems come from seed + 1000)")
    p.add_argument("--json", default=None, help="write the figures here")
    args = p.parse_args(argv)

    path = resolve_model(args.model)
    llm = LLM(path, max_model_len=2048, max_num_seqs=64)
    problems = make_problems(args.seed + TEST_SEED_OFFSET, args.problems)
    results = {}
    for use_tool in (True, False):
        started = time.perf_counter()
        episodes, stats = solve_problems(llm, problems, use_tool, SamplingParams(temperature=0.0, max_tokens=192))
        kinds = Counter(failure_kind(e) for e in episodes)
        by_steps = Counter()
        right = Counter()
        for e in episodes:
            n = len(e.metadata["problem"].steps)
            by_steps[n] += 1
            right[n] += e.metadata["correct"]
        label = "with tool" if use_tool else "without tool"
        results[label] = {
            "accuracy": stats["accuracy"],  # the number (the RL reward)
            "item_right": share(episodes, "item_right"),
            "name_right": share(episodes, "name_right"),
            "all_right": share(episodes, "correct", "item_right", "name_right"),
            "problems": len(problems),
            "outcomes": dict(kinds),
            "accuracy_by_steps": {n: right[n] / by_steps[n] for n in sorted(by_steps)},
            "generated_tokens": stats["generated_tokens"],
            "tokens_per_s": stats["tokens_per_s"],
            "seconds": time.perf_counter() - started,
        }
        r = results[label]
        print(
            f"{label}: number right {r['accuracy']:.1%}, item {r['item_right']:.1%}, name {r['name_right']:.1%}, "
            f"all three {r['all_right']:.1%} on {len(problems)} problems; {dict(kinds)}; "
            f"by steps {r['accuracy_by_steps']}; {stats['tokens_per_s']:.0f} tokens/s"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": os.path.relpath(path), **results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
