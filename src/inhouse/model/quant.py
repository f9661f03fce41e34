"""Weight-only quantized linears: drop-in replacements for ``nn.Linear(bias=False)``.

Decoding one token reads every weight once, so on a CPU its speed is memory bandwidth divided
by the bytes of the weights. Two layouts:

* `Int8Linear`: symmetric int8, one scale per output row; or, for a GGUF Q8_0 matrix taken as it
  is (`Int8Codes`), one fp16 step per group of 32 along the input (exact to the file).
* `Int4Linear`: 4-bit codes in groups of 32 along the input, ``w = code * step + min`` per group.
  GGUF Q4_0/Q4_1 blocks are groups of 32 with one scale and one offset, so a Q4_1 matrix is
  re-laid out *exactly* (its block minimum and maximum land on codes 0 and 15).

Each runs on one of two kernels, chosen when the module is built:

* native (`inhouse.kernels`, x86-64 CPUs with AVX-512 VNNI or AVX2): activations quantized to
  int16 per group of 32 (finer than bf16), integer dot products (VNNI, or AVX2's multiply-add of
  int16 pairs), weights prefetched well ahead; about 30 GB/s of weights read on a 2-core machine,
  where PyTorch's int4 kernel reaches ~10-19 GB/s.
* PyTorch's (``torch._weight_int4pack_mm_for_cpu``, ``torch._weight_int8pack_mm``) with bf16
  activations, everywhere else.

`quantize_tensor` (called by the loaders as each tensor is read) and `quantize_model` (a whole
loaded model) swap the linears in place; the module names stay Meta's (``layers.N.attention.wq``
is now an `Int8Linear`). The output projection becomes a `RescoredOutput`: an int8 pass, then
the top logits recomputed from the bf16 rows (an int8 projection alone moves ~3% of the greedy
next-token choices of SmolLM2-135M). Norm weights stay fp32, which makes the residual stream
fp32: with a bf16 residual stream, ~3% of next tokens differ from the fp32 reference however
exact the weights are; with it and the native kernel, 98.8-99.6% agree (tests/model/test_quant.py).

Per-row results do not depend on how many rows are in the batch (the kernels compute each row
alone, checked in tests/model/test_quant.py and tests/model/test_native_kernels.py): decode rows
(one token per sequence, x of shape (B, 1, K)) always take the row kernels, whatever B. Prompt
chunks of more than `small_batch` rows dequantize the matrix to bf16 (fp32 on CPUs without bf16
hardware, `chunk_dtype`) and use a regular matmul, which is several times faster there.
"""

from __future__ import annotations

import functools
import logging
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from inhouse.model.native_layout import (INT4_GROUP, QuantizeError, int4_rows, int4_tile_parts, int8_group_values,
                                         int8_rows, native_order, pack_int4_tiles, pack_int8_tiles, tile_padded)

logger = logging.getLogger("inhouse.model")

QUANTIZE_MODES = ("none", "int8", "int4")
SMALL_BATCH = 64  # prompt-chunk rows up to which the row kernels run; above, dequantize + a regular matmul
SMALL_BATCH_AVX2 = 24  # the same for the native AVX2 build, whose rows cost about twice as much


@functools.lru_cache(maxsize=2)
def small_batch(native: bool) -> int:
    """Rows of a prompt chunk up to which the row kernels beat dequantizing and one dense matmul."""
    if native:  # a native module exists: the kernels are loaded and their build is known
        from inhouse.kernels import native_isa

        if native_isa() == "avx2":
            return SMALL_BATCH_AVX2
    return SMALL_BATCH


def _row_kernels(x: torch.Tensor, rows: int, native: bool) -> bool:
    """Whether a call on `x` ((..., K), `rows` rows in all) runs the row kernels.

    Decode rows (x (B, 1, K): one token per sequence) always do, so that a sequence's tokens
    never depend on how many others share its step; prompt chunks do up to `small_batch` rows.
    """
    return (x.dim() >= 3 and x.shape[-2] == 1) or rows <= small_batch(native)


