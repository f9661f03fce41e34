"""Dequantization of ggml tensor blocks (the formats found in GGUF files).

Every quantized ggml type stores a tensor as a run of fixed-size *blocks*; a block of
``type_size`` bytes decodes to ``block_size`` consecutive values. The bit layouts below follow
ggml (``ggml-quants.c``) exactly, and the arithmetic is done in float32 in the same order as the
reference (``d * q + m``, ``(d * sc) * q - dmin * m``, ...) so the results are bit-identical to
it. All work is vectorized over blocks with torch; the only Python loop walks over large chunks
of blocks so that the temporaries stay in cache.

Notation in the shape comments: ``n`` = number of blocks in the chunk, ``QK_K`` = 256.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

__all__ = ["GGML_TYPE_NAMES", "GGML_BLOCK_SIZES", "SUPPORTED_TYPES", "Q4_TYPES", "Q8_0", "dequantize", "q4_codes", "q8_codes",
           "type_name"]

QK_K = 256  # values per block of the "k-quants" (Q2_K .. Q8_K)

# ggml type id -> name, for every type ggml defines (supported for dequantization or not).
GGML_TYPE_NAMES: dict[int, str] = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1",
    10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K",
    16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S",
    22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64",
    29: "IQ1_M", 30: "BF16", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4", 40: "NVFP4", 41: "Q1_0",
}

# ggml type id -> (values per block, bytes per block).
GGML_BLOCK_SIZES: dict[int, tuple[int, int]] = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34),
    9: (32, 40), 10: (QK_K, 84), 11: (QK_K, 110), 12: (QK_K, 144), 13: (QK_K, 176),
    14: (QK_K, 210), 15: (QK_K, 292), 16: (QK_K, 66), 17: (QK_K, 74), 18: (QK_K, 98),
    19: (QK_K, 50), 20: (32, 18), 21: (QK_K, 110), 22: (QK_K, 82), 23: (QK_K, 136),
    24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8), 29: (QK_K, 56), 30: (1, 2),
    34: (QK_K, 54), 35: (QK_K, 66), 39: (32, 17), 40: (64, 36), 41: (128, 18),
}

# Values per chunk processed at once: big enough to amortize per-op overhead, small enough
# that the uint8/float temporaries of one chunk stay in the CPU caches.
_CHUNK_VALUES = 1 << 18

_SHIFT_4 = torch.tensor([0, 4], dtype=torch.uint8)
_SHIFT_2 = torch.tensor([0, 2, 4, 6], dtype=torch.uint8)
_SHIFT_1 = torch.arange(8, dtype=torch.uint8)


def _f16(blocks: torch.Tensor, at: int) -> torch.Tensor:
    """The fp16 field at byte ``at`` of every block, as float32 of shape (n, 1)."""
    return blocks[:, at : at + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(n, g, m) bytes -> (n, g, 2, m): low nibbles, then high nibbles."""
    return (qs.unsqueeze(-2) >> _SHIFT_4.view(2, 1)) & 0x0F


def _crumbs(qs: torch.Tensor) -> torch.Tensor:
    """(n, g, m) bytes -> (n, g, 4, m): bits 0-1, 2-3, 4-5, 6-7."""
    return (qs.unsqueeze(-2) >> _SHIFT_2.view(4, 1)) & 0x03


def _bits(qh: torch.Tensor) -> torch.Tensor:
    """(n, g, m) bytes -> (n, g, 8, m): bit 0 of every byte, then bit 1, ..."""
    return (qh.unsqueeze(-2) >> _SHIFT_1.view(8, 1)) & 0x01


# --------------------------------------------------------------------------- 32-value blocks
# Layouts (bytes): Q4_0 = d f16 | qs[16]; Q4_1 = d f16 | m f16 | qs[16];
# Q5_0 = d f16 | qh u32 | qs[16]; Q5_1 = d f16 | m f16 | qh u32 | qs[16]; Q8_0 = d f16 | qs i8[32].
# In the 4/5-bit types value j < 16 is the low nibble of qs[j], value j >= 16 the high nibble of
# qs[j - 16]; the fifth bit of value j is bit j of the little-endian u32 qh.


def _q4_0(blocks: torch.Tensor, out: torch.Tensor) -> None:
    q = _nibbles(blocks[:, None, 2:18]).view(-1, 32)  # (n, 32)
    out.copy_(q.to(torch.int8) - 8)
    out.mul_(_f16(blocks, 0))


def _q4_1(blocks: torch.Tensor, out: torch.Tensor) -> None:
    q = _nibbles(blocks[:, None, 4:20]).view(-1, 32)  # (n, 32)
    out.copy_(q)
    out.mul_(_f16(blocks, 0)).add_(_f16(blocks, 2))


