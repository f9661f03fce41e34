"""Merge a LoRA adapter into its base and write Hugging Face safetensors (``inhouse merge``).

The output directory is a ``LlamaForCausalLM`` checkpoint: ``config.json``, ``model.safetensors``
(sharded with an index past 4 GB), and the tokenizer (copied from an HF base; written as
``tokenizer.json`` + ``tokenizer_config.json`` for a GGUF base; Meta's ``tokenizer.model`` copied for a
Meta base, which inhouse reads but transformers does not). A quantized GGUF base is dequantized:
the merged weights are full precision, not re-quantized.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Optional, Union

import torch
from safetensors.torch import save_file

from inhouse.config import ModelArgs
from inhouse.model.lora import dequantize_nf4, merge_lora
from inhouse.model.transformer import rope_inv_freq

logger = logging.getLogger("inhouse.finetune")

_SHARD_BYTES = 4 * 1024**3
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                    "generation_config.json", "tokenizer.model")
_META_TO_HF = {
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}


def hf_config(args: ModelArgs, dtype: torch.dtype, bos_id: Optional[int] = None,
              eos_id: Union[int, list, None] = None) -> dict:
    """``config.json`` of a LlamaForCausalLM with this architecture."""
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": args.dim,
        "intermediate_size": args.hidden_dim, "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads, "num_key_value_heads": args.n_kv_heads, "head_dim": args.head_dim,
        "vocab_size": args.vocab_size, "rms_norm_eps": args.norm_eps, "max_position_embeddings": args.max_seq_len,
        "hidden_act": "silu", "tie_word_embeddings": args.tie_embeddings, "attention_bias": False,
        "mlp_bias": False, "rope_theta": args.rope_theta, "torch_dtype": str(dtype).removeprefix("torch."),
        "bos_token_id": bos_id, "eos_token_id": eos_id,
    }
    s = args.rope_scaling
    cfg["rope_scaling"] = None if s is None else {
        "rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
        "high_freq_factor": s.high_freq_factor, "original_max_position_embeddings": s.original_max_position_embeddings}
    return cfg


def hf_state_dict(model, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The model's weights in HF names and layout (q/k rows permuted), as `dtype` (no LoRA layers allowed)."""
    from inhouse.finetune.adapters import hf_permute_rows

    args = model.args
    out: dict[str, torch.Tensor] = {}
    for name, p in model.state_dict().items():
        if name == "output.weight" and args.tie_embeddings:
            continue
        t = p.detach().to(dtype)
        if name == "tok_embeddings.weight":
            key = "model.embed_tokens.weight"
        elif name == "norm.weight":
            key = "model.norm.weight"
        elif name == "output.weight":
            key = "lm_head.weight"
        else:
            parts = name.split(".")  # layers.N.attention.wq.weight / layers.N.ffn_norm.weight
            if parts[0] != "layers" or parts[-1] != "weight":
                raise ValueError(f"cannot export tensor {name!r} as a Hugging Face Llama weight")
            mod = ".".join(parts[2:-1])
            if mod not in _META_TO_HF:
                raise ValueError(f"cannot export tensor {name!r} as a Hugging Face Llama weight (merge LoRA first)")
            key = f"model.layers.{parts[1]}.{_META_TO_HF[mod]}.weight"
            if mod == "attention.wq":
                t = hf_permute_rows(t, args.n_heads)
            elif mod == "attention.wk":
                t = hf_permute_rows(t, args.n_kv_heads)
        out[key] = t.contiguous().cpu()
    return out


def _write_tokenizer(tokenizer, out_dir: str, source_dir: Optional[str]) -> None:
    copied = []
    if source_dir and os.path.isdir(source_dir):
        for n in _TOKENIZER_FILES:
            if os.path.isfile(os.path.join(source_dir, n)):
                shutil.copyfile(os.path.join(source_dir, n), os.path.join(out_dir, n))
                copied.append(n)
    if "tokenizer.json" in copied or "tokenizer.model" in copied:
        return
    if not hasattr(tokenizer, "to_json"):
        logger.warning("no tokenizer file written to %s: give inhouse a tokenizer with --tokenizer", out_dir)
        return
    with open(os.path.join(out_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
        f.write(tokenizer.to_json())
    inv = {v: k for k, v in tokenizer.special_tokens.items()}
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": bool(tokenizer.add_bos),
           "bos_token": inv.get(tokenizer.bos_id), "eos_token": inv.get(tokenizer.eos_id),
           "model_max_length": 1 << 30}
    if tokenizer.chat_template:
        cfg["chat_template"] = tokenizer.chat_template
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)


