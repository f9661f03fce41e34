"""The Llama 3.x decoder: RMSNorm, RoPE (with llama3 frequency scaling), GQA attention, SwiGLU.

Parameter names are Meta's (``tok_embeddings``, ``layers.N.attention.wq``, ...), so a Meta
checkpoint loads without any mapping. This file does no I/O and no sampling.

Shape notation used in comments:
    B  batch            T  new tokens in this call      S  cache slots attended
    D  model dim        H  query heads                  K  key/value heads
    hd head dim         V  vocabulary                   F  FFN hidden dim
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from inhouse.config import ModelArgs, RopeScaling
from inhouse.model.kv_cache import KVCache


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)  # the same arithmetic, one kernel
        # Normalize in fp32, then cast back before the weight (as Meta and HF do).
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x)


def rope_inv_freq(head_dim: int, theta: float, scaling: Optional[RopeScaling]) -> torch.Tensor:
    """Inverse frequencies of RoPE, (hd/2,) fp32, with llama3 scaling applied when given.

    llama3 scaling keeps high frequencies (short wavelengths), divides low frequencies by
    `factor`, and interpolates smoothly in between; all four numbers come from the config.
    """
    # On the CPU explicitly: under a meta-device context (loaders) the arithmetic would go through
    # torch._refs and import torch._dynamo (~1.4 s at start); callers move the result.
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device="cpu")[: head_dim // 2].float() / head_dim))
    if scaling is None:
        return inv_freq
    old_len = scaling.original_max_position_embeddings
    low_freq_wavelen = old_len / scaling.low_freq_factor
    high_freq_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles, each (B, T, hd/2) fp32, for integer positions (B, T)."""
    angles = positions.float()[..., None] * inv_freq  # (B, T, hd/2)
    return angles.cos(), angles.sin()


