"""A preallocated key/value cache for one attention layer, updated at tensor positions."""

from __future__ import annotations

import math
import mmap
import sys
from typing import Optional, Union

import torch

LAZY_MIN_BYTES = 1 << 20  # smaller caches are plain zeroed tensors


def lazy_zeros_possible(device: Union[torch.device, str, None]) -> bool:
    """Whether `zeros` hands out memory that becomes resident only when first written (a CPU on Linux)."""
    return (device is None or torch.device(device).type == "cpu") and sys.platform.startswith("linux")


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device: Union[torch.device, str, None] = None) -> torch.Tensor:
    """A zeroed tensor; on a CPU (Linux) its memory is an anonymous map, whose pages the kernel
    supplies as zeros when first touched: a cache sized for every slot and the whole context
    costs resident memory only for the positions actually written. (``torch.zeros`` writes every
    byte at once.) Kept in small pages, so that a few positions do not fault in 2 MiB."""
    nbytes = math.prod(shape) * dtype.itemsize
    if lazy_zeros_possible(device) and nbytes >= LAZY_MIN_BYTES:
        try:
            buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        except OSError:  # larger than the kernel will map: zeroed the usual way (or fail there)
            pass
        else:
            if hasattr(mmap, "MADV_NOHUGEPAGE"):
                buf.madvise(mmap.MADV_NOHUGEPAGE)
            return torch.frombuffer(buf, dtype=dtype).view(shape)  # the tensor keeps the map alive
    return torch.zeros(shape, dtype=dtype, device=device)


class KVCache(torch.nn.Module):
    """Keys and values of `batch_size` sequences, `max_len` positions each.

    Each batch row is one sequence ("slot"); a token at position p of row b is stored at
    ``[b, :, p]``. Rows are independent, so sequences of different lengths share a cache.

    Args:
        batch_size: number of sequences (rows).
        max_len: positions per sequence.
        n_kv_heads, head_dim: attention geometry.
        dtype, device: storage.
    """

    def __init__(self, batch_size: int, max_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: Optional[torch.device] = None):
        super().__init__()
        self.max_len = max_len
        shape = (batch_size, n_kv_heads, max_len, head_dim)  # (B, K, S, hd)
        self.register_buffer("k", zeros(shape, dtype, device), persistent=False)
        self.register_buffer("v", zeros(shape, dtype, device), persistent=False)
        self.register_buffer("_arange", torch.arange(batch_size, device=device), persistent=False)

    @property
    def batch_size(self) -> int:
        return self.k.shape[0]

    def rows_index(self, batch: int, rows: Optional[torch.Tensor]) -> Union[int, torch.Tensor]:
        """The cache rows of a batch of `batch` sequences: the first one when they are contiguous.

        Args:
            batch: B, the number of sequences in the forward pass.
            rows: (B,) cache rows, or None for rows 0..B-1.

        Returns:
            The first row as an int (reads are then views, no copy; under torch.compile an int
            is one symbolic value, where a slice's bounds would be constants of the graph), or
            the (B,) tensor.
        """
        if rows is None:
            return 0
        first = int(rows[0])
        if batch == 1 or rows.tolist() == list(range(first, first + batch)):
            return first
        return rows

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               n_slots: Optional[int] = None,
               rows: Union[int, torch.Tensor, None] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Write new keys/values and return the cache's first `n_slots` positions.

        Args:
            input_pos: (B, T) positions of the new entries.
            k, v: (B, K, T, hd) new keys and values.
            n_slots: how many leading positions to return (default: all).
            rows: the cache rows of the batch rows: the first of B contiguous rows (an int, see
                `rows_index`) or a (B,) tensor (default: rows 0..B-1).

        Returns:
            (k, v), each (B, K, n_slots, hd): views when the rows are contiguous.
        """
        B = k.shape[0]
        if rows is None:
            rows = 0
        contiguous = not isinstance(rows, torch.Tensor)  # rows: the first of B contiguous rows
        n = self.max_len if n_slots is None else n_slots
        # narrow, not [a:b]: its result has exactly the asked size, so that under torch.compile a
        # batch of B rows stays one symbolic B (a slice's size is min(end, size) - start, which
        # made every batch size a compilation of its own)
        if contiguous:
            ck, cv = self.k.narrow(0, rows, B), self.v.narrow(0, rows, B)  # (B, K, max_len, hd) views
            b = self._arange.narrow(0, 0, B)[:, None]  # (B, 1)
        else:
            ck, cv, b = self.k, self.v, rows[:, None]
        # Advanced indices around a slice put the indexed dims first: target is (B, T, K, hd).
        ck[b, :, input_pos] = k.transpose(1, 2).to(ck.dtype)
        cv[b, :, input_pos] = v.transpose(1, 2).to(cv.dtype)
        if contiguous:
            return ck.narrow(2, 0, n), cv.narrow(2, 0, n)  # views, no copy
        return self.k.narrow(2, 0, n)[rows], self.v.narrow(2, 0, n)[rows]  # gather (copies) for scattered rows

    def grow(self, max_len: int) -> None:
        """Extend every row to `max_len` positions, keeping the stored entries."""
        if max_len <= self.max_len:
            return
        B, K, S, hd = self.k.shape
        for name in ("k", "v"):
            old = getattr(self, name)
            new = zeros((B, K, max_len, hd), old.dtype, old.device)
            new[:, :, :S] = old
            setattr(self, name, new)
        self.max_len = max_len
