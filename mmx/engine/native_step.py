"""Decode steps of up to NATIVE_ROWS sequences in one C call (``mmx_decode_rows`` in mmx/ops/decode_rows.c), for
MiniMax models on the CPU: M2's softmax layers, M1's lightning and softmax layers, MoE after each.

A decode step streams the weights once, and for few sequences what it costs beyond that is overhead: a compiled
graph of the step runs ~27 OpenMP regions or barriers a layer, and at one sequence its dot products keep one
accumulator chain per output row, which int8 weights (widened as they are read) cannot feed at the core's speed.
The C step runs the whole forward in one parallel region with 6 barriers a layer: 16 weight rows at a time for one
sequence, blocks of 4 weight rows by 4 sequences for more, each chosen expert read once for all its tokens. It
reads the model's tensors and the cache's K/V pools in place through pointers taken once: the engine's model keeps
its tensors for its lifetime (an RL weight sync copies values into them), as the compiled graphs also assume.

Taken when :func:`build` finds every piece it knows: float32 (or int8-quantised) decoder weights on the CPU, K/V in
float32, bfloat16 or float16, float32 lightning states, SiLU activations, sizes that are multiples of 16, and the
kernels built. Anything else (bf16 weights, FP8, another activation) keeps the compiled graphs, and :func:`build`
says why.
``MMX_NATIVE_DECODE=0`` turns it off (for comparisons).
"""

from __future__ import annotations

import ctypes
import os

import torch

from mmx.engine.cache import HybridCache
from mmx.engine.sequence import Sequence
from mmx.model.lightning import LightningAttention
from mmx.model.linear import Linear
from mmx.model.modeling import MiniMaxForCausalLM
from mmx.model.moe import Experts
from mmx.model.norm import RMSNorm
from mmx.model.quantization import Int8Experts, Int8Linear
from mmx.ops.expert_rows import VECTOR, library_path
from mmx.utils.logging import get_logger

logger = get_logger(__name__)

# Steps of up to this many sequences run natively; larger ones take the compiled graphs. Native against the graphs,
# two engines alternating (docs/benchmarks.md): tiny M2 0.42-0.63x the step time at 1 sequence, 0.75-0.88x at 4-16,
# 0.68-0.75x at 32-64; the tiny hybrid 0.80x at 1, 1.04x at 16 (int8 0.95x), 0.78x at 32.
NATIVE_ROWS = 64


class _Matrix(ctypes.Structure):
    _fields_ = [
        ("weight", ctypes.c_void_p),
        ("scale", ctypes.c_void_p),
        ("scale_bf16", ctypes.c_int32),
    ]


