"""Reinforcement learning on verifiable rewards: CISPO (MiniMax-M1), GRPO and DAPO."""

from mmx.rl.losses import policy_loss

__all__ = ["policy_loss"]
