"""Tokenizers for MiniMax checkpoints: ``tokenizer.json`` through the `tokenizers` library, the special tokens and
chat template from ``tokenizer_config.json``, incremental detokenisation, and training a small byte-level BPE.

MiniMax models use byte-level BPE (GPT-2 style). The chat markers are added special tokens: M1 uses
``<beginning_of_sentence>`` / ``<end_of_sentence>``; M2 uses ``]~b]`` / ``[e~[`` and ``<think>`` tags.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from mmx.chat.formats import M1, M2, TEXT_TAGS
from mmx.errors import FileFormatError

M1_SPECIAL_TOKENS = list(M1.special_tokens)
M2_SPECIAL_TOKENS = list(M2.special_tokens)


def _keep_tags_in_text(backend: HFTokenizer) -> HFTokenizer:
    """Mark the TEXT_TAGS among the added tokens as not special, keeping every id."""
    data = json.loads(backend.to_str())
    for token in data.get("added_tokens", []):
        if token["content"] in TEXT_TAGS:
            token["special"] = False
    return HFTokenizer.from_str(json.dumps(data))


class Tokenizer:
    """A byte-level BPE tokenizer with a checkpoint's special tokens and chat template."""

    def __init__(self, backend: HFTokenizer, config: dict[str, Any] | None = None, chat_template: str | None = None):
        self.backend = backend
        self.config = dict(config or {})
        self.chat_template = chat_template if chat_template is not None else _template_from_config(self.config)
        self.bos_token = _token_text(self.config.get("bos_token"))
        self.eos_token = _token_text(self.config.get("eos_token"))
        self.pad_token = _token_text(self.config.get("pad_token"))

    # ------------------------------------------------------------------ loading and saving
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> Tokenizer:
        """Load a checkpoint's tokenizer files; one that does not parse is a :class:`FileFormatError` naming it."""
        path = os.fspath(path)
        file = os.path.join(path, "tokenizer.json")
        if not os.path.exists(file):
            raise FileNotFoundError(f"no tokenizer.json in {path}")
        config_file = os.path.join(path, "tokenizer_config.json")
        config = _read_json(config_file) or {}
        special_map = _read_json(os.path.join(path, "special_tokens_map.json")) or {}
        for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
            config.setdefault(key, special_map.get(key))
        _check_special_tokens(config, config_file)
        template_file = os.path.join(path, "chat_template.jinja")
        if os.path.exists(template_file):
            template, source = _read_text(template_file), template_file
        else:
            template, source = _template_from_config(config, config_file), f"{config_file} (key 'chat_template')"
        if template is not None:
            _check_template(template, source)
        try:
            backend = HFTokenizer.from_file(file)
        except Exception as e:  # the tokenizers library raises a bare Exception for every kind of bad file
            raise FileFormatError(file, f"not a tokenizer the tokenizers library can read ({e})") from None
        return cls(backend, config, template)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        from mmx.utils.io import atomic_write_text, atomic_write_with

        os.makedirs(path, exist_ok=True)
        atomic_write_with(os.path.join(path, "tokenizer.json"), self.backend.save)
        config = {k: v for k, v in self.config.items() if k != "chat_template"}
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        atomic_write_text(os.path.join(path, "tokenizer_config.json"), json.dumps(config, indent=2, ensure_ascii=False))

    # ------------------------------------------------------------------ encoding
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if len(text) > 4096:  # encode_batch lets other threads run while it works (encode holds the GIL throughout)
            return self.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and each token's (start, end) character span in ``text``."""
        encoding = self.backend.encode(text, add_special_tokens=False)
        return encoding.ids, encoding.offsets

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    @property
    def eos_token_id(self) -> int | None:
        return self.token_to_id(self.eos_token) if self.eos_token else None

    @property
    def bos_token_id(self) -> int | None:
        return self.token_to_id(self.bos_token) if self.bos_token else None

    # ------------------------------------------------------------------ chat
    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> str:
        """Render a conversation with the checkpoint's template (or ``chat_template``), as transformers does."""
        from mmx.chat.template import render_chat

        template = chat_template or self.chat_template
        if template is None:
            raise ValueError("this tokenizer has no chat template; pass chat_template= or use one of mmx's templates")
        specials = {k: getattr(self, k) for k in ("bos_token", "eos_token", "pad_token") if getattr(self, k)}
        return render_chat(
            template, messages, tools=tools, add_generation_prompt=add_generation_prompt, **specials, **kwargs
        )


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # transformers' AddedToken serialisation
        return value.get("content")
    return value


