"""``mmx generate MODEL --prompt ...``: generate from raw prompts, or from chat-templated ones with ``--chat``."""

from __future__ import annotations

import argparse
import json
import sys

from mmx.cli.common import add_engine_args, add_model_arg, engine_kwargs, resolve_model


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text from prompts")
    add_model_arg(p)
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for a batch)")
    p.add_argument(
        "--chat", action="store_true", help="treat each prompt as a user message and apply the chat template"
    )
    p.add_argument("--system", default=None, help="system message (with --chat)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--n", type=int, default=1)
    p.add_argument("--sampling-seed", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print one JSON object per output")
    add_engine_args(p)


def run(args: argparse.Namespace) -> int:
    from mmx.engine import SamplingParams
    from mmx.llm import LLM

    llm = LLM(resolve_model(args.model), **engine_kwargs(args))
    params = SamplingParams(
        n=args.n,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        max_tokens=args.max_tokens,
        seed=args.sampling_seed,
    )
    if args.chat:
        system = [{"role": "system", "content": args.system}] if args.system else []
        conversations = [[*system, {"role": "user", "content": p}] for p in args.prompt]
        outputs = llm.chat(conversations, params, use_tqdm=False)
    else:
        outputs = llm.generate(args.prompt, params, use_tqdm=False)
    for prompt, out in zip(args.prompt, outputs):
        for sample in out.outputs:
            record = {
                "prompt": prompt,
                "text": sample.text,
                "finish_reason": sample.finish_reason,
                "tokens": len(sample.token_ids),
            }
            if sample.message is not None:
                reply = sample.message
                calls = [c["function"] for c in reply.get("tool_calls", [])]
                record.update(reasoning=reply["reasoning_content"], content=reply["content"], tool_calls=calls)
            if args.json:
                print(json.dumps(record, ensure_ascii=False))
            else:
                print(f"--- {prompt!r} [{sample.finish_reason}, {len(sample.token_ids)} tokens]")
                print(sample.text)
    sys.stdout.flush()
    return 0
