"""Decode steps of up to NATIVE_ROWS sequences in one C call (``mmx_decode_rows`` in mmx/ops/decode_rows.c), for
MiniMax models on the CPU: M2's softmax layers, M1's lightning and softmax layers, MoE after each.

A decode step streams the weights once, and for few sequences what it costs beyond that is overhead: a compiled
graph of the step runs ~27 OpenMP regions or barriers a layer, and at one sequence its dot products keep one
accumulator chain per output row, which int8 weights (widened as they are read) cannot feed at the core's speed.
The C step runs the whole forward in one parallel region with 6 barriers a layer, each chosen expert read once for
all its tokens. It reads a copy of the weights repacked into panels (:func:`dense_panels`, :func:`gate_up_panels`,
:func:`down_panels`), each weight vector multiplied by up to 8 sequences as it streams in: 0.52-0.85x the step time
of reading the model's own layout (docs/benchmarks.md, "Weights in panels"), for the weights' size again in memory.
Where that copy would take more than PANEL_COPY_SHARE of the RAM (or with ``MMX_WEIGHT_PANELS=0``) it reads the
model's tensors in place. A panel copy is repacked whenever its tensor changes in place (an RL weight sync, an
optimizer step), which torch counts in the tensor's version; the K/V pools are read in place through pointers taken
once, as the engine's model and cache keep their tensors for their lifetime.

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
        ("panels", ctypes.c_int32),
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


# The panel copy costs the weights' size again in memory: made while it stays under this share of the machine's
# RAM, or as MMX_WEIGHT_PANELS says ("1": always, "0": never; the model's layout is then read in place).
PANEL_COPY_SHARE = 0.25


def copies_weights(model: torch.nn.Module) -> bool:
    """Whether the native step reads the weights from a panel copy (:data:`PANEL_COPY_SHARE`)."""
    setting = os.environ.get("MMX_WEIGHT_PANELS", "")
    if setting in ("0", "1"):
        return setting == "1"
    if setting:
        raise ValueError(f"MMX_WEIGHT_PANELS={setting!r}: expected 0 or 1")
    size = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    return size <= PANEL_COPY_SHARE * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def dense_panels(weight: torch.Tensor) -> torch.Tensor:
    """[rows, cols] as the C step reads it: panels of 16 rows, each [cols][16] (the last one padded with zero rows)."""
    rows, cols = weight.shape
    padded = torch.nn.functional.pad(weight, (0, 0, 0, -rows % 16))
    return padded.view(-1, 16, cols).transpose(1, 2).contiguous()


def gate_up_panels(weight: torch.Tensor) -> torch.Tensor:
    """[experts, 2 * inner, hidden] (gate rows, then up rows) as the C step reads them: panel p of an expert holds
    features 16p .. 16p + 15, a row per input column: their 16 gate weights, then their 16 up weights."""
    experts, rows, hidden = weight.shape
    return weight.view(experts, 2, rows // 32, 16, hidden).permute(0, 2, 4, 1, 3).contiguous()


def down_panels(weight: torch.Tensor) -> torch.Tensor:
    """[experts, hidden, inner] as the C step reads them: panel p of an expert holds outputs 32p .. 32p + 31, a row
    per input column; where hidden is an odd number of 16s, the last panel holds 16."""
    experts, hidden, inner = weight.shape
    full = hidden // 32 * 32
    parts = [weight[:, :full].reshape(experts, full // 32, 32, inner).transpose(2, 3).reshape(experts, -1)]
    if full < hidden:
        parts.append(weight[:, full:].transpose(1, 2).reshape(experts, -1))
    return torch.cat(parts, 1).contiguous()


class _Panels:
    """A weight repacked for the C step, and repacked again whenever the model's tensor changes in place (an RL weight
    sync, an optimizer step on the rollout model), which torch counts in the tensor's version."""

    def __init__(self, source: torch.Tensor, pack):
        self.source, self.pack = source, pack
        self.version = source._version
        self.panels = pack(source)

    def refresh(self, force: bool = False) -> None:
        if force or self.source._version != self.version:
            self.panels.copy_(self.pack(self.source))
            self.version = self.source._version


def _matrix(module: torch.nn.Module, what: str, keep: list[torch.Tensor], panels: list[_Panels] | None) -> _Matrix:
    """A linear map as the kernel reads it: a float32 Linear without bias, or an int8 one with its row scales; in
    panels (:func:`dense_panels`) where ``panels`` collects them, else read in place."""
    if type(module) is Linear and module.bias is None:
        weight, scale = _float32(module.weight, what), None
    elif type(module) is Int8Linear:
        weight, scale = module.qweight, module.weight_scale
    else:
        raise _Unsupported(f"{what} is a {type(module).__name__}")
    if panels is None:
        return _weights(weight, scale, what, keep)
    panels.append(_Panels(weight, dense_panels))
    return _weights(panels[-1].panels, scale, what, keep, rows=weight.shape[0])


