"""Log-probabilities as the APIs write them: the legacy completions object (``tokens``, ``token_logprobs``,
``top_logprobs``, ``text_offset``), vLLM's ``prompt_logprobs`` list, and the bookkeeping that makes streamed
log-probs travel with the text of their tokens."""

from __future__ import annotations

from collections.abc import Sequence

from mmx.engine.sequence import TokenLogprob

# JSON has no -inf: OpenAI and vLLM write an impossible token's log-probability as this
MIN_LOGPROB = -9999.0


def token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def _finite(logprob: float) -> float:
    return max(logprob, MIN_LOGPROB)


def completion_logprobs(
    tokenizer, token_ids: Sequence[int], entries: Sequence[TokenLogprob | None], offset: int, top_k: int
) -> dict:
    """The completions ``logprobs`` object of ``token_ids``. An entry of None (the first token of an echoed prompt,
    which nothing predicts) gives None in ``token_logprobs`` and ``top_logprobs``. ``top_logprobs`` holds the
    ``top_k`` best tokens plus the chosen one (up to top_k + 1, as OpenAI documents); ``text_offset`` counts
    characters from ``offset``, token by token."""
    tokens = [token_text(tokenizer, t) for t in token_ids]
    offsets = []
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    top: list[dict[str, float] | None] = []
    for token, entry in zip(tokens, entries):
        if entry is None:
            top.append(None)
            continue
        alternatives = {token_text(tokenizer, t): _finite(lp) for t, lp in entry.top[:top_k]}
        alternatives.setdefault(token, _finite(entry.logprob))
        top.append(alternatives)
    return {
        "tokens": tokens,
        "token_logprobs": [None if e is None else _finite(e.logprob) for e in entries],
        "top_logprobs": top,
        "text_offset": offsets,
    }


def join_logprobs(first: dict, second: dict) -> dict:
    """Two completions ``logprobs`` objects one after the other (an echoed prompt's, then the completion's)."""
    return {key: first[key] + second[key] for key in first}


def prompt_logprobs(
    tokenizer, prompt_ids: Sequence[int], entries: Sequence[TokenLogprob | None] | None, top_k: int
) -> list[dict | None] | None:
    """vLLM's ``prompt_logprobs``: per prompt token None (the first) or {token id: {logprob, rank, decoded_token}}
    for the prompt's token and the ``top_k`` most likely ones."""
    if entries is None:
        return None
    out: list[dict | None] = []
    for token, entry in zip(prompt_ids, entries):
        if entry is None:
            out.append(None)
            continue
        ranked = {token: (entry.logprob, entry.rank)}
        for rank, (t, lp) in enumerate(entry.top[:top_k], 1):
            ranked.setdefault(t, (lp, rank))
        out.append(
            {
                str(t): {"logprob": _finite(lp), "rank": rank, "decoded_token": token_text(tokenizer, t)}
                for t, (lp, rank) in ranked.items()
            }
        )
    return out


class StreamedLogprobs:
    """One streamed sample's log-probs, sent with the text of their tokens: an entry waits while its token's text
    is held back (it may still turn into a stop string) and leaves in the chunk that sends the last of that text.
    When the sample ends, whatever is left (the tokens of a stop string the text drops) leaves with the last
    chunk, so the streamed entries add up to the non-streamed ones."""

    def __init__(self, offset: int):
        self.offset = offset  # text_offset of the next entry sent
        self.sent_chars = 0  # characters of the sample's text sent so far
        self.waiting: list[tuple[int, list[TokenLogprob]]] = []  # (length of the text that completes them, entries)

    def add(self, entries: list[TokenLogprob], text_end: int) -> None:
        """Entries of tokens fed when the sample's text (held-back characters included) was ``text_end`` long."""
        if entries:
            self.waiting.append((text_end, entries))

    def release(self, tokenizer, chunk_text: str, final: bool, top_k: int) -> dict | None:
        """The ``logprobs`` object for a chunk that sends ``chunk_text`` (None when no entry is due)."""
        self.sent_chars += len(chunk_text)
        due: list[TokenLogprob] = []
        while self.waiting and (final or self.waiting[0][0] <= self.sent_chars):
            due += self.waiting.pop(0)[1]
        if not due:
            return None
        logprobs = completion_logprobs(tokenizer, [e.token_id for e in due], due, self.offset, top_k)
        self.offset = logprobs["text_offset"][-1] + len(logprobs["tokens"][-1])
        return logprobs
