"""``mmx tokenizer train``: a byte-level BPE tokenizer with the MiniMax special tokens, from text and JSONL files."""

from __future__ import annotations

import argparse

from mmx.chat.formats import FORMATS

FORMAT_NAMES = [name.removeprefix("minimax_") for name in FORMATS]  # m1, m2


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
    t.add_argument(
        "--style", choices=FORMAT_NAMES, default=FORMAT_NAMES[-1], help="special tokens and chat template family"
    )
    t.add_argument("--chat-template", default=None, help="a .jinja file (default: the style's built-in template)")
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
    from mmx.chat.formats import get_format, resolve_template
    from mmx.chat.tokenizer import train_bpe_tokenizer

    chat_format = get_format(args.style)
    template = resolve_template(args.chat_template or chat_format.name, None, chat_format.architecture)
    tokenizer = train_bpe_tokenizer(
        _texts(args.files, template),
        args.vocab_size,
        list(chat_format.special_tokens),
        eos_token=chat_format.eos_token,
        chat_template=template,
        min_frequency=args.min_frequency,
        split_digits=args.split_digits,
    )
    tokenizer.save_pretrained(args.out)
    print(f"saved a {tokenizer.vocab_size}-token tokenizer to {args.out}")
    return 0
