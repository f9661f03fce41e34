"""A reader for GGUF files (llama.cpp's model format), memory-mapped and lazy.

File layout (all integers little-endian)::

    magic "GGUF" | version u32 | tensor_count u64 | kv_count u64
    kv_count x   (key: string, value_type u32, value)
    tensor_count x (name: string, n_dims u32, ne u64[n_dims], ggml_type u32, offset u64)
    padding to general.alignment (default 32)
    tensor data; each tensor starts at data_start + offset (a multiple of the alignment)

A string is a u64 byte length followed by UTF-8 bytes; an array is an element type u32, a u64
length and the elements (arrays may nest). ``ne`` lists dimensions fastest-varying first, so the
PyTorch shape is ``ne`` reversed.

:func:`read_gguf` parses the header once and checks every length, count and tensor range
against the file size before anything is allocated; tensor bytes are only touched when asked
for (:meth:`GGUFFile.raw`, :meth:`GGUFFile.tensor`).
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from inhouse.util import gc_paused
from inhouse.weights.quants import GGML_BLOCK_SIZES, GGML_TYPE_NAMES, Q4_TYPES, Q8_0, SUPPORTED_TYPES, dequantize, q4_codes, q8_codes

__all__ = ["GGUFError", "GGUFTensorInfo", "GGUFFile", "read_gguf"]

logger = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ARRAY_NESTING = 16

# Metadata value types: id -> (name, struct format or None, byte size or minimum byte size).
_STRING, _ARRAY, _BOOL = 8, 9, 7
_VALUE_TYPES: dict[int, tuple[str, str | None, int]] = {
    0: ("UINT8", "<B", 1),
    1: ("INT8", "<b", 1),
    2: ("UINT16", "<H", 2),
    3: ("INT16", "<h", 2),
    4: ("UINT32", "<I", 4),
    5: ("INT32", "<i", 4),
    6: ("FLOAT32", "<f", 4),
    7: ("BOOL", "<B", 1),
    8: ("STRING", None, 8),  # at least the u64 length
    9: ("ARRAY", None, 12),  # at least element type u32 + length u64
    10: ("UINT64", "<Q", 8),
    11: ("INT64", "<q", 8),
    12: ("FLOAT64", "<d", 8),
}
# numpy dtypes for reading arrays of fixed-size scalars in one go.
_ARRAY_DTYPES: dict[int, str] = {
    0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 10: "<u8", 11: "<i8", 12: "<f8",
}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")

# ggml types whose bytes are plain values torch can view without decoding.
_NATIVE_DTYPES: dict[int, torch.dtype] = {0: torch.float32, 1: torch.float16, 30: torch.bfloat16}


class GGUFError(ValueError):
    """A GGUF file is malformed, truncated or uses something this reader does not support.

    The message always starts with the file path.
    """


@dataclass(frozen=True)
class GGUFTensorInfo:
    """Where one tensor lives in a GGUF file.

    Attributes:
        name: the GGUF tensor name, e.g. ``"blk.0.attn_q.weight"``.
        shape: PyTorch order (ggml ``ne`` reversed): a Linear weight is ``(out_features, in_features)``.
        ggml_type: the ggml type id.
        type_name: its name, e.g. ``"Q4_K"``.
        offset: absolute byte offset of the data in the file.
        n_bytes: size of the data in bytes.
    """

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    type_name: str
    offset: int
    n_bytes: int

    @property
    def n_elements(self) -> int:
        """Number of values in the tensor."""
        n = 1
        for dim in self.shape:
            n *= dim
        return n


class _HeaderParser:
    """Reads the header fields one after another, checking every read against the file size."""

    def __init__(self, path: str, buf: mmap.mmap | bytes, size: int) -> None:
        self.path = path
        self.buf = buf
        self.size = size
        self.pos = 0

    def fail(self, problem: str) -> GGUFError:
        return GGUFError(f"{self.path}: {problem}")

    def need(self, n: int, what: str) -> None:
        if self.pos + n > self.size:
            raise self.fail(
                f"{what} at byte {self.pos} needs {n} bytes but the file has {self.size} bytes (truncated?)"
            )

    def u32(self, what: str) -> int:
        self.need(4, what)
        (value,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return value

    def u64(self, what: str) -> int:
        self.need(8, what)
        (value,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return value

    def string(self, what: str) -> str:
        length = self.u64(f"length of {what}")
        self.need(length, what)
        start, self.pos = self.pos, self.pos + length
        try:
            return str(self.buf[start : self.pos], "utf-8")
        except UnicodeDecodeError as exc:
            raise self.fail(f"{what} at byte {start} is not valid UTF-8 ({exc.reason})") from None

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        spec = _VALUE_TYPES.get(vtype)
        if spec is None:
            raise self.fail(f"{what} has unknown metadata value type {vtype}")
        fmt, size = spec[1], spec[2]
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            return self.array(what, depth)
        assert fmt is not None
        self.need(size, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return bool(value) if vtype == _BOOL else value

    def array(self, what: str, depth: int) -> list[Any]:
        if depth >= MAX_ARRAY_NESTING:
            raise self.fail(f"{what} nests arrays more than {MAX_ARRAY_NESTING} deep")
        etype = self.u32(f"element type of {what}")
        length = self.u64(f"length of {what}")
        spec = _VALUE_TYPES.get(etype)
        if spec is None:
            raise self.fail(f"{what} is an array of unknown metadata value type {etype}")
        # Every element takes at least spec[2] bytes: reject absurd lengths before allocating.
        remaining = self.size - self.pos
        if length * spec[2] > remaining:
            raise self.fail(
                f"{what} claims {length} {spec[0]} elements (at least {length * spec[2]} bytes) "
                f"but only {remaining} bytes remain in the file (corrupt or truncated)"
            )
        dtype = _ARRAY_DTYPES.get(etype)
        if dtype is not None:
            values = np.frombuffer(self.buf, dtype=dtype, count=length, offset=self.pos).tolist()
            self.pos += length * spec[2]
            return values
        if etype == _BOOL:
            flags = np.frombuffer(self.buf, dtype=np.uint8, count=length, offset=self.pos)
            self.pos += length
            return (flags != 0).tolist()
        if etype == _STRING:
            return self.strings(what, length)
        return [self.array(f"{what}[{i}]", depth + 1) for i in range(length)]

    def strings(self, what: str, length: int) -> list[str]:
        """`length` strings in a row (a tokenizer's 50-150k tokens and merges): `string` in one tight
        loop, with the element's name built only for an error."""
        buf, pos, size, unpack = self.buf, self.pos, self.size, _U64.unpack_from
        out = []
        append = out.append
        for i in range(length):
            n = unpack(buf, pos)[0] if pos + 8 <= size else size  # (no room for the length: past the end)
            start, pos = pos + 8, pos + 8 + n
            if pos > size:
                self.pos = start - 8
                self.string(f"{what}[{i}]")  # raises, with the same message as one string
            try:
                append(str(buf[start:pos], "utf-8"))
            except UnicodeDecodeError as exc:
                raise self.fail(f"{what}[{i}] at byte {start} is not valid UTF-8 ({exc.reason})") from None
        self.pos = pos
        return out


def _type_label(ggml_type: int) -> str:
    name = GGML_TYPE_NAMES.get(ggml_type)
    return f"{name} ({ggml_type})" if name else f"id {ggml_type}"


class GGUFFile:
    """An open, memory-mapped GGUF file. Prefer :func:`read_gguf` to build one.

    Attributes:
        path: the file path.
        version: GGUF version (2 or 3).
        metadata: key -> plain Python value (str, int, float, bool, or lists of those),
            in file order.
        tensors: tensor name -> :class:`GGUFTensorInfo`, in file order.
        alignment: data alignment in bytes (``general.alignment``, default 32).
        data_offset: absolute offset of the tensor data section.

    The memory map is private (copy-on-write): tensors returned without a copy may be written
    to, but the writes never reach the file. Usable as a context manager.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        """Open and parse ``path``.

        Raises:
            GGUFError: the file is not a valid GGUF v2/v3 file (see :func:`read_gguf`).
            OSError: the file cannot be opened.
        """
        self.path = os.fspath(path)
        self.version = 0
        self.metadata: dict[str, Any] = {}
        self.tensors: dict[str, GGUFTensorInfo] = {}
        self.alignment = DEFAULT_ALIGNMENT
        self.data_offset = 0
        self._mmap: mmap.mmap | None = None
        self._bytes: np.ndarray | None = None
        with open(self.path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size == 0:
                raise GGUFError(f"{self.path}: the file is empty, not a GGUF file")
            # ACCESS_COPY: a private mapping whose pages are writable in memory only, so torch can
            # wrap them without copying (and without its read-only-buffer warning).
            self._mmap = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
        try:
            with gc_paused():  # ~100k metadata strings (a tokenizer) and lists
                self._parse(size)
        except BaseException:
            self.close()
            raise
        self._bytes = np.frombuffer(self._mmap, dtype=np.uint8)

    # ------------------------------------------------------------------ parsing

    def _parse(self, size: int) -> None:
        assert self._mmap is not None
        p = _HeaderParser(self.path, self._mmap, size)
        magic = self._mmap[:4]
        if magic != GGUF_MAGIC:
            raise p.fail(f"not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
        p.pos = 4
        version = p.u32("version")
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        if version not in SUPPORTED_VERSIONS and swapped in SUPPORTED_VERSIONS:
            raise p.fail(f"big-endian GGUF files are not supported (version field reads {version:#010x})")
        if version not in SUPPORTED_VERSIONS:
            raise p.fail(f"unsupported GGUF version {version} (supported: {', '.join(map(str, SUPPORTED_VERSIONS))})")
        self.version = version
        n_tensors = p.u64("tensor count")
        n_kv = p.u64("metadata key/value count")
        # Sanity bounds before looping: a tensor info takes >= 24 bytes, a key/value pair >= 13.
        if n_tensors * 24 > size or n_kv * 13 > size:
            raise p.fail(
                f"header claims {n_tensors} tensors and {n_kv} metadata entries, "
                f"impossible in a file of {size} bytes (corrupt header)"
            )

        for i in range(n_kv):
            key = p.string(f"metadata key #{i}")
            vtype = p.u32(f"value type of metadata key {key!r}")
            value = p.value(vtype, f"metadata key {key!r}")
            if key in self.metadata:
                raise p.fail(f"duplicate metadata key {key!r}")
            self.metadata[key] = value

        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if (
            not isinstance(alignment, int)
            or isinstance(alignment, bool)
            or alignment <= 0
            or alignment & (alignment - 1)
        ):
            raise p.fail(f"general.alignment={alignment!r} is not a positive power of two")
        self.alignment = alignment

        raw_infos: list[tuple[str, list[int], int, int]] = []
        seen: set[str] = set()
        for i in range(n_tensors):
            name = p.string(f"name of tensor #{i}")
            if name in seen:
                raise p.fail(f"duplicate tensor name {name!r}")
            seen.add(name)
            n_dims = p.u32(f"dimension count of tensor {name!r}")
            if n_dims > MAX_DIMS:
                raise p.fail(f"tensor {name!r} has {n_dims} dimensions (at most {MAX_DIMS} allowed)")
            ne = [p.u64(f"dimension {d} of tensor {name!r}") for d in range(n_dims)]
            ggml_type = p.u32(f"type of tensor {name!r}")
            offset = p.u64(f"data offset of tensor {name!r}")
            raw_infos.append((name, ne, ggml_type, offset))

        self.data_offset = -(-p.pos // alignment) * alignment
        for name, ne, ggml_type, offset in raw_infos:
            self.tensors[name] = self._tensor_info(p, name, ne, ggml_type, offset, size)

    def _tensor_info(
        self, p: _HeaderParser, name: str, ne: list[int], ggml_type: int, offset: int, size: int
    ) -> GGUFTensorInfo:
        if ggml_type not in GGML_BLOCK_SIZES:
            raise p.fail(f"unknown tensor type id {ggml_type} for tensor {name!r}")
        type_name = GGML_TYPE_NAMES[ggml_type]
        block_size, type_size = GGML_BLOCK_SIZES[ggml_type]
        n_elements = 1
        for dim in ne:
            n_elements *= dim
        row = ne[0] if ne else 1  # a 0-dimensional tensor is a single value
        if row % block_size:
            raise p.fail(
                f"tensor {name!r} of type {type_name} has rows of {row} values, "
                f"not a multiple of the block size {block_size}"
            )
        if offset % self.alignment:
            raise p.fail(f"tensor {name!r} data offset {offset} is not a multiple of the alignment {self.alignment}")
        n_bytes = n_elements // block_size * type_size
        start = self.data_offset + offset
        if start + n_bytes > size:
            raise p.fail(
                f"tensor {name!r} of type {type_name} needs bytes {start}..{start + n_bytes} "
                f"but the file has {size} bytes (truncated?)"
            )
        return GGUFTensorInfo(
            name=name,
            shape=tuple(reversed(ne)),
            ggml_type=ggml_type,
            type_name=type_name,
            offset=start,
            n_bytes=n_bytes,
        )

    # ------------------------------------------------------------------ tensor access

    def _info(self, name: str) -> GGUFTensorInfo:
        info = self.tensors.get(name)
        if info is None:
            raise GGUFError(f"{self.path}: no tensor named {name!r} (the file has {len(self.tensors)} tensors)")
        return info

    def raw(self, name: str) -> np.ndarray:
        """The stored bytes of tensor ``name``.

        Returns:
            A 1-D ``uint8`` view into the memory map (no copy) of ``info.n_bytes`` bytes.

        Raises:
            GGUFError: no such tensor, or the file is closed.
        """
        info = self._info(name)
        if self._bytes is None:
            raise GGUFError(f"{self.path}: the file is closed")
        return self._bytes[info.offset : info.offset + info.n_bytes]

    def int4_codes(self, name: str) -> Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """A Q4_0/Q4_1 matrix's codes, steps and minimums (`quants.q4_codes`); None for other tensors."""
        info = self._info(name)
        if info.ggml_type not in Q4_TYPES or len(info.shape) != 2:
            return None
        return q4_codes(self.raw(name), info.ggml_type, *info.shape)

    def int8_codes(self, name: str) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """A Q8_0 matrix's codes and steps (`quants.q8_codes`); None for other tensors."""
        info = self._info(name)
        if info.ggml_type != Q8_0 or len(info.shape) != 2:
            return None
        return q8_codes(self.raw(name), *info.shape)

    def tensor(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Tensor ``name`` decoded to ``dtype`` and shaped ``info.shape``.

        F32/F16/BF16 data asked for in its own dtype is returned as a view of the memory map
        (no copy); everything else is decoded into new memory.

        Args:
            name: the GGUF tensor name.
            dtype: the floating dtype wanted.

        Returns:
            A tensor of shape ``self.tensors[name].shape``.

        Raises:
            GGUFError: no such tensor, the file is closed, or its type cannot be decoded.
        """
        info = self._info(name)
        if info.ggml_type not in SUPPORTED_TYPES:
            raise GGUFError(
                f"{self.path}: unsupported tensor type {_type_label(info.ggml_type)} for {name!r} "
                f"(supported: {', '.join(SUPPORTED_TYPES.values())})"
            )
        raw = self.raw(name)
        native = _NATIVE_DTYPES.get(info.ggml_type)
        if native is not None:
            if info.offset % native.itemsize:
                raw = raw.copy()  # misaligned (alignment < itemsize): copy to an aligned buffer
            values = torch.from_numpy(raw).view(native)
            return values.view(info.shape).to(dtype)  # .to() returns the view itself when dtype matches
        values = dequantize(raw, info.ggml_type, info.n_elements)
        return values.view(info.shape).to(dtype)

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Release the memory map.

        Tensors still viewing it keep the mapping alive until they are freed; the file
        object itself can no longer hand out data.
        """
        self._bytes = None
        mm, self._mmap = self._mmap, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                logger.debug("%s: tensors still view the memory map; it is unmapped when they are freed", self.path)

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GGUFFile({self.path!r}, version={self.version}, {len(self.metadata)} keys, {len(self.tensors)} tensors)"


def read_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Open a GGUF v2/v3 file: memory-map it and parse its header (tensor data stays lazy).

    Args:
        path: path to a ``.gguf`` file.

    Returns:
        The open :class:`GGUFFile`; close it (or use it as a context manager) when done.

    Raises:
        GGUFError: wrong magic, unsupported version, a truncated or corrupt header (absurd
            counts or lengths, unknown value types, invalid UTF-8), an unknown tensor type,
            a bad alignment, or tensor data reaching past the end of the file.
        OSError: the file cannot be opened.
    """
    return GGUFFile(path)
