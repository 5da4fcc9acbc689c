"""Policy-gradient losses for RL on verifiable rewards: CISPO (MiniMax-M1 §3.1), with GRPO and DAPO as baselines.

All three take per-token log-probabilities of the sampled responses under the policy being trained (``logp``, with
gradient) and under the policy that sampled them (``old_logp``), one advantage per response (or per token), and a
mask of the response tokens. With r = exp(logp - old_logp), the token importance-sampling ratio:

* ``grpo``  PPO clip, -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A); each response's tokens averaged, then the
  responses averaged (sample-level, as DeepSeekMath). Defaults eps_low = eps_high = 0.2.
* ``dapo``  the same surrogate with clip-higher (eps_low 0.2, eps_high 0.28), averaged over every token of the batch
  (token-level). Dynamic sampling and the overlong penalty act on rollouts: see :mod:`mmx.rl.advantages`.
* ``cispo`` REINFORCE with a clipped, stop-gradient IS weight: -sg(clip(r, 1 - eps_low, 1 + eps_high)) A log pi.
  No token's gradient is ever dropped. The lower bound is off by default (eps_low None), as in M1; eps_high
  defaults to 4.0, i.e. a cap of 5 on the weight (ScaleRL's recommendation; M1 does not publish its value).
  Normalised by the tokens of each prompt's group of G responses (M1 Eq. 4), then averaged over groups.

eps values are offsets from 1 throughout (cap = 1 + eps_high), as in verl and the M1 report; TRL's CISPO
``epsilon_high`` is the absolute cap instead (TRL 5.0 = eps_high 4.0 here).
"""

from __future__ import annotations

from typing import Any

import torch

LOSSES = ("cispo", "grpo", "dapo")
DEFAULTS: dict[str, dict[str, Any]] = {
    "grpo": {"eps_low": 0.2, "eps_high": 0.2, "aggregation": "sample"},
    "dapo": {"eps_low": 0.2, "eps_high": 0.28, "aggregation": "token"},
    "cispo": {"eps_low": None, "eps_high": 4.0, "aggregation": "group"},
}
MAX_LOG_RATIO = 20.0  # exp(20) ~ 5e8: a guard against overflow, far outside any clip range


def _aggregate(per_token: torch.Tensor, mask: torch.Tensor, how: str, group_ids: torch.Tensor | None) -> torch.Tensor:
    if how == "token":
        return (per_token * mask).sum() / mask.sum().clamp(min=1)
    if how == "sample":
        per_sample = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        return per_sample.mean()
    if how == "group":
        if group_ids is None:  # one group: the batch
            return (per_token * mask).sum() / mask.sum().clamp(min=1)
        groups, index = torch.unique(group_ids, return_inverse=True)
        sums = torch.zeros(len(groups), dtype=per_token.dtype, device=per_token.device)
        counts = torch.zeros_like(sums)
        sums = sums.index_add(0, index, (per_token * mask).sum(-1))
        counts = counts.index_add(0, index, mask.sum(-1).to(sums.dtype))
        return (sums / counts.clamp(min=1)).mean()
    raise ValueError(f"aggregation must be 'token', 'sample' or 'group', got {how!r}")


def policy_loss(
    name: str,
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    return_stats: bool = False,
    **cfg: Any,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, float]]:
    """The loss to minimise for one batch of responses.

    logp, old_logp, mask: [B, T]; advantages: [B] (one per response) or [B, T]. Keyword settings: ``eps_low``,
    ``eps_high`` (offsets from 1; eps_low None disables the lower bound), ``aggregation`` ("token", "sample",
    "group"), ``group_ids`` [B] (which prompt each response answers; for group aggregation), ``kl_coef`` with
    ``ref_logp`` [B, T] (k3 estimator of KL(pi || ref), added per token; off by default).
    With ``return_stats`` a dict of metrics comes back too: the fraction of tokens whose gradient the clip dropped,
    whose weight was clipped, and that the PPO trust-region mask (M1 Eq. 7) would drop."""
    if name not in LOSSES:
        raise ValueError(f"unknown policy loss {name!r}; use one of {', '.join(LOSSES)}")
    unknown = set(cfg) - {"eps_low", "eps_high", "aggregation", "group_ids", "kl_coef", "ref_logp"}
    if unknown:
        raise ValueError(f"unknown policy_loss setting {sorted(unknown)[0]!r}")
    settings = {**DEFAULTS[name], **cfg}
    eps_low, eps_high = settings["eps_low"], settings["eps_high"]
    if logp.shape != old_logp.shape or logp.shape != mask.shape:
        raise ValueError(
            f"logp {tuple(logp.shape)}, old_logp {tuple(old_logp.shape)} and mask "
            f"{tuple(mask.shape)} must have the same shape"
        )
    mask = mask.to(logp.dtype)
    adv = advantages.to(logp.dtype)
    if adv.dim() == 1:
        adv = adv[:, None].expand_as(logp)
    old_logp = old_logp.detach()
    log_ratio = (logp - old_logp).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    ratio = log_ratio.exp()
    lower = 0.0 if eps_low is None else 1.0 - eps_low
    upper = float("inf") if eps_high is None else 1.0 + eps_high

    if name == "cispo":
        weight = ratio.detach().clamp(min=lower, max=upper)
        per_token = -weight * adv * logp
        zero_grad = adv == 0
        clipped = (ratio.detach() != weight) & ~zero_grad
    else:
        unclipped = ratio * adv
        clipped_ratio = ratio.clamp(min=lower, max=upper)
        per_token = -torch.minimum(unclipped, clipped_ratio * adv)
        # min() picks the constant clipped branch exactly when the ratio left the trust region in the direction the
        # advantage pushes: those tokens get no gradient.
        outside = ((adv > 0) & (ratio > upper)) | ((adv < 0) & (ratio < lower))
        zero_grad = outside | (adv == 0)
        clipped = outside

    kl_coef = settings.get("kl_coef") or 0.0
    kl = None
    if kl_coef:
        ref_logp = settings.get("ref_logp")
        if ref_logp is None:
            raise ValueError("kl_coef needs ref_logp (the reference policy's log-probabilities)")
        delta = (ref_logp.detach() - logp).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
        kl = delta.exp() - delta - 1  # k3: unbiased, non-negative
        per_token = per_token + kl_coef * kl

    loss = _aggregate(per_token, mask, settings["aggregation"], settings.get("group_ids"))
    if not return_stats:
        return loss
    with torch.no_grad():
        n = mask.sum().clamp(min=1)
        trust = ((adv > 0) & (ratio > 1 + 0.28)) | ((adv < 0) & (ratio < 1 - 0.2))  # Eq. 7 with DAPO's bounds

        def frac(x: torch.Tensor) -> float:
            return float((x.to(mask.dtype) * mask).sum() / n)

        stats = {
            "dropped_fraction": frac(zero_grad & (adv != 0)),  # non-zero advantage, yet no gradient
            "clipped_fraction": frac(clipped),
            "trust_region_masked_fraction": frac(trust),
            "ratio_mean": float((ratio * mask).sum() / n),
            "ratio_max": float((ratio * mask + (mask == 0) * -1e9).max()) if mask.any() else 1.0,
        }
        if kl is not None:
            stats["kl"] = float((kl * mask).sum() / n)
    return loss, stats
