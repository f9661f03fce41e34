"""Model architecture configuration: one dataclass, named presets, strict loaders.

`ModelArgs` describes a Llama 3.x decoder. It can be built from a preset name
(`ModelArgs.from_preset("llama3.1-8b")`), from Meta's ``params.json``, from a
Hugging Face ``config.json`` or from GGUF metadata. Unknown keys raise: a config
we do not understand is an error, never silently ignored.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Optional


class ConfigError(ValueError):
    """A model configuration that inhouse cannot honour (unknown key, bad value)."""


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3 ("llama3") RoPE frequency scaling, all four parameters from the config."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelArgs:
    """Architecture of a Llama 3.x decoder.

    Attributes:
        dim: model (residual stream) width.
        n_layers: number of transformer blocks.
        n_heads: number of query heads.
        n_kv_heads: number of key/value heads (grouped-query attention); equals n_heads for MHA.
        vocab_size: rows of the embedding table / columns of the output projection.
        hidden_dim: SwiGLU intermediate width (w1/w3 output, w2 input).
        head_dim: width of one attention head (dim // n_heads unless the config says otherwise).
        norm_eps: RMSNorm epsilon.
        rope_theta: RoPE base frequency.
        rope_scaling: llama3-style frequency scaling, or None.
        max_seq_len: context length the model was trained for.
        tie_embeddings: output projection shares the embedding matrix.
    """

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    hidden_dim: int
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: Optional[RopeScaling] = None
    max_seq_len: int = 8192
    tie_embeddings: bool = False
    head_dim: int = 0  # 0: derived as dim // n_heads

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            if self.dim % self.n_heads:
                raise ConfigError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for RoPE")
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be positive")

    # ------------------------------------------------------------------ derived
    def num_parameters(self) -> int:
        """Number of parameters (tied embeddings counted once)."""
        d, h = self.dim, self.head_dim
        attn = d * self.n_heads * h * 2 + d * self.n_kv_heads * h * 2
        ffn = 3 * d * self.hidden_dim
        per_layer = attn + ffn + 2 * d
        emb = self.vocab_size * d
        out = 0 if self.tie_embeddings else self.vocab_size * d
        return self.n_layers * per_layer + emb + out + d

    def kv_cache_bytes(self, n_tokens: int, bytes_per_element: int = 2) -> int:
        """Bytes of K and V cache for `n_tokens` positions of one sequence."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * n_tokens * bytes_per_element

    def replace(self, **changes: Any) -> "ModelArgs":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ presets
    @classmethod
    def from_preset(cls, name: str) -> "ModelArgs":
        """Build the architecture of a named model (see `PRESETS`)."""
        try:
            return PRESETS[name]
        except KeyError:
            raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}") from None

    # ------------------------------------------------------------------ Meta params.json
    @classmethod
    def from_meta_params(cls, params: Mapping[str, Any]) -> "ModelArgs":
        """Build from Meta's ``params.json`` (llama-models layout).

        The FFN width follows Meta's rule: ``int(2*4*dim/3)``, times ``ffn_dim_multiplier``,
        rounded up to ``multiple_of``. Llama 3.1 checkpoints carry ``use_scaled_rope: true``
        (scale factor 8 unless ``rope_scaling`` says otherwise).
        """
        known = {
            "dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
            "ffn_dim_multiplier", "norm_eps", "rope_theta", "use_scaled_rope", "max_seq_len",
            "rope_scaling", "rope_scaling_factor", "max_batch_size", "hidden_dim", "head_dim",
            "tie_embeddings", "use_qk_norm",
        }
        _check_keys(params, known, "params.json")
        if params.get("use_qk_norm"):
            raise ConfigError("params.json: use_qk_norm=true (Llama 4) is not supported")
        dim = int(params["dim"])
        if "hidden_dim" in params:
            hidden = int(params["hidden_dim"])
        else:
            multiple_of = int(params.get("multiple_of", 256))
            hidden = int(2 * 4 * dim / 3)
            if params.get("ffn_dim_multiplier") is not None:
                hidden = int(float(params["ffn_dim_multiplier"]) * hidden)
            hidden = multiple_of * ((hidden + multiple_of - 1) // multiple_of)
        scaling = None
        if params.get("rope_scaling"):
            scaling = _rope_scaling_from_hf(params["rope_scaling"], "params.json")
        elif params.get("use_scaled_rope"):
            scaling = RopeScaling(
                factor=float(params.get("rope_scaling_factor", 8.0)),
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=8192,
            )
        return cls(
            dim=dim,
            n_layers=int(params["n_layers"]),
            n_heads=int(params["n_heads"]),
            n_kv_heads=int(params.get("n_kv_heads") or params["n_heads"]),
            vocab_size=int(params["vocab_size"]),
            hidden_dim=hidden,
            norm_eps=float(params.get("norm_eps", 1e-5)),
            rope_theta=float(params.get("rope_theta", 500000.0)),
            rope_scaling=scaling,
            max_seq_len=int(params.get("max_seq_len", 131072 if scaling else 8192)),
            tie_embeddings=bool(params.get("tie_embeddings", False)),
            head_dim=int(params.get("head_dim") or 0),
        )

    # ------------------------------------------------------------------ HF config.json
    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any]) -> "ModelArgs":
        """Build from a Hugging Face ``config.json`` of a ``LlamaForCausalLM``.

        Accepts both ``rope_scaling`` and the newer ``rope_parameters`` (which also
        carries ``rope_theta``).
        """
        arch = config.get("architectures") or ["LlamaForCausalLM"]
        if config.get("model_type", "llama") != "llama" or arch[0] != "LlamaForCausalLM":
            raise ConfigError(
                f"config.json: model_type={config.get('model_type')!r}, architectures={arch}: "
                "only Llama models (LlamaForCausalLM) are supported"
            )
        if config.get("attention_bias") or config.get("mlp_bias"):
            raise ConfigError("config.json: attention_bias/mlp_bias=true is not a Llama 3 architecture")
        if config.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"config.json: hidden_act={config['hidden_act']!r}, expected 'silu'")
        rope_theta = config.get("rope_theta")
        scaling_cfg = config.get("rope_scaling")
        params = config.get("rope_parameters")
        if params:
            rope_theta = params.get("rope_theta", rope_theta)
            if params.get("rope_type", "default") != "default":
                scaling_cfg = params
        scaling = _rope_scaling_from_hf(scaling_cfg, "config.json") if scaling_cfg else None
        n_heads = int(config["num_attention_heads"])
        return cls(
            dim=int(config["hidden_size"]),
            n_layers=int(config["num_hidden_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(config.get("num_key_value_heads") or n_heads),
            vocab_size=int(config["vocab_size"]),
            hidden_dim=int(config["intermediate_size"]),
            norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            rope_scaling=scaling,
            max_seq_len=int(config.get("max_position_embeddings", 8192)),
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            head_dim=int(config.get("head_dim") or 0),
        )

    # ------------------------------------------------------------------ GGUF metadata
    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any], has_output_tensor: bool = True) -> "ModelArgs":
        """Build from GGUF key/value metadata (``general.architecture == "llama"``).

        Args:
            meta: GGUF metadata as plain Python values.
            has_output_tensor: whether the file holds ``output.weight``; without it the
                output projection is tied to the token embedding (as llama.cpp does).
        """
        arch = meta.get("general.architecture")
        if arch != "llama":
            raise ConfigError(f"GGUF general.architecture={arch!r}: only 'llama' is supported")

        def key(name: str, default: Any = None) -> Any:
            value = meta.get(f"llama.{name}", default)
            if value is None:
                raise ConfigError(f"GGUF metadata lacks llama.{name}")
            return value

        n_heads = int(key("attention.head_count"))
        dim = int(key("embedding_length"))
        vocab = meta.get("llama.vocab_size")
        if vocab is None:
            tokens = meta.get("tokenizer.ggml.tokens")
            if tokens is None:
                raise ConfigError("GGUF metadata has neither llama.vocab_size nor tokenizer.ggml.tokens")
            vocab = len(tokens)
        scaling = None
        stype = meta.get("llama.rope.scaling.type")
        if stype not in (None, "none", "llama3"):
            raise ConfigError(f"GGUF llama.rope.scaling.type={stype!r} is not supported")
        if stype == "llama3":
            scaling = RopeScaling(
                factor=float(key("rope.scaling.factor")),
                low_freq_factor=float(meta.get("llama.rope.scaling.low_freq_factor", 1.0)),
                high_freq_factor=float(meta.get("llama.rope.scaling.high_freq_factor", 4.0)),
                original_max_position_embeddings=int(key("rope.scaling.original_context_length")),
            )
        head_dim = int(meta.get("llama.attention.key_length") or meta.get("llama.rope.dimension_count") or dim // n_heads)
        return cls(
            dim=dim,
            n_layers=int(key("block_count")),
            n_heads=n_heads,
            n_kv_heads=int(meta.get("llama.attention.head_count_kv") or n_heads),
            vocab_size=int(vocab),
            hidden_dim=int(key("feed_forward_length")),
            norm_eps=float(key("attention.layer_norm_rms_epsilon")),
            rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            max_seq_len=int(key("context_length")),
            tie_embeddings=not has_output_tensor,
            head_dim=head_dim,
        )


def _check_keys(d: Mapping[str, Any], known: set, where: str) -> None:
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}")


