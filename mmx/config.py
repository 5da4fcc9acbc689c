"""One configuration for MiniMax-M1, MiniMax-Text-01 and MiniMax-M2.

Checkpoints on the Hub describe these models in three dialects, and each reads differently when a key is absent:

* the official remote-code M1 / Text-01 dialect (``attn_type_list``, ``layernorm_*_alpha/beta``, ``postnorm``,
  ``rotary_dim``), whose missing keys fall back to the remote code's ``getattr`` defaults;
* the transformers-native dialect (``model_type: "minimax"``, ``layer_types``, ``*_alpha_factor``,
  ``rope_parameters``, ``block_size``), which is always postnorm and uses transformers' slope ladder;
* the M2 dialect (``model_type: "minimax_m2"``), shared by the official file and transformers.

:meth:`MiniMaxConfig.from_dict` reads all three into one dataclass whose fields say exactly what the model
computes. :meth:`MiniMaxConfig.to_dict` writes a file that both transformers and mmx load back to the same model.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# ConfigError lives in mmx.errors so that the preset tables can raise it without importing this module (which
# imports them); mmx.config.ConfigError is the same class.
from mmx.errors import ConfigError
from mmx.presets import preset_dict
from mmx.utils.io import atomic_write_text
from mmx.utils.logging import get_logger

logger = get_logger(__name__)

LINEAR = "linear_attention"
FULL = "full_attention"
ARCH_M1 = "minimax_m1"
ARCH_M2 = "minimax_m2"
DIALECT_OFFICIAL = "official"
DIALECT_TRANSFORMERS = "transformers"

ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh", "relu")
OFFICIAL_M1_MODEL_TYPES = ("minimax_m1", "minimax_text_01", "MiniMaxM1", "MiniMaxText01")
M2_MODEL_TYPES = ("minimax_m2", "MiniMaxM2")

# Keys that real checkpoint configs carry and that change nothing in the forward pass.
INERT_KEYS = frozenset(
    {
        "architectures",
        "auto_map",
        "transformers_version",
        "use_cache",
        "output_router_logits",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "shared_moe_mode",
        "mlp_intermediate_size",
        "_name_or_path",
        "model_type",
        "torch_dtype",
        "dtype",
        "quantization_config",
        "attention_bias",
    }
)


@dataclass
class MiniMaxConfig:
    """The architecture of a MiniMax model. Defaults describe MiniMax-M1 (456B); use :meth:`from_preset`
    for the other published models and for the tiny ones."""

    architecture: str = ARCH_M1
    vocab_size: int = 200064
    hidden_size: int = 6144
    intermediate_size: int = 9216
    num_hidden_layers: int = 80
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    head_dim: int | None = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 10_240_000
    rms_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    # Per-layer attention kind: "linear_attention" (lightning) or "full_attention" (softmax).
    # None means the family's layout: every 8th layer softmax for M1, all softmax for M2.
    layer_types: list[str] | None = None
    block_size: int = 256
    rope_theta: float = 10_000_000.0
    rotary_dim: int | None = 64  # rotated channels per head, the first ones; None means all of head_dim
    # Residual scheme: postnorm adds alpha * RMSNorm(x) (M1); otherwise alpha * x (pre-norm, M2).
    postnorm: bool = True
    full_attn_alpha_factor: float = 3.5565588200778455
    full_attn_beta_factor: float = 1.0
    linear_attn_alpha_factor: float = 3.5565588200778455
    linear_attn_beta_factor: float = 1.0
    mlp_alpha_factor: float = 3.5565588200778455
    mlp_beta_factor: float = 1.0
    num_local_experts: int = 32
    num_experts_per_tok: int = 2
    scoring_func: str = "softmax"  # softmax over all experts (M1) or independent sigmoids (M2)
    use_routing_bias: bool = False  # M2's e_score_correction_bias, used for expert selection only
    use_qk_norm: bool = False
    qk_norm_type: str = "per_layer"  # one RMSNorm over all heads' q (and k) together
    # Decay schedule of lightning layers: "official" (remote code: ALiBi slope interleave for any head count,
    # layer factor 1 - i/(L-1) + 1e-5) or "transformers" (5.23: geometric ladder, factor 1 - i/(L-1+1e-5) + 1e-5).
    # Identical for every released checkpoint (64 heads); they differ for other head counts and tiny depths.
    lightning_slopes: str = "official"
    lightning_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    router_aux_loss_coef: float = 0.001
    router_jitter_noise: float = 0.0
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    use_mtp: bool = False
    num_mtp_modules: int = 0
    mtp_transformer_layers: int = 0
    torch_dtype: str | None = None
    quantization_config: dict | None = None
    dialect: str = DIALECT_TRANSFORMERS  # the dialect the config was read from, and is written back in
    extra: dict[str, Any] = field(default_factory=dict)  # unrecognised keys, kept for round trips

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = derive_head_dim(self.hidden_size, self.num_attention_heads)
        if self.rotary_dim is None:
            self.rotary_dim = self.head_dim
        if self.layer_types is None:
            self.layer_types = default_layer_types(self.architecture, self.num_hidden_layers)
        self.layer_types = list(self.layer_types)
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        if self.architecture not in (ARCH_M1, ARCH_M2):
            raise ConfigError("architecture", f"{self.architecture!r} is not one of {ARCH_M1!r}, {ARCH_M2!r}")
        for key in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "block_size",
            "num_local_experts",
            "num_experts_per_tok",
            "max_position_embeddings",
        ):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(key, f"must be a positive integer, got {value!r}")
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError("hidden_act", f"{self.hidden_act!r} is not supported; use one of {ACTIVATIONS}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                "num_key_value_heads",
                f"{self.num_key_value_heads} does not divide num_attention_heads={self.num_attention_heads}",
            )
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                "layer_types",
                f"has {len(self.layer_types)} entries for num_hidden_layers={self.num_hidden_layers}",
            )
        for i, kind in enumerate(self.layer_types):
            if kind not in (LINEAR, FULL):
                raise ConfigError("layer_types", f"entry {i} is {kind!r}; expected {LINEAR!r} or {FULL!r}")
        if not (0 < self.rotary_dim <= self.head_dim) or self.rotary_dim % 2:
            raise ConfigError(
                "rotary_dim", f"{self.rotary_dim} must be an even number in (0, head_dim={self.head_dim}]"
            )
        if self.num_experts_per_tok > self.num_local_experts:
            raise ConfigError(
                "num_experts_per_tok",
                f"{self.num_experts_per_tok} exceeds num_local_experts={self.num_local_experts}",
            )
        if self.scoring_func not in ("softmax", "sigmoid"):
            raise ConfigError("scoring_func", f"{self.scoring_func!r} is not 'softmax' or 'sigmoid'")
        if self.use_qk_norm and self.qk_norm_type != "per_layer":
            raise ConfigError("qk_norm_type", f"{self.qk_norm_type!r} is not supported; MiniMax uses 'per_layer'")
        if self.lightning_slopes not in ("official", "transformers"):
            raise ConfigError("lightning_slopes", f"{self.lightning_slopes!r} is not 'official' or 'transformers'")
        check_dialect(self.dialect)
        for key in ("rms_norm_eps", "lightning_norm_eps", "rope_theta"):
            if not getattr(self, key) > 0:
                raise ConfigError(key, f"must be positive, got {getattr(self, key)!r}")

    # ------------------------------------------------------------------ derived quantities
    @property
    def num_key_value_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def partial_rotary_factor(self) -> float:
        return self.rotary_dim / self.head_dim

    @property
    def attn_type_list(self) -> list[int]:
        """The official 0 (lightning) / 1 (softmax) encoding of :attr:`layer_types`."""
        return [0 if kind == LINEAR else 1 for kind in self.layer_types]

    def is_lightning(self, layer_idx: int) -> bool:
        return self.layer_types[layer_idx] == LINEAR

    def residual_factors(self, layer_idx: int) -> tuple[float, float, float, float]:
        """(attention alpha, attention beta, mlp alpha, mlp beta) of one decoder layer."""
        if self.is_lightning(layer_idx):
            alpha, beta = self.linear_attn_alpha_factor, self.linear_attn_beta_factor
        else:
            alpha, beta = self.full_attn_alpha_factor, self.full_attn_beta_factor
        return alpha, beta, self.mlp_alpha_factor, self.mlp_beta_factor

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, list) else [self.eos_token_id]

    def replace(self, **changes: Any) -> MiniMaxConfig:
        """A copy with some fields changed (and validated)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(sorted(unknown)[0], "is not a MiniMaxConfig field")
        if "num_hidden_layers" in changes and "layer_types" not in changes:
            changes["layer_types"] = _resize_layer_types(self, changes["num_hidden_layers"])
        elif "layer_types" in changes and "num_hidden_layers" not in changes:
            changes["num_hidden_layers"] = len(changes["layer_types"])
        return dataclasses.replace(copy.deepcopy(self), **changes)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> MiniMaxConfig:
        config = cls.from_dict(preset_dict(name))
        return config.replace(**overrides) if overrides else config

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, strict: bool = False) -> MiniMaxConfig:
        """Read ``config.json`` from a checkpoint directory (or the file itself)."""
        return cls.from_dict(read_config_file(path), strict=strict)

    @classmethod
    def from_dict(cls, data: dict[str, Any], strict: bool = False) -> MiniMaxConfig:
        """Parse a checkpoint's config in any of the three dialects.

        Keys mmx does not know are kept in :attr:`extra` and logged; with ``strict=True`` they raise."""
        if not isinstance(data, dict):
            raise ConfigError("config", f"expected a JSON object, got {type(data).__name__}")
        if "text_config" in data:
            raise ConfigError("text_config", "vision-language configs are not supported; load the text model's config")
        reader = _Reader(data)
        fields = _dialect_of(data).read(reader)
        leftovers = reader.leftovers()
        if leftovers:
            if strict:
                raise ConfigError(leftovers[0], "is not a key mmx understands")
            logger.warning("config keys mmx does not use (kept as extra): %s", ", ".join(leftovers))
        fields["extra"] = {k: data[k] for k in leftovers}
        return cls(**fields)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self, dialect: str | None = None) -> dict[str, Any]:
        """A config.json dict. The transformers dialect loads in transformers 5.x and in mmx; the official dialect
        is the remote-code layout of the released M1 / Text-01 checkpoints."""
        m1_layout = _WRITTEN_AS[check_dialect(dialect or self.dialect)]  # checked for M2 too, which has one
        spec = _M2 if self.architecture == ARCH_M2 else m1_layout
        out = {key: getattr(self, key) for key in (*_ALWAYS_WRITTEN, *spec.knobs)}
        out.update(_SWITCHED_OFF, **copy.deepcopy(spec.constants))
        for native, official in _OFFICIAL_NAMES.items():
            name = official if spec.official_names else native
            out[name] = self.attn_type_list if name == "attn_type_list" else getattr(self, native)
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rotary_dim != self.head_dim:
            rope["partial_rotary_factor"] = self.partial_rotary_factor
        out.update({"rope_theta": self.rope_theta} if spec.legacy_rope else {"rope_parameters": rope})
        if self.architecture == ARCH_M1:
            # Lightning knobs, written when they differ from what the dialect's own code assumes (transformers
            # always uses its own schedule: the key keeps mmx exact on reload). M2 files never carry them.
            for key, assumed in (("lightning_slopes", spec.lightning_slopes), ("lightning_norm_eps", 1e-6)):
                if getattr(self, key) != assumed:
                    out[key] = getattr(self, key)
        if self.torch_dtype is not None:
            out["dtype"] = self.torch_dtype
        out.update(self.extra)
        return dict(sorted(out.items()))

    def save_pretrained(self, path: str | os.PathLike, dialect: str | None = None) -> None:
        os.makedirs(path, exist_ok=True)
        atomic_write_text(os.path.join(path, "config.json"), json.dumps(self.to_dict(dialect), indent=2) + "\n")

    def summary(self) -> str:
        """One line per fact a user checks first."""
        pattern = "".join("L" if kind == LINEAR else "S" for kind in self.layer_types)
        return "\n".join(
            [
                f"architecture   {self.architecture} (read as the {self.dialect} dialect)",
                f"layers         {self.num_hidden_layers}: {pattern}  (L = lightning, S = softmax)",
                f"hidden         {self.hidden_size}, heads {self.num_attention_heads} x {self.head_dim}, "
                f"kv heads {self.num_key_value_heads}, rotary {self.rotary_dim}/{self.head_dim} "
                f"(theta {self.rope_theta:g})",
                f"moe            {self.num_local_experts} experts x {self.intermediate_size}, "
                f"top-{self.num_experts_per_tok}, {self.scoring_func}"
                + (" + routing bias" if self.use_routing_bias else ""),
                f"residual       {'postnorm' if self.postnorm else 'pre-norm'}, "
                f"alpha {self.linear_attn_alpha_factor:g}/{self.full_attn_alpha_factor:g}/{self.mlp_alpha_factor:g}"
                + (", qk-norm" if self.use_qk_norm else ""),
                f"vocab          {self.vocab_size}, context {self.max_position_embeddings}",
            ]
        )


