"""Meta checkpoints: ``params.json`` + ``consolidated.NN.pth`` model-parallel shards.

Shards are memory-mapped (``torch.load(mmap=True, weights_only=True)``) and merged one
tensor at a time along the split dimension in `names.META_SHARD_DIM`.
"""

from __future__ import annotations

import os
import re
from typing import Iterator

import torch

from inhouse.config import ModelArgs
from inhouse.weights.names import read_json_args, META_IGNORED, WeightsError, meta_shard_dim

_SHARD = re.compile(r"^consolidated\.(\d+)\.pth$")


def read_params(root: str) -> ModelArgs:
    """`ModelArgs` from ``root/params.json``.

    Raises:
        WeightsError: the file is missing, not JSON, or holds keys/values we do not support.
    """
    return read_json_args(root, "params.json", ModelArgs.from_meta_params)


def list_shards(root: str) -> list[str]:
    """Paths of ``consolidated.NN.pth`` in `root`, in shard order.

    Raises:
        WeightsError: no shard, or numbers that are not 0..N-1 (a missing shard).
    """
    found = {}
    for name in os.listdir(root):
        m = _SHARD.match(name)
        if m:
            found[int(m.group(1))] = os.path.join(root, name)
    if not found:
        raise WeightsError(f"{root}: Meta checkpoint directory has params.json but no consolidated.NN.pth shard")
    n = max(found) + 1
    missing = [i for i in range(n) if i not in found]
    if missing:
        names = ", ".join(f"consolidated.{i:02d}.pth" for i in missing)
        present = ", ".join(os.path.basename(found[i]) for i in sorted(found))
        raise WeightsError(f"{root}: missing model-parallel shard(s) {names} (present: {present})")
    return [found[i] for i in range(n)]


def _load_shard(path: str) -> dict[str, torch.Tensor]:
    try:
        sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # torch raises many types for a bad file (RuntimeError, UnpicklingError, EOFError)
        raise WeightsError(f"{path}: cannot read PyTorch checkpoint: {e}") from e
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"{path}: expected a dict of tensors (a Meta consolidated checkpoint)")
    return sd


def open_shards(root: str) -> list[tuple[str, dict[str, torch.Tensor]]]:
    """Memory-map every shard and check that they hold the same tensor names.

    Raises:
        WeightsError: a shard is unreadable or its names differ from shard 0.
    """
    shards = [(p, _load_shard(p)) for p in list_shards(root)]
    first_path, first = shards[0]
    for path, sd in shards[1:]:
        if set(sd) != set(first):
            extra, lacking = sorted(set(sd) - set(first)), sorted(set(first) - set(sd))
            raise WeightsError(
                f"{path}: tensor names differ from {os.path.basename(first_path)} "
                f"(only here: {extra[:5]}, missing here: {lacking[:5]})"
            )
    return shards


def stored_dtypes(shards: list[tuple[str, dict[str, torch.Tensor]]]) -> dict[str, int]:
    """Count of tensors per dtype name in shard 0."""
    counts: dict[str, int] = {}
    for t in shards[0][1].values():
        key = str(t.dtype).removeprefix("torch.")
        counts[key] = counts.get(key, 0) + 1
    return counts


def iter_tensors(shards: list[tuple[str, dict[str, torch.Tensor]]]) -> Iterator[tuple[str, torch.Tensor, str]]:
    """Yield ``(meta_name, tensor, file)`` with model-parallel shards merged, one tensor at a time.

    Raises:
        WeightsError: unknown tensor name or inconsistent shard shapes.
    """
    paths = [p for p, _ in shards]
    for name in shards[0][1]:
        if name in META_IGNORED:
            continue
        parts = [sd[name] for _, sd in shards]
        if len(parts) == 1:
            yield name, parts[0], paths[0]
            continue
        try:
            dim = meta_shard_dim(name)
        except KeyError:
            raise WeightsError(f"{paths[0]}: unexpected tensor {name!r} (not a Llama tensor name)") from None
        shapes = [tuple(t.shape) for t in parts]
        if dim is None:
            ok = all(s == shapes[0] for s in shapes)
        else:
            ok = all(len(s) == len(shapes[0]) and s[:dim] + s[dim + 1:] == shapes[0][:dim] + shapes[0][dim + 1:]
                     for s in shapes)
        if not ok:
            listing = ", ".join(f"{os.path.basename(p)}: {s}" for p, s in zip(paths, shapes))
            how = "replicated" if dim is None else f"split along dim {dim}"
            raise WeightsError(f"{os.path.dirname(paths[0])}: inconsistent shard shapes for {name!r} ({how}): {listing}")
        yield name, (parts[0] if dim is None else torch.cat(parts, dim=dim)), paths[0]


__all__ = ["read_params", "list_shards", "open_shards", "stored_dtypes", "iter_tensors"]