def export_hf(model, tokenizer, out_dir: str, *, dtype: torch.dtype = torch.bfloat16,
              source_dir: Optional[str] = None) -> str:
    """Write `model` (no LoRA layers; NF4 layers are dequantized) and its tokenizer as an HF checkpoint.

    Raises:
        ValueError: RoPE frequencies that config.json cannot express (a GGUF ``rope_freqs`` tensor that
            differs from the llama3 scaling of the config).
    """
    args = model.args
    expected = rope_inv_freq(args.head_dim, args.rope_theta, args.rope_scaling)
    if not torch.allclose(model.inv_freq.float().cpu(), expected, rtol=1e-5, atol=0):
        raise ValueError("this model's RoPE frequencies (from a GGUF rope_freqs tensor) cannot be written "
                         "as a Hugging Face config")
    dequantize_nf4(model, torch.float32)
    sd = hf_state_dict(model, dtype)
    os.makedirs(out_dir, exist_ok=True)
    stops = sorted(getattr(tokenizer, "stop_ids", ()) or ())
    eos = stops[0] if len(stops) == 1 else (stops or tokenizer.eos_id)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config(args, dtype, tokenizer.bos_id, eos), f, indent=2)
    total = sum(t.numel() * t.element_size() for t in sd.values())
    if total <= _SHARD_BYTES:
        save_file(sd, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    else:
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for k, t in sd.items():
            n = t.numel() * t.element_size()
            if size + n > _SHARD_BYTES and shards[-1]:
                shards.append({})
                size = 0
            shards[-1][k] = t
            size += n
        weight_map = {}
        for i, part in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(part, os.path.join(out_dir, fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in part})
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    _write_tokenizer(tokenizer, out_dir, source_dir)
    if not os.path.exists(os.path.join(out_dir, "generation_config.json")):
        with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
            json.dump({"bos_token_id": tokenizer.bos_id, "eos_token_id": eos}, f, indent=2)
    logger.info("wrote %s (%d tensors, %.1f MB, %s)", out_dir, len(sd), total / 1e6, str(dtype).removeprefix("torch."))
    return out_dir


def merge_adapter(model: Optional[str], adapter_dir: str, out_dir: str, *, dtype: Union[str, torch.dtype] = "auto",
                  tokenizer: Optional[str] = None) -> str:
    """``inhouse merge``: load MODEL (dequantized), apply the adapter, fold it in, write HF safetensors.

    Args:
        model: a MODEL argument (see `inhouse.resolve`); None for the embedded model.
        adapter_dir: a PEFT LoRA adapter directory.
        out_dir: where the merged checkpoint goes.
        dtype: dtype of the written weights ("auto": fp32 for an fp32 base, else bf16).

    Returns:
        `out_dir`.
    """
    from inhouse.finetune.adapters import load_adapter
    from inhouse.resolve import open_model, resolve_dtype

    loaded = open_model(model, dtype=torch.float32, tokenizer=tokenizer, quantize="none")
    out_dtype = resolve_dtype(dtype, "float32" if loaded.source == "random" else _stored(loaded))
    load_adapter(loaded.model, adapter_dir)
    merge_lora(loaded.model, torch.float32)
    src = None
    if loaded.path:
        src = loaded.path if os.path.isdir(loaded.path) else os.path.dirname(loaded.path)
        if loaded.source == "gguf":
            src = None
    if tokenizer:
        src = tokenizer
    return export_hf(loaded.model, loaded.tokenizer, out_dir, dtype=out_dtype, source_dir=src)


def _stored(loaded) -> str:
    from inhouse.weights import inspect_checkpoint

    return inspect_checkpoint(loaded.path).stored_dtype if loaded.path else "float32"


__all__ = ["hf_config", "hf_state_dict", "export_hf", "merge_adapter"]
