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
from typing import Optional

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
        # Normalize in fp32, then cast back before the weight (as Meta and HF do).
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.type_as(x)


def rope_inv_freq(head_dim: int, theta: float, scaling: Optional[RopeScaling]) -> torch.Tensor:
    """Inverse frequencies of RoPE, (hd/2,) fp32, with llama3 scaling applied when given.

    llama3 scaling keeps high frequencies (short wavelengths), divides low frequencies by
    `factor`, and interpolates smoothly in between; all four numbers come from the config.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
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


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) — Meta's interleaved layout.

    Args:
        x: (B, T, n, hd) queries or keys.
        cos, sin: (B, T, hd/2) fp32.
    """
    xf = x.float().unflatten(-1, (-1, 2))  # (B, T, n, hd/2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    c, s = cos[:, :, None, :], sin[:, :, None, :]  # (B, T, 1, hd/2)
    out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1)  # (B, T, n, hd/2, 2)
    return out.flatten(-2).type_as(x)


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
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: Optional[KVCache],
        input_pos: Optional[torch.Tensor],
        mask: Optional[torch.Tensor],
        cache_rows: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, H, hd)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, K, hd)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, K, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H|K, T, hd)

        if cache is not None:
            assert input_pos is not None and mask is not None
            k, v = cache.update(input_pos, k, v, n_slots=mask.shape[-1], rows=cache_rows)  # (B, K, S, hd)

        n_rep = self.n_heads // self.n_kv_heads
        if n_rep > 1:
            k = k.repeat_interleave(n_rep, dim=1)  # (B, H, S, hd)
            v = v.repeat_interleave(n_rep, dim=1)
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, hd)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])  # mask (B, 1, T, S)
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

    def forward(self, x, cos, sin, cache, input_pos, mask, cache_rows=None):
        h = x + self.attention(self.attention_norm(x), cos, sin, cache, input_pos, mask, cache_rows)
        return h + self.feed_forward(self.ffn_norm(h))


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
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.register_buffer(
            "inv_freq", rope_inv_freq(args.head_dim, args.rope_theta, args.rope_scaling), persistent=False
        )

    def tie_weights(self) -> None:
        """Share the output projection with the embedding (after weights were assigned)."""
        if self.args.tie_embeddings:
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
        cache_rows: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Logits (B, T, V) fp32, or (B, 1, V) with ``last_only``.

        Args:
            tokens: (B, T) token ids.
            input_pos: (B, T) positions; required with ``caches``.
            caches: one `KVCache` per layer for incremental decoding.
            last_only: compute the output projection for the last position only.
            cache_rows: (B,) which cache rows hold these sequences (default 0..B-1).
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
            n_slots = int(input_pos.max()) + 1  # attend only over slots that can be filled
            if n_slots > caches[0].max_len:
                raise ValueError(f"position {n_slots - 1} is past the cache length {caches[0].max_len}")
            slots = torch.arange(n_slots, device=tokens.device)
            mask = slots[None, None, :] <= input_pos[:, :, None]  # (B, T, S)

        cos, sin = rope_cos_sin(positions, self.inv_freq)  # (B, T, hd/2)
        h = self.tok_embeddings(tokens)  # (B, T, D)
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, None if caches is None else caches[i], input_pos, mask, cache_rows)
        if last_only:
            h = h[:, -1:]
        return self.output(self.norm(h)).float()  # (B, T, V)

    def new_caches(self, batch_size: int, max_len: int, dtype: Optional[torch.dtype] = None) -> list[KVCache]:
        """Allocate one zeroed `KVCache` per layer for `batch_size` sequences of `max_len` positions."""
        dtype = dtype or self.tok_embeddings.weight.dtype
        device = self.tok_embeddings.weight.device
        return [
            KVCache(batch_size, max_len, self.args.n_kv_heads, self.args.head_dim, dtype=dtype, device=device)
            for _ in self.layers
        ]
