"""From rewards to advantages: GRPO's group-relative advantage, DAPO's dynamic sampling and overlong penalty."""

from __future__ import annotations

import torch


def group_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor, std_normalize: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """A_i = (R_i - mean of its group) / (std of its group + eps) (M1 Eq. 2; population std). A group whose rewards
    are all equal gets zero advantages; a group of one response has nothing to compare with and gets zero too."""
    rewards = rewards.to(torch.float32)
    _, index = torch.unique(group_ids, return_inverse=True)
    groups = int(index.max()) + 1 if len(index) else 0
    count = torch.zeros(groups).index_add(0, index, torch.ones_like(rewards))
    mean = torch.zeros(groups).index_add(0, index, rewards) / count
    centred = rewards - mean[index]
    if not std_normalize:
        return centred
    var = torch.zeros(groups).index_add(0, index, centred**2) / count
    return centred / (var.sqrt()[index] + eps)


def informative_groups(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """DAPO's dynamic sampling keeps only groups whose rewards differ (the others carry no gradient): a bool mask
    over responses."""
    keep = torch.zeros_like(rewards, dtype=torch.bool)
    for g in torch.unique(group_ids):
        members = group_ids == g
        keep[members] = bool(rewards[members].max() != rewards[members].min())
    return keep


def overlong_penalty(length: int, max_length: int, buffer: int) -> float:
    """DAPO's soft overlong punishment (Eq. 13): 0 up to max_length - buffer, then a linear ramp to -1 at
    max_length, and -1 beyond."""
    if buffer <= 0:
        return -1.0 if length > max_length else 0.0
    start = max_length - buffer
    if length <= start:
        return 0.0
    if length <= max_length:
        return (start - length) / buffer
    return -1.0