def _template_from_config(config: dict[str, Any], file: str | None = None) -> str | None:
    """The chat template a tokenizer config holds: a string, or named templates of which "default" is used."""
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: use "default"
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    if template is not None and not isinstance(template, str) and file is not None:
        raise FileFormatError(file, f"chat_template is a {type(template).__name__}, not a template string")
    return template


def _check_special_tokens(config: dict[str, Any], file: str) -> None:
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = config.get(key)
        if value is not None and not isinstance(_token_text(value), str):
            raise FileFormatError(file, f"{key} is {value!r}, not a token string")


def _check_template(template: str, source: str) -> None:
    """Compile the template now, so that one that does not parse names its file rather than failing later in a
    request. (Compiled templates are cached: rendering does not compile it again.)"""
    import jinja2

    from mmx.chat.template import compile_template

    try:
        compile_template(template)
    except jinja2.TemplateSyntaxError as e:
        raise FileFormatError(source, f"the chat template does not parse: {e.message} (line {e.lineno})") from None


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise FileFormatError(path, f"not UTF-8 text ({e})") from None


def _read_json(path: str) -> dict | None:
    """A JSON object from ``path``, or None when there is no such file."""
    if not os.path.exists(path):
        return None
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise FileFormatError(path, f"not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise FileFormatError(path, f"holds a JSON {type(data).__name__}, not an object")
    return data


class IncrementalDetokenizer:
    """Text of a growing token sequence, emitted piece by piece without ever splitting a multi-byte character.

    Byte-level BPE tokens can end in the middle of a UTF-8 character; decoding them alone yields U+FFFD. Each step
    decodes a short window (the last emitted tokens plus the new ones) and only emits text once the window no
    longer ends in U+FFFD."""

    REPLACEMENT = "\ufffd"

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.text = ""
        self._window = 0  # start of the tokens whose text prefixes the next decode
        self._emitted = 0  # tokens whose text has been emitted

    def add(self, token_ids: Iterable[int]) -> str:
        """Append tokens; return the newly completed text ('' while a character is still incomplete)."""
        self.ids.extend(token_ids)
        decode = self.tokenizer.decode
        before = decode(self.ids[self._window : self._emitted], self.skip_special_tokens)
        after = decode(self.ids[self._window :], self.skip_special_tokens)
        if len(after) <= len(before) or after.endswith(self.REPLACEMENT):
            return ""
        delta = after[len(before) :]
        self._window, self._emitted = self._emitted, len(self.ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        """At the end of generation: emit whatever is left, incomplete characters as U+FFFD."""
        before = self.tokenizer.decode(self.ids[self._window : self._emitted], self.skip_special_tokens)
        after = self.tokenizer.decode(self.ids[self._window :], self.skip_special_tokens)
        delta = after[len(before) :] if len(after) > len(before) else ""
        self._window = self._emitted = len(self.ids)
        self.text += delta
        return delta


def train_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    special_tokens: list[str],
    bos_token: str | None = None,
    eos_token: str | None = None,
    chat_template: str | None = None,
    min_frequency: int = 2,
    split_digits: bool = False,
) -> Tokenizer:
    """Train a byte-level BPE (GPT-2 style, as MiniMax uses) with ``special_tokens`` as added special tokens.
    ``split_digits`` keeps every digit its own token (small models learn arithmetic far better that way)."""
    backend = HFTokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if split_digits:
        backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        backend.pre_tokenizer = byte_level
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    backend = _keep_tags_in_text(backend)
    config = {"bos_token": bos_token, "eos_token": eos_token, "model_max_length": 1 << 30}
    return Tokenizer(backend, {k: v for k, v in config.items() if v is not None}, chat_template)
