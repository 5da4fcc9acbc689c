"""CISPO vs DAPO vs GRPO from mmx-tiny, several seeds each, the same budget; writes the plot and a summary.

    python scripts/rl_experiment.py --out runs/rl-experiment               # 3 losses x 3 seeds
    python scripts/rl_experiment.py --out runs/rl-experiment --report-only  # redraw from finished runs

Every run starts from the same checkpoint and sees the same number of rollouts (prompts x G responses per step) and
optimizer steps; only the objective differs (and DAPO's / CISPO's dynamic sampling and overlong penalty, which M1
says CISPO also used). Several minibatch updates per rollout batch make the updates off-policy, without which the
three objectives give the same gradient. Accuracy is greedy, on held-out problems, every ``--eval-every`` steps.

The default task is length generalisation with the calculator tool: mmx-tiny was trained on problems of 2-4 steps
and solves 5-step problems about half the time (it must write a longer expression than it ever saw), which leaves
room to learn. On its training distribution it is at 100% with the tool; without the tool its errors are
arithmetic slips that a 4.5M-parameter model does not fix in a few dozen RL steps (``--no-tools``; see docs/rl.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from mmx.rl.config import RLConfig
from mmx.rl.trainer import RLTrainer
from mmx.train.checkpoint import list_checkpoints
from mmx.train.metrics import MetricsLog, plot_panels

LOSSES = ("cispo", "dapo", "grpo")
SETTINGS = {
    "cispo": {"loss_settings": {}, "dynamic_sampling": True},
    "dapo": {"loss_settings": {}, "dynamic_sampling": True},
    "grpo": {"loss_settings": {}, "dynamic_sampling": False},
}


def run_one(loss: str, seed: int, args: argparse.Namespace) -> str:
    out = os.path.join(args.out, f"{loss}-seed{seed}")
    finished = list_checkpoints(out)
    if finished and finished[-1][0] >= args.steps:  # a longer run's prefix is this run (the lr is constant)
        return out
    cfg = RLConfig(
        model=args.model,
        task="arithmetic",
        task_options={"use_tools": args.tools, "min_steps": args.min_steps, "max_steps": args.max_steps},
        loss=loss,
        group_size=args.group_size,
        prompts_per_step=args.prompts,
        minibatches=args.minibatches,
        epochs=args.epochs,
        lr=args.lr,
        max_tokens=args.max_tokens,
        overlong_buffer=args.overlong_buffer if loss != "grpo" else 0,
        steps=args.steps,
        eval_every=args.eval_every,
        eval_problems=args.eval_problems,
        save_every=args.steps,
        out_dir=out,
        seed=seed,
        progress=False,
        **SETTINGS[loss],
    )
    started = time.time()
    RLTrainer(cfg, resume="latest").train()
    print(f"{loss} seed {seed}: {(time.time() - started) / 60:.1f} min", flush=True)
    return out


def curves(out: str, steps: int) -> tuple[list[int], list[float]]:
    records = MetricsLog(os.path.join(out, "metrics.jsonl")).read()
    rows = [(r["step"], r["eval_accuracy"]) for r in records if "eval_accuracy" in r and r["step"] <= steps]
    return [s for s, _ in rows], [a for _, a in rows]


TRAINING_STATS = ("dropped_fraction", "clipped_fraction", "trust_region_masked_fraction", "entropy", "response_length")


def training_stats(out: str, steps: int) -> dict[str, float]:
    """Each per-step training figure averaged over the run's updates."""
    records = [r for r in MetricsLog(os.path.join(out, "metrics.jsonl")).read() if 0 < r["step"] <= steps]
    return {
        key: statistics.mean(r[key] for r in records if r.get(key) is not None)
        for key in TRAINING_STATS
        if any(r.get(key) is not None for r in records)
    }


def first_step_reaching(steps: list[int], values: list[float], target: float) -> int | None:
    return next((s for s, v in zip(steps, values) if v >= target), None)


