"""Training checkpoints under faults: a new checkpoint is complete and fsynced before an old one goes, a kill during
rotation or a torn directory never blocks a resume, a torn last metrics line is dropped, and a full disk is reported
as such with the previous checkpoint intact."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

import mmx
from mmx.cli.main import main
from mmx.config import MiniMaxConfig
from mmx.errors import DiskFullError
from mmx.model.modeling import MiniMaxForCausalLM
from mmx.train.checkpoint import (
    STATE_FILE,
    is_complete,
    list_checkpoints,
    load_trainer_state,
    save_checkpoint,
)
from mmx.train.config import TrainConfig
from mmx.train.loop import Trainer
from mmx.train.metrics import MetricsLog

from .test_train import config_for, losses, sft_dir  # noqa: F401  (sft_dir: the fixture, used by name)

STEPS = 6


def _config(data_dir, out_dir, **changes) -> dict:
    return config_for(data_dir, out_dir, steps=STEPS, save_every=2, eval_every=0, keep_checkpoints=1, **changes)


@pytest.fixture(scope="module")
def reference(sft_dir, tmp_path_factory):  # noqa: F811
    """An uninterrupted run: (its per-step losses, its output directory with checkpoints 2, 4 and 6)."""
    out = tmp_path_factory.mktemp("reference")
    Trainer(TrainConfig.from_dict(_config(sft_dir, out) | {"keep_checkpoints": 3})).train()
    return losses(out), out


def _tree_bytes(path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def _digest(path) -> dict[str, str]:
    return {name: hashlib.sha256((path / name).read_bytes()).hexdigest() for name in sorted(os.listdir(path))}


def _tiny(hidden: int = 64) -> MiniMaxForCausalLM:
    config = MiniMaxConfig.from_preset("tiny-m1", hidden_size=hidden, head_dim=16, intermediate_size=hidden)
    return MiniMaxForCausalLM(config).init_weights(seed=0)


# ---------------------------------------------------------------------------------------------------- ordering
def test_new_checkpoint_is_fsynced_and_in_place_before_an_old_one_goes(tmp_path, monkeypatch):
    """Every file of the new checkpoint and its directory are fsynced, it is renamed into place and the output
    directory fsynced, and only then is the old checkpoint renamed away and deleted."""
    model = _tiny()
    save_checkpoint(str(tmp_path), 1, model, None, {"step": 1}, keep=1)
    events: list[tuple[str, str]] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def rename(src, dst):
        events.append(("rename", f"{os.path.basename(src)} -> {os.path.basename(dst)}"))
        return real_rename(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    save_checkpoint(str(tmp_path), 2, model, None, {"step": 2}, keep=1)
    monkeypatch.undo()

    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2"]
    into_place = events.index(("rename", ".tmp-checkpoint-2 -> checkpoint-2"))
    rotated = events.index(("rename", "checkpoint-1 -> .tmp-removed-checkpoint-1"))
    tmp = str(tmp_path / ".tmp-checkpoint-2")
    synced_before = {path for kind, path in events[:into_place] if kind == "fsync"}
    assert {os.path.join(tmp, f) for f in os.listdir(tmp_path / "checkpoint-2")} | {tmp} <= synced_before
    assert ("fsync", str(tmp_path)) in events[into_place:rotated]  # the rename itself is durable before rotation
    assert ("fsync", str(tmp_path)) in events[rotated:]  # and so is the removal's rename


# ---------------------------------------------------------------------------------------------------- kills
_DIE_DURING_ROTATION = """
import json, os, shutil, signal, sys
import torch
torch.set_num_threads(int(sys.argv[2]))
from mmx.train.config import TrainConfig
from mmx.train.loop import Trainer
real_rmtree = shutil.rmtree
def rmtree_then_die(path, *args, **kwargs):
    if os.path.basename(path).startswith(".tmp-removed-") and os.path.isdir(path):
        os.unlink(os.path.join(path, "trainer_state.pt"))  # part of the old checkpoint is deleted ...
        os.kill(os.getpid(), signal.SIGKILL)  # ... when the run is killed
    return real_rmtree(path, *args, **kwargs)
