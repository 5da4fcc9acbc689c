"""MiniMax decoder: embedding, layers (lightning or softmax attention, then MoE), final norm, LM head.

Module and parameter names follow transformers' MiniMax / MiniMaxM2 classes, so ``state_dict()`` keys are the
transformers-native names; :mod:`mmx.model.checkpoint_io` maps the official checkpoint names onto them.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from mmx.config import MiniMaxConfig
from mmx.model.attention import SoftmaxAttention
from mmx.model.cache import AttentionCache
from mmx.model.checkpoint_io import load_checkpoint, save_model
from mmx.model.lightning import LightningAttention
from mmx.model.linear import Linear
from mmx.model.moe import SparseMoeBlock
from mmx.model.norm import RMSNorm
from mmx.model.params import parameter_counts
from mmx.model.rotary import RotaryEmbedding

# Parameters kept in float32 whatever the model dtype: the router decides discrete expert choices.
FP32_PARAMETER_SUFFIXES = ("mlp.gate.weight", "mlp.e_score_correction_bias")


def _scaled_sum(residual: torch.Tensor, alpha: float, update: torch.Tensor, beta: float) -> torch.Tensor:
    """alpha * residual + beta * update in one pass over memory when beta is 1 (every released checkpoint)."""
    if beta != 1.0:
        update = update * beta
    return torch.add(update, residual, alpha=alpha)


class DecoderLayer(nn.Module):
    """x <- alpha * r + beta * Attn(RMSNorm(x)), then the same with the MoE, where r is the normalised input
    under postnorm (M1: DeepNorm-style) and the raw input otherwise (M2: plain pre-norm)."""

    def __init__(self, config: MiniMaxConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.is_lightning = config.is_lightning(layer_idx)
        self.postnorm = config.postnorm
        self.attn_alpha, self.attn_beta, self.mlp_alpha, self.mlp_beta = config.residual_factors(layer_idx)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        attn_cls = LightningAttention if self.is_lightning else SoftmaxAttention
        self.self_attn = attn_cls(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SparseMoeBlock(config)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: AttentionCache | None
    ) -> torch.Tensor:
        h = self.input_layernorm(x)
        x = _scaled_sum(h if self.postnorm else x, self.attn_alpha, self.self_attn(h, rope, cache), self.attn_beta)
        h = self.post_attention_layernorm(x)
        return _scaled_sum(h if self.postnorm else x, self.mlp_alpha, self.mlp(h), self.mlp_beta)


class MiniMaxModel(nn.Module):
    def __init__(self, config: MiniMaxConfig):
        super().__init__()
        self.config = config
        # Built from an empty tensor: nn.Embedding's own init would run normal_ even on the meta device, which
        # costs ~80 MB of one-time imports; MiniMaxForCausalLM initialises every weight itself.
        self.embed_tokens = nn.Embedding(
            config.vocab_size, config.hidden_size, _weight=torch.empty(config.vocab_size, config.hidden_size)
        )
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config.rotary_dim, config.rope_theta)
        self.gradient_checkpointing = False  # recompute each layer's activations in backward (training only)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: AttentionCache | None = None,
    ) -> torch.Tensor:
        b, t = input_ids.shape
        if positions is None:
            positions = (
                cache.positions(b, t, input_ids.device)
                if cache is not None
                else torch.arange(t, device=input_ids.device).expand(b, t)
            )
        elif positions.dim() == 1:
            positions = positions.expand(b, t)
        rope = self.rotary(positions)
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, rope, cache, use_reentrant=False)
            else:
                x = layer(x, rope, cache)
        if cache is not None:
            cache.advance(t)
        return self.norm(x)


class MiniMaxForCausalLM(nn.Module):
    """MiniMax-M1 / Text-01 / M2 language model. ``model(ids)`` maps [batch, seq] token ids to float32 logits
    [batch, seq, vocab]."""

    def __init__(self, config: MiniMaxConfig):
        super().__init__()
        self.config = config
        self.model = MiniMaxModel(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        if self.lm_head.weight.device.type != "meta":
            self.init_weights()

    def tie_weights(self) -> None:
        """Share the LM head with the input embedding when the config says so (re-run after ``to_empty``,
        which replaces parameters one module at a time)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: AttentionCache | None = None,
    ) -> torch.Tensor:
        self._check_ids(input_ids)
        return self.compute_logits(self.model(input_ids, positions, cache))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head; logits come back in float32 (in the head weight's dtype before that: bf16 unless the head was
        loaded in float32, which M1's report recommends for RL)."""
        return self.lm_head(hidden.to(self.lm_head.weight.dtype)).float()  # a sharded head gathers its vocabulary

    def _check_ids(self, input_ids: torch.Tensor) -> None:
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"input_ids must be an integer tensor [batch, seq]; got {input_ids.dtype} {tuple(input_ids.shape)}"
            )
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.vocab_size):
            raise ValueError(
                f"token ids must lie in [0, {self.config.vocab_size}); got range "
                f"[{int(input_ids.min())}, {int(input_ids.max())}]"
            )

    # ------------------------------------------------------------------ properties and helpers
    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def cast(self, dtype: torch.dtype) -> MiniMaxForCausalLM:
        """Cast to ``dtype``, keeping the router weights and routing bias in float32."""
        self.to(dtype)
        for name, tensor in [*self.named_parameters(), *self.named_buffers()]:
            if name.endswith(FP32_PARAMETER_SUFFIXES):
                tensor.data = tensor.data.float()
        return self

    @torch.no_grad()
    def init_weights(self, seed: int | None = None, std: float | None = None) -> MiniMaxForCausalLM:
        """Random initialisation as transformers does it: normal(0, initializer_range) for matrices and
        embeddings, ones for norms, zeros for the routing bias. ``seed`` None draws from torch's global RNG."""
        generator = None if seed is None else torch.Generator(device="cpu").manual_seed(seed)
        std = self.config.initializer_range if std is None else std
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=generator, dtype=torch.float32) * std)
        for name, buf in self.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.zero_()
        return self

    def parameter_counts(self) -> dict[str, int]:
        return parameter_counts(self)

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        dtype: torch.dtype | str | None = None,
        device: str | torch.device = "cpu",
    ) -> MiniMaxForCausalLM:
        return load_checkpoint(cls, path, dtype=dtype, device=device)

    def save_pretrained(
        self, path: str | os.PathLike, dialect: str | None = None, max_shard_size: int | str = "5GB"
    ) -> None:
        from mmx.model.quantization import is_quantized

        if is_quantized(self):
            raise ValueError(
                "this model's decoder weights are int8 in memory (quantization='int8'), and checkpoints hold the "
                "weights in full precision: save the model before quantising it (the engine quantises at load time)"
            )
        save_model(self, path, dialect=dialect, max_shard_size=max_shard_size)
