"""``mmx demo``: the main job of what mmx can do so far, end to end on a CPU in seconds.

It builds tiny random M1 (hybrid lightning + softmax) and M2 models, saves them as Hugging Face checkpoints,
loads them back, checks the reload is exact, generates greedy tokens, and prints the full-size architectures.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from mmx.cli.info import describe
from mmx.config import MiniMaxConfig
from mmx.model.generate import greedy_generate
from mmx.model.modeling import MiniMaxForCausalLM
from mmx.model.weights import load_model


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="build, save, reload and run tiny M1 and M2 models")
    p.add_argument("--tokens", type=int, default=16, help="greedy tokens to generate per model")
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    for preset in ("minimax-m1-80k", "minimax-m2"):
        print(f"== {preset}\n{describe(MiniMaxConfig.from_preset(preset))}\n")
    prompt = torch.randint(0, 512, (1, 12))
    for preset in ("tiny-m1", "tiny-m2"):
        config = MiniMaxConfig.from_preset(preset)
        model = MiniMaxForCausalLM(config).init_weights(seed=args.seed, std=0.1).eval()
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            loaded = load_model(tmp)
        with torch.no_grad():
            same = torch.equal(loaded(prompt), model(prompt))
        start = time.perf_counter()
        tokens = greedy_generate(loaded, prompt, args.tokens)
        elapsed = time.perf_counter() - start
        print(f"== {preset} (random weights)\n{describe(config)}")
        print(f"saved and reloaded: logits {'identical' if same else 'DIFFER'}")
        print(f"prompt ids     {prompt[0].tolist()}")
        print(f"greedy ids     {tokens[0].tolist()}  ({args.tokens / elapsed:.0f} tokens/s)\n")
        if not same:
            return 1
    return 0
