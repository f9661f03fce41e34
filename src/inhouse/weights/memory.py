"""How much memory a model needs, how much the machine has, and a refusal with the numbers."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Union

import torch

from inhouse.config import ModelArgs
from inhouse.weights.names import WeightsError

GIB = 1024**3
OVERHEAD = 0.10  # activations, allocator slack, Python objects


class InsufficientMemoryError(WeightsError):
    """The model (weights + KV cache) does not fit in the memory available."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes needed to run a model; ``total`` includes `OVERHEAD`."""

    weights: int
    kv_cache: int
    total: int


def estimate(args: ModelArgs, dtype: torch.dtype, kv_tokens: int, kv_dtype: torch.dtype) -> MemoryEstimate:
    """Weights in `dtype` + KV cache of `kv_tokens` positions in `kv_dtype`, plus ~10% overhead.

    Args:
        args: model architecture.
        dtype: dtype the weights are held in.
        kv_tokens: positions of KV cache (summed over sequences).
        kv_dtype: dtype of the KV cache.

    Returns:
        A `MemoryEstimate` in bytes.
    """
    if kv_tokens < 0:
        raise ValueError(f"kv_tokens={kv_tokens} must be >= 0")
    weights = args.num_parameters() * _itemsize(dtype)
    kv = args.kv_cache_bytes(kv_tokens, _itemsize(kv_dtype))
    return MemoryEstimate(weights=weights, kv_cache=kv, total=int((weights + kv) * (1 + OVERHEAD)))


def estimate_bytes(args: ModelArgs, dtype: torch.dtype, kv_tokens: int, kv_dtype: torch.dtype) -> int:
    """Total bytes of `estimate` (weights + KV cache + overhead)."""
    return estimate(args, dtype, kv_tokens, kv_dtype).total


def available_bytes() -> int:
    """Memory this process can still use: MemAvailable, capped by a cgroup memory limit.

    Returns:
        Bytes; a very large number where neither /proc/meminfo nor a cgroup limit is readable.
    """
    avail = _meminfo_available()
    limit = _cgroup_headroom()
    candidates = [x for x in (avail, limit) if x is not None]
    return min(candidates) if candidates else 1 << 62


def check_fits(needed: Union[int, MemoryEstimate], available: int, what: str) -> None:
    """Refuse, with the numbers in GiB, when `needed` bytes exceed `available`.

    Args:
        needed: total bytes, or a `MemoryEstimate` (its breakdown goes into the message).
        available: bytes available.
        what: what is being loaded, e.g. the checkpoint path and dtype.

    Raises:
        InsufficientMemoryError: ``needed > available``.
    """
    total = needed.total if isinstance(needed, MemoryEstimate) else int(needed)
    if total <= available:
        return
    detail = ""
    if isinstance(needed, MemoryEstimate):
        detail = (f" (weights {needed.weights / GIB:.1f} + KV cache {needed.kv_cache / GIB:.1f}"
                  f" + {OVERHEAD:.0%} overhead)")
    raise InsufficientMemoryError(
        f"{what}: needs {total / GIB:.1f} GiB{detail}, {available / GIB:.1f} GiB available"
    )


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        return None
    return None


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" (v2) means no limit


def _reclaimable_cache(cgroup_dir: str) -> int:
    """Inactive file cache counted in the cgroup's usage (the kernel reclaims it first)."""
    try:
        with open(os.path.join(cgroup_dir, "memory.stat")) as f:
            for line in f:
                key, _, value = line.partition(" ")
                if key in ("inactive_file", "total_inactive_file"):
                    return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _cgroup_headroom() -> int | None:
    """Limit minus usage of this process's memory cgroup (v2, then v1), or None."""
    candidates = [("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current")]
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                parts = line.strip().split(":", 2)
                if len(parts) == 3 and parts[0] == "0" and parts[2] not in ("", "/"):
                    base = "/sys/fs/cgroup" + parts[2]
                    candidates.insert(0, (base + "/memory.max", base + "/memory.current"))
    except OSError:
        pass
    candidates.append(("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"))
    for limit_path, usage_path in candidates:
        if not os.path.exists(limit_path):
            continue
        limit = _read_int(limit_path)
        if limit is None or limit >= 1 << 60:  # unlimited (v1 reports a huge number)
            return None
        usage = (_read_int(usage_path) or 0) - _reclaimable_cache(os.path.dirname(usage_path))
        return max(limit - usage, 0)
    return None


__all__ = [
    "MemoryEstimate", "InsufficientMemoryError", "estimate", "estimate_bytes", "available_bytes", "check_fits",
]