def report(args: argparse.Namespace) -> None:
    mean_curves, summary = {}, {}
    for loss in LOSSES:
        seeds, per_seed, stats = [], [], []
        for seed in args.seeds:
            out = os.path.join(args.out, f"{loss}-seed{seed}")
            if not os.path.exists(os.path.join(out, "metrics.jsonl")):
                continue
            steps, accuracy = curves(out, args.steps)
            if not steps or steps[-1] != args.steps:
                print(f"{loss} seed {seed}: not finished, left out")
                continue
            seeds.append(seed)
            eval_steps = steps
            per_seed.append(accuracy)
            stats.append(training_stats(out, args.steps))
        if not per_seed:
            continue
        means = [statistics.mean(column) for column in zip(*per_seed)]
        mean_curves[loss] = (eval_steps, means)
        summary[loss] = {
            "steps": eval_steps,
            "seeds": seeds,
            "per_seed": per_seed,
            "mean": means,
            "final": [c[-1] for c in per_seed],
            "training": {k: statistics.mean(s[k] for s in stats) for k in stats[0]},
        }
    if not summary:
        print("no finished runs")
        return
    start = statistics.mean(v["mean"][0] for v in summary.values())
    targets = [start + gain for gain in args.target_gain]
    for v in summary.values():
        v["steps_to_target"] = {
            f"{t:.3f}": [first_step_reaching(v["steps"], c, t) for c in v["per_seed"]] for t in targets
        }
    panels = {"held-out accuracy (mean of seeds)": mean_curves}
    for loss, v in summary.items():
        panels[f"{loss}: each seed"] = {f"seed {s}": (v["steps"], c) for s, c in zip(v["seeds"], v["per_seed"])}
    plot_panels(os.path.join(args.out, "rl_experiment.png"), panels, {k: "greedy accuracy" for k in panels})
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump({"targets": targets, "start": start, "runs": summary}, f, indent=2)
    print(f"start accuracy {start:.3f}; targets " + ", ".join(f"{t:.3f}" for t in targets))
    heads = [f"steps to {t:.2f} per seed" for t in targets]
    print("| objective | seeds | final accuracy per seed | mean final | " + " | ".join(heads) + " |")
    print("|---|---|---|---|" + "---|" * len(heads))
    for loss, v in summary.items():
        finals = ", ".join(f"{x:.3f}" for x in v["final"])
        reached = [", ".join("-" if s is None else str(s) for s in r) for r in v["steps_to_target"].values()]
        seeds = ", ".join(map(str, v["seeds"]))
        print(f"| {loss} | {seeds} | {finals} | {statistics.mean(v['final']):.3f} | " + " | ".join(reached) + " |")
    print()
    print("| objective | " + " | ".join(TRAINING_STATS) + " |")
    print("|---|" + "---|" * len(TRAINING_STATS))
    for loss, v in summary.items():
        print(f"| {loss} | " + " | ".join(f"{v['training'].get(k, float('nan')):.4g}" for k in TRAINING_STATS) + " |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/rl-experiment")
    p.add_argument("--model", default=None, help="starting checkpoint (default: the embedded mmx-tiny)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--losses", nargs="+", default=list(LOSSES))
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--minibatches", type=int, default=8, help="optimizer steps per pass over a rollout batch")
    p.add_argument("--epochs", type=int, default=2, help="passes over each rollout batch (M1: 16 updates per batch)")
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--overlong-buffer", type=int, default=64, help="longer than any correct solution")
    p.add_argument("--no-tools", dest="tools", action="store_false", help="without the calculator tool")
    p.add_argument("--min-steps", type=int, default=5, help="problem length (mmx-tiny was trained on 2-4 steps)")
    p.add_argument("--max-steps", type=int, default=5)
    p.add_argument("--eval-every", type=int, default=2)
    p.add_argument("--eval-problems", type=int, default=200)
    p.add_argument(
        "--target-gain", type=float, nargs="+", default=[0.2, 0.35], help="targets = start accuracy + each of these"
    )
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if not args.report_only:
        for seed in args.seeds:
            for loss in args.losses:
                run_one(loss, seed, args)
    report(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
