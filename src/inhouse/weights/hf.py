"""Hugging Face checkpoints: ``config.json`` + safetensors (one file or an index of shards).

Headers are read and checked by hand (cheap, and a truncated file gets a clear message);
tensors are read lazily with ``safetensors.safe_open``, renamed to Meta names
(`names.HF_TO_META`) and q/k rows put back into Meta's layout (`names.unpermute_hf_qk`).
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any, Iterator

import torch
from safetensors import safe_open

from inhouse.config import ModelArgs
from inhouse.weights.names import read_json_args, HF_PERMUTED, HF_TO_META, WeightsError, remap, unpermute_hf_qk

INDEX_NAME = "model.safetensors.index.json"
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's own limit


def is_safetensors(path: str) -> bool:
    """Whether `path` starts like a safetensors file (u64 header length, then a JSON object)."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 2 <= n <= _MAX_HEADER and head[8:9] == b"{"


def read_header(path: str) -> dict[str, Any]:
    """Parse and validate a safetensors header (tensor name -> dtype/shape/data_offsets).

    Raises:
        WeightsError: truncated file (header or tensor data past the end) or corrupt header.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise WeightsError(f"{path}: truncated safetensors file ({size} bytes, no header length)")
        (n,) = struct.unpack("<Q", head)
        if 8 + n > size:
            raise WeightsError(f"{path}: truncated safetensors file: header length {n} runs past the end of the file ({size} bytes)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"{path}: corrupt safetensors header: {e}") from e
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: corrupt safetensors header: not a JSON object")
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    for name, entry in header.items():
        try:
            begin, end = entry["data_offsets"]
            entry["dtype"], entry["shape"]
        except (KeyError, TypeError, ValueError):
            raise WeightsError(f"{path}: corrupt safetensors header entry for {name!r}: {entry!r}") from None
        if end > data_size:
            raise WeightsError(
                f"{path}: truncated safetensors file: tensor {name!r} data ends at byte {8 + n + end}, "
                f"past the end of the file ({size} bytes)"
            )
    return header


def read_config(root: str) -> ModelArgs:
    """`ModelArgs` from ``root/config.json``.

    Raises:
        WeightsError: the file is missing, not JSON, or not a supported Llama config.
    """
    return read_json_args(root, "config.json", ModelArgs.from_hf_config)


def weight_files(root: str) -> dict[str, str]:
    """Map tensor name -> safetensors file, from the index if there is one, else the headers.

    Args:
        root: the checkpoint directory.

    Raises:
        WeightsError: no safetensors file, an index naming a missing file or a tensor its
            file lacks, a tensor stored twice, or a bad file (see `read_header`).
    """
    index_path = os.path.join(root, INDEX_NAME)
    where: dict[str, str] = {}
    if os.path.exists(index_path):
        try:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise WeightsError(f"{index_path}: cannot read the safetensors index: {e}") from e
        headers: dict[str, dict[str, Any]] = {}
        for name, fname in weight_map.items():
            path = os.path.join(root, fname)
            if fname not in headers:
                if not os.path.isfile(path):
                    raise WeightsError(f"{index_path}: shard {fname} (holding {name!r}) is missing")
                headers[fname] = read_header(path)
            if name not in headers[fname]:
                raise WeightsError(f"{path}: lacks tensor {name!r} that {INDEX_NAME} places there")
            where[name] = path
        return where
    files = sorted(os.path.join(root, n) for n in os.listdir(root) if is_safetensors(os.path.join(root, n)))
    if not files:
        raise WeightsError(f"{root}: Hugging Face checkpoint directory has no safetensors file "
                           "(PyTorch .bin checkpoints are not supported)")
    for path in files:
        for name in read_header(path):
            if name in where:
                raise WeightsError(f"{path}: tensor {name!r} is also in {where[name]}")
            where[name] = path
    return where


def stored_dtypes(where: dict[str, str]) -> dict[str, int]:
    """Count of tensors per safetensors dtype name (e.g. ``{"BF16": 290}``)."""
    counts: dict[str, int] = {}
    for path in sorted(set(where.values())):
        for entry in read_header(path).values():
            counts[entry["dtype"]] = counts.get(entry["dtype"], 0) + 1
    return counts


def iter_tensors(where: dict[str, str], args: ModelArgs) -> Iterator[tuple[str, torch.Tensor, str]]:
    """Yield ``(meta_name, tensor, file)`` one tensor at a time, q/k in Meta's layout.

    Raises:
        WeightsError: a tensor name that is not a Llama tensor.
    """
    by_file: dict[str, list[str]] = {}
    for name, path in where.items():
        by_file.setdefault(path, []).append(name)
    for path, names in by_file.items():
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in names:
                target = remap(name, HF_TO_META, path)
                if target is None:
                    continue
                t = f.get_tensor(name)
                for suffix, heads in HF_PERMUTED.items():
                    if target.endswith(suffix):
                        n = getattr(args, heads)
                        if t.ndim != 2 or t.shape[0] % (2 * n):
                            raise WeightsError(f"{path}: {name} has shape {tuple(t.shape)}, "
                                               f"not ({n} heads x head_dim, dim)")
                        t = unpermute_hf_qk(t, n)
                yield target, t, path


__all__ = ["INDEX_NAME", "is_safetensors", "read_header", "read_config", "weight_files", "stored_dtypes", "iter_tensors"]
