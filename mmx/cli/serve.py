"""``mmx serve [MODEL]``: an OpenAI- and Anthropic-compatible server (127.0.0.1 by default)."""

from __future__ import annotations

import argparse
import os

from mmx.cli.common import add_engine_args, add_model_arg, engine_kwargs, resolve_model


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model over the OpenAI and Anthropic HTTP APIs")
    add_model_arg(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("MMX_API_KEY"), help="require this key (or $MMX_API_KEY)")
    p.add_argument("--served-model-name", default=None, help="model id clients use (default: the directory name)")
    p.add_argument(
        "--chat-template",
        default=None,
        help="a .jinja file or a built-in format's name (m1, m2) (default: the checkpoint's own template)",
    )
    p.add_argument(
        "--reasoning-mode",
        choices=["split", "append_think"],
        default="split",
        help="split: reasoning in reasoning_content; append_think: reasoning kept inline in the content",
    )
    p.add_argument("--max-body-mb", type=float, default=8.0, help="largest request body accepted")
    p.add_argument(
        "--max-sequences-per-request",
        type=int,
        default=256,
        help="most sequences (prompts x n) one request may run (default 256)",
    )
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="on SIGTERM / Ctrl-C, seconds to let requests in flight finish before they are aborted (default 30)",
    )
    p.add_argument("--log-level", default="info")
    add_engine_args(p)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from mmx.chat.formats import chat_for
    from mmx.engine import AsyncLLM
    from mmx.llm import load_engine
    from mmx.serve import ServerState, build_app
    from mmx.utils.threads import in_passing_thread

    path = resolve_model(args.model)

    def prepare():
        engine, tokenizer = load_engine(path, **engine_kwargs(args))
        graph = engine.decode_graph
        if graph is not None:
            if graph.needs_graphs(engine.args.max_num_seqs):
                print("mmx: compiling the decode step (cached for later runs; --enforce-eager skips it)", flush=True)
            engine.warm_up()
        return engine, tokenizer

    engine, tokenizer = in_passing_thread(prepare)
    if tokenizer is None:
        raise FileNotFoundError(f"{path} has no tokenizer.json; the server needs one")
    chat = chat_for(tokenizer, engine.config.architecture, args.chat_template)
    state = ServerState(
        engine=AsyncLLM(engine),
        tokenizer=tokenizer,
        chat=chat,
        model_name=args.served_model_name or os.path.basename(os.path.normpath(path)),
        model_path=path,
        max_model_len=engine.max_model_len,
        reasoning_mode=args.reasoning_mode,
        max_sequences_per_request=args.max_sequences_per_request,
    )
    app = build_app(state, api_key=args.api_key, max_body_bytes=int(args.max_body_mb * (1 << 20)))
    url = f"http://{args.host}:{args.port}/v1"
    print(f"mmx: serving {state.model_name!r} on {url} ({chat.format.name} format)", flush=True)
    # uvicorn stops accepting connections at once, waits up to the timeout for requests in flight, then cancels
    # them; cancelling a request's generator aborts it in the engine
    try:
        uvicorn.run(
            app,
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            timeout_graceful_shutdown=args.shutdown_timeout,
        )
    finally:
        state.engine.shutdown()
    return 0
