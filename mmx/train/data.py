"""Training data: documents read from text and JSONL files, tokenised, and packed into fixed-length rows.

A packed row holds several documents side by side. Each position carries the token, the next token of the same
document as its label (or ``IGNORE`` where there is none or it carries no loss), and the document's number within
the row, from which the model builds its attention mask and restarts lightning states (:class:`PackedDocuments`).
The row order is a pure function of (seed, epoch), so a resumed run sees exactly the rows it would have seen.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from mmx.chat.template import render_chat
from mmx.chat.tokenizer import Tokenizer

IGNORE = -100  # label of a position that carries no loss (torch's cross_entropy ignore_index)
PACKING_WINDOW = 16  # rows kept open while packing: first-fit over these wastes a few % of each row at most


@dataclass
class Document:
    ids: list[int]
    targets: list[bool]  # targets[j]: token j is a training target (predicted from the tokens before it)

    def __len__(self) -> int:
        return len(self.ids)


# ---------------------------------------------------------------------------------------------------- reading
def read_records(path: str) -> Iterator[dict[str, Any]]:
    """A ``.txt`` file is one document ``{"text": ...}``; a ``.jsonl`` file holds one record per line."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"training data file not found: {path}")
    if path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{number}: not valid JSON ({e.msg})") from None
                if not isinstance(record, dict):
                    raise ValueError(f"{path}:{number}: each line must be a JSON object")
                yield record
    else:
        with open(path, encoding="utf-8") as f:
            yield {"text": f.read()}


def text_document(tokenizer: Tokenizer, text: str) -> Document:
    """Pretraining: every token is a target; an end-of-text token closes the document."""
    ids = tokenizer.encode(text)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return Document(ids, [True] * len(ids))


def chat_document(tokenizer: Tokenizer, template: str, record: dict[str, Any]) -> Document:
    """SFT: render with the chat template; only tokens inside the assistant's generation spans (its reasoning, text,
    tool calls and end-of-turn token) are targets."""
    specials = {k: getattr(tokenizer, k) for k in ("bos_token", "eos_token") if getattr(tokenizer, k)}
    text, spans = render_chat(
        template, record["messages"], tools=record.get("tools"), return_generation_spans=True, **specials
    )
    ids, offsets = tokenizer.encode_with_offsets(text)
    targets = []
    span_index = 0
    for start, _ in offsets:  # a token belongs to the span its first character is in
        while span_index < len(spans) and spans[span_index][1] <= start:
            span_index += 1
        targets.append(span_index < len(spans) and spans[span_index][0] <= start)
    return Document(ids, targets)


def load_documents(
    paths: list[str], task: str, tokenizer: Tokenizer, template: str | None, seq_len: int
) -> list[Document]:
    """Every document of ``paths``; one longer than ``seq_len`` is cut into pieces (each its own document)."""
    docs = []
    for path in paths:
        for number, record in enumerate(read_records(path), 1):
            if task == "sft":
                if "messages" not in record:
                    raise ValueError(f"{path}: record {number} has no 'messages' (SFT records are chats)")
                if template is None:
                    raise ValueError("SFT needs a chat template")
                doc = chat_document(tokenizer, template, record)
            else:
                if not isinstance(record.get("text"), str):
                    raise ValueError(f"{path}: record {number} has no 'text' string (pretraining records are text)")
                doc = text_document(tokenizer, record["text"])
            for start in range(0, len(doc), seq_len):
                piece = Document(doc.ids[start : start + seq_len], doc.targets[start : start + seq_len])
                if any(piece.targets[1:]):  # a piece whose first token is its only target teaches nothing
                    docs.append(piece)
    if not docs:
        raise ValueError(f"no training documents in {paths}")
    return docs


# ---------------------------------------------------------------------------------------------------- packing
def pack(lengths: list[int], order: list[int], seq_len: int) -> list[list[int]]:
    """Rows of document indices (taken in ``order``), first-fit into a window of open rows."""
    rows: list[list[int]] = []
    open_rows: list[tuple[int, int]] = []  # (row index, free space)
    for doc in order:
        n = lengths[doc]
        for slot, (row, free) in enumerate(open_rows):
            if n <= free:
                rows[row].append(doc)
                open_rows[slot] = (row, free - n)
                break
        else:
            rows.append([doc])
            open_rows.append((len(rows) - 1, seq_len - n))
            if len(open_rows) > PACKING_WINDOW:
                open_rows.pop(0)
        open_rows = [(row, free) for row, free in open_rows if free > 0]
    return rows


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T]
    labels: torch.Tensor  # [B, T], IGNORE where no loss
    doc_ids: torch.Tensor  # [B, T], -1 on padding

    @property
    def num_targets(self) -> int:
        return int((self.labels != IGNORE).sum())

    @property
    def single_document_rows(self) -> bool:
        """Every row is one document filling it: plain causal attention is already exact."""
        return bool((self.doc_ids == 0).all())


class PackedDataset:
    def __init__(self, docs: list[Document], seq_len: int, seed: int, pad_id: int = 0, shuffle: bool = True):
        self.docs = docs
        self.seq_len = seq_len
        self.seed = seed
        self.pad_id = pad_id
        self.shuffle = shuffle
        self._lengths = [len(d) for d in docs]
        self._epoch_rows: dict[int, list[list[int]]] = {}

    def rows(self, epoch: int) -> list[list[int]]:
        if epoch not in self._epoch_rows:
            order = list(range(len(self.docs)))
            if self.shuffle:
                random.Random(self.seed * 100_003 + epoch).shuffle(order)
            self._epoch_rows = {epoch: pack(self._lengths, order, self.seq_len)}  # keep one epoch in memory
        return self._epoch_rows[epoch]

    @property
    def tokens(self) -> int:
        return sum(self._lengths)

    def collate(self, rows: list[list[int]]) -> Batch:
        shape = (len(rows), self.seq_len)
        input_ids = torch.full(shape, self.pad_id, dtype=torch.long)
        labels = torch.full(shape, IGNORE, dtype=torch.long)
        doc_ids = torch.full(shape, -1, dtype=torch.long)
        for r, row in enumerate(rows):
            pos = 0
            for number, doc_index in enumerate(row):
                doc = self.docs[doc_index]
                n = len(doc)
                input_ids[r, pos : pos + n] = torch.tensor(doc.ids)
                next_ids = torch.tensor([*doc.ids[1:], IGNORE])
                wanted = torch.tensor([*doc.targets[1:], False])
                labels[r, pos : pos + n] = torch.where(wanted, next_ids, IGNORE)
                doc_ids[r, pos : pos + n] = number
                pos += n
        return Batch(input_ids, labels, doc_ids)


class BatchStream:
    """Endless global batches of ``rows_per_batch`` rows, epoch after epoch; ``position`` (epoch, row offset) is
    all a resumed run needs to continue from the same row."""

    def __init__(self, dataset: PackedDataset, rows_per_batch: int):
        self.dataset = dataset
        self.rows_per_batch = rows_per_batch
        self.epoch = 0
        self.offset = 0

    def next_rows(self) -> list[list[int]]:
        taken: list[list[int]] = []
        while len(taken) < self.rows_per_batch:
            rows = self.dataset.rows(self.epoch)
            need = self.rows_per_batch - len(taken)
            taken += rows[self.offset : self.offset + need]
            self.offset += need
            if self.offset >= len(rows):
                self.epoch, self.offset = self.epoch + 1, 0
        return taken

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