def read_config_file(path: str | os.PathLike) -> Any:
    """The JSON of ``config.json`` in a checkpoint directory (or of the file itself), not yet interpreted."""
    file = os.path.join(path, "config.json") if os.path.isdir(path) else os.fspath(path)
    if not os.path.exists(file):
        raise FileNotFoundError(f"no config.json in {os.fspath(path)!r}")
    with open(file, encoding="utf-8") as f:
        try:
            return json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError("config.json", f"{file} is not valid JSON: {e}") from e


def default_layer_types(architecture: str, num_layers: int) -> list[str]:
    if architecture == ARCH_M2:
        return [FULL] * num_layers
    return [FULL if (i + 1) % 8 == 0 else LINEAR for i in range(num_layers)]


def derive_head_dim(hidden_size: int, num_attention_heads: int) -> int:
    """head_dim when a config leaves it out, as every dialect's own code computes it."""
    if hidden_size % num_attention_heads:
        raise ConfigError("head_dim", "absent, and hidden_size is not divisible by num_attention_heads")
    return hidden_size // num_attention_heads


def check_dialect(dialect: str) -> str:
    if dialect not in (DIALECT_OFFICIAL, DIALECT_TRANSFORMERS):
        raise ConfigError("dialect", f"{dialect!r} is not {DIALECT_OFFICIAL!r} or {DIALECT_TRANSFORMERS!r}")
    return dialect