class _Layer(ctypes.Structure):
    _fields_ = [
        ("input_norm", ctypes.c_void_p),
        ("post_norm", ctypes.c_void_p),
        ("q_norm", ctypes.c_void_p),
        ("k_norm", ctypes.c_void_p),
        ("q", _Matrix),
        ("k", _Matrix),
        ("v", _Matrix),
        ("o", _Matrix),
        ("router", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
        ("gate_up", _Matrix),
        ("down", _Matrix),
        ("keys", ctypes.c_void_p),
        ("values", ctypes.c_void_p),
        ("attn_alpha", ctypes.c_float),
        ("attn_beta", ctypes.c_float),
        ("mlp_alpha", ctypes.c_float),
        ("mlp_beta", ctypes.c_float),
        ("lightning", ctypes.c_int32),
        ("qkv", _Matrix),
        ("gate", _Matrix),
        ("lightning_norm", ctypes.c_void_p),
        ("rates", ctypes.c_void_p),
        ("states", ctypes.c_void_p),
        ("lightning_eps", ctypes.c_float),
    ]


class _Model(ctypes.Structure):
    _fields_ = [
        *((name, ctypes.c_int32) for name in ("layers", "hidden", "heads", "kv_heads", "head_dim", "rotary_dim")),
        *((name, ctypes.c_int32) for name in ("experts", "top_k", "inner", "vocab", "block_size")),
        ("postnorm", ctypes.c_int32),
        ("sigmoid_router", ctypes.c_int32),
        ("kv_dtype", ctypes.c_int32),
        ("eps", ctypes.c_float),
        ("attn_scale", ctypes.c_float),
        ("embed", ctypes.c_void_p),
        ("final_norm", ctypes.c_void_p),
        ("lm_head", _Matrix),
        ("inv_freq", ctypes.c_void_p),
        ("layer", ctypes.POINTER(_Layer)),
    ]


def enabled() -> bool:
    """``MMX_NATIVE_DECODE``: on unless "0"."""
    return os.environ.get("MMX_NATIVE_DECODE", "1") != "0"


class _Unsupported(Exception):
    """Why the C step cannot take this model (the compiled graphs keep its decode steps)."""


def _float32(t: torch.Tensor | None, what: str, optional: bool = False) -> torch.Tensor | None:
    if t is None and optional:
        return None
    if t is None or t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous():
        raise _Unsupported(f"{what} is not a contiguous float32 CPU tensor")
    return t


def _matrix(module: torch.nn.Module, what: str, keep: list[torch.Tensor]) -> _Matrix:
    """A linear map as the kernel reads it: a float32 Linear without bias, or an int8 one with its row scales."""
    if type(module) is Linear and module.bias is None:
        weight, scale = _float32(module.weight, what), None
    elif type(module) is Int8Linear:
        weight, scale = module.qweight, module.weight_scale
    else:
        raise _Unsupported(f"{what} is a {type(module).__name__}")
    return _weights(weight, scale, what, keep)


def _weights(weight: torch.Tensor, scale: torch.Tensor | None, what: str, keep: list[torch.Tensor]) -> _Matrix:
    if scale is not None:
        if (
            weight.dtype != torch.int8
            or not weight.is_contiguous()
            or scale.dtype not in (torch.float32, torch.bfloat16)
        ):
            raise _Unsupported(f"{what}: int8 weights with float32 or bfloat16 scales expected")
        if not scale.is_contiguous() or scale.numel() != weight.numel() // weight.shape[-1]:
            raise _Unsupported(f"{what}: one contiguous scale per row expected")
    keep.extend(t for t in (weight, scale) if t is not None)
    return _Matrix(
        weight.data_ptr(),
        None if scale is None else scale.data_ptr(),
        int(scale is not None and scale.dtype == torch.bfloat16),
    )


def _experts(experts: torch.nn.Module, keep: list[torch.Tensor]) -> tuple[_Matrix, _Matrix]:
    if experts.act_name != "silu":
        raise _Unsupported(f"experts with {experts.act_name!r} (SiLU only)")
    if type(experts) is Experts:
        gate_up, down = _float32(experts.gate_up_proj, "experts"), _float32(experts.down_proj, "experts")
        return _weights(gate_up, None, "gate_up", keep), _weights(down, None, "down", keep)
    if type(experts) is Int8Experts:
        gate_up = _weights(experts.gate_up_qweight, experts.gate_up_scale, "gate_up", keep)
        return gate_up, _weights(experts.down_qweight, experts.down_scale, "down", keep)
    raise _Unsupported(f"experts of type {type(experts).__name__}")


def _norm(module: torch.nn.Module | None, what: str, keep: list[torch.Tensor]) -> int | None:
    if module is None:
        return None
    if type(module) is not RMSNorm:
        raise _Unsupported(f"{what} is a {type(module).__name__}")
    keep.append(_float32(module.weight, what))
    return module.weight.data_ptr()


# the K/V pools' element types the kernel reads, in its order (KV_F32, KV_BF16, KV_F16 in decode_rows.c)
KV_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _pool(t: torch.Tensor, what: str) -> torch.Tensor:
    if t.dtype not in KV_DTYPES or t.device.type != "cpu" or not t.is_contiguous():
        raise _Unsupported(f"the {what} pool ({t.dtype}, {t.device})")
    return t


def _lightning(attn: torch.nn.Module, states: torch.Tensor, keep: list[torch.Tensor]) -> dict:
    """A lightning layer's fields: its projections, norm, decay rates and state pool."""
    if type(attn) is not LightningAttention:
        raise _Unsupported(f"a lightning layer of type {type(attn).__name__}")
    rates = attn.rates(torch.device("cpu"))
    keep.extend((_float32(rates, "the decay rates"), _float32(states, "the lightning state pool")))
    return dict(
        lightning=1,
        o=_matrix(attn.out_proj, "out_proj", keep),
        qkv=_matrix(attn.qkv_proj, "qkv_proj", keep),
        gate=_matrix(attn.output_gate, "output_gate", keep),
        lightning_norm=_norm(attn.norm, "the lightning norm", keep),
        rates=rates.data_ptr(),
        states=states.data_ptr(),
        lightning_eps=attn.norm.eps,
    )


class NativeStep:
    """Calls ``mmx_decode_rows`` for a decode step of a few sequences: their logits, their K/V written into the
    pools."""

    def __init__(self, model: MiniMaxForCausalLM, cache: HybridCache, path: str):
        config = model.config
        self.keep: list[torch.Tensor] = []  # every tensor the structs point into, alive as long as they are
        keep = self.keep
        if model.device.type != "cpu":
            raise _Unsupported(f"the model is on {model.device}")
        d, dh, inner = config.hidden_size, config.head_dim, config.intermediate_size
        if d % VECTOR or dh % VECTOR or inner % VECTOR or config.rotary_dim % 2 or config.rotary_dim > dh:
            raise _Unsupported(f"hidden {d}, head {dh}, expert {inner} sizes not all multiples of {VECTOR}")
        if any(config.is_lightning(i) for i in range(config.num_hidden_layers)) and config.hidden_act != "silu":
            raise _Unsupported(f"lightning layers with {config.hidden_act!r} (SiLU only)")
        layers = []
        for i, layer in enumerate(model.model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            gate_up, down = _experts(mlp.experts, keep)
            bias = _float32(mlp.e_score_correction_bias, "the routing bias", optional=True)
            keep.extend(t for t in (bias, _float32(mlp.gate.weight, "the router")) if t is not None)
            fields = dict(
                input_norm=_norm(layer.input_layernorm, "input_layernorm", keep),
                post_norm=_norm(layer.post_attention_layernorm, "post_attention_layernorm", keep),
                router=mlp.gate.weight.data_ptr(),
                bias=None if bias is None else bias.data_ptr(),
                gate_up=gate_up,
                down=down,
                attn_alpha=layer.attn_alpha,
                attn_beta=layer.attn_beta,
                mlp_alpha=layer.mlp_alpha,
                mlp_beta=layer.mlp_beta,
            )
            if config.is_lightning(i):
                fields.update(_lightning(attn, cache.states[i], keep))
            else:
                keys, values = _pool(cache.keys[i], "K"), _pool(cache.values[i], "V")
                keep.extend((keys, values))
                fields.update(
                    {f"{p}_norm": _norm(getattr(attn, f"{p}_norm"), f"{p}_norm", keep) for p in "qk"},
                    **{p: _matrix(getattr(attn, f"{p}_proj"), f"{p}_proj", keep) for p in "qkvo"},
                    keys=keys.data_ptr(),
                    values=values.data_ptr(),
                )
            layers.append(_Layer(**fields))
        self._layers = (_Layer * len(layers))(*layers)
        inv_freq = model.model.rotary.inv_freq(torch.device("cpu")).contiguous()
        keep.append(inv_freq)
        embed = _float32(model.model.embed_tokens.weight, "the embedding")
        keep.append(embed)
        self._model = _Model(
            config.num_hidden_layers,
            d,
            config.num_attention_heads,
            config.num_key_value_heads,
            dh,
            config.rotary_dim,
            config.num_local_experts,
            config.num_experts_per_tok,
            inner,
            config.vocab_size,
            cache.block_size,
            int(config.postnorm),
            int(config.scoring_func == "sigmoid"),
            KV_DTYPES.index(next(iter(cache.keys.values())).dtype) if cache.keys else 0,
            config.rms_norm_eps,
            dh**-0.5,
            embed.data_ptr(),
            _norm(model.model.norm, "the final norm", keep),
            _matrix(model.lm_head, "lm_head", keep),
            inv_freq.data_ptr(),
            self._layers,
        )
        self._model_ref = ctypes.byref(self._model)
        self._function = ctypes.CDLL(path).mmx_decode_rows
        self._function.restype = ctypes.c_int
        pointer, i64 = ctypes.c_void_p, ctypes.c_int64
        self._function.argtypes = [pointer, ctypes.c_int, *[pointer] * 4, i64, *[pointer] * 3, ctypes.c_int]
        self.vocab = config.vocab_size
        self.block_size = cache.block_size
        self.steps = 0  # decode steps taken (of any number of sequences)

    def __call__(self, seqs: list[Sequence]) -> torch.Tensor:
        """Logits [len(seqs), vocab] of each sequence's next token; each feeds its token at num_computed_tokens."""
        n, bs = len(seqs), self.block_size
        starts = [seq.num_computed_tokens for seq in seqs]
        rows = [seq.block_table[: a // bs + 1] for seq, a in zip(seqs, starts)]
        for seq, a, row in zip(seqs, starts, rows):
            if len(row) <= a // bs:  # the C step trusts its tables: one too short would read past them
                raise ValueError(f"{seq} has no cache block for position {a} (the scheduler grows it first)")
        width = max(len(row) for row in rows)
        longs = ctypes.c_int64 * n
        tokens = longs(*(seq.tokens(a, a + 1)[0] for seq, a in zip(seqs, starts)))
        write_at = longs(*(row[-1] * bs + a % bs for row, a in zip(rows, starts)))
        table = [block for row in rows for block in row + [0] * (width - len(row))]
        tables = (ctypes.c_int64 * len(table))(*table)
        logits = torch.empty(n, self.vocab)
        status = self._function(
            self._model_ref,
            n,
            tokens,
            longs(*starts),
            write_at,
            tables,
            width,
            longs(*(a + 1 for a in starts)),
            longs(*(seq.slot or 0 for seq in seqs)),
            logits.data_ptr(),
            torch.get_num_threads(),
        )
        if status:
            raise MemoryError("the native decode step could not allocate its scratch memory")
        self.steps += 1
        return logits


def build(model: MiniMaxForCausalLM, cache: HybridCache) -> NativeStep | None:
    """The C step for this model and cache, or None (logged, with the reason) where it cannot take them."""
    if not enabled():
        return None
    try:
        if not cache.uses_blocks:
            raise _Unsupported("no K/V pools")
        path = library_path()
        if path is None:
            raise _Unsupported("the CPU kernels could not be built")
        step = NativeStep(model, cache, path)
    except _Unsupported as e:
        logger.info("decode steps run compiled graphs (the native step does not take %s)", e)
        return None
    logger.info("decode steps of up to %d sequences run natively (mmx_decode_rows)", NATIVE_ROWS)
    return step
