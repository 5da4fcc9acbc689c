"""``mmx agent "TASK"``: run the agent loop against an OpenAI- or Anthropic-compatible endpoint (an ``mmx serve``
instance by default, or a hosted MiniMax model)."""

from __future__ import annotations

import argparse
import os
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("agent", help="run an agent with file, shell, Python and delegate tools")
    p.add_argument("task", help="what the agent should do")
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="the endpoint (with or without /v1)")
    p.add_argument("--api", choices=["openai", "anthropic"], default="openai")
    p.add_argument("--model", default=None, help="model name (default: the first one the endpoint lists)")
    p.add_argument(
        "--api-key", default=None, help="API key (default: $MMX_API_KEY, $OPENAI_API_KEY or $ANTHROPIC_API_KEY)"
    )
    p.add_argument("--workdir", default=".", help="the directory the agent may read, write and run code in")
    p.add_argument("--max-steps", type=int, default=20)
    p.add_argument("--max-tokens", type=int, default=4096, help="tokens per model turn")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--command-timeout", type=float, default=30.0, help="seconds a shell command or program may run")
    p.add_argument("--sub-agent-depth", type=int, default=1, help="how deep delegate may nest (0: no delegate tool)")
    p.add_argument(
        "--transcript", default=None, help="JSONL transcript path (default: WORKDIR/.mmx-agent/transcript-*.jsonl)"
    )
    p.add_argument("--quiet", action="store_true", help="no live view; print only the answer")
    p.add_argument(
        "--unsafe-no-sandbox",
        action="store_true",
        help="UNSAFE: where bubblewrap is missing, run the model's shell commands and Python with no confinement "
        "(they can read, change and delete anything your user can)",
    )


def run(args: argparse.Namespace) -> int:
    import time

    from mmx.agent import Agent, AnthropicClient, LiveView, OpenAIClient, Workspace, default_tools

    key_env = "ANTHROPIC_API_KEY" if args.api == "anthropic" else "OPENAI_API_KEY"
    api_key = args.api_key or os.environ.get("MMX_API_KEY") or os.environ.get(key_env)
    client_cls = AnthropicClient if args.api == "anthropic" else OpenAIClient
    client = client_cls(args.base_url, args.model, api_key, args.max_tokens, args.temperature)
    workspace = Workspace(args.workdir, command_timeout=args.command_timeout, allow_unsandboxed=args.unsafe_no_sandbox)
    if args.unsafe_no_sandbox:
        from mmx.sandbox import sandbox_problem

        problem = sandbox_problem()
        if problem:
            print(f"warning: running model-written code WITHOUT a sandbox ({problem})", file=sys.stderr)
    transcript = args.transcript or os.path.join(
        workspace.root, ".mmx-agent", f"transcript-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
    )
    agent = Agent(
        client,
        tools=default_tools(workspace),
        max_steps=args.max_steps,
        transcript=transcript,
        view=None if args.quiet else LiveView(),
        max_depth=args.sub_agent_depth,
        workspace=workspace,
    )
    result = agent.run(args.task)
    if result.answer is not None:
        print(result.answer)
    if not args.quiet:
        print(f"[{result.stopped} after {result.steps} step(s); transcript: {transcript}]", file=sys.stderr)
    return 0 if result.answer is not None else 1