def _resize_layer_types(config: MiniMaxConfig, num_layers: int) -> list[str]:
    """Keep the period of the layout when a preset is shortened or lengthened."""
    period = config.layer_types
    return [period[i % len(period)] for i in range(num_layers)]


# ---------------------------------------------------------------------------------------------------- dialects
# Official names of the fields that transformers (and mmx) name otherwise.
_RESIDUAL_NAMES = {
    "full_attn_alpha_factor": "layernorm_full_attention_alpha",
    "full_attn_beta_factor": "layernorm_full_attention_beta",
    "linear_attn_alpha_factor": "layernorm_linear_attention_alpha",
    "linear_attn_beta_factor": "layernorm_linear_attention_beta",
    "mlp_alpha_factor": "layernorm_mlp_alpha",
    "mlp_beta_factor": "layernorm_mlp_beta",
}
_OFFICIAL_NAMES = {"layer_types": "attn_type_list", **_RESIDUAL_NAMES}
# Keys that fix the shapes of the model's tensors. The reference code of every dialect has defaults for them, but
# those describe some other model (a config without hidden_size would build a 4096-wide one), and every real
# config.json carries them (transformers writes all its fields), so a file without one is refused, naming it.
REQUIRED_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_local_experts",  # or its alias num_experts
)
# Size keys with defaults (a context length, the experts per token), read as they are (validation, not a cast,
# rejects a bad one). In the M1 dialects: configuration_minimax_m1.py's class defaults, which transformers'
# MiniMaxConfig shares.
_M1_SIZES = {"max_position_embeddings": 4096 * 32, "num_experts_per_tok": 2}
# Keys every dialect reads with the same default; a default's type is the type the value is cast to.
_COMMON_KNOBS: dict[str, Any] = {
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "tie_word_embeddings": False,
    "router_aux_loss_coef": 0.001,
    "router_jitter_noise": 0.0,
    "bos_token_id": None,
    "eos_token_id": None,
    "pad_token_id": None,
    "lightning_norm_eps": 1e-6,
}
# Fields every written file carries; lightning_norm_eps is written only when it is not the default (to_dict).
_ALWAYS_WRITTEN = {*REQUIRED_KEYS, *_M1_SIZES, "num_key_value_heads", "head_dim", "rotary_dim", *_COMMON_KNOBS}
_ALWAYS_WRITTEN -= {"lightning_norm_eps"}
# Features no MiniMax model has, written switched off so that other readers do not assume their own defaults.
_SWITCHED_OFF = {"attention_dropout": 0.0, "sliding_window": None}


