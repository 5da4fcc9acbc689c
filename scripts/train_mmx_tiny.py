"""Train mmx-tiny, the embedded default model, from nothing: data, tokenizer, SFT, export.

    python scripts/train_mmx_tiny.py --out runs/mmx-tiny --export mmx/assets/mmx-tiny

Everything is generated from ``--seed``: multi-step arithmetic word problems (``mmx.tasks.arithmetic``) written as
M2-style chats, half solved with the calculator tool (reasoning, a ``<minimax:tool_call>``, the tool's result, the
answer) and half worked out in the reasoning alone. A byte-level BPE with one token per digit is trained on them,
then the model (the M1 hybrid: three lightning layers, one softmax layer, MoE with 4 experts) is trained with
``mmx train``. The held-out test problems are drawn first and never appear in training. Interrupted? Run the same
command again: training resumes from the last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import yaml

from mmx.chat.template import builtin_template, render_chat
from mmx.chat.tokenizer import M2_SPECIAL_TOKENS, train_bpe_tokenizer
from mmx.tasks.arithmetic import make_problems, sft_record
from mmx.train.config import TrainConfig
from mmx.train.loop import Trainer, export_model

MODEL = {  # on top of the tiny-m1 preset
    # Two softmax layers (lightning, softmax, lightning, softmax): with one, the model never learned to copy the
    # counted item from the question (6-7% right, chance); an induction circuit needs two attention hops.
    "layer_types": ["linear_attention", "full_attention", "linear_attention", "full_attention"],
    # M1's theta of 1e7 barely rotates 32-wide heads over a few hundred tokens; 1e4 gives the softmax layers
    # usable relative positions at this length.
    "rope_theta": 10000.0,
    "hidden_size": 192,
    "intermediate_size": 384,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 8192,
}
TEST_SEED_OFFSET = 1000  # test problems come from seed + 1000, training problems from seed


def write_jsonl(path: str, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def build_data(out: str, seed: int, train_count: int, eval_count: int, test_count: int) -> None:
    data = os.path.join(out, "data")
    os.makedirs(data, exist_ok=True)
    test = make_problems(seed + TEST_SEED_OFFSET, test_count)
    held_out = {p.question for p in test}
    problems = make_problems(seed, train_count + eval_count, exclude=held_out)
    rng = random.Random(seed)
    records = [sft_record(p, use_tool=rng.random() < 0.5, system=rng.random() < 0.5) for p in problems]
    write_jsonl(os.path.join(data, "train.jsonl"), records[:train_count])
    write_jsonl(os.path.join(data, "eval.jsonl"), records[train_count:])
    write_jsonl(os.path.join(data, "test.jsonl"), [{"question": p.question, "answer": p.answer} for p in test])

    template = builtin_template("minimax_m2")
    texts = (render_chat(template, r["messages"], tools=r.get("tools")) for r in records[:20000])
    tokenizer = train_bpe_tokenizer(
        texts, 1024, M2_SPECIAL_TOKENS, eos_token="[e~[", chat_template=template, split_digits=True
    )
    tokenizer.save_pretrained(os.path.join(out, "tokenizer"))
    print(
        f"data: {train_count} train / {eval_count} eval / {test_count} test problems; "
        f"tokenizer: {tokenizer.vocab_size} tokens"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/mmx-tiny")
    p.add_argument("--export", default=None, help="write the final model and tokenizer here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--train-problems", type=int, default=60000)
    p.add_argument("--eval-problems", type=int, default=300)
    p.add_argument("--test-problems", type=int, default=500)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    started = time.time()
    if not os.path.exists(os.path.join(args.out, "tokenizer", "tokenizer.json")):
        build_data(args.out, args.seed, args.train_problems, args.eval_problems, args.test_problems)
    config = {
        "model": "tiny-m1",
        "model_overrides": MODEL,
        "tokenizer": os.path.join(args.out, "tokenizer"),
        "chat_template": "minimax_m2",
        "task": "sft",
        "train_data": [os.path.join(args.out, "data", "train.jsonl")],
        "eval_data": [os.path.join(args.out, "data", "eval.jsonl")],
        "seq_len": 1024,
        "batch_size": 8,
        "steps": args.steps,
        "lr": 3e-3,
        "min_lr": 1e-4,
        "warmup_steps": 100,
        "weight_decay": 0.1,
        "out_dir": os.path.join(args.out, "train"),
        "seed": args.seed,
        "eval_every": 250,
        "eval_batches": 8,
        "save_every": 250,
        "progress": not args.no_progress,
    }
    with open(os.path.join(args.out, "train.yaml"), "w", encoding="utf-8") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    trainer = Trainer(TrainConfig.from_dict(config), resume="latest")
    history = trainer.train()
    if args.export:
        export_model(trainer, args.export)
        print(f"exported to {args.export}")
    if history:
        print(f"final loss {history[-1]['loss']:.4f}; this invocation took {(time.time() - started) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
