"""Load a checkpoint of any supported format into a `Transformer`.

The format is read from the files' contents (GGUF magic, safetensors header, PyTorch
zip/pickle, ``params.json`` / ``config.json`` in a directory), never from a file name.
The model is built on the ``meta`` device and each parameter is assigned as it is read,
converted to the target dtype, so the weights are never held twice.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Union

import torch
from torch import nn

from inhouse.config import ConfigError, ModelArgs
from inhouse.model.quant import Int4Codes, Int8Codes, quantize_tensor
from inhouse.model.transformer import Transformer, rope_inv_freq
from inhouse.weights import hf, meta
from inhouse.weights.gguf import GGUFError, read_gguf
from inhouse.weights.memory import available_bytes, check_fits, estimate
from inhouse.weights.names import GGUF_TO_META, ROPE_FREQS, WeightsError, remap
from inhouse.weights.quants import SUPPORTED_TYPES

logger = logging.getLogger("inhouse.weights")

RANDOM_PREFIX = "random:"
_GGUF_MAGIC = b"GGUF"
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default (zip) format
_PICKLE_MAGIC = b"\x80"  # torch.save's legacy format starts with a pickle protocol opcode
_LOUD_PROGRESS_BYTES = 256 * 1024**2  # below this, progress goes to DEBUG only


@dataclass
class CheckpointInfo:
    """What a checkpoint holds, read from its headers only.

    Attributes:
        format: ``"meta"``, ``"hf"``, ``"gguf"`` or ``"random"``.
        path: the checkpoint file or directory (``"random:<preset>"`` for a random model).
        args: the model architecture.
        stored_dtype: e.g. ``"bfloat16"``, ``"F32"``, ``"mixed: Q4_1 x210, F32 x61, Q8_0 x1"``.
        file_bytes: bytes of the weight files.
        gguf_metadata: the GGUF key/value metadata (the tokenizer is built from it), else None.
    """

    format: str
    path: str
    args: ModelArgs
    stored_dtype: str
    file_bytes: int
    gguf_metadata: Optional[dict] = None
    # The parsed, still open GGUF file, so that loading does not parse the header a second time
    # (its tokenizer arrays take ~0.2 s); loading takes it over and closes it.
    gguf_file: Optional[Any] = field(default=None, repr=False, compare=False)


# --------------------------------------------------------------------------- detection
def _head(path: str, n: int = 16) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError as e:
        raise WeightsError(f"{path}: cannot read: {e}") from e


def _is_torch_file(path: str) -> bool:
    head = _head(path, 4)
    return head.startswith(_ZIP_MAGIC) or head.startswith(_PICKLE_MAGIC)


def detect_format(path: Union[str, os.PathLike]) -> str:
    """Which format `path` is, from its contents.

    Args:
        path: a GGUF file, a safetensors file or directory with ``config.json``, a Meta
            ``.pth`` file or directory with ``params.json``, or ``"random:<preset>"``.

    Returns:
        ``"gguf"``, ``"hf"``, ``"meta"`` or ``"random"``.

    Raises:
        WeightsError: the path does not exist or is none of these.
    """
    path = os.fspath(path)
    if path.startswith(RANDOM_PREFIX):
        return "random"
    if os.path.isdir(path):
        has_params = os.path.isfile(os.path.join(path, "params.json"))
        has_config = os.path.isfile(os.path.join(path, "config.json"))
        files = [os.path.join(path, n) for n in sorted(os.listdir(path))]
        files = [p for p in files if os.path.isfile(p)]
        if has_params and any(_is_torch_file(p) for p in files):
            return "meta"
        if has_config and (os.path.isfile(os.path.join(path, hf.INDEX_NAME)) or any(map(hf.is_safetensors, files))):
            return "hf"
        if has_params:
            return "meta"
        if has_config:
            return "hf"
        raise WeightsError(f"{path}: directory holds neither params.json (Meta) nor config.json (Hugging Face)")
    if not os.path.isfile(path):
        raise WeightsError(f"{path}: no such file or directory")
    head = _head(path)
    if head.startswith(_GGUF_MAGIC):
        return "gguf"
    if hf.is_safetensors(path):
        return "hf"
    if _is_torch_file(path):
        return "meta"
    raise WeightsError(f"{path}: unknown checkpoint format (not GGUF, safetensors or a PyTorch checkpoint; "
                       f"starts with {head[:8]!r})")


# --------------------------------------------------------------------------- inspection
def _dtype_summary(counts: dict[str, int]) -> str:
    if len(counts) == 1:
        return next(iter(counts))
    return "mixed: " + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _root(path: str) -> str:
    return path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))


def _open_gguf(path: str):
    try:
        return read_gguf(path)
    except GGUFError as e:
        raise WeightsError(str(e) if path in str(e) else f"{path}: {e}") from e
    except OSError as e:
        raise WeightsError(f"{path}: cannot read: {e}") from e


def inspect_checkpoint(path: Union[str, os.PathLike]) -> CheckpointInfo:
    """Read a checkpoint's configuration and tensor headers (cheap: no tensor data).

    Args:
        path: see `detect_format`.

    Returns:
        A `CheckpointInfo`.

    Raises:
        WeightsError: unknown format, unreadable/unsupported config, truncated or corrupt
            file, missing shard, unsupported GGUF tensor type; the message names the file.
    """
    path = os.fspath(path)
    fmt = detect_format(path)
    if fmt == "random":
        preset = path[len(RANDOM_PREFIX):]
        try:
            args = ModelArgs.from_preset(preset)
        except ConfigError as e:
            raise WeightsError(f"{path}: {e}") from e
        return CheckpointInfo("random", path, args, "float32", 0)
    if fmt == "meta":
        root = _root(path)
        args = meta.read_params(root)
        shards = meta.open_shards(root)
        return CheckpointInfo("meta", path, args, _dtype_summary(meta.stored_dtypes(shards)),
                              sum(os.path.getsize(p) for p, _ in shards))
    if fmt == "hf":
        root = _root(path)
        args = hf.read_config(root)
        where = hf.weight_files(root)
        return CheckpointInfo("hf", path, args, _dtype_summary(hf.stored_dtypes(where)),
                              sum(os.path.getsize(p) for p in set(where.values())))
    f = _open_gguf(path)
    try:
        try:
            args = ModelArgs.from_gguf_metadata(f.metadata, has_output_tensor="output.weight" in f.tensors)
        except (ConfigError, KeyError, TypeError, ValueError) as e:
            raise WeightsError(f"{path}: {e}") from e
        for info in f.tensors.values():
            if info.ggml_type not in SUPPORTED_TYPES:
                raise WeightsError(f"{path}: tensor {info.name!r} has unsupported quantization type "
                                   f"{info.type_name} (supported: {', '.join(SUPPORTED_TYPES.values())})")
    except BaseException:
        f.close()
        raise
    counts = Counter(info.type_name for info in f.tensors.values())
    return CheckpointInfo("gguf", path, args, _dtype_summary(dict(counts)), os.path.getsize(path),
                          gguf_metadata=dict(f.metadata), gguf_file=f)


# --------------------------------------------------------------------------- tensors
def _iter_gguf(path: str, dtype: torch.dtype, opened=None, int4_codes: bool = False, int8_codes: bool = False
               ) -> Iterator[tuple[str, Union[torch.Tensor, Int4Codes, Int8Codes], str]]:
    with opened or _open_gguf(path) as f:
        for name in f.tensors:
            target = remap(name, GGUF_TO_META, path)
            if target is None:
                continue
            try:
                codes = f.int4_codes(name) if int4_codes else None
                if codes is not None:  # a Q4_0/Q4_1 matrix, handed over as its codes (no fp32 round trip)
                    yield target, Int4Codes(*codes), path
                    continue
                codes8 = f.int8_codes(name) if int8_codes else None
                if codes8 is not None:  # a Q8_0 matrix, likewise
                    yield target, Int8Codes(*codes8), path
                    continue
                t = f.tensor(name, dtype=torch.float32 if target == ROPE_FREQS else dtype)
            except GGUFError as e:
                raise WeightsError(str(e)) from e
            except ValueError as e:  # q4_codes/q8_codes: a size that does not match the shape
                raise WeightsError(f"{path}: tensor {name!r}: {e}") from e
            yield target, t, path  # views of the map keep it alive after close()


def _iter_checkpoint(info: CheckpointInfo, dtype: torch.dtype, int4_codes: bool = False, int8_codes: bool = False
                     ) -> Iterator[tuple[str, Union[torch.Tensor, Int4Codes, Int8Codes], str]]:
    if info.format == "meta":
        return meta.iter_tensors(meta.open_shards(_root(info.path)))
    if info.format == "hf":
        return hf.iter_tensors(hf.weight_files(_root(info.path)), info.args)
    if info.format == "gguf":
        opened, info.gguf_file = info.gguf_file, None
        return _iter_gguf(info.path, dtype, opened, int4_codes, int8_codes)
    raise WeightsError(f"{info.path}: format {info.format!r} has no tensors to read")


class _Progress:
    """Logs "loading weights: 45% (123/272 tensors, 1.2/2.7 GB)" every ~10%."""

    def __init__(self, n_tensors: int, n_bytes: int, file_bytes: int):
        self.n_tensors, self.n_bytes = n_tensors, n_bytes
        self.done_tensors = self.done_bytes = 0
        self.next_pct = 10
        # Loud when reading takes a while: judged by the bytes on disk (a 4-bit file expands 4-8x).
        self.level = logging.INFO if file_bytes >= _LOUD_PROGRESS_BYTES else logging.DEBUG

    def step(self, n_bytes: int) -> None:
        self.done_tensors += 1
        self.done_bytes += n_bytes
        pct = 100 * self.done_bytes // max(self.n_bytes, 1)
        if pct >= self.next_pct or self.done_tensors == self.n_tensors:
            logger.log(self.level, "loading weights: %d%% (%d/%d tensors, %.1f/%.1f GB)", min(pct, 100),
                       self.done_tensors, self.n_tensors, self.done_bytes / 1e9, self.n_bytes / 1e9)
            self.next_pct = (pct // 10 + 1) * 10


def _set_parameter(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(module_name), leaf, nn.Parameter(value))


def _finish(model: Transformer, device: torch.device, rope_freqs: Optional[torch.Tensor], where: str) -> None:
    """Tie embeddings, rebuild the (non-persistent) RoPE table on `device`, apply rope_freqs."""
    args = model.args
    model.tie_weights()
    model.inv_freq = rope_inv_freq(args.head_dim, args.rope_theta, args.rope_scaling).to(device)
    if rope_freqs is not None:
        try:
            model.set_rope_freq_factors(rope_freqs.to(device))
        except ValueError as e:
            raise WeightsError(f"{where}: {e}") from e
    model.eval()


def _assign_all(model: Transformer, tensors: Iterator[tuple[str, Union[torch.Tensor, Int4Codes, Int8Codes], str]],
                info: CheckpointInfo,
                dtype: torch.dtype, device: torch.device, quantize: str = "none") -> None:
    args = model.args
    params = dict(model.named_parameters())  # tied output.weight is not listed separately
    itemsize = torch.empty((), dtype=dtype).element_size()
    progress = _Progress(len(params), sum(p.numel() for p in params.values()) * itemsize, info.file_bytes)
    done: set[str] = set()
    rope_freqs = None
    for name, t, src in tensors:
        if name == ROPE_FREQS:
            rope_freqs = t.float()
            continue
        if name not in params:
            if args.tie_embeddings and name == "output.weight":
                continue  # tied checkpoints may store the copy; the embedding is used
            raise WeightsError(f"{src}: unexpected tensor {name!r} for this model")
        if name in done:
            raise WeightsError(f"{src}: tensor {name!r} appears twice")
        want = tuple(params[name].shape)
        if tuple(t.shape) != want:
            raise WeightsError(f"{src}: tensor {name!r} has shape {tuple(t.shape)}, "
                               f"but the model config needs {want}")
        if isinstance(t, (Int4Codes, Int8Codes)):
            if quantize == "none" or device.type != "cpu":
                t = t.dense()  # what dequantizing the blocks gives, bit for bit
        elif not t.is_floating_point():
            raise WeightsError(f"{src}: tensor {name!r} has dtype {t.dtype}, expected floating point")
        if quantize == "none":
            _set_parameter(model, name, t.to(device=device, dtype=dtype))
        else:  # quantized as it arrives: the model never exists in fp32 as a whole
            value = t if isinstance(t, (Int4Codes, Int8Codes)) else t.to(device=device, dtype=torch.float32)
            quantize_tensor(model, name, value, quantize, dtype)
        done.add(name)
        progress.step(t.numel() * itemsize)
    missing = [n for n in params if n not in done]
    if missing:
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        raise WeightsError(f"{info.path}: missing tensor(s) {', '.join(missing[:8])}{more}")
    _finish(model, device, rope_freqs, info.path)


# --------------------------------------------------------------------------- public entry points
def _available_on(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    return available_bytes()


def load_model(
    path_or_info: Union[str, os.PathLike, CheckpointInfo],
    *,
    dtype: torch.dtype = torch.float32,
    device: Union[str, torch.device] = "cpu",
    max_seq_len_for_estimate: Optional[int] = None,
    check_memory: bool = True,
    quantize: str = "none",
) -> tuple[Transformer, CheckpointInfo]:
    """Build a `Transformer` from a checkpoint, one tensor at a time.

    Args:
        path_or_info: a checkpoint path (see `detect_format`) or an `inspect_checkpoint` result.
        dtype: dtype of the parameters (quantized GGUF tensors are dequantized to it).
        device: where the parameters live.
        max_seq_len_for_estimate: KV-cache positions to include in the memory check
            (None: weights only).
        check_memory: refuse up front when the estimate exceeds the memory available.
        quantize: "none", or "int8"/"int4": each tensor is read in fp32 and quantized at once
            (`inhouse.model.quant.quantize_tensor`); `dtype` is then the dtype of what stays
            unquantized (bf16), norms excepted (fp32).

    Returns:
        ``(model, info)``: the model in eval mode, and the checkpoint description.

    Raises:
        WeightsError: any problem with the files (see `inspect_checkpoint`), a missing,
            unexpected, duplicated or wrongly shaped tensor, or not enough memory
            (`memory.InsufficientMemoryError`).
    """
    info = path_or_info if isinstance(path_or_info, CheckpointInfo) else inspect_checkpoint(path_or_info)
    device = torch.device(device)
    args = info.args
    if check_memory:
        needed = estimate(args, dtype, max_seq_len_for_estimate or 0, dtype)
        check_fits(needed, _available_on(device), f"loading {info.path} as {str(dtype).removeprefix('torch.')}")
    if info.format == "random":
        return random_model(args, seed=0, dtype=dtype, device=device), info
    logger.info("loading %s (%s, %s, %d layers, dim %d) as %s", info.path, info.format, info.stored_dtype,
                args.n_layers, args.dim, str(dtype).removeprefix("torch."))
    with torch.device("meta"):
        model = Transformer(args)
    tensors = _iter_checkpoint(info, torch.float32 if quantize != "none" else dtype, int4_codes=quantize == "int4",
                               int8_codes=quantize != "none")
    _assign_all(model, tensors, info, dtype, device, quantize)
    return model, info


def random_model(
    preset_or_args: Union[str, ModelArgs],
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    std: float = 0.02,
    device: Union[str, torch.device] = "cpu",
    quantize: str = "none",
) -> Transformer:
    """A deterministically initialised model (for tests, benchmarks and ``random:`` models).

    Each matrix is drawn from N(0, std²) in float32 with a generator seeded by `seed`, in
    parameter order, then cast to `dtype`; norm weights are 1. Same seed, same weights.
    With `quantize` ("int8"/"int4") each matrix is quantized as it is drawn (see `load_model`),
    so ``random:llama3.1-8b`` in int4 never needs its 32 GB of fp32.

    Args:
        preset_or_args: a preset name (see `inhouse.config.PRESETS`) or `ModelArgs`.
        seed: generator seed.
        dtype: parameter dtype.
        std: standard deviation of the matrices (raise it in tests so RoPE mistakes show).
        device: where the parameters live.

    Raises:
        WeightsError: unknown preset name.
    """
    if isinstance(preset_or_args, ModelArgs):
        args = preset_or_args
    else:
        try:
            args = ModelArgs.from_preset(preset_or_args)
        except ConfigError as e:
            raise WeightsError(f"{RANDOM_PREFIX}{preset_or_args}: {e}") from e
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = Transformer(args)
    for name, p in list(model.named_parameters()):
        if p.ndim == 1:  # RMSNorm weights
            value = torch.ones(p.shape, dtype=torch.float32, device=device)
        else:
            value = torch.empty(p.shape, dtype=torch.float32).normal_(0.0, std, generator=gen).to(device)
        if quantize == "none":
            _set_parameter(model, name, value.to(dtype))
        else:
            quantize_tensor(model, name, value, quantize, dtype)
    _finish(model, device, None, f"{RANDOM_PREFIX}model")
    return model


__all__ = ["WeightsError", "CheckpointInfo", "detect_format", "inspect_checkpoint", "load_model", "random_model"]
