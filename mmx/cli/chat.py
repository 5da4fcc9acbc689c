"""``mmx chat MODEL``: an interactive conversation. Reasoning streams dimmed, apart from the answer; tool calls
are shown as structured calls. /reset starts over, /exit (or Ctrl-D) leaves.

With mmx-tiny (no MODEL given) the model's own ``calculator`` tool is offered and run locally, its calls and
results shown, unless ``--no-calculator`` is given; tools from ``--tools`` are shown but not run.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from mmx.cli.common import add_engine_args, add_model_arg, engine_kwargs, resolve_model

DIM, RESET, BOLD = "\033[2m", "\033[0m", "\033[1m"
MAX_TOOL_ROUNDS = 4  # model turns per user message while it keeps calling tools


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="chat with a model in the terminal")
    add_model_arg(p)
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--tools", default=None, help="JSON file with a list of OpenAI-style tool definitions (not run)")
    p.add_argument(
        "--calculator",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="offer the calculator tool and run its calls (default: on for mmx-tiny, off otherwise)",
    )
    p.add_argument("--max-tokens", type=int, default=1024)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    add_engine_args(p)


def stream_reply(engine, tokenizer, chat, prompt: str, params, tools, out=None) -> dict:
    """Generate one reply, printing it as it comes; returns the assistant message (OpenAI shape)."""
    from dataclasses import replace

    from mmx.chat.reply import ContentDelta, ReasoningDelta, ReplyStream, ToolCallStart
    from mmx.engine.sampling_params import RequestOutputKind

    out = out or sys.stdout
    stream = ReplyStream(tokenizer, chat.format, tools=tools, stop=params.stop)
    engine.add_request("chat", tokenizer.encode(prompt), replace(params, output_kind=RequestOutputKind.DELTA))
    in_reasoning = False

    def show(events: list) -> None:
        nonlocal in_reasoning
        for ev in events:
            if isinstance(ev, ReasoningDelta):
                if not in_reasoning:
                    out.write(DIM)
                    in_reasoning = True
                out.write(ev.text)
                continue
            if in_reasoning:
                out.write(RESET + "\n")
                in_reasoning = False
            if isinstance(ev, ContentDelta):
                out.write(ev.text)
            elif isinstance(ev, ToolCallStart):
                out.write(f"\n{BOLD}tool call{RESET} {ev.name}")
        out.flush()

    while engine.has_unfinished_requests():
        for result in engine.step():
            sample = result.outputs[0]
            show(stream.feed(sample.new_token_ids))
            if stream.done:
                engine.abort_request("chat")
            elif sample.finish_reason is not None:
                show(stream.finish(sample.finish_reason, sample.stop_reason))
    if in_reasoning:
        out.write(RESET)
    message = stream.message()
    for call in message.get("tool_calls", []):
        out.write(f"({json.dumps(call['function']['arguments'], ensure_ascii=False)})")
    out.write("\n")
    return message


def run_tools(message: dict, functions: dict[str, Callable[[dict], str]], out=None) -> list[dict[str, Any]]:
    """Run the reply's calls of the tools we can run; their results, as tool messages, shown as they come."""
    out = out or sys.stdout
    results = []
    for call in message.get("tool_calls", []):
        fn = functions.get(call["function"]["name"])
        if fn is None:
            continue
        result = fn(call["function"]["arguments"])
        out.write(f"{BOLD}tool result{RESET} {result}\n")
        results.append({"role": "tool", "tool_call_id": call["id"], "content": result})
    return results


def run(args: argparse.Namespace) -> int:
    from mmx.chat.formats import chat_for
    from mmx.engine import SamplingParams
    from mmx.llm import load_engine

    engine, tokenizer = load_engine(resolve_model(args.model), **engine_kwargs(args))
    if tokenizer is None:
        print("mmx chat: this checkpoint has no tokenizer", file=sys.stderr)
        return 1
    chat = chat_for(tokenizer, engine.config.architecture)
    tools, functions = None, {}
    if args.tools:
        with open(args.tools, encoding="utf-8") as f:
            tools = json.load(f)
    if args.calculator if args.calculator is not None else args.model is None:
        from mmx.tasks.arithmetic import CALCULATOR_TOOL
        from mmx.tasks.solve import TOOLS

        tools = [*(tools or []), CALCULATOR_TOOL]
        functions = TOOLS
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens)
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    offered = f"; tools: {', '.join(t['function']['name'] for t in tools)}" if tools else ""
    print(f"{DIM}chatting with {args.model or 'mmx-tiny'} ({chat.format.name} format{offered}); /reset, /exit{RESET}")
    while True:
        try:
            user = input(f"{BOLD}you>{RESET} ")
        except EOFError:
            print()
            return 0
        if user.strip() == "/exit":
            return 0
        if user.strip() == "/reset":
            messages = list(system)
            continue
        if not user.strip():
            continue
        messages.append({"role": "user", "content": user})
        for _ in range(MAX_TOOL_ROUNDS):
            prompt = tokenizer.apply_chat_template(messages, tools=tools, chat_template=chat.template)
            reply = stream_reply(engine, tokenizer, chat, prompt, params, tools)
            messages.append(reply)
            results = run_tools(reply, functions)
            if not results:
                break
            messages += results
