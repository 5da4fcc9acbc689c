"""``mmx chat MODEL``: an interactive conversation. Reasoning streams dimmed, apart from the answer; tool calls
are shown as structured calls. /reset starts over, /exit (or Ctrl-D) leaves."""

from __future__ import annotations

import argparse
import json
import sys

from mmx.chat import ContentDelta, ReasoningStreamParser, ToolCallArgs, ToolCallStart, ToolCallStreamParser
from mmx.cli.common import add_engine_args, add_model_arg, detect_style, engine_kwargs, resolve_model
from mmx.engine import LLMEngine, SamplingParams

DIM, RESET, BOLD = "\033[2m", "\033[0m", "\033[1m"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="chat with a model in the terminal")
    add_model_arg(p)
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--tools", default=None, help="JSON file with a list of OpenAI-style tool definitions")
    p.add_argument("--max-tokens", type=int, default=1024)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    add_engine_args(p)


def stream_reply(engine: LLMEngine, prompt: str, params: SamplingParams, style: str, tools, out=None) -> dict:
    """Generate one reply, printing it as it comes; returns the assistant message (OpenAI shape)."""
    out = out or sys.stdout
    engine.add_request("chat", prompt, params)
    reasoning_parser = ReasoningStreamParser(style)
    tool_parser = ToolCallStreamParser(tools, style)
    reasoning, content, calls, seen = "", "", {}, 0
    in_reasoning = False

    def show(r: str, events: list) -> None:
        nonlocal reasoning, content, in_reasoning
        if r:
            if not in_reasoning:
                out.write(DIM)
                in_reasoning = True
            out.write(r)
            reasoning += r
        for ev in events:
            if in_reasoning:
                out.write(RESET + "\n")
                in_reasoning = False
            if isinstance(ev, ContentDelta):
                out.write(ev.text)
                content += ev.text
            elif isinstance(ev, ToolCallStart):
                calls[ev.index] = {"id": ev.id, "name": ev.name, "arguments": ""}
            elif isinstance(ev, ToolCallArgs):
                calls[ev.index]["arguments"] += ev.text
        out.flush()

    while engine.has_unfinished_requests():
        for result in engine.step():
            text = result.outputs[0].text
            delta, seen = text[seen:], len(text)
            r, c = reasoning_parser.feed(delta)
            show(r, tool_parser.feed(c))
    r, c = reasoning_parser.finish()
    show(r, tool_parser.feed(c) + tool_parser.finish())
    if in_reasoning:
        out.write(RESET)
    for call in calls.values():
        out.write(f"\n{BOLD}tool call{RESET} {call['name']}({call['arguments']})")
    out.write("\n")
    message = {"role": "assistant", "content": content, "reasoning_content": reasoning or None}
    if calls:
        message["tool_calls"] = [
            {
                "id": c["id"],
                "type": "function",
                "function": {"name": c["name"], "arguments": json.loads(c["arguments"])},
            }
            for c in calls.values()
        ]
    return message


def run(args: argparse.Namespace) -> int:
    engine = LLMEngine.from_pretrained(resolve_model(args.model), **engine_kwargs(args))
    if engine.tokenizer is None or engine.tokenizer.chat_template is None:
        print("mmx chat: this checkpoint has no tokenizer with a chat template", file=sys.stderr)
        return 1
    tools = None
    if args.tools:
        with open(args.tools, encoding="utf-8") as f:
            tools = json.load(f)
    style = detect_style(engine.tokenizer, engine.config)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens)
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    print(f"{DIM}chatting with {args.model or 'mmx-tiny'} ({style} format); /reset, /exit{RESET}")
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
        prompt = engine.tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True)
        messages.append(stream_reply(engine, prompt, params, style, tools))
