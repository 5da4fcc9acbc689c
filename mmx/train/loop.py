"""The training loop behind ``mmx train``: pretraining and SFT of MiniMax models, one process or many.

One optimizer step consumes ``batch_size x grad_accum x world_size`` packed rows. The loss is the sum of token
cross-entropies divided by the number of target tokens in the whole step (counted before the first forward), so a
run's losses and gradients do not depend on how the step is split across micro-batches and processes.
"""

from __future__ import annotations

import math
import os
import random
import time
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from mmx.chat import formats
from mmx.chat.tokenizer import Tokenizer
from mmx.config import ARCH_M1, MiniMaxConfig
from mmx.model.cache import PackedDocuments
from mmx.model.modeling import MiniMaxForCausalLM
from mmx.model.moe import SparseMoeBlock
from mmx.model.weights import build_empty_model, load_model
from mmx.train.checkpoint import clean_out_dir, latest_checkpoint, load_trainer_state, save_checkpoint
from mmx.train.config import TrainConfig
from mmx.train.data import IGNORE, Batch, BatchStream, PackedDataset, load_documents
from mmx.train.metrics import MetricsLog, plot_loss
from mmx.train.parallel import (
    DistEnv,
    full_optimizer_state,
    full_state_dict,
    load_full_optimizer_state,
    shard_model,
)
from mmx.train.resume import capture_rng, restore_rng
from mmx.utils.logging import get_logger

logger = get_logger(__name__)


# ---------------------------------------------------------------------------------------------------- pieces
def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices (and stacked expert matrices) only, never on norms or biases."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``lr``, then a cosine down to ``min_lr`` at the last step (as a multiple of ``lr``)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    floor = cfg.min_lr / cfg.lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def moe_blocks(model: torch.nn.Module) -> list[SparseMoeBlock]:
    return [m for m in model.modules() if isinstance(m, SparseMoeBlock)]


def load_balancing_loss(blocks: list[SparseMoeBlock], valid: torch.Tensor) -> torch.Tensor:
    """Switch-Transformer auxiliary loss of softmax routers, averaged over layers: E * sum_e f_e * P_e, with f_e the
    share of (token, slot) choices that went to expert e and P_e its mean router probability, over real tokens.
    It is k at perfect balance and grows as routing concentrates."""
    losses = []
    for block in blocks:
        if block.gate.scoring_func != "softmax" or block.routing is None:
            continue
        logits, ids = block.routing
        logits, ids = logits[valid], ids[valid]
        e = logits.shape[-1]
        share = torch.bincount(ids.reshape(-1), minlength=e).float() / max(1, ids.shape[0])
        prob = logits.softmax(dim=-1).mean(dim=0)
        losses.append(e * (share * prob).sum())
    return torch.stack(losses).mean() if losses else torch.zeros(())


def resolve_tokenizer(cfg: TrainConfig, model_dir: str | None) -> Tokenizer:
    source = cfg.tokenizer or model_dir
    if source is None:
        raise ValueError("train config key 'tokenizer': a model built from a preset needs a tokenizer directory")
    return Tokenizer.from_pretrained(source)


def resolve_template(cfg: TrainConfig, tokenizer: Tokenizer, architecture: str) -> str | None:
    """The template SFT chats are rendered with (pretraining renders none)."""
    if cfg.task != "sft":
        return None
    return formats.resolve_template(cfg.chat_template, tokenizer.chat_template, architecture)


