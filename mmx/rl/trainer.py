"""The loop behind ``mmx rl``: sample G responses per prompt with the mmx engine, score them, turn rewards into
group-relative advantages, and take several minibatch steps of CISPO / GRPO / DAPO on the same rollouts.

The engine runs the policy's own weights: in float32 it shares the trainer's tensors, so every optimizer step is
visible to the next rollout; in bfloat16 it holds a copy that is refreshed after each update. The sampler records
the log-probability of every token it draws, and those are the "old" log-probs of the importance ratio, so the
ratio also measures how far trainer and sampler disagree numerically (reported as their correlation).

Multi-turn episodes (the model calls tools, reads the results, continues) are trained turn by turn: each turn is
one sample of exactly the prompt tokens the engine saw and the tokens it produced, all carrying the episode's
advantage.
"""

from __future__ import annotations

import copy
import os
import random
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from mmx.chat.tokenizer import Tokenizer
from mmx.embedded import resolve_model
from mmx.engine import SamplingParams
from mmx.llm import LLM
from mmx.model.modeling import MiniMaxForCausalLM
from mmx.model.weights import load_model
from mmx.rl.advantages import group_advantages, informative_groups, overlong_penalty
from mmx.rl.config import RLConfig
from mmx.rl.losses import policy_loss
from mmx.rl.rewards import format_ok
from mmx.rl.tasks import build_task
from mmx.tasks.episodes import Episode, run_episodes
from mmx.train.checkpoint import clean_out_dir, latest_checkpoint, load_trainer_state, save_checkpoint
from mmx.train.metrics import MetricsLog, column, plot_panels
from mmx.train.resume import capture_rng, restore_rng
from mmx.utils.logging import get_logger

logger = get_logger(__name__)


@dataclass
class Sample:
    """One model turn: the exact prompt it was given, what it generated, and the sampler's log-probs."""

    prompt_ids: list[int]
    output_ids: list[int]
    old_logprobs: list[float]
    advantage: float
    group: int


def episode_samples(episode: Episode, advantage: float, group: int) -> list[Sample]:
    return [
        Sample(t.prompt_ids, t.output_ids, t.logprobs, advantage, group)
        for t in episode.turns
        if t.output_ids and t.logprobs is not None and len(t.logprobs) == len(t.output_ids)
    ]


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    if x.numel() < 2 or float(x.std()) == 0 or float(y.std()) == 0:
        return 1.0
    return float(torch.corrcoef(torch.stack([x.double(), y.double()]))[0, 1])


