"""Weight-only quantized linears: drop-in replacements for ``nn.Linear(bias=False)``.

Decoding one token reads every weight once, so on a CPU its speed is memory bandwidth divided
by the bytes of the weights. Storing the matrices in int8 (one scale per output row) halves the
bytes of bf16; the activations stay in bf16, which is what PyTorch's int8 kernel is fast with
(``torch._weight_int8pack_mm``: about 30 GB/s of weights on a 2-core AVX-512 machine, against
12–18 GB/s for plain bf16/fp32 matmuls; with fp32 activations it is ~15× slower).

Two layouts:

* `Int8Linear`: symmetric int8, one scale per output row (``torch._weight_int8pack_mm``).
* `Int4Linear`: asymmetric 4-bit in groups of 32 along the input, a bf16 scale and zero per
  group (``torch._weight_int4pack_mm_for_cpu``). GGUF Q4_0/Q4_1 blocks are groups of 32 with
  one scale and one offset, so a Q4_1 matrix is re-laid out *exactly* (its block minimum and
  maximum land on codes 0 and 15), up to the bf16 rounding of the scale and zero.

`quantize_model` swaps the linears of a loaded `Transformer` in place; the module names stay
Meta's (``layers.N.attention.wq`` is now an `Int8Linear`). The output projection is left as it
is: measured on SmolLM2-135M, an int8 vocabulary projection alone moves ~3% of the greedy
next-token choices, and when tied it shares the embedding table (no extra memory).

Per-row results do not depend on how many rows are in the batch (both kernels compute each row
alone, checked in tests/model/test_quant.py), as long as a call has at most `SMALL_BATCH` rows;
larger calls (prompt chunks) dequantize the matrix to bf16 and use a regular matmul, which is
several times faster there.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger("inhouse.model")

QUANTIZE_MODES = ("none", "int8", "int4")
INT4_GROUP = 32  # input columns per scale/zero: a GGUF Q4 block
SMALL_BATCH = 64  # rows at or under which the int8 kernel runs; above, dequantize + bf16 matmul


class QuantizeError(ValueError):
    """An unknown quantization mode, or a module that cannot be quantized."""


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-row int8: ``weight ≈ q * scale[:, None]``.

    Args:
        weight: (N, K) floating point.

    Returns:
        ``(q, scale)``: q (N, K) int8 in [-127, 127], scale (N,) fp32 (absmax / 127, never 0).
    """
    w = weight.float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)  # (N,)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)  # (N, K)
    return q, scale


