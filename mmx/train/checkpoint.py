"""Training checkpoints: a Hugging Face model directory (config.json, safetensors, tokenizer files) that
``mmx.load_model``, the engine and transformers load as is, plus ``trainer_state.pt`` (optimizer, scheduler,
RNG and data position) for ``--resume``.

Crash safety, in the order a save does things:

1. the new checkpoint is assembled in ``.tmp-checkpoint-N``, every file and the directory fsynced;
2. it is renamed to ``checkpoint-N`` and the output directory fsynced: from here on it survives a power cut;
3. only then are old checkpoints rotated out, each renamed to ``.tmp-removed-...`` (one atomic step) before its
   files are deleted, so no kill can leave a ``checkpoint-M`` holding some files and not others.

Whatever a kill leaves behind (``.tmp-*`` entries, and torn ``checkpoint-N`` directories from older versions that
deleted in place) is never chosen for resuming and is removed by :func:`clean_out_dir` when the next run starts.
A disk that fills up during a save raises :class:`~mmx.errors.DiskFullError`, after removing the partial
checkpoint; the previous checkpoints are untouched."""

from __future__ import annotations

import errno
import os
import re
import shutil
from typing import Any

import torch

from mmx.chat.tokenizer import Tokenizer
from mmx.errors import DiskFullError
from mmx.model.modeling import MiniMaxForCausalLM
from mmx.model.weights import checkpoint_files, save_model
from mmx.utils.logging import get_logger

logger = get_logger(__name__)

STATE_FILE = "trainer_state.pt"
_NAME = re.compile(r"checkpoint-(\d+)$")
TMP_PREFIX = ".tmp-"  # anything not yet (or no longer) a checkpoint; never read, removed at start
_REPLACED = TMP_PREFIX + "replaced-"  # a checkpoint moved aside while a re-save of its step lands
_REMOVED = TMP_PREFIX + "removed-"  # a checkpoint being rotated out


def checkpoint_dir(out_dir: str, step: int) -> str:
    return os.path.join(out_dir, f"checkpoint-{step}")


def is_complete(path: str) -> bool:
    """Whether ``path`` holds everything a resume reads: the trainer state, the config and every weight file (with
    readable headers). A save only ever renames complete directories into place; this tells torn ones apart."""
    if not all(os.path.isfile(os.path.join(path, f)) for f in (STATE_FILE, "config.json")):
        return False
    try:
        checkpoint_files(path)
    except (OSError, ValueError):  # a missing or truncated shard, an unreadable index
        return False
    return True


def list_checkpoints(out_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints in ``out_dir``, oldest first."""
    if not os.path.isdir(out_dir):
        return []
    found = []
    for name in os.listdir(out_dir):
        match = _NAME.match(name)
        path = os.path.join(out_dir, name)
        if match and is_complete(path):
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
    """Write checkpoint-``step`` durably, then delete all but the ``keep`` newest checkpoints."""
    final = checkpoint_dir(out_dir, step)
    tmp = os.path.join(out_dir, f"{TMP_PREFIX}checkpoint-{step}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        save_model(model, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        # Through a Python file object, a write error reaches us as the OSError it is (ENOSPC included); given a
        # path, torch's own writer reports every failure as "enforce fail at inline_container.cc".
        with open(os.path.join(tmp, STATE_FILE), "wb") as f:
            torch.save(state, f)
        fsync_tree(tmp)
    except BaseException as e:
        written = _tree_size(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(e):
            raise _disk_full_error(out_dir, step, written) from e
        raise
    _move_into_place(tmp, final)
    for _, old in list_checkpoints(out_dir)[:-keep]:
        discard(old)
    return final


def _move_into_place(tmp: str, final: str) -> None:
    out_dir = os.path.dirname(final)
    aside = None
    if os.path.exists(final):  # a re-run of the same step replaces it; clean_out_dir restores it if we die here
        aside = os.path.join(out_dir, _REPLACED + os.path.basename(final))
        shutil.rmtree(aside, ignore_errors=True)
        os.rename(final, aside)
    os.rename(tmp, final)
    fsync_dir(out_dir)
    if aside is not None:
        shutil.rmtree(aside)


def discard(path: str) -> None:
    """Remove a checkpoint directory without ever leaving part of it under its own name."""
    parent = os.path.dirname(path)
    trash = os.path.join(parent, _REMOVED + os.path.basename(path))
    shutil.rmtree(trash, ignore_errors=True)
    os.rename(path, trash)
    fsync_dir(parent)
    shutil.rmtree(trash)


def clean_out_dir(out_dir: str) -> list[str]:
    """Remove what an interrupted run left half done, before a run starts in ``out_dir``: ``.tmp-*`` files and
    directories, and torn ``checkpoint-N`` directories. A checkpoint moved aside by a re-save of its step whose
    replacement never landed is put back. Returns the names removed."""
    removed = []
    for name in sorted(os.listdir(out_dir)):
        path = os.path.join(out_dir, name)
        if name.startswith(_REPLACED):
            final = os.path.join(out_dir, name[len(_REPLACED) :])
            if not os.path.exists(final) and is_complete(path):
                os.rename(path, final)
                continue
        if name.startswith(TMP_PREFIX) or (_NAME.match(name) and os.path.isdir(path) and not is_complete(path)):
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.unlink(path)
            removed.append(name)
    if removed:
        fsync_dir(out_dir)
        logger.warning("removed what an interrupted run left incomplete in %s: %s", out_dir, ", ".join(removed))
    return removed


def load_trainer_state(path: str) -> dict[str, Any]:
    file = os.path.join(path, STATE_FILE)
    if not os.path.exists(file):
        raise FileNotFoundError(f"{path} is not a training checkpoint: {STATE_FILE} is missing")
    return torch.load(file, map_location="cpu", weights_only=False)


# ---------------------------------------------------------------------------------------------------- durability
def fsync_dir(path: str) -> None:
    """Make the entries of directory ``path`` (names created, renamed or removed in it) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str) -> None:
    """fsync every file under ``root``, then every directory, deepest first."""
    for directory, _, files in os.walk(root, topdown=False):
        for name in files:
            fd = os.open(os.path.join(directory, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(directory)


# ---------------------------------------------------------------------------------------------------- disk full
def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` (or an error it was raised from) is "no space left on device": an OSError with ENOSPC or
    EDQUOT, or the message of a library that reports the OS error in text (safetensors, tokenizers: Rust I/O)."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [error]
    while pending:
        e = pending.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(e)
        if "No space left on device" in text or f"os error {errno.ENOSPC}" in text or "Disk quota exceeded" in text:
            return True
        pending += [e.__cause__, e.__context__]
    return False


def _disk_full_error(out_dir: str, step: int, written: int) -> DiskFullError:
    usage = shutil.disk_usage(out_dir)
    previous = latest_checkpoint(out_dir)
    kept = f"the previous checkpoint {previous} is intact" if previous else "there is no earlier checkpoint"
    return DiskFullError(
        f"the disk is full: no space left on the device of {os.path.abspath(out_dir)} while writing "
        f"checkpoint-{step} ({written / 2**20:.1f} MiB written, {usage.free / 2**20:.1f} MiB free now that the "
        f"partial checkpoint is removed); {kept}. Free some space (or lower keep_checkpoints) and resume."
    )


def _tree_size(root: str) -> int:
    return sum(os.path.getsize(os.path.join(d, name)) for d, _, files in os.walk(root) for name in files)