def _rope_scaling_from_hf(cfg: Mapping[str, Any], where: str) -> RopeScaling:
    rope_type = cfg.get("rope_type", cfg.get("type"))
    if rope_type != "llama3":
        raise ConfigError(f"{where}: rope scaling type {rope_type!r} is not supported (only 'llama3')")
    try:
        return RopeScaling(
            factor=float(cfg["factor"]),
            low_freq_factor=float(cfg["low_freq_factor"]),
            high_freq_factor=float(cfg["high_freq_factor"]),
            original_max_position_embeddings=int(cfg["original_max_position_embeddings"]),
        )
    except KeyError as e:
        raise ConfigError(f"{where}: llama3 rope scaling lacks {e.args[0]!r}") from None


def _llama31(dim: int, n_layers: int, n_heads: int, hidden: int) -> ModelArgs:
    return ModelArgs(
        dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=8, vocab_size=128256,
        hidden_dim=hidden, norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192), max_seq_len=131072,
    )


def _llama32(dim: int, n_layers: int, n_heads: int, hidden: int) -> ModelArgs:
    return ModelArgs(
        dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=8, vocab_size=128256,
        hidden_dim=hidden, norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=RopeScaling(32.0, 1.0, 4.0, 8192), max_seq_len=131072, tie_embeddings=True,
    )


# Published configurations (Meta's params.json / HF config.json of each model).
PRESETS: dict[str, ModelArgs] = {
    "llama3.1-8b": _llama31(4096, 32, 32, 14336),
    "llama3.1-70b": _llama31(8192, 80, 64, 28672),
    "llama3.1-405b": _llama31(16384, 126, 128, 53248),
    "llama3.2-1b": _llama32(2048, 16, 32, 8192),
    "llama3.2-3b": _llama32(3072, 28, 24, 8192),
    "smollm2-135m": ModelArgs(
        dim=576, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152, hidden_dim=1536,
        norm_eps=1e-5, rope_theta=100000.0, rope_scaling=None, max_seq_len=8192, tie_embeddings=True,
    ),
}

# Preset name -> which tokenizer a `random:` model of it uses.
PRESET_TOKENIZER: dict[str, str] = {name: ("llama3" if name.startswith("llama") else "gguf-smollm2") for name in PRESETS}

__all__ = ["ModelArgs", "RopeScaling", "ConfigError", "PRESETS", "PRESET_TOKENIZER"]