shutil.rmtree = rmtree_then_die
Trainer(TrainConfig.from_dict(json.loads(sys.argv[1]))).train()
"""


def test_sigkill_during_rotation_then_resume(sft_dir, tmp_path, reference):  # noqa: F811
    out = tmp_path / "run"
    cfg = _config(sft_dir, out)
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    killed = subprocess.run(
        [sys.executable, "-c", _DIE_DURING_ROTATION, json.dumps(cfg), str(torch.get_num_threads())],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    # Killed while deleting checkpoint-2, after checkpoint-4 was complete: the half-deleted one is not a checkpoint.
    assert {"checkpoint-4", ".tmp-removed-checkpoint-2"} <= set(os.listdir(out))
    assert "checkpoint-2" not in os.listdir(out) and max(losses(out)) == 4

    trainer = Trainer(TrainConfig.from_dict(cfg), resume=True)
    assert trainer.resume_from == str(out / "checkpoint-4") and trainer.step == 4
    assert ".tmp-removed-checkpoint-2" not in os.listdir(out)  # cleaned at start
    trainer.train()
    assert losses(out) == reference[0]  # every step, bit for bit
    assert sorted(os.listdir(out)) == ["checkpoint-6", "loss.png", "metrics.jsonl"]


def test_torn_checkpoints_and_metrics_line_do_not_block_resume(sft_dir, tmp_path, reference):  # noqa: F811
    """What older versions or a crash could leave: checkpoint directories with weights but no trainer state, state but
    no weights, a truncated shard; leftover temporary entries; a checkpoint moved aside by a re-save of its step whose
    replacement never landed; and a last metrics line cut mid-write. The resume starts from the newest complete
    checkpoint (put back in place), after removing the rest, and continues the reference run exactly."""
    out = tmp_path / "run"
    out.mkdir()
    done = reference[1]

    def copy(source, name, drop=()):
        subprocess.run(["cp", "-r", str(done / source), str(out / name)], check=True)
        for file in drop:
            os.unlink(out / name / file)
        return out / name

    copy("checkpoint-4", ".tmp-replaced-checkpoint-4")  # killed while checkpoint-4 was being re-saved
    copy("checkpoint-6", "checkpoint-6", [STATE_FILE])  # weights, no trainer state
    copy("checkpoint-6", "checkpoint-8", ["model.safetensors"])  # trainer state, no weights
    truncated = copy("checkpoint-6", "checkpoint-10") / "model.safetensors"
    truncated.write_bytes(truncated.read_bytes()[:1000])
    copy("checkpoint-6", ".tmp-checkpoint-12")
    (out / ".tmp-metrics.jsonl").write_text("half")
    with open(done / "metrics.jsonl", "rb") as f:
        first_four = [line for line in f if json.loads(line)["step"] <= 4]
    with open(out / "metrics.jsonl", "wb") as f:
        f.writelines(first_four)
        f.write(b'{"step": 5, "loss": 3.\xe2\x82')  # torn mid-number, mid-character

    assert list_checkpoints(str(out)) == []  # nothing complete under a checkpoint-N name
    trainer = Trainer(TrainConfig.from_dict(_config(sft_dir, out)), resume=True)
    assert trainer.resume_from == str(out / "checkpoint-4") and trainer.step == 4
    assert sorted(os.listdir(out)) == ["checkpoint-4", "metrics.jsonl"]
    trainer.train()
    assert losses(out) == reference[0]
    assert sorted(os.listdir(out)) == ["checkpoint-6", "loss.png", "metrics.jsonl"]


def test_metrics_line_corrupt_in_the_middle_is_an_error_naming_it(tmp_path):
    log = MetricsLog(str(tmp_path / "metrics.jsonl"))
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, oops}\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl, line 2: not a JSON record"):
        log.read()
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n[2]\n')
    with pytest.raises(ValueError, match=r"line 2: a JSON list, not a record"):
        log.read()
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n\n{"step": 2}')  # blank line kept, torn tail dropped
    assert log.read() == [{"step": 1}]


# ---------------------------------------------------------------------------------------------------- a full disk
@contextlib.contextmanager
def small_disk(path, size: int):
    """A ``size``-byte tmpfs mounted at ``path`` (needs root and mount rights; skips the test otherwise)."""
    path.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs to fill needs root")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)]).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=True)


def _fill(disk, leave: int) -> None:
    """Fill the disk up to ``leave`` free bytes."""
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    with open(disk / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave))


@pytest.mark.parametrize("fills_during", ["weights", "trainer state"])
def test_full_disk_is_reported_and_the_previous_checkpoint_survives(fills_during, tmp_path):
    model = _tiny(hidden=256 if fills_during == "weights" else 32)
    big = {"blob": torch.zeros(2**20 if fills_during == "trainer state" else 16)}  # 4 MiB of "optimizer state"
    probe = tmp_path / "probe"
    save_checkpoint(str(probe), 1, model, None, big, keep=1)
    size = _tree_bytes(probe / "checkpoint-1")
    weights = os.path.getsize(probe / "checkpoint-1" / "model.safetensors")
    with small_disk(tmp_path / "disk", 64 * 2**20) as disk:
        out = disk / "run"
        save_checkpoint(str(out), 1, model, None, big | {"step": 1}, keep=1)
        before = _digest(out / "checkpoint-1")
        # Room for part of the weights, or for the weights but not the trainer state.
        _fill(disk, weights // 2 if fills_during == "weights" else weights + (size - weights) // 2)
        with pytest.raises(DiskFullError) as e:
            save_checkpoint(str(out), 2, model, None, big | {"step": 2}, keep=1)
        message = str(e.value)
        assert message.startswith("the disk is full: no space left on the device of " + str(out))
        assert f"the previous checkpoint {out / 'checkpoint-1'} is intact" in message
        assert e.value.errno == 28 and isinstance(e.value, OSError)
        assert sorted(os.listdir(out)) == ["checkpoint-1"]  # the partial checkpoint-2 is gone
        assert _digest(out / "checkpoint-1") == before and is_complete(str(out / "checkpoint-1"))
        assert load_trainer_state(str(out / "checkpoint-1"))["step"] == 1
        mmx.load_model(out / "checkpoint-1")


def test_full_disk_during_training_is_a_clean_cli_error(sft_dir, tmp_path, reference, capsys):  # noqa: F811
    """`mmx train` on a disk with room for one checkpoint and a half: the second save fails, the message says the
    disk is full and where, and the first checkpoint stays complete."""
    one = _tree_bytes(reference[1] / "checkpoint-6")
    cfg = tmp_path / "train.json"
    cfg.write_text(json.dumps(_config(sft_dir, tmp_path / "unused")))
    with small_disk(tmp_path / "disk", int(one * 1.5)) as disk:
        assert main(["train", str(cfg), "--out-dir", str(disk)]) == 1
        err = capsys.readouterr().err
        assert "the disk is full: no space left on the device of " + str(disk) in err and "Traceback" not in err
        assert f"the previous checkpoint {disk / 'checkpoint-2'} is intact" in err
        assert [step for step, _ in list_checkpoints(str(disk))] == [2]
        assert not any(name.startswith(".tmp-") for name in os.listdir(disk))
