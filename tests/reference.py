"""An independent float64 transcription of the official MiniMax forward pass, for tests only.

Written from the formulas in specs/m1_architecture.md §3 and specs/m2_and_formats.md §3, reading tensors by their
official checkpoint names. It shares no code with mmx: slopes, RoPE, attention, lightning recurrence and routing
are all re-derived here, slowly and plainly.
"""

from __future__ import annotations

import math

import torch

F64 = torch.float64


def ref_slopes(num_heads: int) -> list[float]:
    """ALiBi slopes (the official remote code's recipe), written out without recursion."""

    def ladder(n: int) -> list[float]:
        return [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]

    if math.log2(num_heads).is_integer():
        return ladder(num_heads)
    p = 2 ** int(math.log2(num_heads))
    return ladder(p) + ladder(2 * p)[0::2][: num_heads - p]


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w.to(F64) * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


def _act(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "silu":
        return x * torch.sigmoid(x)
    if name == "gelu":
        return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))
    raise ValueError(name)


def _rope(x: torch.Tensor, rotary_dim: int, theta: float) -> torch.Tensor:
    """x [T, heads, d]; rotate-half pairing j <-> j + R/2 inside the first R channels."""
    t = x.shape[0]
    half = rotary_dim // 2
    inv = [theta ** (-2.0 * j / rotary_dim) for j in range(half)]
    out = x.clone()
    for p in range(t):
        for j in range(half):
            c, s = math.cos(p * inv[j]), math.sin(p * inv[j])
            a, b = x[p, :, j], x[p, :, j + half]
            out[p, :, j] = a * c - b * s
            out[p, :, j + half] = b * c + a * s
    return out


def reference_logits(cfg: dict, w: dict[str, torch.Tensor], ids: list[int]) -> torch.Tensor:
    """Logits [T, vocab] for one sequence. ``cfg`` holds plain values:
    layer_types (0 lightning / 1 softmax), hidden, heads, kv_heads, head_dim, rotary_dim, theta, eps, experts,
    top_k, act, alphas (attn_lin, attn_full, mlp) and betas, postnorm, scoring ("softmax"/"sigmoid"), qk_norm."""
    g = {k: v.to(F64) for k, v in w.items()}
    H, G, d = cfg["heads"], cfg["kv_heads"], cfg["head_dim"]
    L = len(cfg["layer_types"])
    x = g["model.embed_tokens.weight"][torch.tensor(ids)]
    T = x.shape[0]
    for i, kind in enumerate(cfg["layer_types"]):
        p = f"model.layers.{i}."
        u = _rms(x, g[p + "input_layernorm.weight"], cfg["eps"])
        if kind == 0:
            proj = _act(cfg["act"], u @ g[p + "self_attn.qkv_proj.weight"].T).view(T, H, 3 * d)
            q, k, v = proj[..., :d], proj[..., d : 2 * d], proj[..., 2 * d :]
            factor = 1 - i / (L - 1) + 1e-5 if L > 1 else 1 + 1e-5
            o = torch.zeros(T, H, d, dtype=F64)
            for h, slope in enumerate(ref_slopes(H)):
                lam = math.exp(-slope * factor)
                state = torch.zeros(d, d, dtype=F64)
                for t in range(T):
                    state = lam * state + torch.outer(k[t, h], v[t, h])
                    o[t, h] = q[t, h] @ state
            y = _rms(o.reshape(T, H * d), g[p + "self_attn.norm.weight"], 1e-6)
            a = (torch.sigmoid(u @ g[p + "self_attn.output_gate.weight"].T) * y) @ g[p + "self_attn.out_proj.weight"].T
            alpha, beta = cfg["alphas"][0], cfg["betas"][0]
        else:
            q = u @ g[p + "self_attn.q_proj.weight"].T
            k = u @ g[p + "self_attn.k_proj.weight"].T
            v = (u @ g[p + "self_attn.v_proj.weight"].T).view(T, G, d)
            if cfg.get("qk_norm"):
                q = _rms(q, g[p + "self_attn.q_norm.weight"], cfg["eps"])
                k = _rms(k, g[p + "self_attn.k_norm.weight"], cfg["eps"])
            q = _rope(q.view(T, H, d), cfg["rotary_dim"], cfg["theta"])
            k = _rope(k.view(T, G, d), cfg["rotary_dim"], cfg["theta"])
            o = torch.zeros(T, H, d, dtype=F64)
            for h in range(H):
                kv = h // (H // G)
                scores = (q[:, h] @ k[:, kv].T) / math.sqrt(d)
                scores = scores.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
                o[:, h] = torch.softmax(scores, dim=-1) @ v[:, kv]
            a = o.reshape(T, H * d) @ g[p + "self_attn.o_proj.weight"].T
            alpha, beta = cfg["alphas"][1], cfg["betas"][1]
        x = alpha * (u if cfg["postnorm"] else x) + beta * a
        u = _rms(x, g[p + "post_attention_layernorm.weight"], cfg["eps"])
        logits = u @ g[p + "block_sparse_moe.gate.weight"].T
        m = torch.zeros_like(u)
        for t in range(T):
            if cfg["scoring"] == "softmax":
                probs = torch.softmax(logits[t], dim=-1)
                chosen = torch.topk(probs, cfg["top_k"]).indices
            else:
                probs = torch.sigmoid(logits[t])
                chosen = torch.topk(probs + g[p + "block_sparse_moe.e_score_correction_bias"], cfg["top_k"]).indices
            weights = probs[chosen] / probs[chosen].sum()
            for wgt, e in zip(weights, chosen.tolist()):
                e_p = f"{p}block_sparse_moe.experts.{e}."
                hidden = _act(cfg["act"], g[e_p + "w1.weight"] @ u[t]) * (g[e_p + "w3.weight"] @ u[t])
                m[t] += wgt * (g[e_p + "w2.weight"] @ hidden)
        x = cfg["alphas"][2] * (u if cfg["postnorm"] else x) + cfg["betas"][2] * m
    x = _rms(x, g["model.norm.weight"], cfg["eps"])
    head = g.get("lm_head.weight", g["model.embed_tokens.weight"])
    return x @ head.T


def reference_cfg_from(config) -> dict:
    """The plain-value description of an mmx config (used to drive the reference)."""
    return {
        "layer_types": config.attn_type_list,
        "heads": config.num_attention_heads,
        "kv_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "rotary_dim": config.rotary_dim,
        "theta": config.rope_theta,
        "eps": config.rms_norm_eps,
        "top_k": config.num_experts_per_tok,
        "act": config.hidden_act,
        "alphas": (config.linear_attn_alpha_factor, config.full_attn_alpha_factor, config.mlp_alpha_factor),
        "betas": (config.linear_attn_beta_factor, config.full_attn_beta_factor, config.mlp_beta_factor),
        "postnorm": config.postnorm,
        "scoring": config.scoring_func,
        "qk_norm": config.use_qk_norm,
    }