@dataclass(frozen=True)
class _Dialect:
    """One config.json layout: how a file is recognised, what its own code assumes for an absent key, and which
    keys mmx writes in it."""

    architecture: str
    dialect: str | None  # None: decided per file, as M2 files come in both dialects
    model_types: tuple[str, ...]  # model_type values that select this layout
    marker: str | None  # the key that selects it in a file without model_type
    sizes: dict[str, Any]  # defaults of the size keys that have one, those of _M1_SIZES
    knobs: dict[str, Any]  # defaults of its other keys, each also written; the default's type is the key's type
    lightning_slopes: str  # the schedule its code uses; written only when the config differs
    rope_theta: float
    default_layout: Callable[[int], list[str]]
    official_names: bool  # attn_type_list and layernorm_*_alpha/beta, else layer_types and *_alpha_factor
    legacy_rope: bool  # rope_theta as a top-level key, else inside rope_parameters
    constants: dict[str, Any]  # written as they are
    aliases: dict[str, str] = field(default_factory=dict)  # key -> an older name read when the key is absent

    def read(self, r: _Reader) -> dict[str, Any]:
        """The MiniMaxConfig fields of a file in this dialect."""
        out = _read_sizes(r, self.sizes)
        # An M2 file written by transformers carries rope_parameters; the official one only attn_type_list.
        official = r.has("attn_type_list") and not r.has("rope_parameters")
        dialect = self.dialect or (DIALECT_OFFICIAL if official else DIALECT_TRANSFORMERS)
        n = out["num_hidden_layers"]
        out.update(architecture=self.architecture, dialect=dialect)
        out["layer_types"] = _layer_types(r, n, self.default_layout(n))
        out.update(_read_residual_factors(r))
        out["rope_theta"], out["rotary_dim"] = _read_rope(r, out["head_dim"], self.rope_theta, dialect)
        out.update(_take(r, {**self.knobs, "lightning_slopes": self.lightning_slopes}, self.aliases))
        _reject_unsupported(r)
        out.update(_take(r, _COMMON_KNOBS))
        dtype = r.data.get("dtype") or r.data.get("torch_dtype")
        out["torch_dtype"] = dtype if isinstance(dtype, str) else None
        out["quantization_config"] = r.data.get("quantization_config")
        return out


