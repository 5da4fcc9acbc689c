"""vLLM's tokenizer routes: ``POST /tokenize`` (a prompt, or chat messages rendered as ``/v1/chat/completions``
renders them), ``POST /detokenize`` and ``GET /tokenizer_info`` (what lm-evaluation-harness's remote tokenizer reads:
the special tokens and the chat template).

Tokenising megabytes of text is seconds of CPU, so it runs in a worker thread, through the tokenizers call that
releases the GIL while it encodes (``encode_batch``; ``encode`` holds it). Turning a few million token ids into
Python objects, freeing them and writing them as JSON hold the GIL too. Long text is therefore encoded in pieces cut
where cutting cannot change the tokens, and the JSON body is written piece by piece in the thread, so the event loop
(health checks, every other stream) never waits long. What stays on the event loop is parsing the request's JSON
(about 50 ms for 5 MB).
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import Discriminator, Field, Tag, field_validator

from mmx.chat.tokenizer import Tokenizer
from mmx.engine.sampling_params import SamplingParams
from mmx.serve.chat import RequestError, prepare_chat_async
from mmx.serve.openai_api import check_model
from mmx.serve.protocol import ChatMessage, Tool, _Request

router = APIRouter()

PIECE_CHARS = 1 << 16  # text encoded at once: its ids and their JSON take a few ms of GIL
_WINDOW = 256  # characters each side of a cut that the check re-encodes
# Places a byte-level BPE's pre-tokenizer splits in every common MiniMax / GPT-style pattern: after a line break
# before a non-space, and before a single space that starts a word. Each one is still checked before it is used.
_CUT = re.compile(r"(?<=\n)(?=\S)|(?<=\S)(?= [^\W\d_])")


# ---------------------------------------------------------------------------------------------------- requests
class TokenizePromptRequest(_Request):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True  # the tokenizer's own post-processing (e.g. a BOS), as vLLM does
    return_token_strs: bool = False


class TokenizeChatRequest(_Request):
    model: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    tools: list[Tool] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: Literal[False] = False  # the chat template writes the special tokens itself
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False

    @field_validator("add_special_tokens", mode="before")
    @classmethod
    def _template_writes_them(cls, value):
        if value is not False:  # a Literal[False] would take 0
            raise ValueError("the chat template writes the special tokens; only false is accepted with messages")
        return value


def _tokenize_kind(value: Any) -> str:
    """A body with ``messages`` is a chat request; anything else is read as a prompt request. (The tags are the
    class names: error locations leave them out, naming only the request's fields.)"""
    has_messages = "messages" in value if isinstance(value, dict) else hasattr(value, "messages")
    return "TokenizeChatRequest" if has_messages else "TokenizePromptRequest"


TokenizeRequest = Annotated[
    Annotated[TokenizePromptRequest, Tag("TokenizePromptRequest")]
    | Annotated[TokenizeChatRequest, Tag("TokenizeChatRequest")],
    Discriminator(_tokenize_kind),
]


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]]