class Int8Linear(nn.Module):
    """``y = x @ (q * scale).T`` with int8 `q` (N, K) and bf16 `scale` (N,); no bias.

    Args:
        in_features: K.
        out_features: N.
        device: where the (zero) buffers are allocated; use `from_linear` to fill them.
    """

    def __init__(self, in_features: int, out_features: int, device: Optional[torch.device] = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(out_features, dtype=torch.bfloat16, device=device))

    @classmethod
    def from_weight(cls, weight: torch.Tensor) -> "Int8Linear":
        """Quantize an (N, K) weight matrix (any float dtype)."""
        n, k = weight.shape
        m = cls(k, n, device=torch.device("meta"))
        q, scale = quantize_int8(weight)
        m.weight_int8, m.scales = q, scale.to(torch.bfloat16)
        return m

    def dequantized(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """The (N, K) matrix the module multiplies by, in `dtype`."""
        return (self.weight_int8.to(dtype) * self.scales.to(dtype)[:, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)  # (M, K)
        if x2.shape[0] <= SMALL_BATCH:
            y = torch._weight_int8pack_mm(x2, self.weight_int8, self.scales)  # (M, N)
        else:
            y = F.linear(x2, self.dequantized(torch.bfloat16))  # prompt chunks: compute-bound
        return y.view(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight-only"


class Int4Linear(nn.Module):
    """4-bit weights in groups of `INT4_GROUP` input columns: ``w = (code - 8) * scale + zero``.

    Buffers: ``weight_int4pack`` (the CPU kernel's packed layout), ``scales_and_zeros``
    (K/32, N, 2) bf16 for the kernel, and for dequantizing prompt chunks (the kernel's own
    layout is opaque): ``weight_nibbles`` (N, K/2) uint8, two codes per byte (low nibble
    first), and ``steps_and_mins`` (K/32, N, 2) fp16 — GGUF stores Q4_1's scale and minimum
    in fp16, so prompt chunks see the file's weights exactly, rounded once to bf16.

    Args:
        in_features: K (a multiple of 32).
        out_features: N.
    """

    def __init__(self, in_features: int, out_features: int, device: Optional[torch.device] = None):
        super().__init__()
        if in_features % INT4_GROUP:
            raise QuantizeError(f"int4 needs in_features divisible by {INT4_GROUP}, got {in_features}")
        self.in_features, self.out_features = in_features, out_features
        g = in_features // INT4_GROUP
        self.register_buffer("weight_int4pack", torch.zeros(0, dtype=torch.uint8, device=device))
        self.register_buffer("scales_and_zeros", torch.zeros(g, out_features, 2, dtype=torch.bfloat16, device=device))
        self.register_buffer("steps_and_mins", torch.zeros(g, out_features, 2, dtype=torch.float16, device=device))
        self.register_buffer("weight_nibbles", torch.zeros(out_features, in_features // 2, dtype=torch.uint8,
                                                           device=device))

    @classmethod
    def from_weight(cls, weight: torch.Tensor) -> "Int4Linear":
        """Quantize an (N, K) matrix: per group of 32, codes 0..15 spanning [min, max]."""
        n, k = weight.shape
        m = cls(k, n, device=torch.device("meta"))
        w = weight.float().view(n, k // INT4_GROUP, INT4_GROUP)  # (N, G, 32)
        lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)  # (N, G, 1)
        step = ((hi - lo) / 15).clamp(min=1e-12)
        codes = torch.round((w - lo) / step).clamp_(0, 15).to(torch.uint8).view(n, k)  # (N, K)
        zero = lo + 8 * step  # the kernel computes (code - 8) * scale + zero
        m.scales_and_zeros = torch.stack((step, zero), dim=-1).squeeze(2).transpose(0, 1).contiguous().to(
            torch.bfloat16)  # (G, N, 2)
        m.steps_and_mins = torch.stack((step, lo), dim=-1).squeeze(2).transpose(0, 1).contiguous().to(torch.float16)
        m.weight_int4pack = torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
        m.weight_nibbles = codes[:, 0::2] | (codes[:, 1::2] << 4)  # (N, K/2)
        return m

    def dequantized(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """The (N, K) matrix the module multiplies by, in `dtype`."""
        n, k = self.out_features, self.in_features
        codes = torch.stack((self.weight_nibbles & 15, self.weight_nibbles >> 4), dim=-1).view(n, k)  # (N, K)
        sm = self.steps_and_mins.to(dtype).transpose(0, 1)  # (N, G, 2)
        w = codes.to(dtype).view(n, -1, INT4_GROUP) * sm[..., :1] + sm[..., 1:]  # (N, G, 32)
        return w.view(n, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)  # (M, K)
        if x2.shape[0] <= SMALL_BATCH:
            y = torch._weight_int4pack_mm_for_cpu(x2, self.weight_int4pack, INT4_GROUP, self.scales_and_zeros)
        else:
            # prompt chunks: compute-bound. Dequantize in fp32 and round once (bf16 arithmetic
            # on the codes would add its own rounding to every weight).
            y = F.linear(x2, self.dequantized(torch.float32).to(torch.bfloat16))
        return y.view(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 weight-only, group {INT4_GROUP}"


QUANTIZED_LINEARS = {"int8": Int8Linear, "int4": Int4Linear}
KEEP = ("output",)  # module names left unquantized (see the module docstring)


def _linears(model: nn.Module):
    for name, mod in model.named_modules():
        if type(mod) is nn.Linear:
            yield name, mod


def quantize_model(model: nn.Module, mode: str, dtype: Optional[torch.dtype] = torch.bfloat16) -> nn.Module:
    """Replace every ``nn.Linear`` of `model` (but the output projection) by its quantized version, in place.

    Quantize from fp32 weights when you can: bf16-rounded weights no longer sit exactly on a
    GGUF file's 4-bit grid. The remaining parameters (embedding, norms, output) are then cast to
    `dtype` — bf16 by default, since the kernels are fast only with bf16 activations; buffers
    such as the RoPE frequencies keep their dtype.

    Args:
        model: a loaded `Transformer` (any module with bias-free ``nn.Linear`` children).
        mode: "none" (no change at all), "int8" or "int4".
        dtype: dtype of the parameters left unquantized (None: leave them).

    Returns:
        `model`, for chaining.

    Raises:
        QuantizeError: unknown mode, or a linear with a bias.
    """
    if mode not in QUANTIZE_MODES:
        raise QuantizeError(f"quantize={mode!r} is not supported; use one of {', '.join(QUANTIZE_MODES)}")
    if mode == "none":
        return model
    n = 0
    cls = QUANTIZED_LINEARS[mode]
    for name, lin in list(_linears(model)):
        if name in KEEP:
            continue
        if lin.bias is not None:
            raise QuantizeError(f"{name} has a bias; only bias-free linears can be quantized")
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        with torch.no_grad():
            q = cls.from_weight(lin.weight.detach())
        setattr(parent, leaf, q)
        n += 1
    if dtype is not None:
        for p in model.parameters():
            p.data = p.data.to(dtype)
    logger.debug("quantized %d linears to %s", n, mode)
    return model


def quantized_mode(model: nn.Module) -> str:
    """"int8" or "int4" if `model` holds such linears, else "none"."""
    for mode, cls in QUANTIZED_LINEARS.items():
        if any(isinstance(m, cls) for m in model.modules()):
            return mode
    return "none"


__all__ = ["QUANTIZE_MODES", "QuantizeError", "Int8Linear", "Int4Linear", "quantize_int8", "quantize_model",
           "quantized_mode"]