_OFFICIAL_M1 = _Dialect(
    architecture=ARCH_M1,
    dialect=DIALECT_OFFICIAL,
    model_types=OFFICIAL_M1_MODEL_TYPES,
    marker="attn_type_list",
    sizes=_M1_SIZES,
    knobs={"rms_norm_eps": 1e-5, "postnorm": False, "block_size": 256},  # postnorm: the remote code's getattr
    aliases={"block_size": "block"},
    lightning_slopes="official",
    rope_theta=1e6,
    default_layout=lambda n: [FULL] * n,
    official_names=True,
    legacy_rope=True,
    constants={"model_type": "minimax_m1", "architectures": ["MiniMaxM1ForCausalLM"], "shared_intermediate_size": 0},
)
_TRANSFORMERS_M1 = _Dialect(
    architecture=ARCH_M1,
    dialect=DIALECT_TRANSFORMERS,
    model_types=("minimax",),
    marker="layer_types",
    sizes=_M1_SIZES,
    knobs={"rms_norm_eps": 1e-5, "postnorm": True, "block_size": 256},  # transformers' MiniMax is always postnorm
    lightning_slopes="transformers",
    rope_theta=1e6,
    default_layout=lambda n: [FULL if i % 2 == 0 else LINEAR for i in range(n)],  # softmax first, alternating
    official_names=False,
    legacy_rope=False,
    constants={"model_type": "minimax", "architectures": ["MiniMaxForCausalLM"]},
)
_M2 = _Dialect(
    architecture=ARCH_M2,
    dialect=None,
    model_types=M2_MODEL_TYPES,
    marker=None,
    sizes={"max_position_embeddings": 196608, "num_experts_per_tok": 8},  # transformers' MiniMaxM2Config defaults
    knobs={
        "rms_norm_eps": 1e-6,
        "postnorm": False,
        "use_qk_norm": True,
        "qk_norm_type": "per_layer",
        "scoring_func": "sigmoid",
        "use_routing_bias": True,
        "use_mtp": False,
        "num_mtp_modules": 0,
        "mtp_transformer_layers": 0,
        "block_size": 256,
    },
    lightning_slopes="official",
    rope_theta=5e6,
    default_layout=lambda n: [FULL] * n,
    official_names=True,
    legacy_rope=False,
    constants={"model_type": "minimax_m2", "architectures": ["MiniMaxM2ForCausalLM"], "shared_intermediate_size": 0},
)
_DIALECTS = (_M2, _OFFICIAL_M1, _TRANSFORMERS_M1)  # in the order a file is matched against them
_WRITTEN_AS = {DIALECT_OFFICIAL: _OFFICIAL_M1, DIALECT_TRANSFORMERS: _TRANSFORMERS_M1}  # M1 files; M2 has one


