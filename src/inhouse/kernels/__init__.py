"""Native CPU kernels, compiled on first use with the machine's C++ compiler and cached on disk.

quant_cpu.cpp holds the decode-time matmuls of `inhouse.model.quant.Int4Linear` and
`Int8Linear` on CPUs with AVX-512 VNNI and BF16 (``torch.ops.inhouse.int4_mm``, ``int8_mm``:
4-bit or 8-bit weights times activations quantized to int16 per group of 32, reading the weights
at close to memory bandwidth, where PyTorch's int4 kernel reaches about half of it) and
``int4_dequantize`` (the bf16 matrix for prompt chunks); decode_cpu.cpp holds
``torch.classes.inhouse.FusedDecoder``, a quantized model's whole decode step in one call
(`inhouse.model.fused_decode`). Both share the row kernels of quant_cpu.h.

The library is built once per source/PyTorch/Python version into ``$INHOUSE_KERNEL_CACHE``
(default ``~/.cache/inhouse/kernels``; about 10 s on two cores) and loaded from there
afterwards. Where it cannot be used — another architecture, a CPU without those instructions, no
compiler, a failed build, or ``INHOUSE_NATIVE_KERNELS=0`` — `native_kernels_available` says False
once, with the reason in the log, and the linears keep PyTorch's kernels.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

import torch

logger = logging.getLogger("inhouse.kernels")

_HERE = Path(__file__).parent
_SOURCES = [_HERE / "quant_cpu.cpp", _HERE / "decode_cpu.cpp"]
_HEADERS = [_HERE / "quant_cpu.h"]
_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "f16c", "fma")
_CFLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mavx512bf16", "-mf16c", "-mfma", "-fopenmp"]
_state: Optional[bool] = None


def kernel_cache_dir() -> Path:
    """Where built kernels are kept between runs."""
    env = os.environ.get("INHOUSE_KERNEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "inhouse" / "kernels"


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _why_not() -> Optional[str]:
    if os.environ.get("INHOUSE_NATIVE_KERNELS", "1") == "0":
        return "INHOUSE_NATIVE_KERNELS=0"
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"no native kernel for {sys.platform}/{platform.machine()}"
    missing = [f for f in _CPU_FLAGS if f not in _cpu_flags()]
    if missing:
        return "the CPU lacks " + ", ".join(missing)
    if not torch.backends.openmp.is_available():
        return "this PyTorch build has no OpenMP"
    return None


def _build_name() -> str:
    h = hashlib.sha256()
    for f in _SOURCES + _HEADERS:
        h.update(f.read_bytes())
    h.update(f"{torch.__version__}|{sys.version_info[:2]}|{' '.join(_CFLAGS)}".encode())
    return "inhouse_quant_cpu_" + h.hexdigest()[:12]


def native_kernels_available() -> bool:
    """Whether ``torch.ops.inhouse.int4_mm`` can be used here (builds and loads it the first time)."""
    global _state
    if _state is not None:
        return _state
    reason = _why_not()
    if reason is not None:
        logger.info("native CPU kernels not used (%s): PyTorch's kernels instead", reason)
    else:
        reason = _load()
        if reason is not None:  # the CPU could run them: say it loudly, decode is ~2x slower without
            logger.warning("native CPU kernels unavailable (%s): PyTorch's slower kernels instead", reason)
    _state = reason is None
    return _state


def _load() -> Optional[str]:
    name = _build_name()
    build_dir = kernel_cache_dir() / name
    lib = build_dir / f"{name}.so"
    try:
        if not lib.exists():
            from torch.utils import cpp_extension

            # built (and loaded) in a directory of its own, then moved into place: another
            # process never loads a half-written library
            work = build_dir / f"build-{os.getpid()}"
            work.mkdir(parents=True, exist_ok=True)
            logger.warning("building the native CPU kernels once (about 10 s; kept in %s)", build_dir)
            t = time.perf_counter()
            cpp_extension.load(name=name, sources=[str(f) for f in _SOURCES], extra_cflags=_CFLAGS,
                               extra_ldflags=["-fopenmp"], build_directory=str(work),
                               is_python_module=False, verbose=False)
            os.replace(work / f"{name}.so", lib)
            shutil.rmtree(work, ignore_errors=True)
            logger.info("native CPU kernels built in %.1f s", time.perf_counter() - t)
        else:
            torch.ops.load_library(str(lib))
    except Exception as e:  # a missing compiler or a failed build: keep PyTorch's kernels
        return f"build failed: {str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__}"
    if not all(hasattr(torch.ops.inhouse, op) for op in ("int4_mm", "int8_mm", "int4_dequantize")):
        return "the built library did not register inhouse::int4_mm, int8_mm and int4_dequantize"
    try:
        torch.classes.inhouse.FusedDecoder
    except (AttributeError, RuntimeError):
        return "the built library did not register inhouse.FusedDecoder"
    _register_fake()
    return None


def _register_fake() -> None:
    """Shapes for torch.compile: (M, K) x (N, ...) -> (M, N) in x's dtype."""
    @torch.library.register_fake("inhouse::int4_mm")
    def _(x, w, steps, mins):
        return x.new_empty((x.shape[0], w.shape[0]))

    @torch.library.register_fake("inhouse::int8_mm")
    def _(x, w, row_scales):
        return x.new_empty((x.shape[0], w.shape[0]))

    @torch.library.register_fake("inhouse::int4_dequantize")
    def _(w, steps, mins):
        return w.new_empty((w.shape[0], w.shape[1] * 2), dtype=torch.bfloat16)
