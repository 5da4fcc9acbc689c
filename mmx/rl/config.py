"""``mmx rl`` configuration (YAML or JSON with ``--key value`` overrides, like ``mmx train``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mmx.rl.losses import LOSSES
from mmx.train.config import ConfigFile


@dataclass
class RLConfig(ConfigFile):
    KIND = "rl config"

    # policy and task
    model: str | None = None  # checkpoint directory; None: the embedded mmx-tiny
    task: str = "arithmetic"  # "arithmetic" or a .jsonl file of prompts
    task_options: dict[str, Any] = field(default_factory=dict)  # e.g. {"use_tools": false, "max_steps": 5}
    reward: str | None = None  # custom reward "module:function" or "file.py:function"
    format_reward: float = 0.0  # added when the output is well formed (closed reasoning, finished, non-empty)
    # objective
    loss: str = "cispo"  # cispo, grpo or dapo
    loss_settings: dict[str, Any] = field(default_factory=dict)  # eps_low, eps_high, aggregation (see policy_loss)
    kl_coef: float = 0.0  # KL to the starting policy (k3); off, as in CISPO and DAPO
    dynamic_sampling: bool = False  # DAPO: drop prompt groups whose rewards are all equal, refill with new prompts
    max_refill_rounds: int = 2
    overlong_buffer: int = 0  # DAPO soft overlong penalty over the last N tokens before max_tokens (0: off)
    # rollouts
    group_size: int = 8  # G responses per prompt
    prompts_per_step: int = 8
    max_tokens: int = 192  # per model turn
    max_turns: int = 3
    temperature: float = 1.0
    stop_after_confident_tokens: int | None = None  # M1's early truncation (3000 there); None: off
    rollout_dtype: str = "float32"  # the engine's weights; float32 shares the trainer's tensors
    # updates
    minibatches: int = 4  # optimizer steps per rollout batch (off-policy reuse grows with it)
    epochs: int = 1  # passes over the rollout batch
    lr: float = 2e-5
    betas: tuple[float, float] = (0.9, 0.95)  # M1 §3.2
    adam_eps: float = 1e-15  # M1 §3.2
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    precision: str = "fp32"  # "fp32", or "bf16" autocast
    fp32_lm_head: bool = True  # logits in float32 even under bf16 autocast (M1 §3.2)
    # bookkeeping
    steps: int = 50
    eval_every: int = 10
    eval_problems: int = 200
    save_every: int = 50
    out_dir: str = "runs/rl"
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # YAML gives a list
        self.check(
            {
                "loss": self.loss in LOSSES,
                "group_size": self.group_size >= 2,
                "prompts_per_step": self.prompts_per_step >= 1,
                "max_tokens": self.max_tokens >= 1,
                "max_turns": self.max_turns >= 1,
                "temperature": self.temperature > 0,
                "rollout_dtype": self.rollout_dtype in ("float32", "bfloat16"),
                "minibatches": 1 <= self.minibatches <= self.prompts_per_step,
                "epochs": self.epochs >= 1,
                "lr": self.lr > 0,
                "precision": self.precision in ("fp32", "bf16"),
                "steps": self.steps >= 1,
                "save_every": self.save_every >= 1,
                "overlong_buffer": 0 <= self.overlong_buffer < self.max_tokens,
            }
        )