def _dialect_of(data: dict[str, Any]) -> _Dialect:
    model_type = data.get("model_type")
    for spec in _DIALECTS:
        if model_type in spec.model_types or (model_type is None and spec.marker is not None and spec.marker in data):
            return spec
    raise ConfigError(
        "model_type",
        f"{model_type!r} is not a MiniMax text model; mmx reads "
        f"{', '.join(OFFICIAL_M1_MODEL_TYPES[:2])}, minimax and minimax_m2",
    )


# ---------------------------------------------------------------------------------------------------- readers
_MISSING = object()


class _Reader:
    """Reads keys from a config dict and remembers which ones were used."""

    def __init__(self, data: dict[str, Any]):
        self.data = data
        self.used: set[str] = set()

    def has(self, key: str) -> bool:
        return key in self.data and self.data[key] is not None

    def get(self, key: str, default: Any = None) -> Any:
        self.used.add(key)
        value = self.data.get(key, _MISSING)
        return default if value is _MISSING or value is None else value

    def leftovers(self) -> list[str]:
        return sorted(k for k in self.data if k not in self.used and k not in INERT_KEYS)


def _take(r: _Reader, defaults: dict[str, Any], aliases: dict[str, str] | None = None) -> dict[str, Any]:
    """Read each key (else its alias, else the default), cast to the type of its default as the remote code's
    own casts do; a default of None or a string leaves the value as it is."""
    out = {}
    for key, default in defaults.items():
        fallback = r.get(aliases[key], default) if aliases and key in aliases else default
        value = r.get(key, fallback)
        out[key] = type(default)(value) if isinstance(default, (bool, int, float)) else value
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def _check_agree(key: str, value: Any, other_key: str, other: Any) -> None:
    if not _same(value, other):
        raise ConfigError(key, f"{value!r} contradicts {other_key}={other!r}")


def _layer_types(r: _Reader, num_layers: int, default: list[str]) -> list[str]:
    codes, kinds = r.get("attn_type_list"), r.get("layer_types")
    if codes is not None:
        if not isinstance(codes, list):
            raise ConfigError("attn_type_list", f"must be a list of 0/1, got {codes!r}")
        for i, v in enumerate(codes):
            if v not in (0, 1) or isinstance(v, bool):
                raise ConfigError("attn_type_list", f"entry {i} is {v!r}; only 0 (lightning) and 1 (softmax) exist")
        codes = [LINEAR if v == 0 else FULL for v in codes]
    if kinds is not None and not isinstance(kinds, list):
        raise ConfigError("layer_types", f"must be a list, got {kinds!r}")
    if codes is not None and kinds is not None and codes != kinds:
        raise ConfigError("attn_type_list", "contradicts layer_types")
    chosen = codes if codes is not None else kinds if kinds is not None else default
    if len(chosen) != num_layers:
        key = "attn_type_list" if codes is not None else "layer_types"
        raise ConfigError(key, f"has {len(chosen)} entries for num_hidden_layers={num_layers}")
    return chosen


def _reject_unsupported(r: _Reader) -> None:
    shared = r.get("shared_intermediate_size", 0)
    if any(size != 0 for size in (shared if isinstance(shared, list) else [shared])):
        raise ConfigError(
            "shared_intermediate_size",
            f"{shared!r}: no released MiniMax model has a shared expert and mmx does not implement one",
        )
    if r.get("sliding_window") is not None:
        raise ConfigError("sliding_window", "sliding-window attention is not part of any MiniMax model")
    if r.get("attention_dropout", 0.0) not in (0, 0.0):
        raise ConfigError("attention_dropout", "must be 0; MiniMax models train without attention dropout")
    if r.get("rope_scaling") is not None:
        raise ConfigError("rope_scaling", "RoPE scaling is not used by MiniMax models and not supported")


