"""``mmx tokenizer train``: a byte-level BPE tokenizer with the MiniMax special tokens, from text and JSONL files."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenizer", help="tokenizer tools")
    tsub = p.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    t = tsub.add_parser(
        "train",
        help="train a byte-level BPE tokenizer",
        description="Train a byte-level BPE (the `tokenizers` library) on .txt files and .jsonl files (their "
        "'text' fields, or their chats rendered with the chat template) and save it in the Hugging Face layout.",
    )
    t.add_argument("files", nargs="+", help=".txt or .jsonl files")
    t.add_argument("--out", required=True, help="output directory")
    t.add_argument("--vocab-size", type=int, default=32000)
    t.add_argument("--style", choices=["m1", "m2"], default="m2", help="special tokens and chat template family")
    t.add_argument("--chat-template", default=None, help="minimax_m1, minimax_m2 or a .jinja file (default: style's)")
    t.add_argument("--split-digits", action="store_true", help="one token per digit")
    t.add_argument("--min-frequency", type=int, default=2)


def _texts(files: list[str], template: str):
    from mmx.chat.template import render_chat
    from mmx.train.data import read_records

    for path in files:
        for record in read_records(path):
            if "messages" in record:
                yield render_chat(template, record["messages"], tools=record.get("tools"))
            elif isinstance(record.get("text"), str):
                yield record["text"]
            else:
                raise ValueError(f"{path}: a record has neither 'text' nor 'messages'")


def run(args: argparse.Namespace) -> int:
    from mmx.chat.template import builtin_template
    from mmx.chat.tokenizer import M1_SPECIAL_TOKENS, M2_SPECIAL_TOKENS, train_bpe_tokenizer

    name = args.chat_template or ("minimax_m2" if args.style == "m2" else "minimax_m1")
    if name.endswith(".jinja"):
        with open(name, encoding="utf-8") as f:
            template = f.read()
    else:
        template = builtin_template(name)
    specials, eos = (M2_SPECIAL_TOKENS, "[e~[") if args.style == "m2" else (M1_SPECIAL_TOKENS, "<end_of_sentence>")
    tokenizer = train_bpe_tokenizer(
        _texts(args.files, template),
        args.vocab_size,
        specials,
        eos_token=eos,
        chat_template=template,
        min_frequency=args.min_frequency,
        split_digits=args.split_digits,
    )
    tokenizer.save_pretrained(args.out)
    print(f"saved a {tokenizer.vocab_size}-token tokenizer to {args.out}")
    return 0