@functools.lru_cache(maxsize=1)
def _cpu_chunk_dtype() -> torch.dtype:
    from inhouse.kernels import cpu_has_fast_bf16

    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def chunk_dtype(device: Union[torch.device, str] = "cpu") -> torch.dtype:
    """The dtype of the matmuls of prompt chunks over `small_batch` rows on `device`: bf16 on a GPU
    and on CPUs with bf16 hardware (AVX512-BF16, AMX), fp32 on the other CPUs, where PyTorch emulates
    bf16 about 6x slower (and fp32 is the more exact of the two)."""
    return _cpu_chunk_dtype() if torch.device(device).type == "cpu" else torch.bfloat16


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-row int8: ``weight ≈ q * scale[:, None]``.

    Args:
        weight: (N, K) floating point.

    Returns:
        ``(q, scale)``: q (N, K) int8 in [-127, 127], scale (N,) fp32 (absmax / 127, never 0).
    """
    n = weight.shape[0]
    q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scale = torch.empty(n, dtype=torch.float32, device=weight.device)
    for i in range(0, n, 4096):  # in row blocks: the fp32 temporaries of a 49152-row vocabulary stay small
        w = weight[i:i + 4096].float()
        s = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)  # (rows,)
        q[i:i + 4096] = torch.round(w / s[:, None]).clamp_(-127, 127)
        scale[i:i + 4096] = s
    return q, scale


class Int8Codes:
    """An int8 matrix with one step per group of 32 along the input: ``w[n, k] = codes[n, k] *
    steps[n, k // 32]``. What a loader hands `quantize_tensor` for a GGUF Q8_0 matrix, so that it
    becomes an `Int8Linear` (group form) exactly, without a round trip through fp32.

    Args:
        codes: (N, K) int8.
        steps: (N, K/32), any float dtype (fp16 from GGUF).
    """

    def __init__(self, codes: torch.Tensor, steps: torch.Tensor):
        n, k = codes.shape
        if k % INT4_GROUP or steps.shape != (n, k // INT4_GROUP):
            raise QuantizeError(f"Int8Codes: codes {tuple(codes.shape)} need steps of shape ({n}, {k // INT4_GROUP}), "
                                f"got {tuple(steps.shape)}")
        self.codes, self.steps = codes, steps

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def numel(self) -> int:
        return self.codes.numel()

    def dense(self) -> torch.Tensor:
        """The (N, K) fp32 values (each ``code * step`` in fp32, as ggml's dequantization)."""
        return int8_group_values(self.codes, self.steps)


class Int8Linear(nn.Module):
    """``y = x @ (q * scale).T`` with int8 `q` (N, K) and one `scale` per output row (N,); no bias.

    The group form (``groups=True``, built by `from_codes` from a GGUF Q8_0 matrix) has one fp16
    step per group of 32 inputs instead: the file's values exactly. It needs the native kernel and
    is stored in its row tiles (`pack_int8_tiles`): `weight_int8` and ``scales`` (N', K) and (N',
    K/32), N' = N rounded up to whole tiles.

    With the native kernel (``native``: AVX-512 VNNI or AVX2, K a multiple of 64) `weight_int8` is in
    the kernels' column order (`native_order`), the scales are fp32, and decode rows and prompt chunks of up to `small_batch` rows run ``torch.ops.inhouse.int8_mm`` (activations as int16
    per group of 32); otherwise they are bf16 for ``torch._weight_int8pack_mm`` (bf16
    activations). Larger calls dequantize to `chunk_dtype` (bf16, or fp32 on CPUs without bf16
    hardware) and use a regular matmul.

    Args:
        in_features: K.
        out_features: N.
        device: where the (zero) buffers are allocated; use `from_weight` to fill them.
        native: use the native kernel (None: wherever it is available).
        groups: one step per group of 32 inputs (fp16) instead of one scale per row.
    """

    def __init__(self, in_features: int, out_features: int, device: Optional[torch.device] = None,
                 native: Optional[bool] = None, groups: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.groups = in_features, out_features, groups
        self.native = _native_choice(True if groups else native, in_features)
        if groups:
            _register_int8_tiles(self, out_features, in_features, device)
            return
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(out_features, dtype=torch.float32 if self.native else torch.bfloat16,
                                                  device=device))

    @classmethod
    def from_weight(cls, weight: torch.Tensor, native: Optional[bool] = None) -> "Int8Linear":
        """Quantize an (N, K) weight matrix (any float dtype)."""
        n, k = weight.shape
        m = cls(k, n, device=torch.device("meta"), native=native)
        q, scale = quantize_int8(weight)
        if m.native:  # the kernels' column order
            q = q[:, native_order(k)[0]].contiguous()
        m.weight_int8, m.scales = q, scale.to(m.scales.dtype)
        return m

    @classmethod
    def from_codes(cls, codes: Int8Codes) -> "Int8Linear":
        """The group form of a matrix given as `Int8Codes` (a GGUF Q8_0 matrix), exactly.

        Raises:
            QuantizeError: the native kernel cannot take it here (see `native_kernel_fits`).
        """
        n, k = codes.shape
        m = cls(k, n, device=torch.device("meta"), groups=True)
        m.weight_int8, m.scales = pack_int8_tiles(codes.codes, codes.steps)
        return m

    def dequantized(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """The (N, K) matrix the module multiplies by, in `dtype`."""
        if self.groups:  # code * step in fp32 (the file's values), rounded once to `dtype`
            n = self.out_features
            out = torch.empty(n, self.in_features, dtype=dtype, device=self.weight_int8.device)
            for i in range(0, n, 4096):  # in row blocks: no fp32 copy of a whole vocabulary
                out[i:i + 4096] = self.dequantized_rows(torch.arange(i, min(n, i + 4096)))
            return out
        q = self.weight_int8[:, native_order(self.in_features)[1]] if self.native else self.weight_int8
        return q.to(dtype) * self.scales.to(dtype)[:, None]

    def dequantized_rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Rows `idx` ((n,) int64) of the matrix in fp32 (exactly, for the group form), without
        expanding the rest."""
        if self.groups:
            return int8_rows(self.weight_int8, self.scales, idx)
        q = self.weight_int8[idx]
        if self.native:
            q = q[:, native_order(self.in_features)[1]]
        return q.float() * self.scales[idx].float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        small = _row_kernels(x, x2.shape[0], self.native)
        if small and self.native:
            return torch.ops.inhouse.int8_mm(x2, self.weight_int8, self.scales,
                                             self.out_features).view(*shape[:-1], self.out_features)
        if small:
            y = torch._weight_int8pack_mm(x2.to(torch.bfloat16), self.weight_int8, self.scales)  # (M, N)
        else:  # prompt chunks: compute-bound
            dt = chunk_dtype(x2.device)
            y = F.linear(x2.to(dt), self.dequantized(dt))
        return y.view(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        kernel = "native" if self.native else "torch"
        scales = f"a step per group of {INT4_GROUP}" if self.groups else "a scale per row"
        return (f"in_features={self.in_features}, out_features={self.out_features}, int8 weight-only ({scales}), "
                f"{kernel} kernel")


INT4PACK_BLOCKS_N = (64, 32)  # output rows per block of PyTorch's int4 packed layout: its AVX-512 and AVX2 kernels
_block_n: Optional[int] = None  # the one this PyTorch build uses here; 0: neither


def unpack_int4pack(packed: torch.Tensor, n: int, k: int, block_n: Optional[int] = None) -> torch.Tensor:
    """The (N, K) codes held by ``torch._convert_weight_to_int4pack_for_cpu(codes, 1)``.

    That layout (PyTorch's CPU kernel) stores blocks of `block_n` output rows (64 where PyTorch
    runs its AVX-512 kernel, 32 with AVX2), each as K rows of block_n/2 bytes: byte j of row k holds
    ``codes[block_n*b + j, k]`` in its low nibble and ``codes[block_n*b + block_n/2 + j, k]`` in its
    high nibble. `int4pack_block_n` says which block size this build uses (default).
    """
    block_n = block_n or int4pack_block_n()
    if not block_n:
        raise QuantizeError("PyTorch's int4 packed layout is not a known one here")
    p = packed.reshape(n // block_n, k, block_n // 2)  # (N/bn, K, bn/2)
    lo, hi = (p & 15).transpose(1, 2), (p >> 4).transpose(1, 2)  # (N/bn, bn/2, K) each
    return torch.cat((lo, hi), dim=1).reshape(n, k)  # rows bn*b..bn*b+bn/2-1 then the next bn/2


def int4pack_block_n() -> int:
    """The block size (64 or 32 rows) with which `unpack_int4pack` reads this PyTorch build's packed
    layout here, or 0 when it is neither (checked once)."""
    global _block_n
    if _block_n is None:
        _block_n = 0
        codes = torch.randint(0, 16, (2 * max(INT4PACK_BLOCKS_N), 64), generator=torch.Generator().manual_seed(0),
                              dtype=torch.int32)
        try:
            packed = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
        except (RuntimeError, ValueError):
            packed = None
        if packed is not None and packed.numel() == codes.numel() // 2:
            for bn in INT4PACK_BLOCKS_N:
                if torch.equal(unpack_int4pack(packed, *codes.shape, block_n=bn).to(torch.int32), codes):
                    _block_n = bn
                    break
        if not _block_n:
            logger.info("int4 packed layout not recognised: keeping a second copy of the 4-bit codes")
    return _block_n


class Int4Codes:
    """A 4-bit matrix as codes, not values: ``w[n, k] = codes[n, k] * steps[n, k // 32] + mins[n, k // 32]``.

    What a loader hands `quantize_tensor` for a GGUF Q4_0/Q4_1 matrix, so that it becomes an
    `Int4Linear` without being expanded to fp32 and quantized again (exact, and several times
    faster to load).

    Args:
        codes: (N, K) uint8, values 0..15.
        steps, mins: (N, K/32), any float dtype (fp16 from GGUF).
    """

    def __init__(self, codes: torch.Tensor, steps: torch.Tensor, mins: torch.Tensor):
        n, k = codes.shape
        if k % INT4_GROUP or steps.shape != (n, k // INT4_GROUP) or mins.shape != steps.shape:
            raise QuantizeError(f"Int4Codes: codes {tuple(codes.shape)} need steps and mins of shape "
                                f"({n}, {k // INT4_GROUP}), got {tuple(steps.shape)} and {tuple(mins.shape)}")
        self.codes, self.steps, self.mins = codes, steps, mins

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def numel(self) -> int:
        return self.codes.numel()

    def dense(self) -> torch.Tensor:
        """The (N, K) fp32 values (each ``code * step + min`` in fp32, as ggml's dequantization)."""
        n, k = self.codes.shape
        w = self.codes.view(n, -1, INT4_GROUP).float() * self.steps.float()[..., None] + self.mins.float()[..., None]
        return w.view(n, k)


class Int4Linear(nn.Module):
    """4-bit weights in groups of `INT4_GROUP` input columns: ``w = code * step + min``.

    Two storage layouts, chosen when the module is built (``native``):

    * native (`inhouse.kernels`, CPUs with AVX-512 VNNI or AVX2, K a multiple of 64): ``weight_q4``
      (N', K/2) uint8, the codes in the kernels' row tiles (`pack_int4_tiles`, N' = N rounded up
      to whole tiles), two per byte; ``steps`` and ``mins`` (N', K/32) fp16 in the same order —
      GGUF stores Q4_1's scale and minimum in fp16, so these are the file's weights exactly. Calls of
      decode rows and chunks of up to `small_batch` rows run ``torch.ops.inhouse.int4_mm``: the activations are quantized
      to int16 per group of 32 and multiplied with integer dot products, reading the weights at close
      to memory bandwidth.
    * PyTorch's: ``weight_int4pack`` (``torch._weight_int4pack_mm_for_cpu``'s packed layout),
      ``scales_and_zeros`` (K/32, N, 2) bf16 for that kernel, and ``steps_and_mins`` (K/32, N, 2)
      fp16 for dequantizing. The codes are read back from the kernel's layout
      (`unpack_int4pack`, checked against PyTorch at first use); where that layout is not the
      known one, a second copy, ``weight_nibbles`` (N, K/2) uint8, is kept.

    Larger calls (prompt chunks) dequantize the matrix in fp32, round it once to `chunk_dtype`
    (bf16; kept fp32 on CPUs without bf16 hardware) and use a regular matmul.

    Args:
        in_features: K (a multiple of 32).
        out_features: N.
        native: use the native layout and kernel (None: wherever it is available).
    """

    def __init__(self, in_features: int, out_features: int, device: Optional[torch.device] = None,
                 native: Optional[bool] = None):
        super().__init__()
        if in_features % INT4_GROUP:
            raise QuantizeError(f"int4 needs in_features divisible by {INT4_GROUP}, got {in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.native = native = _native_choice(native, in_features)
        g, n = in_features // INT4_GROUP, out_features
        if native:
            _register_int4_tiles(self, n, in_features, device)
            return
        self.register_buffer("weight_int4pack", torch.zeros(0, dtype=torch.uint8, device=device))
        self.register_buffer("scales_and_zeros", torch.zeros(g, n, 2, dtype=torch.bfloat16, device=device))
        self.register_buffer("steps_and_mins", torch.zeros(g, n, 2, dtype=torch.float16, device=device))
        self.register_buffer("weight_nibbles", torch.zeros(n, in_features // 2, dtype=torch.uint8, device=device))

    @classmethod
    def from_weight(cls, weight: torch.Tensor, native: Optional[bool] = None) -> "Int4Linear":
        """Quantize an (N, K) matrix: per group of 32, codes 0..15 spanning [min, max]."""
        n, k = weight.shape
        w = weight.float().view(n, k // INT4_GROUP, INT4_GROUP)  # (N, G, 32)
        lo, hi = w.amin(-1), w.amax(-1)  # (N, G)
        step = ((hi - lo) / 15).clamp(min=1e-12)
        codes = torch.round((w - lo[..., None]) / step[..., None]).clamp_(0, 15).to(torch.uint8).view(n, k)  # (N, K)
        return cls.from_codes(Int4Codes(codes, step, lo), native=native)

    @classmethod
    def from_codes(cls, q: "Int4Codes", native: Optional[bool] = None) -> "Int4Linear":
        """The matrix ``q.codes * q.steps + q.mins`` (per group of 32), taken as it is: a GGUF
        Q4_0/Q4_1 matrix keeps the file's own codes, steps and minimums, with no requantization."""
        n, k = q.shape
        m = cls(k, n, device=torch.device("meta"), native=native)
        codes = q.codes
        if m.native:
            m.weight_q4, m.steps, m.mins = pack_int4_tiles(codes, q.steps, q.mins)
            return m
        step, lo = q.steps.float()[..., None], q.mins.float()[..., None]  # (N, G, 1)
        zero = lo + 8 * step  # PyTorch's kernel computes (code - 8) * scale + zero
        m.scales_and_zeros = torch.stack((step, zero), dim=-1).squeeze(2).transpose(0, 1).contiguous().to(
            torch.bfloat16)  # (G, N, 2)
        m.steps_and_mins = torch.stack((step, lo), dim=-1).squeeze(2).transpose(0, 1).contiguous().to(torch.float16)
        m.weight_int4pack = torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
        block_n = int4pack_block_n()
        if not block_n or n % block_n:
            m.weight_nibbles = codes[:, 0::2] | (codes[:, 1::2] << 4)  # (N, K/2)
        else:
            m.weight_nibbles = torch.zeros(0, dtype=torch.uint8)  # read the codes from weight_int4pack
        return m

    def codes(self) -> torch.Tensor:
        """The (N, K) uint8 codes 0..15."""
        n, k = self.out_features, self.in_features
        if self.native:
            return int4_tile_parts(self.weight_q4, self.steps, self.mins, torch.arange(n))[0]
        if self.weight_nibbles.numel() == 0:
            return unpack_int4pack(self.weight_int4pack, n, k)
        return torch.stack((self.weight_nibbles & 15, self.weight_nibbles >> 4), dim=-1).view(n, k)

    def dequantized_rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Rows `idx` ((n,) int64) of the matrix, exactly, in fp32: each ``code * step + min`` (as
        `Int4Codes.dense`), without expanding the rest."""
        if self.native:
            return int4_rows(self.weight_q4, self.steps, self.mins, idx)
        return self.dequantized(torch.float32)[idx]

    def dequantized(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """The (N, K) matrix the module multiplies by, in `dtype`."""
        n, k = self.out_features, self.in_features
        if self.native:
            codes, steps, mins = int4_tile_parts(self.weight_q4, self.steps, self.mins, torch.arange(n))
            step, lo = steps.to(dtype)[..., None], mins.to(dtype)[..., None]  # (N, G, 1)
        else:
            codes = self.codes()  # (N, K)
            sm = self.steps_and_mins.to(dtype).transpose(0, 1)  # (N, G, 2)
            step, lo = sm[..., :1], sm[..., 1:]
        return (codes.to(dtype).view(n, -1, INT4_GROUP) * step + lo).view(n, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        small = _row_kernels(x, x2.shape[0], self.native)
        if self.native:
            if small:
                y = torch.ops.inhouse.int4_mm(x2, self.weight_q4, self.steps, self.mins, self.out_features)  # in x's dtype
            else:  # prompt chunks: the matrix in bf16 (rounded once from fp32) or fp32, a regular matmul
                dt = chunk_dtype(x2.device)
                w = torch.ops.inhouse.int4_dequantize(self.weight_q4, self.steps, self.mins, dt == torch.float32,
                                                      self.out_features)
                y = F.linear(x2.to(dt), w).to(x.dtype)
            return y.view(*shape[:-1], self.out_features)
        if small:
            y = torch._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16), self.weight_int4pack, INT4_GROUP,
                                                  self.scales_and_zeros)
        else:
            # prompt chunks: compute-bound. Dequantize in fp32 and round once, if at all (bf16
            # arithmetic on the codes would add its own rounding to every weight).
            dt = chunk_dtype(x2.device)
            y = F.linear(x2.to(dt), self.dequantized(torch.float32).to(dt))
        return y.view(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        kernel = "native" if self.native else "torch"
        return (f"in_features={self.in_features}, out_features={self.out_features}, int4 weight-only, "
                f"group {INT4_GROUP}, {kernel} kernel")


def _register_int4_tiles(m: nn.Module, n: int, k: int, device: Optional[torch.device]) -> None:
    """The (zero) buffers of an (n, k) 4-bit matrix in row tiles: ``weight_q4``, ``steps``, ``mins``."""
    padded = tile_padded(n)
    m.register_buffer("weight_q4", torch.zeros(padded, k // 2, dtype=torch.uint8, device=device))
    m.register_buffer("steps", torch.zeros(padded, k // INT4_GROUP, dtype=torch.float16, device=device))
    m.register_buffer("mins", torch.zeros(padded, k // INT4_GROUP, dtype=torch.float16, device=device))


def _register_int8_tiles(m: nn.Module, n: int, k: int, device: Optional[torch.device]) -> None:
    """The (zero) buffers of an (n, k) int8 matrix with group steps in row tiles: ``weight_int8``, ``scales``."""
    padded = tile_padded(n)
    m.register_buffer("weight_int8", torch.zeros(padded, k, dtype=torch.int8, device=device))
    m.register_buffer("scales", torch.zeros(padded, k // INT4_GROUP, dtype=torch.float16, device=device))


class _FileRowsEmbedding(nn.Module):
    """What `Int4Embedding` and `Int8Embedding` share: the token embedding as a native table of the
    file's rows (V, D); a lookup dequantizes just the rows it reads (`rows`), in fp32."""

    kind = ""  # "a 4-bit", "an int8": for messages

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: torch.dtype):
        super().__init__()
        if embedding_dim % 64:
            raise QuantizeError(f"{self.kind} embedding needs a dimension divisible by 64, got {embedding_dim}")
        self.num_embeddings, self.embedding_dim, self.dtype = num_embeddings, embedding_dim, dtype

    @property
    def device(self) -> torch.device:
        return next(self.buffers()).device

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Rows `idx` ((n,) int64) in fp32."""
        raise NotImplementedError

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(..., D) fp32 rows of `tokens` (...) int64."""
        return self.rows(tokens.reshape(-1)).view(*tokens.shape, self.embedding_dim)


class Int4Embedding(_FileRowsEmbedding):
    """The token embedding kept as 4-bit rows (a GGUF Q4_0/Q4_1 ``token_embd`` in int4 mode): a
    lookup dequantizes just the rows it reads, exactly (fp32, the file's values).

    When the output projection is tied to the embedding, both read one matrix: the buffers here
    are the output's `Int4Linear`'s own tensors (`RescoredOutput` then recomputes its top logits
    from the same rows). On SmolLM2-135M that is 17.7 MB where a bf16 table and an int8
    projection pass took 85 MB, and the vocabulary pass of a decode step reads 40% fewer bytes.

    Args:
        num_embeddings, embedding_dim: V and D (D a multiple of 64: the native layout).
        dtype: what the model's unquantized parameters and its KV cache are in (`Transformer.dtype`);
            lookups return fp32, which the residual stream of a quantized model is.
        device: where the (zero) buffers are allocated; `from_linear` shares an `Int4Linear`'s.
    """

    kind = "a 4-bit"

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: torch.dtype = torch.bfloat16,
                 device: Optional[torch.device] = None):
        super().__init__(num_embeddings, embedding_dim, dtype)
        _register_int4_tiles(self, num_embeddings, embedding_dim, device)

    @classmethod
    def from_linear(cls, table: "Int4Linear", dtype: torch.dtype) -> "Int4Embedding":
        """The embedding whose rows are `table`'s (a native `Int4Linear`, (V, D)): no copy."""
        if not table.native:
            raise QuantizeError("a 4-bit embedding needs the native int4 layout")
        m = cls(table.out_features, table.in_features, dtype, device=torch.device("meta"))
        m.weight_q4, m.steps, m.mins = table.weight_q4, table.steps, table.mins
        return m

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        return int4_rows(self.weight_q4, self.steps, self.mins, idx)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int4 rows (group {INT4_GROUP}), for a {self.dtype} model"


class Int8Embedding(_FileRowsEmbedding):
    """The token embedding kept as the file's int8 rows with a step per group of 32 (a GGUF Q8_0
    ``token_embd``): a lookup dequantizes just the rows it reads, exactly (fp32, the file's values).

    When the output projection is tied to the embedding, both read one matrix: the buffers here are
    the output's group-form `Int8Linear`'s own (`RescoredOutput` then recomputes its top logits
    from the same rows). On SmolLM2-135M that is 30 MB, as in the file, where a bf16 table and a
    per-row int8 projection took 85 MB.

    Args:
        num_embeddings, embedding_dim: V and D (D a multiple of 64: the native layout).
        dtype: what the model's unquantized parameters and its KV cache are in (`Transformer.dtype`);
            lookups return fp32, which the residual stream of a quantized model is.
        device: where the (zero) buffers are allocated; `from_linear` shares an `Int8Linear`'s.
    """

    kind = "an int8"

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: torch.dtype = torch.bfloat16,
                 device: Optional[torch.device] = None):
        super().__init__(num_embeddings, embedding_dim, dtype)
        _register_int8_tiles(self, num_embeddings, embedding_dim, device)

    @classmethod
    def from_linear(cls, table: "Int8Linear", dtype: torch.dtype) -> "Int8Embedding":
        """The embedding whose rows are `table`'s (a group-form `Int8Linear`, (V, D)): no copy."""
        if not table.groups:
            raise QuantizeError("an int8 embedding needs the group form of Int8Linear")
        m = cls(table.out_features, table.in_features, dtype, device=torch.device("meta"))
        m.weight_int8, m.scales = table.weight_int8, table.scales
        return m

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        return int8_rows(self.weight_int8, self.scales, idx)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, int8 rows (a step per group of {INT4_GROUP}), "
                f"for a {self.dtype} model")


def _native_choice(native: Optional[bool], in_features: int) -> bool:
    if native is None:
        return native_kernel_fits(in_features)
    if native and not native_kernel_fits(in_features):
        raise QuantizeError(f"the native kernel cannot take this matrix here ({in_features} columns; it needs a "
                            "multiple of 64 and an x86-64 CPU with AVX-512 VNNI or AVX2, see inhouse.kernels)")
    return native


def native_kernel_fits(in_features: int) -> bool:
    """Whether a matrix with `in_features` columns can use the native kernels here."""
    if in_features % 64:
        return False
    from inhouse.kernels import native_kernels_available

    return native_kernels_available()


class RescoredOutput(nn.Module):
    """The vocabulary projection: a fast quantized pass, then the `k` best logits recomputed exactly.

    The output projection is the largest matrix a small model reads per token (SmolLM2-135M:
    49152 x 576, a third of its weights), and the one whose rounding moves greedy choices most:
    a per-row int8 projection alone flips ~3% of next tokens. So each row of logits is first
    computed by the quantized kernel (`approx`), then the `k` highest are recomputed in fp32 from
    the projection's exact rows and written back. The top of the distribution — what greedy,
    top-k and top-p sampling read — is therefore exact; the tail keeps the pass's accuracy.

    Two forms:

    * `approx` an `Int8Linear` of a projection held at higher precision, `rows` its (V, D) weight
      (bf16; the embedding table when tied: no extra memory), read for the recomputation;
    * `approx` an `Int4Linear` or a group-form `Int8Linear` holding the file's own rows (a GGUF
      Q4_0/Q4_1/Q8_0 projection or tied embedding), `rows` None: the pass reads those rows and the
      recomputation dequantizes the `k` best of them (``dequantized_rows``), so the top logits are
      exact to the file.

    Args:
        approx: the quantized pass.
        rows: (V, D) the projection's weight for the recomputation, or None with an `Int4Linear`
            or a group-form `Int8Linear`.
        k: how many logits per row are recomputed.
    """

    def __init__(self, approx: Union[Int8Linear, Int4Linear], rows: Optional[nn.Parameter], k: int = 32):
        super().__init__()
        if rows is None and not (isinstance(approx, Int4Linear) or approx.groups):
            raise QuantizeError("RescoredOutput needs the projection's rows unless its pass holds the file's own "
                                "(an Int4Linear or a group-form Int8Linear)")
        self.approx, self.k = approx, k
        self.in_features, self.out_features = approx.in_features, approx.out_features
        self.rows = rows  # (V, D) Parameter, the embedding's own when tied (not a second copy); or None

    def exact_rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Rows `idx` ((n,) int64) of the projection in fp32, as the recomputation reads them."""
        return self.rows[idx].float() if self.rows is not None else self.approx.dequantized_rows(idx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).float()  # (M, D)
        # (M, V); the kernels take fp32 or bf16 rows; x's own shape says decode rows or a chunk
        logits = self.approx(x.float()).reshape(-1, self.out_features).float()
        top = logits.topk(self.k, dim=-1).indices  # (M, k)
        # A product and a sum per row rather than bmm, whose kernel choice depends on M (and
        # with it the rounding): each row must come out the same whatever the batch.
        rows = self.exact_rows(top.reshape(-1)).view(*top.shape, self.in_features)  # (M, k, D)
        exact = (rows * x2[:, None, :]).sum(-1)  # (M, k, D) * (M, 1, D) -> (M, k)
        logits.scatter_(1, top, exact)
        return logits.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        kind = ("int8 (group steps)" if self.approx.groups else "int8") if isinstance(self.approx, Int8Linear) else "int4"
        return f"in_features={self.in_features}, out_features={self.out_features}, {kind} + exact top-{self.k}"


QUANTIZED_LINEARS = {"int8": Int8Linear, "int4": Int4Linear}


def _is_norm(name: str) -> bool:
    """Norm weights stay fp32: they set the residual stream's dtype (see `Transformer.forward`)."""
    return name.endswith("norm.weight")


def _set(model: nn.Module, path: str, value) -> None:
    parent_name, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, leaf, value)


@torch.no_grad()
def quantize_tensor(model: nn.Module, name: str, value: Union[torch.Tensor, Int4Codes], mode: str,
                    dtype: Optional[torch.dtype] = torch.bfloat16) -> None:
    """Put one parameter of `model`, given at full precision, in place in its quantized form.

    Loaders call this as each tensor is read, so that a quantized model never exists in fp32 as
    a whole (peak memory = quantized weights + one fp32 tensor). What each parameter becomes:

    * a linear's weight (attention, feed-forward): that linear becomes an `Int8Linear` /
      `Int4Linear` built from `value` (in int8 mode, `Int8Codes` become the exact group form);
    * the output projection (its own weight, or the embedding when tied): a `RescoredOutput`,
      an int8 pass built from `value` plus the projection's rows in `dtype`; given as `Int4Codes`
      in int4 mode, or as `Int8Codes` (a Q8_0 table) in either mode, where the native kernels run:
      the file's rows themselves, taken as they are, and the embedding an `Int4Embedding` /
      `Int8Embedding` reading the same rows;
    * norm weights: fp32 (they set the residual stream's dtype: fp32, see `Transformer.forward`);
    * anything else (the embedding): `value` cast to `dtype` (None: as given).

    Args:
        model: the model (parameters may still be on the meta device).
        name: the parameter's name in Meta's naming (``layers.0.attention.wq.weight``).
        value: the full-precision tensor (fp32 keeps GGUF 4-bit grids exact), or a GGUF matrix as
            `Int4Codes` / `Int8Codes` (taken as it is where the mode and the kernels allow; otherwise
            it is expanded).
        mode: "int8" or "int4".
        dtype: dtype of the parameters left unquantized.

    Raises:
        QuantizeError: unknown mode, or a linear with a bias.
    """
    if mode not in QUANTIZED_LINEARS:
        raise QuantizeError(f"quantize={mode!r} is not supported here; use int8 or int4")
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    args = getattr(model, "args", None)
    tied_embedding = name == "tok_embeddings.weight" and args is not None and args.tie_embeddings
    if isinstance(value, Int4Codes):
        if mode == "int4" and type(module) is nn.Linear and leaf == "weight" and module.bias is None \
                and module_name != "output":
            _set(model, module_name, Int4Linear.from_codes(value))
            return
        if mode == "int4" and name in ("tok_embeddings.weight", "output.weight") and \
                _file_vocabulary(model, name, value, tied_embedding, dtype):
            return
        value = value.dense()
    elif isinstance(value, Int8Codes):
        if mode == "int8" and type(module) is nn.Linear and leaf == "weight" and module.bias is None \
                and module_name != "output" and native_kernel_fits(value.shape[1]):
            _set(model, module_name, Int8Linear.from_codes(value))
            return
        if name in ("tok_embeddings.weight", "output.weight") and _file_vocabulary(model, name, value, tied_embedding, dtype):
            return
        value = value.dense()
    def own(to: Optional[torch.dtype]) -> nn.Parameter:
        # A copy, never a view of the loader's memory map: the quantized model keeps nothing of
        # the file mapped (its pages would stay resident).
        kept = value if to is None else value.to(to)
        return nn.Parameter(kept.clone() if kept.data_ptr() == value.data_ptr() else kept, requires_grad=False)

    if module_name == "output" or tied_embedding:
        approx = Int8Linear.from_weight(value)
        rows = own(dtype)
        if tied_embedding:
            model.tok_embeddings.weight = rows
        model.output = RescoredOutput(approx, rows)
    elif type(module) is nn.Linear and leaf == "weight":
        if module.bias is not None:
            raise QuantizeError(f"{module_name} has a bias; only bias-free linears can be quantized")
        _set(model, module_name, QUANTIZED_LINEARS[mode].from_weight(value))
    else:
        _set(model, name, own(torch.float32 if _is_norm(name) else dtype))


def _file_vocabulary(model: nn.Module, name: str, value: Union[Int4Codes, Int8Codes], tied: bool,
                     dtype: Optional[torch.dtype]) -> bool:
    """The embedding (`Int4Embedding` / `Int8Embedding`) and/or the output projection
    (`RescoredOutput` over an `Int4Linear` / a group-form `Int8Linear`) kept as the file's own rows;
    False where the native kernels cannot take them."""
    if not native_kernel_fits(value.shape[1]):
        return False
    four = isinstance(value, Int4Codes)
    table = Int4Linear.from_codes(value, native=True) if four else Int8Linear.from_codes(value)
    if name == "output.weight" or tied:
        model.output = RescoredOutput(table, None)
    if name == "tok_embeddings.weight":
        embedding = Int4Embedding if four else Int8Embedding
        model.tok_embeddings = embedding.from_linear(table, dtype or torch.float32)
    return True


def quantize_model(model: nn.Module, mode: str, dtype: Optional[torch.dtype] = torch.bfloat16) -> nn.Module:
    """Quantize a whole loaded model in place: every parameter through `quantize_tensor`.

    The linears become `Int8Linear`/`Int4Linear`, the output projection a `RescoredOutput`,
    norms stay fp32 and the rest is cast to `dtype` (bf16 by default: the kernels are fast only
    with bf16 inputs). Quantize from fp32 weights when you can: bf16-rounded weights no longer
    sit exactly on a GGUF file's 4-bit grid. Buffers (RoPE frequencies) keep their dtype.

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
    for name, p in list(model.named_parameters()):  # a tied output is listed once, as the embedding
        quantize_tensor(model, name, p.detach(), mode, dtype)
    logger.debug("quantized %s to %s", type(model).__name__, mode)
    return model


def quantized_mode(model: nn.Module) -> str:
    """"int8" or "int4" if `model` holds such linears, else "none"."""
    for mode, cls in QUANTIZED_LINEARS.items():
        if any(isinstance(m, cls) for m in model.modules()):
            return mode
    return "none"


__all__ = ["QUANTIZE_MODES", "QuantizeError", "Int8Codes", "Int8Embedding", "Int8Linear", "Int4Codes", "Int4Embedding",
           "Int4Linear", "RescoredOutput", "quantize_int8", "quantize_model", "quantize_tensor", "quantized_mode"]