def _read_rope(r: _Reader, head_dim: int, default_theta: float, dialect: str) -> tuple[float, int]:
    """(theta, rotary_dim) from ``rope_parameters`` and/or the legacy ``rope_theta`` / ``rotary_dim`` keys."""
    params = r.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise ConfigError("rope_parameters", f"must be an object, got {params!r}")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ConfigError("rope_parameters.rope_type", f"{rope_type!r} is not supported; only 'default'")
    unknown = set(params) - {"rope_type", "type", "rope_theta", "partial_rotary_factor"}
    if unknown:
        raise ConfigError(f"rope_parameters.{sorted(unknown)[0]}", "is not supported")
    legacy, new = r.get("rope_theta"), params.get("rope_theta")
    theta = legacy if legacy is not None else new
    if legacy is not None and new is not None and not _same(legacy, new):
        # transformers reads rope_parameters and ignores the legacy key; the official code reads rope_theta.
        theta = legacy if dialect == DIALECT_OFFICIAL else new
        logger.warning(
            "config has rope_theta=%s and rope_parameters.rope_theta=%s; using %s as this dialect does",
            legacy,
            new,
            theta,
        )
    theta = float(theta if theta is not None else default_theta)
    rotary_dim = r.get("rotary_dim")
    factor = params.get("partial_rotary_factor", r.get("partial_rotary_factor"))
    if factor is not None:
        from_factor = head_dim * float(factor)
        if abs(from_factor - round(from_factor)) > 1e-6:
            raise ConfigError("partial_rotary_factor", f"{factor} x head_dim={head_dim} is not an integer")
        if rotary_dim is not None:
            _check_agree("rotary_dim", rotary_dim, "partial_rotary_factor x head_dim", round(from_factor))
        rotary_dim = round(from_factor)
    if rotary_dim is not None and (not isinstance(rotary_dim, int) or isinstance(rotary_dim, bool)):
        raise ConfigError("rotary_dim", f"must be an integer, got {rotary_dim!r}")
    if rotary_dim is not None and rotary_dim > head_dim and dialect == DIALECT_TRANSFORMERS and factor is None:
        # Some transformers-dialect test configs carry a leftover rotary_dim larger than the head; transformers
        # ignores it and rotates the whole head, which is the only reading that computes anything.
        logger.warning(
            "ignoring rotary_dim=%d > head_dim=%d (a leftover key); rotating all channels",
            rotary_dim,
            head_dim,
        )
        rotary_dim = head_dim
    return theta, rotary_dim if rotary_dim is not None else head_dim


def _read_residual_factors(r: _Reader) -> dict[str, float]:
    out = {}
    for native, official in _RESIDUAL_NAMES.items():
        a, b = r.get(native), r.get(official)
        if a is not None and b is not None:
            _check_agree(official, b, native, a)
        value = a if a is not None else b
        out[native] = float(value if value is not None else 1.0)
    return out


def _read_sizes(r: _Reader, defaults: dict[str, Any]) -> dict[str, Any]:
    for key in REQUIRED_KEYS:
        if not r.has(key) and not (key == "num_local_experts" and r.has("num_experts")):
            raise ConfigError(key, "is missing; it fixes the model's tensor shapes, so mmx does not assume a default")
    out = {key: r.get(key) for key in REQUIRED_KEYS if key != "num_local_experts"}
    out.update({key: r.get(key, default) for key, default in defaults.items()})
    experts, alias = r.get("num_local_experts"), r.get("num_experts")
    if experts is not None and alias is not None:
        _check_agree("num_experts", alias, "num_local_experts", experts)
    out["num_local_experts"] = experts if experts is not None else alias
    out["num_key_value_heads"] = r.get("num_key_value_heads", out["num_attention_heads"])
    head_dim = r.get("head_dim")
    out["head_dim"] = derive_head_dim(out["hidden_size"], out["num_attention_heads"]) if head_dim is None else head_dim
    return out
