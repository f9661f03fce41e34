"""Tensor name maps as data, and the one strict function that applies them.

Meta's names are canonical (see `inhouse.model.transformer`). Hugging Face and GGUF names
are mapped into them here; a name that no table knows is an error. Layer-indexed names use
``{n}`` for the block number.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Callable, Mapping, Optional

import torch


class WeightsError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the problem."""


# Name that the loaders yield for llama.cpp's per-frequency RoPE divisors (not a parameter:
# it goes to `Transformer.set_rope_freq_factors`).
ROPE_FREQS = "rope_freqs"

# Meta model-parallel shards: the dimension each weight is split along (None: replicated).
# Keyed by the name with the ``layers.{n}.`` prefix and ``.weight`` suffix removed.
# Llama 3 uses a VocabParallelEmbedding (rows split) and ColumnParallelLinear for the output.
META_SHARD_DIM: dict[str, Optional[int]] = {
    "tok_embeddings": 0,
    "attention.wq": 0,
    "attention.wk": 0,
    "attention.wv": 0,
    "attention.wo": 1,
    "feed_forward.w1": 0,
    "feed_forward.w2": 1,
    "feed_forward.w3": 0,
    "attention_norm": None,
    "ffn_norm": None,
    "norm": None,
    "output": 0,
}

# Meta checkpoint keys that carry no parameter (Llama 2's precomputed standard RoPE table).
META_IGNORED = {"rope.freqs"}

# Hugging Face LlamaForCausalLM -> Meta. A value of None marks a known tensor that is not
# a parameter (recomputed from the config) and is dropped.
HF_TO_META: dict[str, Optional[str]] = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.layers.{n}.self_attn.q_proj.weight": "layers.{n}.attention.wq.weight",
    "model.layers.{n}.self_attn.k_proj.weight": "layers.{n}.attention.wk.weight",
    "model.layers.{n}.self_attn.v_proj.weight": "layers.{n}.attention.wv.weight",
    "model.layers.{n}.self_attn.o_proj.weight": "layers.{n}.attention.wo.weight",
    "model.layers.{n}.mlp.gate_proj.weight": "layers.{n}.feed_forward.w1.weight",
    "model.layers.{n}.mlp.down_proj.weight": "layers.{n}.feed_forward.w2.weight",
    "model.layers.{n}.mlp.up_proj.weight": "layers.{n}.feed_forward.w3.weight",
    "model.layers.{n}.input_layernorm.weight": "layers.{n}.attention_norm.weight",
    "model.layers.{n}.post_attention_layernorm.weight": "layers.{n}.ffn_norm.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
    "model.rotary_emb.inv_freq": None,
    "model.layers.{n}.self_attn.rotary_emb.inv_freq": None,
}

# GGUF (llama.cpp, architecture "llama") -> Meta. llama.cpp's converter already undid HF's
# q/k permutation, so attn_q/attn_k are in Meta's interleaved layout.
GGUF_TO_META: dict[str, Optional[str]] = {
    "token_embd.weight": "tok_embeddings.weight",
    "blk.{n}.attn_q.weight": "layers.{n}.attention.wq.weight",
    "blk.{n}.attn_k.weight": "layers.{n}.attention.wk.weight",
    "blk.{n}.attn_v.weight": "layers.{n}.attention.wv.weight",
    "blk.{n}.attn_output.weight": "layers.{n}.attention.wo.weight",
    "blk.{n}.ffn_gate.weight": "layers.{n}.feed_forward.w1.weight",
    "blk.{n}.ffn_down.weight": "layers.{n}.feed_forward.w2.weight",
    "blk.{n}.ffn_up.weight": "layers.{n}.feed_forward.w3.weight",
    "blk.{n}.attn_norm.weight": "layers.{n}.attention_norm.weight",
    "blk.{n}.ffn_norm.weight": "layers.{n}.ffn_norm.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
    "rope_freqs.weight": ROPE_FREQS,
    "blk.{n}.attn_rot_embd": None,  # old converters stored the standard RoPE table
}

# Meta names whose rows are permuted by Hugging Face's conversion (rotate-half RoPE layout),
# with the ModelArgs field giving their number of heads.
HF_PERMUTED: dict[str, str] = {
    "attention.wq.weight": "n_heads",
    "attention.wk.weight": "n_kv_heads",
}

_LAYER = re.compile(r"\.(\d+)\.")


def remap(name: str, table: Mapping[str, Optional[str]], where: str) -> Optional[str]:
    """Map one tensor name through `table`, strictly.

    Args:
        name: tensor name in the source format.
        table: one of `HF_TO_META` / `GGUF_TO_META`.
        where: file name for the error message.

    Returns:
        The Meta name, or None for a known tensor that carries no parameter.

    Raises:
        WeightsError: the name is not in the table.
    """
    m = _LAYER.search(name)
    key, layer = (name[: m.start()] + ".{n}." + name[m.end():], m.group(1)) if m else (name, None)
    if key not in table:
        raise WeightsError(f"{where}: unexpected tensor {name!r} (not a Llama tensor name)")
    target = table[key]
    return None if target is None else target.replace("{n}", layer or "")


def meta_shard_dim(name: str) -> Optional[int]:
    """Split dimension of Meta tensor `name` across model-parallel shards (None: replicated).

    Raises:
        KeyError: `name` is not a Meta parameter name.
    """
    key = re.sub(r"^layers\.\d+\.", "", name)
    key = key.removesuffix(".weight")
    return META_SHARD_DIM[key]


def unpermute_hf_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo Hugging Face's q/k row permutation: rotate-half halves -> Meta's adjacent pairs.

    HF's converter reorders each head's rows from (pair, 2) to (2, pair) so that RoPE can
    rotate the two halves of a head; this puts them back (llama2.c ``permute_reverse``).

    Args:
        w: (n_heads * hd, D) weight in HF layout.
        n_heads: heads in `w` (query heads for q, key/value heads for k).

    Returns:
        (n_heads * hd, D) weight in Meta's layout.
    """
    rows, cols = w.shape
    hd = rows // n_heads
    return w.view(n_heads, 2, hd // 2, cols).transpose(1, 2).reshape(rows, cols)  # (H, hd/2, 2, D)


__all__ = [
    "WeightsError", "ROPE_FREQS", "META_SHARD_DIM", "META_IGNORED", "HF_TO_META", "GGUF_TO_META",
    "HF_PERMUTED", "remap", "meta_shard_dim", "unpermute_hf_qk",
]


def read_json_args(root: str, filename: str, build: Callable[[dict], Any]) -> Any:
    """Read ``root/filename`` (params.json / config.json) and build `ModelArgs` from it.

    Raises:
        WeightsError: the file is missing, not a JSON object, or not a supported configuration.
    """
    from inhouse.config import ConfigError

    path = os.path.join(root, filename)
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise WeightsError(f"{path}: cannot read {filename}: {e}") from e
    if not isinstance(data, dict):
        raise WeightsError(f"{path}: expected a JSON object, got {type(data).__name__}")
    try:
        return build(data)
    except (ConfigError, KeyError, TypeError, ValueError) as e:
        raise WeightsError(f"{path}: {str(e).removeprefix(filename + ': ')}") from e