def _weights(
    weight: torch.Tensor, scale: torch.Tensor | None, what: str, keep: list[torch.Tensor], rows: int | None = None
) -> _Matrix:
    """``rows``: the matrix's rows where ``weight`` is its panels (one scale per row)."""
    if scale is not None:
        if (
            weight.dtype != torch.int8
            or not weight.is_contiguous()
            or scale.dtype not in (torch.float32, torch.bfloat16)
        ):
            raise _Unsupported(f"{what}: int8 weights with float32 or bfloat16 scales expected")
        if not scale.is_contiguous() or scale.numel() != (rows or weight.numel() // weight.shape[-1]):
            raise _Unsupported(f"{what}: one contiguous scale per row expected")
    keep.extend(t for t in (weight, scale) if t is not None)
    return _Matrix(
        weight.data_ptr(),
        None if scale is None else scale.data_ptr(),
        int(scale is not None and scale.dtype == torch.bfloat16),
        int(rows is not None),
    )


def _expert_weights(
    experts: torch.nn.Module,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """gate_up, its row scales, down, its row scales (None for float32)."""
    if experts.act_name != "silu":
        raise _Unsupported(f"experts with {experts.act_name!r} (SiLU only)")
    if type(experts) is Experts:
        return _float32(experts.gate_up_proj, "experts"), None, _float32(experts.down_proj, "experts"), None
    if type(experts) is Int8Experts:
        return experts.gate_up_qweight, experts.gate_up_scale, experts.down_qweight, experts.down_scale
    raise _Unsupported(f"experts of type {type(experts).__name__}")


def _experts(
    weights: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None],
    keep: list[torch.Tensor],
    panels: list[_Panels] | None,
) -> tuple[_Matrix, _Matrix]:
    """The experts' two matrices: as panels (:func:`gate_up_panels`, :func:`down_panels`; a copy, since the model
    keeps its own layout for prefill and training) where ``panels`` collects them, else read in place."""
    gate_up, gate_up_scale, down, down_scale = weights
    if panels is None:
        return _weights(gate_up, gate_up_scale, "gate_up", keep), _weights(down, down_scale, "down", keep)
    packed = _Panels(gate_up, gate_up_panels), _Panels(down, down_panels)
    panels.extend(packed)
    return (
        _weights(packed[0].panels, gate_up_scale, "gate_up", keep, rows=gate_up.shape[0] * gate_up.shape[1]),
        _weights(packed[1].panels, down_scale, "down", keep, rows=down.shape[0] * down.shape[1]),
    )


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


def _lightning(
    attn: torch.nn.Module, states: torch.Tensor, keep: list[torch.Tensor], panels: list[_Panels] | None
) -> dict:
    """A lightning layer's fields: its projections, norm, decay rates and state pool."""
    if type(attn) is not LightningAttention:
        raise _Unsupported(f"a lightning layer of type {type(attn).__name__}")
    rates = attn.rates(torch.device("cpu"))
    keep.extend((_float32(rates, "the decay rates"), _float32(states, "the lightning state pool")))
    return dict(
        lightning=1,
        o=_matrix(attn.out_proj, "out_proj", keep, panels),
        qkv=_matrix(attn.qkv_proj, "qkv_proj", keep, panels),
        gate=_matrix(attn.output_gate, "output_gate", keep, panels),
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
        self.panels: list[_Panels] | None = [] if copies_weights(model) else None  # the weights' panel copies
        panels = self.panels
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
            gate_up, down = _experts(_expert_weights(mlp.experts), keep, panels)
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
                fields.update(_lightning(attn, cache.states[i], keep, panels))
            else:
                keys, values = _pool(cache.keys[i], "K"), _pool(cache.values[i], "V")
                keep.extend((keys, values))
                fields.update(
                    {f"{p}_norm": _norm(getattr(attn, f"{p}_norm"), f"{p}_norm", keep) for p in "qk"},
                    **{p: _matrix(getattr(attn, f"{p}_proj"), f"{p}_proj", keep, panels) for p in "qkvo"},
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
            _matrix(model.lm_head, "lm_head", keep, panels),
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

    def refresh_weights(self, force: bool = False) -> None:
        """Repack the panels whose model tensor changed in place since they were packed (all of them: ``force``)."""
        panels = self.panels or ()
        # one pass over the versions first: the step runs this with its caches cold from streaming the weights
        if force or [p.source._version for p in panels] != [p.version for p in panels]:
            for p in panels:
                p.refresh(force)

    def __call__(self, seqs: list[Sequence]) -> torch.Tensor:
        """Logits [len(seqs), vocab] of each sequence's next token; each feeds its token at num_computed_tokens."""
        n, bs = len(seqs), self.block_size
        self.refresh_weights()
        starts = [seq.num_computed_tokens for seq in seqs]
        rows = [seq.block_table[: a // bs + 1] for seq, a in zip(seqs, starts)]
        for seq, a, row in zip(seqs, starts, rows):
            if len(row) <= a // bs:  # the C step trusts its tables: one too short would read past them
                raise ValueError(f"{seq} has no cache block for position {a} (the scheduler grows it first)")
        width = max(len(row) for row in rows)
        # one array: tokens, positions, write slots, lengths, state slots (n each), then the block tables
        fields = [seq.tokens(a, a + 1)[0] for seq, a in zip(seqs, starts)]
        fields += starts
        fields += [row[-1] * bs + a % bs for row, a in zip(rows, starts)]
        fields += [a + 1 for a in starts]
        fields += [seq.slot or 0 for seq in seqs]
        for row in rows:
            fields += row
            fields += [0] * (width - len(row))
        array = (ctypes.c_int64 * len(fields))(*fields)
        at = ctypes.addressof(array)
        tokens, positions, write_at, lengths, slots, tables = (at + 8 * n * i for i in range(6))
        logits = torch.empty(n, self.vocab)
        status = self._function(
            self._model_ref,
            n,
            tokens,
            positions,
            write_at,
            tables,
            width,
            lengths,
            slots,
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
    logger.info(
        "decode steps of up to %d sequences run natively (mmx_decode_rows), weights %s",
        NATIVE_ROWS,
        "in panels (a copy)" if step.panels is not None else "read in place",
    )
    return step
