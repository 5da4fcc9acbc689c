"""Training configuration: one dataclass, read from YAML or JSON, with ``key=value`` overrides from the command line.
An unknown key is an error that names it (a typo must not silently fall back to a default)."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any


class ConfigFile:
    """Loading for config dataclasses: YAML or JSON, ``key=value`` overrides, unknown keys named in the error."""

    PATH_KEYS: tuple[str, ...] = ()  # list-of-path keys resolved relative to the config file
    KIND = "config"

    @classmethod
    def load(cls, path: str | None, overrides: list[str] | None = None):
        data: dict[str, Any] = {}
        if path:
            with open(path, encoding="utf-8") as f:
                if path.endswith((".yaml", ".yml")):
                    import yaml

                    data = yaml.safe_load(f) or {}
                else:
                    data = json.load(f)
            if not isinstance(data, dict):
                raise ValueError(f"{path}: a {cls.KIND} is a mapping of keys to values")
            base = os.path.dirname(os.path.abspath(path))
            for key in cls.PATH_KEYS:  # data paths are relative to the config file
                if isinstance(data.get(key), list):
                    data[key] = [p if os.path.isabs(p) else os.path.join(base, p) for p in data[key]]
                elif isinstance(data.get(key), str) and os.path.exists(os.path.join(base, data[key])):
                    data[key] = os.path.join(base, data[key])
        for item in overrides or []:
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"override {item!r} is not key=value")
            try:
                data[key] = json.loads(value)
            except json.JSONDecodeError:
                data[key] = value
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown {cls.KIND} key {unknown[0]!r}; known keys: {', '.join(sorted(names))}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def check(self, checks: dict[str, bool]) -> None:
        for key, ok in checks.items():
            if not ok:
                raise ValueError(f"{self.KIND} key {key!r}: invalid value {getattr(self, key)!r}")


@dataclass
class TrainConfig(ConfigFile):
    PATH_KEYS = ("train_data", "eval_data")
    KIND = "train config"

    # model and text
    model: str = "tiny-m1"  # a preset name, or a checkpoint directory to continue from
    model_overrides: dict[str, Any] = field(default_factory=dict)  # config fields changed from the preset
    tokenizer: str | None = None  # tokenizer directory (default: the model directory's)
    # how SFT chats are rendered: a .jinja file, a built-in format's name (m1, m2), or None: the tokenizer's own
    # template, else the built-in one of the model's family
    chat_template: str | None = None
    # data
    task: str = "sft"  # "pretrain" (text, every token) or "sft" (chats, assistant tokens only)
    train_data: list[str] = field(default_factory=list)  # .txt (one document per file) or .jsonl files
    eval_data: list[str] = field(default_factory=list)
    seq_len: int = 512  # tokens per packed row
    # optimisation
    batch_size: int = 8  # rows per micro-batch, per process
    grad_accum: int = 1
    steps: int = 1000
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 50
    weight_decay: float = 0.1  # on matrices only
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    precision: str = "fp32"  # "fp32", or "bf16" autocast over float32 weights
    activation_checkpointing: bool = False
    aux_loss_coef: float | None = None  # MoE load balancing (softmax routers); None: the model config's value
    routing_bias_rate: float = 1e-3  # aux-loss-free routing-bias update (sigmoid routers with a bias)
    # bookkeeping
    out_dir: str = "runs/train"
    seed: int = 0
    eval_every: int = 100
    eval_batches: int = 20
    save_every: int = 200
    keep_checkpoints: int = 2
    progress: bool = True

    def __post_init__(self) -> None:
        self.check(
            {
                "task": self.task in ("pretrain", "sft"),
                "precision": self.precision in ("fp32", "bf16"),
                "seq_len": self.seq_len >= 8,
                "batch_size": self.batch_size >= 1,
                "grad_accum": self.grad_accum >= 1,
                "steps": self.steps >= 1,
                "lr": self.lr > 0 and self.min_lr >= 0,
                "warmup_steps": self.warmup_steps >= 0,
                "save_every": self.save_every >= 1,
                "keep_checkpoints": self.keep_checkpoints >= 1,
            }
        )