class RLTrainer:
    def __init__(self, cfg: RLConfig, resume: str | bool | None = None):
        self.cfg = cfg
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.model_path = resolve_model(cfg.model)
        self.tokenizer = Tokenizer.from_pretrained(self.model_path)
        self.policy: MiniMaxForCausalLM = load_model(self.model_path, dtype=torch.float32)
        self.task = build_task(cfg.task, dict(cfg.task_options), cfg.reward)
        self.reference = copy.deepcopy(self.policy).eval() if cfg.kl_coef else None
        if cfg.rollout_dtype == "float32":
            rollout_model = self.policy  # shared tensors: always in sync
        else:
            rollout_model = copy.deepcopy(self.policy).cast(torch.bfloat16)
            if cfg.fp32_lm_head:
                rollout_model.lm_head.float()
        self.rollout_model = rollout_model
        max_len = min(self.policy.config.max_position_embeddings, 4096)
        self.llm = LLM(
            rollout_model,
            self.tokenizer,
            max_model_len=max_len,
            max_num_seqs=cfg.group_size * cfg.prompts_per_step,
            seed=cfg.seed,
        )
        self.optimizer = torch.optim.AdamW(
            self.policy.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.adam_eps, weight_decay=cfg.weight_decay
        )
        self.step = 0
        os.makedirs(cfg.out_dir, exist_ok=True)
        clean_out_dir(cfg.out_dir)
        self.metrics = MetricsLog(os.path.join(cfg.out_dir, "metrics.jsonl"))
        found = None
        if resume:
            found = (
                resume
                if isinstance(resume, str) and resume not in ("latest", "auto")
                else latest_checkpoint(cfg.out_dir)
            )
        if found:
            self._restore(found)
        else:
            self.metrics.truncate_after(-1)

    # ------------------------------------------------------------------ checkpoints
    def _restore(self, path: str) -> None:
        state = load_trainer_state(path)
        weights = load_model(path, dtype=torch.float32).state_dict()
        with torch.no_grad():
            self.policy.load_state_dict(weights)
        self._sync_rollout_weights()
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = state["step"]
        restore_rng(state["rng"][0])
        self.metrics.truncate_after(self.step)
        logger.info("resumed RL from %s at step %d", path, self.step)

    def save(self) -> str:
        state = {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "rng": [capture_rng()],
            "config": self.cfg.to_dict(),
        }
        return save_checkpoint(self.cfg.out_dir, self.step, self.policy, self.tokenizer, state, keep=2)

    def _sync_rollout_weights(self) -> None:
        self.llm.engine.reset_prefix_cache()  # what the old weights computed must not be reused
        if self.rollout_model is self.policy:
            return
        with torch.no_grad():
            for target, source in zip(self.rollout_model.parameters(), self.policy.parameters()):
                target.copy_(source)
            for target, source in zip(self.rollout_model.buffers(), self.policy.buffers()):
                target.copy_(source)

    # ------------------------------------------------------------------ rollouts
    def _sampling(self) -> SamplingParams:
        cfg = self.cfg
        return SamplingParams(
            temperature=cfg.temperature,
            max_tokens=cfg.max_tokens,
            logprobs=0,
            stop_after_confident_tokens=cfg.stop_after_confident_tokens,
        )

    def _reward(self, episode: Episode) -> float:
        score = self.task.score(episode)
        reward = score.reward
        if self.cfg.format_reward and format_ok(episode):
            reward += self.cfg.format_reward
        if self.cfg.overlong_buffer:
            reward += min(
                overlong_penalty(len(t.output_ids), self.cfg.max_tokens, self.cfg.overlong_buffer)
                for t in episode.turns
            )
        episode.metadata["reward"] = reward
        return reward

    def rollout(self) -> tuple[list[list[Episode]], dict[str, float]]:
        """Groups of G scored episodes: prompts_per_step of them (with dynamic sampling, only groups whose rewards
        differ, refilled with new prompts for up to max_refill_rounds extra rounds)."""
        cfg = self.cfg
        rng = random.Random(cfg.seed * 1_000_003 + self.step)
        kept: list[list[Episode]] = []
        generated = scored = rounds = 0
        started = time.perf_counter()
        while len(kept) < cfg.prompts_per_step and rounds <= (cfg.max_refill_rounds if cfg.dynamic_sampling else 0):
            prompts = self.task.sample(rng, cfg.prompts_per_step - len(kept))
            groups = []
            for p, prompt in enumerate(prompts):
                group = []
                for g in range(cfg.group_size):
                    episode = Episode(copy.deepcopy(prompt.messages), prompt.tools, metadata=dict(prompt.metadata))
                    episode.metadata["seed"] = rng.getrandbits(40) + p * 131 + g
                    group.append(episode)
                groups.append(group)
            flat = [e for group in groups for e in group]
            stats = run_episodes(self.llm, flat, self.task.tools, self._sampling(), max_turns=cfg.max_turns)
            generated += stats["generated_tokens"]
            for group in groups:
                rewards = torch.tensor([self._reward(e) for e in group])
                scored += 1
                if not cfg.dynamic_sampling or bool(informative_groups(rewards, torch.zeros(len(group)))[0]):
                    kept.append(group)
            rounds += 1
        return kept, {
            "rollout_s": time.perf_counter() - started,
            "generated_tokens": generated,
            "groups_scored": scored,
            "groups_kept": len(kept),
        }

    # ------------------------------------------------------------------ updates
    def _batch(self, samples: list[Sample]) -> dict[str, torch.Tensor]:
        lengths = [len(s.prompt_ids) + len(s.output_ids) for s in samples]
        width = max(lengths) - 1
        ids = torch.zeros(len(samples), width + 1, dtype=torch.long)
        mask = torch.zeros(len(samples), width)
        old = torch.zeros(len(samples), width)
        for i, s in enumerate(samples):
            seq = s.prompt_ids + s.output_ids
            ids[i, : len(seq)] = torch.tensor(seq)
            start = len(s.prompt_ids) - 1  # the logits at position p predict token p + 1
            mask[i, start : start + len(s.output_ids)] = 1
            old[i, start : start + len(s.output_ids)] = torch.tensor(s.old_logprobs)
        return {
            "ids": ids,
            "mask": mask,
            "old": old,
            "adv": torch.tensor([s.advantage for s in samples]),
            "group": torch.tensor([s.group for s in samples]),
        }

    def _logits(self, model: MiniMaxForCausalLM, ids: torch.Tensor) -> torch.Tensor:
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.cfg.precision == "bf16")
        with autocast:
            hidden = model.model(ids)
        if self.cfg.fp32_lm_head:
            return F.linear(hidden.float(), model.lm_head.weight.float())
        with autocast:
            return model.compute_logits(hidden)

    def _token_logp(
        self, model: MiniMaxForCausalLM, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-prob of each next token [B, T-1], token entropies [B, T-1] without gradient)."""
        logits = self._logits(model, batch["ids"][:, :-1])
        logp_all = logits.log_softmax(-1)
        logp = logp_all.gather(-1, batch["ids"][:, 1:, None])[..., 0]
        with torch.no_grad():
            entropy = -(logp_all.exp() * logp_all).sum(-1)
        return logp, entropy

    def update(self, samples: list[Sample]) -> dict[str, float]:
        cfg = self.cfg
        self.policy.train()
        groups = sorted({s.group for s in samples})
        rng = random.Random(cfg.seed * 7919 + self.step)
        totals: dict[str, list[float]] = {}
        first = True
        for _ in range(cfg.epochs):
            rng.shuffle(groups)
            chunks = [groups[i :: cfg.minibatches] for i in range(min(cfg.minibatches, len(groups)))]
            for chunk in chunks:
                members = set(chunk)
                batch = self._batch([s for s in samples if s.group in members])
                logp, entropy = self._token_logp(self.policy, batch)
                extra: dict[str, Any] = {}
                if self.reference is not None:
                    with torch.no_grad():
                        extra = {"kl_coef": cfg.kl_coef, "ref_logp": self._token_logp(self.reference, batch)[0]}
                loss, stats = policy_loss(
                    cfg.loss,
                    logp,
                    batch["old"],
                    batch["adv"],
                    batch["mask"],
                    group_ids=batch["group"],
                    return_stats=True,
                    **cfg.loss_settings,
                    **extra,
                )
                loss.backward()
                stats["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.grad_clip))
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                mask = batch["mask"].bool()
                stats["entropy"] = float(entropy[mask].mean())
                if first:  # before any update: trainer and sampler ran the same weights
                    stats["prob_correlation"] = pearson(logp.detach()[mask].exp(), batch["old"][mask].exp())
                    first = False
                for key, value in stats.items():
                    totals.setdefault(key, []).append(value)
        self.policy.eval()
        self._sync_rollout_weights()
        out = {k: (v[0] if k == "prob_correlation" else sum(v) / len(v)) for k, v in totals.items()}
        out["ratio_max"] = max(totals.get("ratio_max", [1.0]))
        return out

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> float:
        episodes = self.task.eval_episodes(self.cfg.eval_problems)
        greedy = SamplingParams(temperature=0.0, max_tokens=self.cfg.max_tokens)
        run_episodes(self.llm, episodes, self.task.tools, greedy, max_turns=self.cfg.max_turns)
        return sum(self.task.score(e).correct for e in episodes) / max(1, len(episodes))

    # ------------------------------------------------------------------ the run
    def train_step(self) -> dict[str, Any]:
        started = time.perf_counter()
        groups, stats = self.rollout()
        record: dict[str, Any] = {"step": self.step + 1, **stats}
        episodes = [e for g in groups for e in g]
        if episodes:
            record["reward"] = sum(e.metadata["reward"] for e in episodes) / len(episodes)
            record["accuracy"] = sum(bool(e.metadata.get("correct")) for e in episodes) / len(episodes)
            record["response_length"] = sum(e.generated_tokens for e in episodes) / len(episodes)
            record["truncated_repetitions"] = sum(t.finish_reason == "repetition" for e in episodes for t in e.turns)
            if "tool_success" in episodes[0].metadata:
                record["tool_success"] = sum(e.metadata["tool_success"] for e in episodes) / len(episodes)
            samples = []
            for gid, group in enumerate(groups):
                rewards = torch.tensor([e.metadata["reward"] for e in group])
                advantages = group_advantages(rewards, torch.zeros(len(group), dtype=torch.long))
                for e, a in zip(group, advantages.tolist()):
                    samples += episode_samples(e, a, gid)
            t0 = time.perf_counter()
            record.update(self.update(samples))
            record["update_s"] = time.perf_counter() - t0
        else:  # dynamic sampling found nothing to learn from: skip the update
            record.update(reward=None, accuracy=None)
        self.step += 1
        record["step_s"] = time.perf_counter() - started
        return record

    def train(self) -> list[dict[str, Any]]:
        cfg = self.cfg
        history = []
        if self.step == 0 and cfg.eval_every:
            accuracy = self.evaluate()
            self.metrics.write({"step": 0, "eval_accuracy": accuracy})
            logger.info("step 0: eval accuracy %.3f", accuracy)
        bar = tqdm(total=cfg.steps, initial=self.step, desc=f"rl {cfg.loss}", disable=not cfg.progress, unit="step")
        while self.step < cfg.steps:
            record = self.train_step()
            done = self.step >= cfg.steps
            if cfg.eval_every and (self.step % cfg.eval_every == 0 or done):
                record["eval_accuracy"] = self.evaluate()
            history.append(record)
            self.metrics.write(record)
            bar.update(1)
            shown = {k: record.get(k) for k in ("reward", "accuracy", "eval_accuracy") if record.get(k) is not None}
            bar.set_postfix({k: f"{v:.3f}" for k, v in shown.items()})
            if self.step % cfg.save_every == 0 or done:
                self.save()
                self.plot()
        bar.close()
        return history

    def plot(self) -> None:
        records = self.metrics.read()
        panels = {
            "reward and accuracy": {
                "train reward": column(records, "reward"),
                "train accuracy": column(records, "accuracy"),
                "eval accuracy (greedy)": column(records, "eval_accuracy"),
            },
            "entropy": {"token entropy": column(records, "entropy")},
            "response length": {"tokens per episode": column(records, "response_length")},
            "clipping": {
                "weight clipped": column(records, "clipped_fraction"),
                "gradient dropped": column(records, "dropped_fraction"),
                "PPO-masked (M1 Eq. 7)": column(records, "trust_region_masked_fraction"),
            },
        }
        plot_panels(os.path.join(self.cfg.out_dir, "rl.png"), panels)
