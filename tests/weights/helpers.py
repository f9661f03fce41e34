"""Writers for tiny checkpoints in every format, from one Meta-named state dict.

The writers follow the reference converters, not our loader: Meta shards are split the way
llama-models' fairscale layers split them, HF q/k rows are permuted as transformers'
``convert_llama_weights_to_hf.py`` does, GGUF is written with the `gguf` package's writer,
and ``rope_freqs`` is computed as llama.cpp's ``convert_hf_to_gguf.py`` computes it.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import torch
from safetensors.torch import save_file

from inhouse.config import ModelArgs, RopeScaling

# Llama 3.1-style, tiny: GQA (4 query heads, 2 kv heads), llama3 RoPE scaling. norm_eps is exact in
# float32 (GGUF stores it as f32) so that every format gives bit-identical logits.
PARAMS_JSON = {
    "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 256,
    "multiple_of": 32, "ffn_dim_multiplier": 1.0, "norm_eps": 2**-16, "rope_theta": 500000.0,
    "use_scaled_rope": True, "max_seq_len": 16384,
}
TINY = ModelArgs(
    dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, hidden_dim=192, norm_eps=2**-16,
    rope_theta=500000.0, rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192), max_seq_len=16384,
)


def hf_config(args: ModelArgs, style: str = "rope_scaling") -> dict:
    """config.json of a LlamaForCausalLM; `style` "rope_scaling" (<= 4.x) or "rope_parameters" (5.x)."""
    s = args.rope_scaling
    scaling = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
               "high_freq_factor": s.high_freq_factor, "original_max_position_embeddings": s.original_max_position_embeddings}
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": args.dim,
        "intermediate_size": args.hidden_dim, "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads, "num_key_value_heads": args.n_kv_heads, "head_dim": args.head_dim,
        "vocab_size": args.vocab_size, "rms_norm_eps": args.norm_eps, "max_position_embeddings": args.max_seq_len,
        "hidden_act": "silu", "tie_word_embeddings": args.tie_embeddings, "attention_bias": False, "mlp_bias": False,
        "torch_dtype": "float32",
    }
    if style == "rope_scaling":
        config.update(rope_theta=args.rope_theta, rope_scaling=scaling)
    else:
        config.update(rope_parameters={**scaling, "rope_theta": args.rope_theta})
    return config


def random_state_dict(args: ModelArgs, seed: int = 0, std: float = 0.2) -> dict[str, torch.Tensor]:
    """Meta-named fp32 weights; norms are 1 + noise so that swapped norm names would show."""
    g = torch.Generator().manual_seed(seed)
    hd, d = args.head_dim, args.dim
    sd = {"tok_embeddings.weight": torch.randn(args.vocab_size, d, generator=g)}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        sd[p + "attention.wq.weight"] = torch.randn(args.n_heads * hd, d, generator=g) * std
        sd[p + "attention.wk.weight"] = torch.randn(args.n_kv_heads * hd, d, generator=g) * std
        sd[p + "attention.wv.weight"] = torch.randn(args.n_kv_heads * hd, d, generator=g) * std
        sd[p + "attention.wo.weight"] = torch.randn(d, args.n_heads * hd, generator=g) * std
        sd[p + "feed_forward.w1.weight"] = torch.randn(args.hidden_dim, d, generator=g) * std
        sd[p + "feed_forward.w2.weight"] = torch.randn(d, args.hidden_dim, generator=g) * std
        sd[p + "feed_forward.w3.weight"] = torch.randn(args.hidden_dim, d, generator=g) * std
        sd[p + "attention_norm.weight"] = 1 + 0.1 * torch.randn(d, generator=g)
        sd[p + "ffn_norm.weight"] = 1 + 0.1 * torch.randn(d, generator=g)
    sd["norm.weight"] = 1 + 0.1 * torch.randn(d, generator=g)
    sd["output.weight"] = torch.randn(args.vocab_size, d, generator=g) * std
    return sd


# llama-models: VocabParallelEmbedding / ColumnParallelLinear split rows, RowParallelLinear columns.
_COLUMN = ("tok_embeddings", "wq", "wk", "wv", "w1", "w3", "output")
_ROW = ("wo", "w2")


def save_meta(root: str, sd: dict[str, torch.Tensor], params: dict, n_shards: int = 2,
              dtype: torch.dtype = torch.float32) -> None:
    """params.json + consolidated.NN.pth model-parallel shards."""
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "params.json"), "w") as f:
        json.dump(params, f)
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(n_shards)]
    for name, t in sd.items():
        kind = name.split(".")[-2]
        if kind in _COLUMN:
            parts = t.chunk(n_shards, dim=0)
        elif kind in _ROW:
            parts = t.chunk(n_shards, dim=1)
        else:
            parts = [t] * n_shards
        for shard, part in zip(shards, parts):
            shard[name] = part.to(dtype).clone()
    for i, shard in enumerate(shards):
        torch.save(shard, os.path.join(root, f"consolidated.{i:02d}.pth"))


def _hf_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    # transformers convert_llama_weights_to_hf.py: permute(w, n_heads, dim1, dim2)
    dim1, dim2 = w.shape
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def to_hf(sd: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Meta names/layout -> Hugging Face LlamaForCausalLM names/layout."""
    out = {"model.embed_tokens.weight": sd["tok_embeddings.weight"], "model.norm.weight": sd["norm.weight"],
           "lm_head.weight": sd["output.weight"]}
    for i in range(args.n_layers):
        p, q = f"layers.{i}.", f"model.layers.{i}."
        out[q + "self_attn.q_proj.weight"] = _hf_permute(sd[p + "attention.wq.weight"], args.n_heads)
        out[q + "self_attn.k_proj.weight"] = _hf_permute(sd[p + "attention.wk.weight"], args.n_kv_heads)
        out[q + "self_attn.v_proj.weight"] = sd[p + "attention.wv.weight"]
        out[q + "self_attn.o_proj.weight"] = sd[p + "attention.wo.weight"]
        out[q + "mlp.gate_proj.weight"] = sd[p + "feed_forward.w1.weight"]
        out[q + "mlp.down_proj.weight"] = sd[p + "feed_forward.w2.weight"]
        out[q + "mlp.up_proj.weight"] = sd[p + "feed_forward.w3.weight"]
        out[q + "input_layernorm.weight"] = sd[p + "attention_norm.weight"]
        out[q + "post_attention_layernorm.weight"] = sd[p + "ffn_norm.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def save_hf(root: str, hf_sd: dict[str, torch.Tensor], config: dict, n_files: int = 1) -> None:
    """config.json + model.safetensors, or n_files shards with model.safetensors.index.json."""
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "config.json"), "w") as f:
        json.dump(config, f)
    if n_files == 1:
        save_file(hf_sd, os.path.join(root, "model.safetensors"))
        return
    names = sorted(hf_sd)
    weight_map = {}
    for i in range(n_files):
        fname = f"model-{i + 1:05d}-of-{n_files:05d}.safetensors"
        part = {n: hf_sd[n] for n in names[i::n_files]}
        save_file(part, os.path.join(root, fname))
        weight_map.update({n: fname for n in part})
    with open(os.path.join(root, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


_GGUF_NAMES = {
    "tok_embeddings": "token_embd", "norm": "output_norm", "output": "output",
    "attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v", "attention.wo": "attn_output",
    "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down", "feed_forward.w3": "ffn_up",
    "attention_norm": "attn_norm", "ffn_norm": "ffn_norm",
}


def llama_cpp_rope_factors(args: ModelArgs) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.generate_extra_tensors (rope_freqs.weight)."""
    s, dim, base = args.rope_scaling, args.head_dim, args.rope_theta
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1)
        elif wavelen > low_wavelen:
            factors.append(s.factor)
        else:
            smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
            factors.append(1 / ((1 - smooth) / s.factor + smooth))
    return np.array(factors, dtype=np.float32)


def save_gguf(path: str, sd: dict[str, torch.Tensor], args: ModelArgs, rope: str = "metadata",
              extra_tensors: dict | None = None) -> None:
    """A llama GGUF with F32 tensors in Meta layout; llama3 RoPE as metadata or as rope_freqs.

    `extra_tensors` maps GGUF names to arrays, or to ``(raw bytes, shape, GGMLQuantizationType)``.
    """
    import gguf

    w = gguf.GGUFWriter(path, "llama")
    w.add_context_length(args.max_seq_len)
    w.add_embedding_length(args.dim)
    w.add_block_count(args.n_layers)
    w.add_feed_forward_length(args.hidden_dim)
    w.add_head_count(args.n_heads)
    w.add_head_count_kv(args.n_kv_heads)
    w.add_layer_norm_rms_eps(args.norm_eps)
    w.add_rope_freq_base(args.rope_theta)
    w.add_rope_dimension_count(args.head_dim)
    w.add_vocab_size(args.vocab_size)
    s = args.rope_scaling
    if rope == "metadata":
        w.add_string("llama.rope.scaling.type", "llama3")
        w.add_float32("llama.rope.scaling.factor", s.factor)
        w.add_uint32("llama.rope.scaling.original_context_length", s.original_max_position_embeddings)
        w.add_float32("llama.rope.scaling.low_freq_factor", s.low_freq_factor)
        w.add_float32("llama.rope.scaling.high_freq_factor", s.high_freq_factor)
    else:
        w.add_tensor("rope_freqs.weight", llama_cpp_rope_factors(args))
    for name, t in sd.items():
        parts = name.split(".")
        if parts[0] == "layers":
            gname = f"blk.{parts[1]}.{_GGUF_NAMES['.'.join(parts[2:-1])]}.weight"
        else:
            gname = f"{_GGUF_NAMES[parts[0]]}.weight"
        w.add_tensor(gname, t.float().numpy())
    for gname, arr in (extra_tensors or {}).items():
        if isinstance(arr, tuple):
            raw, shape, qtype = arr
            w.add_tensor(gname, raw, raw_shape=shape, raw_dtype=qtype)
        else:
            w.add_tensor(gname, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
