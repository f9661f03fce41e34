"""A quantized model's decode step in one native call (``torch.classes.inhouse.FusedDecoder``).

A decode step of a small model is hundreds of small operations (SmolLM2-135M: 210 quantized
matrix x vector products and ~1,500 element-wise ops); run from Python one by one, their
dispatch and thread fork/join cost more than reading the weights. `FusedDecode` hands the whole
step (embedding, every layer, final norm, vocabulary projection) to one native function that
runs it inside one parallel region (inhouse/kernels/decode_cpu.cpp), with the arithmetic of the
eager model: the same int4/int8 row kernels, fp32 residual stream, bf16 KV cache, the top logits
recomputed from the projection's exact rows. The same call runs prompt chunks as rows
(`FusedDecode.rows`); long prompts run the eager model (large matmuls).

It applies to models whose linears are all the native `Int4Linear`/`Int8Linear` and whose output
is a `RescoredOutput` over a native int8 or 4-bit pass, and whose embedding is bf16 or the file's
4-bit or int8 rows (`Int4Embedding`, `Int8Embedding`): the default for GGUF files on CPUs with AVX-512 VNNI or AVX2, and ``quantize``
int4/int8 there; `fused_decode_unsupported` says why another model cannot use it. When a layer
is swapped afterwards (LoRA adapters), calls go to the fallback (the eager or compiled model).
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Optional

import torch
from torch import nn

from inhouse.model.kv_cache import KVCache
from inhouse.model.quant import Int4Embedding, Int4Linear, Int8Embedding, Int8Linear, RescoredOutput
from inhouse.model.transformer import RMSNorm, Transformer

logger = logging.getLogger("inhouse.model")

_ALL_ROWS = torch.zeros(0, dtype=torch.long)  # FusedDecoder.step's logit_rows: every row
LINEARS = ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
           "feed_forward.w1", "feed_forward.w3", "feed_forward.w2")  # the order FusedDecoder.add_layer takes


def _linear_tensors(m: nn.Module) -> list[torch.Tensor]:
    # detached: the decoder keeps its own references to the storage its raw pointers point into,
    # even if the module's tensors are later pointed elsewhere (`inhouse.model.arena`)
    if isinstance(m, Int4Linear):
        return [m.weight_q4.detach(), m.steps.detach(), m.mins.detach()]
    return [m.weight_int8.detach(), m.scales.detach(), m.scales.detach()]  # int8 (row scales or group steps): the third is unused


def fused_decode_unsupported(model: nn.Module) -> Optional[str]:
    """Why `model` cannot use `FusedDecode` here, or None if it can."""
    if os.environ.get("INHOUSE_FUSED_DECODE", "1") == "0":
        return "INHOUSE_FUSED_DECODE=0"
    if type(model) is not Transformer:
        return f"a {type(model).__name__}, not inhouse's Transformer"
    if model.__dict__.get("layers_changed"):
        return "its layers were swapped (LoRA)"
    if model.device.type != "cpu":
        return "not on the CPU"
    out = model.output
    if not (isinstance(out, RescoredOutput) and type(out.approx) in (Int4Linear, Int8Linear) and out.approx.native
            and (out.rows is None or out.rows.dtype == torch.bfloat16)):
        return "its output projection is not a native int8 pass with bf16 rows or a native one of the file's own rows"
    emb = model.tok_embeddings
    if not (type(emb) in (Int4Embedding, Int8Embedding) or emb.weight.dtype == torch.bfloat16):
        return "its embedding is neither bf16 nor the file's 4-bit or int8 rows"
    args = model.args
    if args.head_dim % 16 or args.dim % 64 or (args.n_heads * args.head_dim) % 64 or args.hidden_dim % 64:
        return "its sizes are not multiples of 64 (head_dim of 16)"
    for i, layer in enumerate(model.layers):
        for name in LINEARS:
            m = layer.get_submodule(name)
            if type(m) not in (Int4Linear, Int8Linear) or not m.native:
                return f"layers.{i}.{name} is a {type(m).__name__}, not a native int4/int8 linear"
        for norm in (layer.attention_norm, layer.ffn_norm):
            if type(norm) is not RMSNorm or norm.weight.dtype != torch.float32:
                return "its norms are not fp32 RMSNorms"
    if model.norm.weight.dtype != torch.float32:
        return "its final norm is not fp32"
    from inhouse.kernels import native_kernels_available

    if not native_kernels_available():
        return "the native kernels are not available here"
    return None


class FusedDecode:
    """The model's forward for decode steps (one new token per row), as one native call.

    Args:
        model: a quantized `Transformer` (see `fused_decode_unsupported`).
        fallback: what to call once the model's layers have been swapped (LoRA adapters), or
            for steps of more than one token per row; default the model itself.

    Raises:
        ValueError: the model cannot use it (the reason from `fused_decode_unsupported`).
    """

    def __init__(self, model: Transformer, fallback: Optional[Callable[..., torch.Tensor]] = None):
        why = fused_decode_unsupported(model)
        if why is not None:
            raise ValueError(f"the fused decode step cannot run this model: {why}")
        self.model = model
        self.fallback = fallback or model
        args = model.args
        out, emb = model.output, model.tok_embeddings
        if type(emb) is Int4Embedding:
            table = [emb.weight_q4.detach(), emb.steps.detach(), emb.mins.detach()]
        elif type(emb) is Int8Embedding:
            table = [emb.weight_int8.detach(), emb.scales.detach(), emb.scales.detach()]  # the third is unused
        else:
            table = [emb.weight.detach()]
        projection = _linear_tensors(out.approx)
        if out.rows is not None:  # the int8 pass's exact rows; a pass of the file's rows recomputes from its own
            projection[2] = out.rows.detach()
        self._decoder = torch.classes.inhouse.FusedDecoder(
            args.n_heads, args.n_kv_heads, args.head_dim, float(args.norm_eps), model.norm.weight.detach(),
            model.inv_freq.detach().float().contiguous(), table, projection, out.k, args.vocab_size)
        for layer in model.layers:
            tensors = [layer.attention_norm.weight.detach(), layer.ffn_norm.weight.detach()]
            for name in LINEARS:
                tensors += _linear_tensors(layer.get_submodule(name))
            self._decoder.add_layer(tensors)
        self._caches: Optional[list[KVCache]] = None
        self._bound: list[torch.Tensor] = []  # the cache tensors the decoder points into (kept alive)

    def _bind(self, caches: list[KVCache]) -> None:
        # The engine's caches change only when they grow, all layers at once (`KVCache.grow`, new
        # tensors): the list and its first layer's keys tell, without reading 60 buffers every step.
        if caches is self._caches and caches[0].k is self._bound[0]:
            return
        ks, vs = [c.k for c in caches], [c.v for c in caches]
        self._decoder.set_caches(ks, vs)  # checked there: bf16, contiguous, the model's geometry
        self._caches, self._bound = caches, ks + vs

    def __call__(self, tokens: torch.Tensor, input_pos: torch.Tensor, caches: list[KVCache],
                 last_only: bool = True, cache_rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits (B, 1, V) fp32 of the next token after `tokens` (B, 1) at `input_pos` (B, 1).

        Same arguments as `Transformer.forward` for a decode step; `cache_rows` (B,) defaults
        to rows 0..B-1.
        """
        if tokens.shape[1] != 1 or self.model.__dict__.get("layers_changed"):
            return self.fallback(tokens, input_pos=input_pos, caches=caches, last_only=last_only, cache_rows=cache_rows)
        B = tokens.shape[0]
        if input_pos.shape != (B, 1):
            raise ValueError(f"input_pos must be (B, 1)=({B}, 1), got {tuple(input_pos.shape)}")
        if cache_rows is None:
            cache_rows = torch.arange(B)
        self._bind(caches)
        return self._decoder.step(tokens.reshape(B), input_pos.reshape(B), cache_rows.reshape(B), _ALL_ROWS)

    def rows(self, tokens: torch.Tensor, positions: torch.Tensor, cache_rows: torch.Tensor, caches: list[KVCache],
             logit_rows: torch.Tensor) -> torch.Tensor:
        """Compute R tokens of any sequences in one call; logits (n, 1, V) fp32 of `logit_rows`.

        `tokens`, `positions` and `cache_rows` are (R,) int64: the r-th token is at `positions[r]`
        of cache row `cache_rows[r]`. Several rows may belong to one sequence (a prompt chunk, at
        consecutive positions): every row's key/value is written first, then each row attends to
        its sequence's positions up to its own, so a row's result depends only on its sequence's
        tokens up to it. It is computed exactly as a decode step of that token would compute it
        (the same per-row kernels), whatever else shares the call: a prompt fed this way, whole,
        in chunks, or token by token, leaves bit-identical keys and values in the cache.

        Args:
            logit_rows: (n,) int64, which rows need logits (the vocabulary pass is a fifth of a
                row's cost); the logits come back in that order.

        Raises:
            ValueError: the model's layers were swapped (LoRA): the fused step no longer applies.
        """
        if self.model.__dict__.get("layers_changed"):
            raise ValueError("the fused decode step does not run a model whose layers were swapped")
        self._bind(caches)
        return self._decoder.step(tokens, positions, cache_rows, logit_rows)
