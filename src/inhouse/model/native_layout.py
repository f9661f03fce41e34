"""The native CPU kernels' weight layouts (inhouse/kernels/quant_cpu.h), and reading rows back.

* int8 matrices with one scale per row: columns in the kernels' block order (`native_order`);
* 4-bit matrices and int8 ones with one step per group of 32 (GGUF Q4_0/Q4_1/Q8_0 as they are):
  row tiles, `int4_tile_rows` rows side by side (`pack_int4_tiles`, `pack_int8_tiles`), read back
  row by row without unpacking the rest (`int4_tile_parts`, `int8_tile_parts`, `int4_rows`,
  `int8_rows`).

Both depend on the instruction set the kernels are built for (16 lanes with AVX-512, 8 with AVX2):
a prepared-weights cache entry is kept per instruction set (`inhouse.weights.prepared`).
`inhouse.model.quant` builds its modules on these.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

INT4_GROUP = 32  # input columns per scale/zero: a GGUF Q4 block


class QuantizeError(ValueError):
    """An unknown quantization mode, a module that cannot be quantized, or a matrix the native
    layout cannot hold (`inhouse.model.quant` raises it too)."""


def native_lanes() -> int:
    """Groups per block of the native layout (`native_order`): the int32 lanes of the kernels'
    dot-product vectors, 16 with AVX-512, 8 with AVX2 (the instruction set `inhouse.kernels.cpu_isa`
    picks, ``INHOUSE_NATIVE_ISA`` included)."""
    from inhouse.kernels import cpu_isa

    return 16 if cpu_isa() == "avx512" else 8


def native_order(k: int, lanes: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The column order of the native kernels' 8-bit weights for rows of `k` columns, and its inverse
    with one scale per row (4-bit weights and int8 ones with group steps are stored in row tiles
    instead: `pack_int4_tiles`, `pack_int8_tiles`).

    Groups of 32 columns are taken `lanes` at a time (a block; default `native_lanes`), the rest in
    blocks of lanes/2, lanes/4, ... down to 2. A block of P groups is stored as P chunks of 32,
    chunk c holding columns w*c .. w*c + w-1 of each of its groups (w = 32 / P). (A chunk's integer
    dot products then land one group per lane, and a block is scaled at once:
    inhouse/kernels/quant_cpu.h.) Stored column p is column ``order[p]``; ``inverse[order] ==
    arange(k)``. The layout depends on the instruction set: a prepared-weights cache entry is
    kept per instruction set (`inhouse.weights.prepared`).
    """
    return _native_order(k, lanes or native_lanes())


