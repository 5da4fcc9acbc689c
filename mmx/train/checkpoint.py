"""Training checkpoints: a Hugging Face model directory (config.json, safetensors, tokenizer files) that
``mmx.load_model``, the engine and transformers load as is, plus ``trainer_state.pt`` (optimizer, scheduler,
RNG and data position) for ``--resume``.

A checkpoint is assembled in a hidden temporary directory and renamed into place, so a run killed while saving
leaves either the previous checkpoints or the new one complete, never a torn one."""

from __future__ import annotations

import os
import re
import shutil
from typing import Any

import torch

from mmx.chat.tokenizer import Tokenizer
from mmx.model.modeling import MiniMaxForCausalLM
from mmx.model.weights import save_model

STATE_FILE = "trainer_state.pt"
_NAME = re.compile(r"checkpoint-(\d+)$")


def checkpoint_dir(out_dir: str, step: int) -> str:
    return os.path.join(out_dir, f"checkpoint-{step}")


def list_checkpoints(out_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints in ``out_dir``, oldest first."""
    if not os.path.isdir(out_dir):
        return []
    found = []
    for name in os.listdir(out_dir):
        match = _NAME.match(name)
        path = os.path.join(out_dir, name)
        if match and os.path.exists(os.path.join(path, STATE_FILE)):
            found.append((int(match[1]), path))
    return sorted(found)


def latest_checkpoint(out_dir: str) -> str | None:
    found = list_checkpoints(out_dir)
    return found[-1][1] if found else None


def save_checkpoint(
    out_dir: str,
    step: int,
    model: MiniMaxForCausalLM,
    tokenizer: Tokenizer | None,
    state: dict[str, Any],
    keep: int,
) -> str:
    """Write checkpoint-``step`` atomically and delete all but the ``keep`` newest."""
    final = checkpoint_dir(out_dir, step)
    tmp = os.path.join(out_dir, f".tmp-checkpoint-{step}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_model(model, tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    torch.save(state, os.path.join(tmp, STATE_FILE))
    if os.path.exists(final):  # a re-run of the same step replaces it
        shutil.rmtree(final)
    os.replace(tmp, final)
    for _, old in list_checkpoints(out_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_trainer_state(path: str) -> dict[str, Any]:
    file = os.path.join(path, STATE_FILE)
    if not os.path.exists(file):
        raise FileNotFoundError(f"{path} is not a training checkpoint: {STATE_FILE} is missing")
    return torch.load(file, map_location="cpu", weights_only=False)
