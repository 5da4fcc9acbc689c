"""What resuming a killed run needs, for pretraining / SFT (:mod:`mmx.train.loop`) and RL (:mod:`mmx.rl.trainer`)
alike: the random-number-generator states a checkpoint records, and removal of the files a killed save left half
written.

It sits below both loops so that neither imports the other.
"""

from __future__ import annotations

import os
import random
import shutil
from typing import Any

import numpy as np
import torch


def capture_rng() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def remove_partial_writes(out_dir: str) -> None:
    """Temporary files and directories of a run that was killed while writing (never read, only renamed)."""
    for name in os.listdir(out_dir):
        if name.startswith(".tmp-"):
            path = os.path.join(out_dir, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)
