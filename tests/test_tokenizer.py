"""Tokenizer: round trips, special tokens, checkpoint files, and incremental detokenisation that never splits a
multi-byte character."""

from __future__ import annotations

from mmx.chat import IncrementalDetokenizer, Tokenizer

TEXT = "naïve café — 東京 🙂 tools: ]~b]user\nhi[e~[ <think>x</think>"


def test_round_trip_and_special_tokens(tiny_tokenizer):
    ids = tiny_tokenizer.encode(TEXT)
    assert tiny_tokenizer.decode(ids, skip_special_tokens=False) == TEXT
    for token in ("]~b]", "[e~[", "<think>", "</think>"):
        assert tiny_tokenizer.token_to_id(token) in ids  # special tokens are single ids
    assert tiny_tokenizer.eos_token_id == tiny_tokenizer.token_to_id("[e~[")
    assert "]~b]" not in tiny_tokenizer.decode(ids)  # skipped by default


def test_incremental_detokenizer_never_splits_characters(tiny_tokenizer):
    ids = tiny_tokenizer.encode(TEXT)
    detok = IncrementalDetokenizer(tiny_tokenizer, skip_special_tokens=False)
    pieces = [detok.add([t]) for t in ids]
    pieces.append(detok.flush())
    assert "".join(pieces) == TEXT
    assert all("\ufffd" not in p for p in pieces)
    # an emoji is several byte-level tokens: nothing is emitted until it is whole
    emoji_ids = tiny_tokenizer.encode("🙂")
    assert len(emoji_ids) > 1
    detok = IncrementalDetokenizer(tiny_tokenizer)
    assert [detok.add([t]) for t in emoji_ids] == [""] * (len(emoji_ids) - 1) + ["🙂"]


def test_save_and_load(tiny_tokenizer, tmp_path):
    tiny_tokenizer.save_pretrained(tmp_path)
    loaded = Tokenizer.from_pretrained(tmp_path)
    assert loaded.encode(TEXT) == tiny_tokenizer.encode(TEXT)
    assert loaded.chat_template == tiny_tokenizer.chat_template
    assert loaded.eos_token == "[e~[" and loaded.bos_token == "]~!b["
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0].content }}")
    assert Tokenizer.from_pretrained(tmp_path).apply_chat_template([{"role": "user", "content": "x"}]) == "x"
