"""Training-step throughput on the tiny hybrid M1 config (bench/lightning.py: 8 layers, 6 lightning + 2 softmax,
hidden 256, 4 experts top-2): mmx against transformers' MiniMaxForCausalLM, the same weights, in the same run.

    python bench/train.py                 # fp32 and bf16 autocast, rows of 1K and 4K tokens (about 6 minutes)
    python bench/train.py --quick

A step is forward, cross-entropy over every position, backward, gradient clipping and an AdamW update, on both
sides (transformers gets the identical optimizer code). Each figure is the median of several steps after warm-up;
the first step's losses are compared so that both sides provably compute the same thing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from lightning import machine, table, tiny_hybrid_config

import mmx


def make_models(tmp: str):
    import transformers

    torch.manual_seed(0)
    config = tiny_hybrid_config()
    hf = transformers.MiniMaxForCausalLM(transformers.MiniMaxConfig(**config))
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.05) if p.ndim > 1 else p.fill_(1.0)
    hf.save_pretrained(tmp)
    ours = mmx.load_model(tmp, dtype="float32")
    return hf, ours


class HFLogits:
    """transformers returns an output object; the step wants the logits tensor."""

    def __init__(self, model):
        self.model = model

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids).logits


def step_fn(model, forward, precision: str):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")

    def step(ids: torch.Tensor) -> float:
        with autocast:
            logits = forward(ids)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def timed(step, ids: torch.Tensor, reps: int) -> tuple[float, float]:
    """(median seconds per step, loss of the first step)."""
    first = step(ids)  # warm-up, and the loss to compare
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        step(ids)
        times.append(time.perf_counter() - start)
    return statistics.median(times), first


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    shapes = [(8, 1024), (2, 4096)] if not args.quick else [(2, 1024)]
    reps = 2 if args.quick else 4
    print(f"machine: {machine()}\n")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for precision in ("fp32", "bf16"):
            for batch, seq in shapes:
                hf, ours = make_models(tmp)  # fresh weights and optimizers for every cell
                hf.train()
                ours.train()
                ids = torch.randint(0, 2048, (batch, seq), generator=torch.Generator().manual_seed(1))
                t_ours, loss_ours = timed(step_fn(ours, ours, precision), ids, reps)
                t_hf, loss_hf = timed(step_fn(hf, HFLogits(hf), precision), ids, reps)
                tokens = batch * seq
                rows.append(
                    [
                        precision,
                        f"{batch} x {seq}",
                        f"{tokens / t_ours:,.0f}",
                        f"{tokens / t_hf:,.0f}",
                        f"**{t_hf / t_ours:.2f}x**",
                        f"{loss_ours:.4f} / {loss_hf:.4f}",
                    ]
                )
                print(rows[-1], flush=True)
                del hf, ours
    print()
    print(
        table(
            [
                "precision",
                "rows x tokens",
                "mmx tok/s",
                "transformers tok/s",
                "mmx / transformers",
                "first-step loss mmx / transformers",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