# ---------------------------------------------------------------------------------------------------- encoding
def _can_cut(tokenizer: Tokenizer) -> bool:
    """Whether encoding a text in pieces can give the text's tokens: no normaliser, and no pre-tokenizer that adds
    a space (or a sentencepiece marker) at the start of every piece."""
    backend = tokenizer.backend
    if backend.normalizer is not None:
        return False
    pre = json.loads(backend.pre_tokenizer.__getstate__()) if backend.pre_tokenizer is not None else {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    return not any(s.get("type") == "Metaspace" or s.get("add_prefix_space") for s in steps)


def _encode(tokenizer: Tokenizer, text: str) -> list[int]:
    # encode_batch, not encode: only the batch call lets go of the GIL while it works
    return tokenizer.backend.encode_batch([text], add_special_tokens=False)[0].ids


def _cuts_cleanly(tokenizer: Tokenizer, text: str, cut: int) -> bool:
    left, right = text[max(0, cut - _WINDOW) : cut], text[cut : cut + _WINDOW]
    return _encode(tokenizer, left + right) == _encode(tokenizer, left) + _encode(tokenizer, right)


def pieces(tokenizer: Tokenizer, text: str, size: int = PIECE_CHARS) -> list[str]:
    """``text`` in pieces of about ``size`` characters whose tokens, put together, are the text's: each cut is at a
    pre-tokenizer boundary (a line break, or a space before a word) where re-encoding the text around it shows the
    tokens do not change. A text with no such place left is one piece from there on."""
    if len(text) <= size or not _can_cut(tokenizer):
        return [text]
    out, start = [], 0
    while len(text) - start > size:
        cut = None
        for match in _CUT.finditer(text, start + size, min(len(text), start + 2 * size)):
            if _cuts_cleanly(tokenizer, text, match.start()):
                cut = match.start()
                break
        if cut is None:
            break
        out.append(text[start:cut])
        start = cut
    out.append(text[start:])
    return out


def _special_tokens(tokenizer: Tokenizer, sample: str) -> tuple[list[int], list[int]]:
    """The ids the tokenizer's post-processor puts before and after a text (e.g. a BOS), found on ``sample``."""
    plain = tokenizer.backend.encode(sample, add_special_tokens=False).ids
    full = tokenizer.backend.encode(sample, add_special_tokens=True).ids
    for at in range(len(full) - len(plain) + 1):
        if full[at : at + len(plain)] == plain:
            return full[:at], full[at + len(plain) :]
    return [], []


def check_text(text: str, param: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError(
            f"the text is not valid Unicode: a lone surrogate {text[e.start]!r} at character {e.start}", param
        ) from None


def tokenize_body(
    tokenizer: Tokenizer, text: str, add_special_tokens: bool, token_strs: bool, max_model_len: int
) -> bytes:
    """The /tokenize response for ``text`` as JSON bytes, written piece by piece (see the module's docstring)."""
    check_text(text, "prompt")
    prefix, suffix = _special_tokens(tokenizer, text[:64]) if add_special_tokens else ([], [])
    id_parts: list[str] = []
    str_parts: list[str] = []
    count = 0

    def groups():  # one piece's ids alive at a time: freeing millions of ints at once would hold the GIL
        yield prefix
        for piece in pieces(tokenizer, text):
            yield _encode(tokenizer, piece)
        yield suffix

    for ids in groups():
        if not ids:
            continue
        count += len(ids)
        id_parts.append(",".join(map(str, ids)))
        if token_strs:
            str_parts.append(json.dumps([tokenizer.id_to_token(i) for i in ids], ensure_ascii=False)[1:-1])
    body = f'{{"count": {count}, "max_model_len": {max_model_len}, "tokens": [{",".join(id_parts)}]'
    if token_strs:
        body += f', "token_strs": [{",".join(str_parts)}]'
    return (body + "}").encode("utf-8")


# ---------------------------------------------------------------------------------------------------- routes
@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request):
    state = request.app.state.mmx
    if body.model is not None:
        check_model(state, body.model)
    if isinstance(body, TokenizeChatRequest):
        prepared = await prepare_chat_async(
            state.tokenizer,
            state.chat,
            [m.model_dump(exclude_none=True) for m in body.messages],
            SamplingParams(),
            tools=[t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None,
            tool_choice="auto" if body.tools else "none",
            template_kwargs=body.chat_template_kwargs,
            max_model_len=state.max_model_len,
            continue_final_message=body.continue_final_message,
            add_generation_prompt=body.add_generation_prompt,
        )
        ids = prepared.prompt_ids
        content: dict[str, Any] = {"count": len(ids), "max_model_len": state.max_model_len, "tokens": ids}
        if body.return_token_strs:
            content["token_strs"] = [state.tokenizer.id_to_token(i) for i in ids]
        return JSONResponse(content)
    if len(body.prompt) > state.max_tokenize_chars:
        raise RequestError(
            f"the prompt has {len(body.prompt)} characters; /tokenize takes at most {state.max_tokenize_chars}",
            "prompt",
            status=413,
        )
    data = await asyncio.to_thread(
        tokenize_body,
        state.tokenizer,
        body.prompt,
        body.add_special_tokens,
        body.return_token_strs,
        state.max_model_len,
    )
    return Response(data, media_type="application/json")


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request):
    state = request.app.state.mmx
    if body.model is not None:
        check_model(state, body.model)
    vocab = state.tokenizer.vocab_size
    bad = next((i for i, t in enumerate(body.tokens) if t >= vocab), None)
    if bad is not None:
        raise RequestError(f"token id {body.tokens[bad]} is not in the vocabulary of {vocab}", f"tokens.{bad}")
    text = await asyncio.to_thread(state.tokenizer.decode, body.tokens, False)
    return {"prompt": text}


@router.get("/tokenizer_info")
async def tokenizer_info(request: Request):
    """The tokenizer's configuration (``tokenizer_config.json``), with the special tokens as strings, the chat
    template the server renders with, and the server's context length."""
    state = request.app.state.mmx
    tokenizer: Tokenizer = state.tokenizer
    info = {k: v for k, v in tokenizer.config.items() if k not in ("chat_template", "added_tokens_decoder")}
    info.update(
        tokenizer_class=tokenizer.config.get("tokenizer_class") or "PreTrainedTokenizerFast",
        bos_token=tokenizer.bos_token,
        eos_token=tokenizer.eos_token,
        pad_token=tokenizer.pad_token,
        chat_template=state.chat.template,
        model_max_length=state.max_model_len,
        vocab_size=tokenizer.vocab_size,
    )
    return info