def _five_bit(qs: torch.Tensor, qh: torch.Tensor) -> torch.Tensor:
    low = _nibbles(qs[:, None, :]).view(-1, 32)  # (n, 32)
    high = _bits(qh[:, :, None]).view(-1, 32)  # (n, 4, 8, 1) -> (n, 32), value j = bit j of qh
    return low | (high << 4)


def _q5_0(blocks: torch.Tensor, out: torch.Tensor) -> None:
    q = _five_bit(blocks[:, 6:22], blocks[:, 2:6])
    out.copy_(q.to(torch.int8) - 16)
    out.mul_(_f16(blocks, 0))


def _q5_1(blocks: torch.Tensor, out: torch.Tensor) -> None:
    q = _five_bit(blocks[:, 8:24], blocks[:, 4:8])
    out.copy_(q)
    out.mul_(_f16(blocks, 0)).add_(_f16(blocks, 2))


def _q8_0(blocks: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(blocks[:, 2:34].view(torch.int8))
    out.mul_(_f16(blocks, 0))


# --------------------------------------------------------------------------- 256-value k-quants


def _q2_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    # scales[16] (low nibble: scale, high nibble: min of each 16-value group) | qs[64] | d | dmin
    scales = blocks[:, 0:16]
    dl = (_f16(blocks, 80) * (scales & 0x0F)).unsqueeze(-1)  # (n, 16, 1)
    ml = (_f16(blocks, 82) * (scales >> 4)).unsqueeze(-1)  # (n, 16, 1)
    # Each half of 128 values reads 32 bytes of qs four times, two bits at a time.
    q = _crumbs(blocks[:, 16:80].view(-1, 2, 32)).view(-1, 16, 16)  # (n, 2, 4, 32) -> (n, 16, 16)
    o = out.view(-1, 16, 16)
    o.copy_(q)
    o.mul_(dl).sub_(ml)


def _q3_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    # hmask[32] | qs[64] | scales[12] (16 six-bit signed scales) | d
    packed = blocks[:, 96:108]
    low = _nibbles(packed[:, None, 0:8]).view(-1, 16)  # (n, 16): low 4 bits of each scale
    high = _crumbs(packed[:, None, 8:12]).view(-1, 16)  # (n, 16): top 2 bits of each scale
    sc = (low | (high << 4)).to(torch.int8) - 32  # (n, 16), in -32..31
    dl = (_f16(blocks, 108) * sc).unsqueeze(-1)  # (n, 16, 1)
    ql = _crumbs(blocks[:, 32:96].view(-1, 2, 32)).view(-1, 16, 16)  # (n, 2, 4, 32) -> (n, 16, 16)
    # Bit k of hmask[j] belongs to value 32k + j; a *clear* bit subtracts 4.
    hm = _bits(blocks[:, None, 0:32]).view(-1, 16, 16)  # (n, 1, 8, 32) -> (n, 16, 16)
    q = ql.to(torch.int8) - ((hm ^ 1) << 2).to(torch.int8)
    o = out.view(-1, 16, 16)
    o.copy_(q)
    o.mul_(dl)


def _k_scale_min(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack the 12-byte field of Q4_K/Q5_K into 8 six-bit scales and 8 six-bit mins.

    Bytes 0-3 hold scales 0-3 in their low 6 bits, bytes 4-7 mins 0-3; scales/mins 4-7 take
    their low 4 bits from the nibbles of bytes 8-11 and their top 2 bits from the top 2 bits
    of bytes 0-3 (scales) / 4-7 (mins).
    """
    sc_lo, mn_lo, mixed = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scale = torch.cat([sc_lo & 0x3F, (mixed & 0x0F) | ((sc_lo >> 2) & 0x30)], dim=1)  # (n, 8)
    minimum = torch.cat([mn_lo & 0x3F, (mixed >> 4) | ((mn_lo >> 2) & 0x30)], dim=1)  # (n, 8)
    return scale, minimum


def _q4_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    # d | dmin | scales[12] | qs[128]: four runs of 32 bytes, low nibbles then high nibbles
    scale, minimum = _k_scale_min(blocks[:, 4:16])
    d = (_f16(blocks, 0) * scale).unsqueeze(-1)  # (n, 8, 1)
    dm = (_f16(blocks, 2) * minimum).unsqueeze(-1)  # (n, 8, 1)
    q = _nibbles(blocks[:, 16:144].view(-1, 4, 32)).view(-1, 8, 32)  # (n, 4, 2, 32) -> (n, 8, 32)
    o = out.view(-1, 8, 32)
    o.copy_(q)
    o.mul_(d).sub_(dm)


def _q5_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    # d | dmin | scales[12] | qh[32] | qs[128]; bit k of qh[j] is the fifth bit of value 32k + j
    scale, minimum = _k_scale_min(blocks[:, 4:16])
    d = (_f16(blocks, 0) * scale).unsqueeze(-1)  # (n, 8, 1)
    dm = (_f16(blocks, 2) * minimum).unsqueeze(-1)  # (n, 8, 1)
    ql = _nibbles(blocks[:, 48:176].view(-1, 4, 32)).view(-1, 8, 32)  # (n, 8, 32)
    qh = _bits(blocks[:, None, 16:48]).view(-1, 8, 32)  # (n, 1, 8, 32) -> (n, 8, 32)
    o = out.view(-1, 8, 32)
    o.copy_(ql | (qh << 4))
    o.mul_(d).sub_(dm)


def _q6_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    # ql[128] | qh[64] | scales i8[16] | d. Per half of 128 values: ql[64] gives the low nibbles
    # of values 0-63 then the high nibbles for 64-127; qh[32] gives 2 bits per value.
    d = (_f16(blocks, 208) * blocks[:, 192:208].view(torch.int8)).unsqueeze(-1)  # (n, 16, 1)
    ql = _nibbles(blocks[:, 0:128].view(-1, 2, 64)).view(-1, 8, 32)  # (n, 2, 2, 64) -> (n, 8, 32)
    qh = _crumbs(blocks[:, 128:192].view(-1, 2, 32)).view(-1, 8, 32)  # (n, 2, 4, 32) -> (n, 8, 32)
    q = (ql | (qh << 4)).to(torch.int8) - 32
    o = out.view(-1, 16, 16)
    o.copy_(q.view(-1, 16, 16))
    o.mul_(d)


def _q8_k(blocks: torch.Tensor, out: torch.Tensor) -> None:
    # d f32 | qs i8[256] | bsums i16[16] (the sums are only used by dot products)
    d = blocks[:, 0:4].contiguous().view(torch.float32)  # (n, 1)
    out.copy_(blocks[:, 4:260].view(torch.int8))
    out.mul_(d)


# --------------------------------------------------------------------------- plain floats


def _f32(blocks: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(blocks.view(torch.float32))


def _f16_values(blocks: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(blocks.view(torch.float16))


def _bf16(blocks: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(blocks.view(torch.bfloat16))


_KERNELS: dict[int, Callable[[torch.Tensor, torch.Tensor], None]] = {
    0: _f32, 1: _f16_values, 30: _bf16,
    2: _q4_0, 3: _q4_1, 6: _q5_0, 7: _q5_1, 8: _q8_0,
    10: _q2_k, 11: _q3_k, 12: _q4_k, 13: _q5_k, 14: _q6_k, 15: _q8_k,
}

# ggml type id -> name, for the types :func:`dequantize` can decode.
SUPPORTED_TYPES: dict[int, str] = {t: GGML_TYPE_NAMES[t] for t in sorted(_KERNELS)}


Q4_TYPES = (2, 3)  # Q4_0, Q4_1: 4-bit codes with one fp16 step (and minimum) per 32 values


def q4_codes(raw: np.ndarray, ggml_type: int, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The codes of a Q4_0 / Q4_1 matrix, without dequantizing it.

    Value ``j`` of a block is ``code * d + m`` (Q4_1) or ``(code - 8) * d`` (Q4_0, i.e. the minimum
    is ``-8 d``, exact in fp16); both are exactly ``code * step + min`` in fp32, the order in which
    :func:`dequantize` computes them.

    Args:
        raw: the tensor's bytes (see :func:`dequantize`).
        ggml_type: 2 (Q4_0) or 3 (Q4_1).
        rows, cols: the matrix shape; blocks run along `cols` (a multiple of 32).

    Returns:
        ``(codes, steps, mins)``: (rows, cols) uint8 in 0..15, and (rows, cols / 32) fp16 each.

    Raises:
        ValueError: another type, or a size that does not match.
    """
    if ggml_type not in Q4_TYPES:
        raise ValueError(f"q4_codes: {type_name(ggml_type)} is not Q4_0 or Q4_1")
    block_size, type_size = GGML_BLOCK_SIZES[ggml_type]
    if cols % block_size or np.asarray(raw).size != rows * cols // block_size * type_size:
        raise ValueError(f"q4_codes: {rows} x {cols} {type_name(ggml_type)} values do not match {np.asarray(raw).size} bytes")
    blocks = _as_tensor(np.asarray(raw)).view(-1, type_size)  # (n, type_size)
    qs = blocks[:, type_size - 16:]  # (n, 16): value j < 16 in the low nibble of byte j, j >= 16 in the high one
    codes = torch.cat((qs & 0x0F, qs >> 4), dim=1).view(rows, cols)
    steps = blocks[:, 0:2].contiguous().view(torch.float16).view(rows, cols // block_size)
    if ggml_type == 3:
        mins = blocks[:, 2:4].contiguous().view(torch.float16).view(rows, cols // block_size)
    else:
        mins = steps * -8
    return codes, steps, mins


Q8_0 = 8  # int8 codes with one fp16 step per 32 values


def q8_codes(raw: np.ndarray, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The codes of a Q8_0 matrix, without dequantizing it: value ``j`` of a block is ``code * d``
    (in fp32, as :func:`dequantize` computes it).

    Args:
        raw: the tensor's bytes (see :func:`dequantize`).
        rows, cols: the matrix shape; blocks run along `cols` (a multiple of 32).

    Returns:
        ``(codes, steps)``: (rows, cols) int8 and (rows, cols / 32) fp16.

    Raises:
        ValueError: a size that does not match.
    """
    block_size, type_size = GGML_BLOCK_SIZES[Q8_0]
    if cols % block_size or np.asarray(raw).size != rows * cols // block_size * type_size:
        raise ValueError(f"q8_codes: {rows} x {cols} Q8_0 values do not match {np.asarray(raw).size} bytes")
    blocks = _as_tensor(np.asarray(raw)).view(-1, type_size)  # (n, 34): d f16 | qs i8[32]
    codes = blocks[:, 2:].contiguous().view(torch.int8).view(rows, cols)
    steps = blocks[:, 0:2].contiguous().view(torch.float16).view(rows, cols // block_size)
    return codes, steps


def type_name(ggml_type: int) -> str:
    """Human-readable name of a ggml type id, e.g. ``"Q4_K"``, or ``"type 99"`` if unknown."""
    return GGML_TYPE_NAMES.get(ggml_type, f"type {ggml_type}")


def dequantize(raw: np.ndarray, ggml_type: int, n_elements: int) -> torch.Tensor:
    """Decode ``n_elements`` values of ggml type ``ggml_type`` from their raw bytes.

    Args:
        raw: the tensor's bytes, a 1-D ``uint8`` array of exactly
            ``n_elements // block_size * type_size`` bytes (e.g. :meth:`GGUFFile.raw`).
            It is only read, never written.
        ggml_type: the ggml type id (a key of :data:`SUPPORTED_TYPES`).
        n_elements: number of values to decode; a multiple of the type's block size.

    Returns:
        A new contiguous float32 tensor of shape ``(n_elements,)``.

    Raises:
        ValueError: if the type is not supported, ``n_elements`` is not a whole number of
            blocks, or ``raw`` does not have the matching number of bytes.
    """
    kernel = _KERNELS.get(ggml_type)
    if kernel is None:
        supported = ", ".join(SUPPORTED_TYPES.values())
        raise ValueError(
            f"dequantize: unsupported ggml type {type_name(ggml_type)} ({ggml_type}); supported: {supported}"
        )
    block_size, type_size = GGML_BLOCK_SIZES[ggml_type]
    name = GGML_TYPE_NAMES[ggml_type]
    if n_elements < 0 or n_elements % block_size:
        raise ValueError(f"dequantize: {n_elements} values are not a whole number of {name} blocks of {block_size}")
    n_blocks = n_elements // block_size
    data = np.asarray(raw)
    if data.dtype != np.uint8 or data.ndim != 1:
        raise ValueError(f"dequantize: raw must be a 1-D uint8 array, got {data.dtype} of shape {data.shape}")
    if data.size != n_blocks * type_size:
        raise ValueError(
            f"dequantize: {n_elements} {name} values need {n_blocks * type_size} bytes, got {data.size}"
        )
    out = torch.empty(n_elements, dtype=torch.float32)
    if n_blocks == 0:
        return out
    blocks = _as_tensor(data).view(n_blocks, type_size)  # (N, type_size), shares memory with raw
    rows = out.view(n_blocks, block_size)  # (N, block_size)
    step = max(1, _CHUNK_VALUES // block_size)
    for start in range(0, n_blocks, step):
        kernel(blocks[start : start + step], rows[start : start + step])
    return out


def _as_tensor(data: np.ndarray) -> torch.Tensor:
    """Wrap a 1-D uint8 array as a tensor, without copying when it is contiguous and writable.

    torch warns when wrapping a read-only buffer, so such an array (e.g. a read-only
    ``np.memmap``) is copied; the bytes are a fraction of the decoded size.
    """
    if not data.flags.writeable or not data.flags.c_contiguous:
        data = data.copy()
    return torch.from_numpy(data)
