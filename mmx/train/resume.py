"""What resuming a killed run needs, for pretraining / SFT (:mod:`mmx.train.loop`) and RL (:mod:`mmx.rl.trainer`)
alike: the random-number-generator states a checkpoint records. (Removing what a killed save left half written is
:func:`mmx.train.checkpoint.clean_out_dir`.)

It sits below both loops so that neither imports the other.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def capture_rng() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