def rope_rotation(positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """cos + i·sin of the rotation angles, (B, T, 1, hd/2) complex64 (Meta's ``freqs_cis``)."""
    cos, sin = rope_cos_sin(positions, inv_freq)
    return torch.complex(cos, sin)[:, :, None, :]  # (B, T, 1, hd/2): broadcast over heads


def apply_rope(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) — Meta's interleaved layout.

    The pair (x0, x1) is the complex number x0 + i·x1, multiplied in fp32 by the rotation
    cos + i·sin, as Meta's ``apply_rotary_emb`` does: one kernel in eager mode. Under
    ``torch.compile`` the same product is written with real tensors, which Inductor can fuse
    (it generates no code for complex numbers).

    Args:
        x: (B, T, n, hd) queries or keys.
        rot: (B, T, 1, hd/2) complex64 from `rope_rotation`.
    """
    if torch.compiler.is_compiling():
        xp = x.float().unflatten(-1, (-1, 2))  # (B, T, n, hd/2, 2)
        x0, x1 = xp[..., 0], xp[..., 1]
        cos, sin = rot.real, rot.imag
        out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)  # (B, T, n, hd/2, 2)
        return out.flatten(-2).type_as(x)  # (B, T, n, hd)
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (B, T, n, hd/2) complex
    return torch.view_as_real(xc * rot).flatten(-2).type_as(x)  # (B, T, n, hd)


# Score elements (B*H*T*T) up to which a bf16 full causal forward writes the scores out (see
# `_causal_attention_math`): 4 MiB of fp32 per layer, kept for the backward pass.
SMALL_SCORES = 1 << 20


def _causal_attention_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal GQA attention as plain matmuls and a softmax (q (B, H, T, hd); k, v (B, K, T, hd)).

    For short bf16 sequences — fine-tuning batches — PyTorch's CPU flash attention is several
    times slower than this, forward + backward (B=8, H=9, T=50: 7.0 vs 2.0 ms; T=128: 16 vs
    7 ms); from a few hundred positions flash wins and its memory stays linear in T.
    """
    B, H, T, hd = q.shape
    rep = H // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, H, T, hd)
    scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(hd))  # (B, H, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    return (probs @ v).type_as(q)  # (B, H, T, hd)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Grouped-query attention: query head h reads key/value head h // (H/K).

    Args:
        q: (B, H, T, hd); k, v: (B, K, S, hd).
        mask: (B, T, S) bool, True where a query may attend; None for plain causal (S == T).

    Returns:
        (B, H, T, hd).

    One new token per row (decode) takes a direct path: the H/K query heads of a group are
    stacked against their one key/value head (no copy of the cache per head), scores and
    softmax in fp32. Longer chunks use SDPA.
    """
    B, H, T, hd = q.shape
    if mask is None:
        if q.dtype != torch.float32 and B * H * T * T <= SMALL_SCORES:
            return _causal_attention_math(q, k, v)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    K = k.shape[1]
    if T > 1:  # the cache may hold a narrower dtype than the queries (bf16 cache, fp32 residual)
        k, v = k.to(q.dtype), v.to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], enable_gqa=True)  # mask (B, 1, T, S)
    qg = q.reshape(B, K, H // K, hd).float()  # (B, K, H/K, hd): T == 1
    scores = (qg @ k.float().transpose(-1, -2)) * (1.0 / math.sqrt(hd))  # (B, K, H/K, S)
    scores = scores.masked_fill(~mask[:, :, None, :], float("-inf"))  # mask (B, 1, 1, S)
    y = scores.softmax(-1) @ v.float()  # (B, K, H/K, hd)
    return y.view(B, H, 1, hd).type_as(q)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        rot: torch.Tensor,
        cache: Optional[KVCache],
        input_pos: Optional[torch.Tensor],
        mask: Optional[torch.Tensor],
        cache_rows: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, H, hd)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, K, hd)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, K, hd)
        q, k = apply_rope(q, rot), apply_rope(k, rot)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H|K, T, hd)

        if cache is not None:
            assert input_pos is not None and mask is not None
            k, v = cache.update(input_pos, k, v, n_slots=mask.shape[-1], rows=cache_rows)  # (B, K, S, hd)

        y = attend(q, k, v, mask)  # (B, H, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, H*hd)
        return self.wo(y)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # down
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)  # up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # (B, T, F) -> (B, T, D)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, rot, cache, input_pos, mask, cache_rows=None):
        h = x + self.attention(self.attention_norm(x), rot, cache, input_pos, mask, cache_rows)
        return h + self.feed_forward(self.ffn_norm(h))


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of a model's unquantized parameters and of its KV cache: its embedding table's (bf16
    for quantized models), or what a 4-bit table (`Int4Embedding`) was loaded for. Any module with a
    ``tok_embeddings`` (a `Transformer`, or something that wraps one)."""
    emb = model.tok_embeddings
    return emb.weight.dtype if isinstance(emb, nn.Embedding) else emb.dtype


def model_device(model: nn.Module) -> torch.device:
    """Where a model's weights are (any module with a ``tok_embeddings``)."""
    emb = model.tok_embeddings
    return emb.weight.device if isinstance(emb, nn.Embedding) else emb.device


