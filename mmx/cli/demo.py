"""``mmx demo``: mmx-tiny solves arithmetic word problems through the whole stack.

The embedded model (or MODEL) is loaded into the engine; each problem is rendered with the model's chat template,
generated, split into reasoning and content, its tool call parsed, the calculator run, the result fed back, and the
final answer generated. Then the same problems are solved without the tool, the model doing the arithmetic in its
reasoning. Every answer comes from the model; the demo only checks it against the ground truth.
"""

from __future__ import annotations

import argparse
import textwrap
import time
from typing import TYPE_CHECKING

from mmx.cli.common import resolve_model
from mmx.tasks.arithmetic import make_problems

if TYPE_CHECKING:
    from mmx.tasks.episodes import Episode


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="mmx-tiny solves arithmetic word problems, with and without a calculator tool")
    p.add_argument("model", nargs="?", default=None, help="checkpoint directory (default: the embedded mmx-tiny)")
    p.add_argument("--problems", type=int, default=3, help="how many problems to solve")
    p.add_argument("--seed", type=int, default=2026, help="which problems (generated from this seed)")
    p.add_argument("--max-tokens", type=int, default=192, help="tokens per model turn")


def _indent(label: str, text: str) -> str:
    body = textwrap.indent(text.strip(), " " * 14).lstrip()
    return f"    {label:<10}{body}"


def _right(episode: Episode) -> bool:
    """The demo's verdict: the number and the counted item both right."""
    return episode.metadata["correct"] and episode.metadata["item_right"]


def show(episode: Episode) -> None:
    from mmx.tasks.episodes import describe_call

    for turn in episode.turns:
        if turn.reasoning:
            print(_indent("thinking", turn.reasoning))
        for call, result in zip(turn.calls, turn.results):
            print(_indent("tool call", f"{describe_call(call)} -> {result}"))
        if not turn.calls:
            print(_indent("answer", turn.content or "(none)"))
    problem, graded = episode.metadata["problem"], episode.metadata
    wrong = [] if graded["correct"] else [f"the number (expected {problem.answer})"]
    wrong += [] if graded["item_right"] else [f"the item (expected {problem.item})"]
    verdict = "correct" if not wrong else "wrong: " + ", ".join(wrong)
    print(f"    {'':<10}[{verdict}]")


def run(args: argparse.Namespace) -> int:
    from mmx.engine import SamplingParams
    from mmx.llm import LLM
    from mmx.tasks.solve import solve_problems

    path = resolve_model(args.model)
    started = time.perf_counter()
    llm = LLM(path, max_model_len=2048, max_num_seqs=max(8, args.problems))
    if llm.engine.decode_graph is not None:  # before the timed part: compiled once, cached for later runs
        print("building the compiled decode step (cached for later runs)...", flush=True)
        llm.engine.warm_up()
    config = llm.engine.model.config
    counts = llm.engine.model.parameter_counts()
    pattern = "".join("S" if not config.is_lightning(i) else "L" for i in range(config.num_hidden_layers))
    print(
        f"model: {path}\n  {counts['total'] / 1e6:.1f}M parameters ({counts['active'] / 1e6:.1f}M active), layers "
        f"{pattern} (L lightning, S softmax), MoE {config.num_local_experts} experts top-"
        f"{config.num_experts_per_tok}; loaded in {time.perf_counter() - started:.1f} s\n"
    )
    problems = make_problems(args.seed, args.problems)
    sampling = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    results = {}
    for use_tool in (True, False):
        episodes, stats = solve_problems(llm, problems, use_tool, sampling)
        results[use_tool] = (episodes, stats)
    for i, problem in enumerate(problems):
        print(f"problem {i + 1}: {problem.question}")
        for use_tool, heading in ((True, "with the calculator tool"), (False, "without tools")):
            print(f"  {heading}:")
            show(results[use_tool][0][i])
        print()
    tokens = sum(stats["generated_tokens"] for _, stats in results.values())
    seconds = sum(stats["seconds"] for _, stats in results.values())
    solved = {use: sum(_right(e) for e in eps) for use, (eps, _) in results.items()}
    print(
        f"solved {solved[True]}/{len(problems)} with the tool and {solved[False]}/{len(problems)} without; "
        f"{tokens} tokens generated in {seconds:.2f} s ({tokens / max(seconds, 1e-9):.0f} tokens/s, "
        f"{len(problems)} problems batched)"
    )
    return 0