# ---------------------------------------------------------------------------------------------------- trainer
class Trainer:
    def __init__(self, cfg: TrainConfig, resume: str | bool | None = None):
        self.cfg = cfg
        self.env = DistEnv.from_environment()
        if self.env.is_main and os.path.isdir(cfg.out_dir):
            clean_out_dir(cfg.out_dir)  # before choosing a checkpoint: what it puts back or removes counts
        self.env.barrier()
        self.resume_from = self._find_resume(resume)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)

        model_dir = cfg.model if os.path.isdir(cfg.model) else None
        self.tokenizer = resolve_tokenizer(cfg, model_dir)
        self.model = self._build_model(model_dir)
        self.config: MiniMaxConfig = self.model.config
        self.template = resolve_template(cfg, self.tokenizer, self.config.architecture)
        if self.template is not None and self.tokenizer.chat_template is None:
            self.tokenizer.chat_template = self.template  # saved checkpoints then chat out of the box
        self.model.train()
        self.model.model.gradient_checkpointing = cfg.activation_checkpointing
        self.blocks = moe_blocks(self.model)
        for block in self.blocks:
            block.record_routing = True
        self.aux_coef = cfg.aux_loss_coef if cfg.aux_loss_coef is not None else self.config.router_aux_loss_coef

        pad_id = self.tokenizer.eos_token_id or 0
        docs = load_documents(cfg.train_data, cfg.task, self.tokenizer, self.template, cfg.seq_len)
        self.dataset = PackedDataset(docs, cfg.seq_len, cfg.seed, pad_id)
        self.stream = BatchStream(self.dataset, cfg.batch_size * cfg.grad_accum * self.env.world_size)
        self.eval_dataset = None
        if cfg.eval_data:
            eval_docs = load_documents(cfg.eval_data, cfg.task, self.tokenizer, self.template, cfg.seq_len)
            self.eval_dataset = PackedDataset(eval_docs, cfg.seq_len, cfg.seed, pad_id, shuffle=False)

        if self.env.distributed:
            shard_model(self.model)
        self.optimizer = build_optimizer(self.model, cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, cfg))
        self.step = 0
        self.tokens_seen = 0
        os.makedirs(cfg.out_dir, exist_ok=True)
        self.metrics = MetricsLog(os.path.join(cfg.out_dir, "metrics.jsonl"))
        if self.resume_from:
            self._restore(self.resume_from)
        elif self.env.is_main:
            self.metrics.truncate_after(0)
        if self.env.is_main:
            counts = self.model.parameter_counts() if not self.env.distributed else None
            logger.info(
                "training %s: %d documents, %d tokens, %d rows/step of %d tokens%s",
                cfg.model,
                len(docs),
                self.dataset.tokens,
                self.stream.rows_per_batch,
                cfg.seq_len,
                f", {counts['total']:,} parameters" if counts else "",
            )

    # ------------------------------------------------------------------ set-up
    def _find_resume(self, resume: str | bool | None) -> str | None:
        if not resume:
            return None
        if isinstance(resume, str) and resume not in ("latest", "auto"):
            if not os.path.isdir(resume):
                raise FileNotFoundError(f"--resume: no checkpoint directory {resume}")
            return resume
        found = latest_checkpoint(self.cfg.out_dir)
        if found is None:
            logger.info("no checkpoint in %s yet: starting from step 0", self.cfg.out_dir)
        return found

    def _build_model(self, model_dir: str | None) -> MiniMaxForCausalLM:
        source = self.resume_from or model_dir
        if source is not None:  # weights on disk (a resumed run, or continued training of a checkpoint)
            model = load_model(source, dtype=torch.float32)
            if self.cfg.model_overrides:
                logger.warning("model_overrides are ignored when the model comes from %s", source)
            return model
        overrides = dict(self.cfg.model_overrides)
        overrides.setdefault("vocab_size", self.tokenizer.vocab_size)
        overrides.setdefault("torch_dtype", "float32")
        if self.tokenizer.eos_token_id is not None:
            overrides.setdefault("eos_token_id", self.tokenizer.eos_token_id)
        config = MiniMaxConfig.from_preset(self.cfg.model, **overrides)
        if config.architecture == ARCH_M1:
            # A new M1-family model is written in the transformers dialect, with transformers' decay ladder and RoPE
            # over the whole head (transformers 5.23 ignores M1's partial rotary_dim), so that transformers computes
            # exactly what mmx does. model_overrides can still ask for the official choices.
            native = {"dialect": "transformers", "lightning_slopes": "transformers", "rotary_dim": config.head_dim}
            config = config.replace(**{k: v for k, v in native.items() if k not in self.cfg.model_overrides})
        if self.tokenizer.vocab_size > config.vocab_size:
            raise ValueError(
                f"model_overrides key 'vocab_size': {config.vocab_size} is smaller than the tokenizer's "
                f"{self.tokenizer.vocab_size} tokens"
            )
        model = build_empty_model(config, torch.float32, "cpu")
        model.init_weights(seed=self.cfg.seed)
        return model

    def _restore(self, path: str) -> None:
        state = load_trainer_state(path)
        load_full_optimizer_state(self.model, self.optimizer, state["optimizer"], self.env)
        self.scheduler.load_state_dict(state["scheduler"])
        # The schedule is a function of the step: recompute the learning rate so that a resumed run with a changed
        # `steps` or `lr` follows the new schedule instead of the rate stored with the optimizer.
        self.scheduler.base_lrs = [self.cfg.lr] * len(self.optimizer.param_groups)
        for group in self.optimizer.param_groups:
            group["initial_lr"] = self.cfg.lr
            group["lr"] = self.cfg.lr * lr_factor(state["step"], self.cfg)
        self.stream.load_state_dict(state["data"])
        self.step = state["step"]
        self.tokens_seen = state["tokens_seen"]
        restore_rng(state["rng"][self.env.rank % len(state["rng"])])
        if self.env.is_main:
            self.metrics.truncate_after(self.step)
            logger.info("resumed from %s at step %d", path, self.step)

    # ------------------------------------------------------------------ one step
    def _micro_batches(self) -> list[Batch]:
        rows = self.stream.next_rows()
        bs, world = self.cfg.batch_size, self.env.world_size
        mine = []
        for a in range(self.cfg.grad_accum):
            start = (a * world + self.env.rank) * bs
            mine.append(self.dataset.collate(rows[start : start + bs]))
        return mine

    def _autocast(self):
        if self.cfg.precision == "bf16":
            return torch.autocast(self.env.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def _forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of token cross-entropies, auxiliary loss) of one micro-batch."""
        device = self.env.device
        ids, labels = batch.input_ids.to(device), batch.labels.to(device)
        cache = None if batch.single_document_rows else PackedDocuments(batch.doc_ids.to(device))
        with self._autocast():
            logits = self.model(ids, cache=cache)
        ce = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE, reduction="sum"
        )
        aux = load_balancing_loss(self.blocks, (batch.doc_ids >= 0).reshape(-1).to(device))
        return ce, aux

    def train_step(self) -> dict[str, float]:
        started = time.perf_counter()
        micro = self._micro_batches()
        counts = self.env.sum(torch.tensor([sum(b.num_targets for b in micro)], dtype=torch.float64))
        total_targets = max(1.0, float(counts[0]))
        loads = [torch.zeros(self.config.num_local_experts, dtype=torch.float64) for _ in self.blocks]
        ce_sum, aux_sum = 0.0, 0.0
        for batch in micro:
            ce, aux = self._forward(batch)
            # FSDP averages gradients over processes; scaling by the world size turns that into a sum.
            loss = ce * (self.env.world_size / total_targets)
            if self.aux_coef:
                loss = loss + aux * (self.aux_coef / len(micro))
            loss.backward()
            ce_sum += float(ce.detach())
            aux_sum += float(aux.detach()) / len(micro)
            valid = (batch.doc_ids >= 0).reshape(-1)
            for load, block in zip(loads, self.blocks):
                if block.routing is not None:
                    load += torch.bincount(block.routing[1][valid].reshape(-1).cpu(), minlength=load.numel()).double()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        self._update_routing_bias(loads)
        for block in self.blocks:
            block.routing = None  # release the last forward's routing tensors
        totals = self.env.sum(torch.tensor([ce_sum, aux_sum, sum(b.input_ids.numel() for b in micro)]))
        self.step += 1
        tokens = int(totals[2])
        self.tokens_seen += tokens
        elapsed = time.perf_counter() - started
        return {
            "step": self.step,
            "loss": float(totals[0]) / total_targets,
            "aux_loss": float(totals[1]) / self.env.world_size,
            "lr": lr,
            "grad_norm": float(grad_norm),
            "tokens": self.tokens_seen,
            "tokens_per_s": tokens / elapsed,
            "step_time_s": elapsed,
        }

    def _update_routing_bias(self, loads: list[torch.Tensor]) -> None:
        """Aux-loss-free balancing of sigmoid routers (DeepSeek-V3, used by M2): raise the selection bias of
        under-loaded experts and lower it for over-loaded ones by a fixed rate, from the step's global loads."""
        if not self.cfg.routing_bias_rate:
            return
        for load, block in zip(loads, self.blocks):
            bias = block.e_score_correction_bias
            if bias is None:
                continue
            load = self.env.sum(load)
            bias += (self.cfg.routing_bias_rate * torch.sign(load.mean() - load)).to(bias)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> float | None:
        if self.eval_dataset is None:
            return None
        self.model.eval()
        rows = self.eval_dataset.rows(0)[: self.cfg.eval_batches * self.cfg.batch_size * self.env.world_size]
        mine = rows[self.env.rank :: self.env.world_size]
        ce_sum, count = 0.0, 0
        for start in range(0, max(len(mine), 1), self.cfg.batch_size):
            part = mine[start : start + self.cfg.batch_size]
            if not part:  # FSDP needs every process in every forward: run a padding row
                part = [[]]
            batch = self.eval_dataset.collate(part)
            ce, _ = self._forward(batch)
            ce_sum += float(ce)
            count += batch.num_targets
        totals = self.env.sum(torch.tensor([ce_sum, count], dtype=torch.float64))
        self.model.train()
        return float(totals[0]) / max(1.0, float(totals[1]))

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> str | None:
        model_state = full_state_dict(self.model, self.env)
        optim_state = full_optimizer_state(self.model, self.optimizer, self.env)
        rng = [capture_rng()]
        if self.env.distributed:
            import torch.distributed as dist

            gathered: list[Any] = [None] * self.env.world_size
            dist.all_gather_object(gathered, rng[0])
            rng = gathered
        path = None
        if self.env.is_main:
            model = self.model
            if self.env.distributed:  # an unsharded copy to write the HF files from
                model = build_empty_model(self.config, torch.float32, "cpu")
                model.load_state_dict(model_state)
            state = {
                "step": self.step,
                "tokens_seen": self.tokens_seen,
                "optimizer": optim_state,
                "scheduler": self.scheduler.state_dict(),
                "data": self.stream.state_dict(),
                "rng": rng,
                "config": self.cfg.to_dict(),
                "world_size": self.env.world_size,
            }
            path = save_checkpoint(self.cfg.out_dir, self.step, model, self.tokenizer, state, self.cfg.keep_checkpoints)
        self.env.barrier()
        return path

    # ------------------------------------------------------------------ the run
    def train(self) -> list[dict[str, float]]:
        cfg = self.cfg
        history: list[dict[str, float]] = []
        bar = tqdm(
            total=cfg.steps,
            initial=self.step,
            desc="train",
            disable=not (cfg.progress and self.env.is_main),
            unit="step",
        )
        while self.step < cfg.steps:
            record = self.train_step()
            history.append(record)
            bar.update(1)
            bar.set_postfix(
                loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}", lr=f"{record['lr']:.2e}"
            )
            done = self.step >= cfg.steps
            if cfg.eval_every and (self.step % cfg.eval_every == 0 or done):
                eval_loss = self.evaluate()
                if eval_loss is not None:
                    record["eval_loss"] = eval_loss
                    if self.env.is_main:
                        bar.write(f"step {self.step}: eval loss {eval_loss:.4f}")
            if self.env.is_main:
                self.metrics.write(record)
            if self.step % cfg.save_every == 0 or done:
                self.save()
                if self.env.is_main:
                    plot_loss(self.metrics.read(), os.path.join(cfg.out_dir, "loss.png"))
        bar.close()
        return history

    def close(self) -> None:
        self.env.close()


def export_model(trainer: Trainer, path: str) -> None:
    """Write just the model and tokenizer (no optimizer state) to ``path``, from rank 0."""
    from mmx.model.weights import save_model

    state = full_state_dict(trainer.model, trainer.env)
    if trainer.env.is_main:
        model = trainer.model
        if trainer.env.distributed:
            model = build_empty_model(trainer.config, torch.float32, "cpu")
            model.load_state_dict(state)
        save_model(model, path)
        trainer.tokenizer.save_pretrained(path)
    trainer.env.barrier()