class Transformer(nn.Module):
    """A Llama 3.x decoder.

    Two ways to call it:
      * ``model(tokens)`` — a full causal forward over (B, T) tokens at positions 0..T-1,
        no cache (training, scoring).
      * ``model(tokens, input_pos=pos, caches=caches)`` — incremental: ``pos`` (B, T) gives
        each token's position; keys/values are written into ``caches`` (one `KVCache`
        per layer) and each query attends to cached positions <= its own.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        table = torch.empty(args.vocab_size, args.dim)
        if not table.is_meta:  # nn.Embedding's own init; on the meta device (loaders) it would
            nn.init.normal_(table)  # go through torch._refs and import torch._dynamo: ~1.3 s at start
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim, _weight=table)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.register_buffer(
            "inv_freq", rope_inv_freq(args.head_dim, args.rope_theta, args.rope_scaling), persistent=False
        )

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the model's unquantized parameters and of its KV cache (`model_dtype`)."""
        return model_dtype(self)

    @property
    def device(self) -> torch.device:
        """Where the model's weights are (`model_device`)."""
        return model_device(self)

    def tie_weights(self) -> None:
        """Share the output projection with the embedding (after weights were assigned)."""
        if self.args.tie_embeddings and isinstance(self.output, nn.Linear):  # quantized outputs tie themselves
            self.output.weight = self.tok_embeddings.weight

    def set_rope_freq_factors(self, factors: torch.Tensor) -> None:
        """Divide RoPE frequencies by per-frequency factors (llama.cpp's ``rope_freqs`` tensor)."""
        if factors.shape != (self.args.head_dim // 2,):
            raise ValueError(f"rope_freqs has shape {tuple(factors.shape)}, expected ({self.args.head_dim // 2},)")
        base = rope_inv_freq(self.args.head_dim, self.args.rope_theta, None)
        self.inv_freq = (base / factors.float()).to(self.inv_freq.device)

    def forward(
        self,
        tokens: torch.Tensor,
        input_pos: Optional[torch.Tensor] = None,
        caches: Optional[list[KVCache]] = None,
        last_only: bool = False,
        cache_rows: Union[torch.Tensor, int, None] = None,
        n_slots: Optional[int] = None,
    ) -> torch.Tensor:
        """Logits (B, T, V) fp32, or (B, 1, V) with ``last_only``.

        Args:
            tokens: (B, T) token ids.
            input_pos: (B, T) positions; required with ``caches``.
            caches: one `KVCache` per layer for incremental decoding.
            last_only: compute the output projection for the last position only.
            cache_rows: (B,) which cache rows hold these sequences (default 0..B-1), or the
                first of B contiguous rows (an int, `KVCache.rows_index`).
            n_slots: cache positions to attend over, ``max(input_pos) + 1`` when not given. The
                compiled decode step passes it, with an int or a tensor for `cache_rows`, so that
                the graph reads no tensor value on the host (`inhouse.engine.compile`).
        """
        B, T = tokens.shape
        if caches is None:
            if input_pos is not None:
                raise ValueError("input_pos without caches is not supported: pass neither or both")
            positions = torch.arange(T, device=tokens.device).expand(B, T)
            mask = None
        else:
            if input_pos is None or input_pos.shape != (B, T):
                raise ValueError(f"input_pos must be (B, T)=({B}, {T}), got {None if input_pos is None else tuple(input_pos.shape)}")
            if len(caches) != len(self.layers):
                raise ValueError(f"got {len(caches)} caches for {len(self.layers)} layers")
            positions = input_pos
            if n_slots is None:
                n_slots = int(input_pos.max()) + 1  # attend only over slots that can be filled
            if n_slots > caches[0].max_len:
                raise ValueError(f"position {n_slots - 1} is past the cache length {caches[0].max_len}")
            slots = torch.arange(n_slots, device=tokens.device)
            mask = slots[None, None, :] <= input_pos[:, :, None]  # (B, T, S)
            if cache_rows is None or (isinstance(cache_rows, torch.Tensor) and not torch.compiler.is_compiling()):
                # an int when the rows are contiguous (a compiled step is handed rows already
                # sorted out: a tensor there means scattered rows, and reading it would break the graph)
                cache_rows = caches[0].rows_index(B, cache_rows)

        rot = rope_rotation(positions, self.inv_freq)  # (B, T, 1, hd/2) complex
        # The residual stream runs in the norms' dtype: the model's dtype, or fp32 for quantized
        # models (their matmuls take bf16 inputs; an fp32 sum keeps each layer's rounding out of it).
        h = self.tok_embeddings(tokens).to(self.norm.weight.dtype)  # (B, T, D)
        for i, layer in enumerate(self.layers):
            h = layer(h, rot, None if caches is None else caches[i], input_pos, mask, cache_rows)
        if last_only:
            h = h[:, -1:]
        return self.output(self.norm(h)).float()  # (B, T, V)

    def new_caches(self, batch_size: int, max_len: int, dtype: Optional[torch.dtype] = None) -> list[KVCache]:
        """Allocate one zeroed `KVCache` per layer for `batch_size` sequences of `max_len` positions."""
        dtype = dtype or self.dtype
        device = self.device
        return [
            KVCache(batch_size, max_len, self.args.n_kv_heads, self.args.head_dim, dtype=dtype, device=device)
            for _ in self.layers
        ]