@functools.lru_cache(maxsize=64)
def _native_order(k: int, lanes: int) -> tuple[torch.Tensor, torch.Tensor]:
    if k % 64:
        raise QuantizeError(f"the native layout needs a multiple of 64 columns, got {k}")
    j = torch.arange(32)
    parts, g0, n_groups = [], 0, k // 32
    while g0 < n_groups:
        p = lanes
        while p > n_groups - g0:
            p //= 2
        w = 32 // p
        parts += [32 * (g0 + j // w) + w * c + j % w for c in range(p)]
        g0 += p
    order = torch.cat(parts)
    return order, torch.argsort(order)


def int4_tile_rows() -> int:
    """Weight rows per tile of the native 4-bit layout (`pack_int4_tiles`): the int32 lanes of the
    kernels' vectors, 16 with AVX-512, 8 with AVX2 (the instruction set `inhouse.kernels.cpu_isa` picks)."""
    return native_lanes()


def tile_padded(n: int, rows: Optional[int] = None) -> int:
    """Rows a row-tile matrix of `n` rows stores: `n` rounded up to whole tiles of `rows` (default
    `int4_tile_rows`), as the kernels' ``tile_padded``."""
    rows = rows or int4_tile_rows()
    return -(-n // rows) * rows


def pack_int4_tiles(codes: torch.Tensor, steps: torch.Tensor, mins: torch.Tensor,
                    rows: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) codes 0..15 with (N, K/32) steps and mins -> the native kernels' row tiles.

    `rows` weight rows (default `int4_tile_rows`) side by side; N is padded to a multiple of them
    with zero rows. Tile t, group g (32 columns) is 8 units of 2 * rows bytes, byte 2i + h of unit u
    holding row i's code of column 2u + h in its low nibble and of column 16 + 2u + h in its high
    one (inhouse/kernels/quant_cpu.h); steps and mins are in the same tile/group/row order. Returns
    (N', K/2) uint8 and two (N', K/32) fp16, N' = N rounded up.
    """
    n, k = codes.shape
    rows, g = rows or int4_tile_rows(), k // INT4_GROUP
    padded = tile_padded(n, rows)
    c = codes.view(n, g, 2, 16)
    b = c[:, :, 0] | (c[:, :, 1] << 4)  # (N, G, 16): byte j, column j low and 16 + j high
    if padded > n:
        b = torch.cat((b, b.new_zeros(padded - n, g, 16)))
    packed = _laid_out(b.view(padded // rows, rows, g, 8, 2).permute(0, 2, 3, 1, 4), (padded, k // 2))
    return packed, _padded_tiles(steps, n, padded, rows), _padded_tiles(mins, n, padded, rows)


def _laid_out(src: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """`src` (any strides) copied, in its logical order, into a new tensor of `shape` that owns its
    memory. Not ``src.contiguous().view(shape)``: that is a view, whose base would keep this copy
    alive after `inhouse.model.arena` moves the weights (it replaces their data), ~60 MB of a
    converting start on SmolLM2."""
    out = torch.empty(shape, dtype=src.dtype, device=src.device)
    out.view(src.shape).copy_(src)
    return out


def _padded_tiles(v: torch.Tensor, n: int, padded: int, rows: int) -> torch.Tensor:
    """(n, G) per-group values -> (padded, G) fp16 in row-tile order (tile, group, row)."""
    g = v.shape[1]
    v = v.to(torch.float16)
    if padded > n:
        v = torch.cat((v, v.new_zeros(padded - n, g)))
    return _laid_out(v.view(padded // rows, rows, g).transpose(1, 2), (padded, g))


def pack_int8_tiles(codes: torch.Tensor, steps: torch.Tensor,
                    rows: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) int8 codes with (N, K/32) steps (a GGUF Q8_0 matrix) -> the native kernels' row tiles.

    As `pack_int4_tiles`, `rows` weight rows side by side (default `int4_tile_rows`), N padded with
    zero rows; tile t, group g is 8 units of 4 * rows bytes: byte 2i + j of unit u is row i's code
    of column 2u + j, byte 2 * rows + 2i + j its code of column 16 + 2u + j (the two vectors of code
    pairs the row-tile kernel multiplies, inhouse/kernels/quant_cpu.h); steps in the tile/group/row
    order. Returns (N', K) int8 and (N', K/32) fp16, N' = N rounded up.
    """
    n, k = codes.shape
    rows, g = rows or int4_tile_rows(), k // INT4_GROUP
    padded = tile_padded(n, rows)
    c = codes if padded == n else torch.cat((codes, codes.new_zeros(padded - n, k)))
    # column 16h + 2u + j of row i (tile t) -> (t, group, u, h, i, j)
    packed = _laid_out(c.view(padded // rows, rows, g, 2, 8, 2).permute(0, 2, 4, 3, 1, 5), (padded, k))
    return packed, _padded_tiles(steps, n, padded, rows)


def int8_tile_parts(packed: torch.Tensor, steps: torch.Tensor, idx: torch.Tensor,
                    rows: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows `idx` ((n,) int64) of an int8 matrix in row tiles (`pack_int8_tiles`): codes (n, K) int8
    and steps (n, K/32) fp16, read without unpacking the other rows."""
    rows = rows or int4_tile_rows()
    padded, k = packed.shape
    g, t, i = k // INT4_GROUP, idx // rows, idx % rows
    b = packed.view(padded // rows, g, 8, 2, rows, 2)[t, :, :, :, i, :]  # (n, G, u, h, j)
    codes = b.permute(0, 1, 3, 2, 4).reshape(-1, k)
    return codes, steps.view(padded // rows, g, rows)[t, :, i]


def int4_tile_parts(packed: torch.Tensor, steps: torch.Tensor, mins: torch.Tensor, idx: torch.Tensor,
                    rows: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows `idx` ((n,) int64) of a matrix in row tiles (`pack_int4_tiles`): codes (n, K) uint8 and
    steps, mins (n, K/32) fp16, read without unpacking the other rows."""
    rows = rows or int4_tile_rows()
    padded, k = packed.shape[0], packed.shape[1] * 2
    g, t, i = k // INT4_GROUP, idx // rows, idx % rows
    b = packed.view(padded // rows, g, 8, rows, 2)[t, :, :, i, :].reshape(-1, g, 16)  # (n, G, 16)
    codes = torch.cat((b & 15, b >> 4), dim=2).view(-1, k)
    st = steps.view(padded // rows, g, rows)[t, :, i]
    mn = mins.view(padded // rows, g, rows)[t, :, i]
    return codes, st, mn


def int8_group_values(codes: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """(N, K) int8 codes in column order and their (N, K/32) steps -> the (N, K) fp32 values, each
    ``code * step`` in fp32 (ggml's Q8_0 dequantization)."""
    n, k = codes.shape
    return (codes.view(n, k // INT4_GROUP, INT4_GROUP).float() * steps.float()[..., None]).view(n, k)


def int4_rows(weight_q4: torch.Tensor, steps: torch.Tensor, mins: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows `idx` ((n,) int64) of a native-layout 4-bit matrix (`Int4Linear`'s ``weight_q4``,
    ``steps``, ``mins``: row tiles) in fp32: ``code * step + min`` per element, a multiply then an add."""
    n, k = idx.numel(), weight_q4.shape[1] * 2
    codes, st, mn = int4_tile_parts(weight_q4, steps, mins, idx)
    return (codes.view(n, k // INT4_GROUP, INT4_GROUP).float() * st.float()[..., None] + mn.float()[..., None]).view(n, k)


def int8_rows(weight_int8: torch.Tensor, steps: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows `idx` ((n,) int64) of an int8 matrix with group steps in row tiles (the group form of
    `Int8Linear`: ``weight_int8``, ``scales``) in fp32: ``code * step`` per element."""
    return int8_group_values(*int8_tile_parts(weight_int8, steps, idx))
