"""Native CPU kernels, compiled on first use with the machine's C++ compiler and cached on disk.

quant_cpu.cpp holds the decode-time matmuls of `inhouse.model.quant.Int4Linear` and
`Int8Linear` (``torch.ops.inhouse.int4_mm``, ``int8_mm``:
4-bit or 8-bit weights times activations quantized to int16 per group of 32, reading the weights
at close to memory bandwidth, where PyTorch's int4 kernel reaches about half of it) and
``int4_dequantize`` (the bf16 matrix for prompt chunks); decode_cpu.cpp holds
``torch.classes.inhouse.FusedDecoder``, a quantized model's whole decode step in one call
(`inhouse.model.fused_decode`). Both share the row kernels of quant_cpu.h, written in the vector
operations of simd.h, which compile for two instruction sets: AVX-512 (F, BW, VL, VNNI, BF16:
recent Intel Xeons, AMD Zen 4 and later) and AVX2 with FMA and F16C (AMD Zen 2/3, most other
x86-64 CPUs of the last decade). `native_isa` says which one this CPU gets;
``INHOUSE_NATIVE_ISA=avx2`` asks for the AVX2 build on an AVX-512 CPU (to test it there). Where the
CPU also has AMX-INT8 (Intel Sapphire Rapids and later), the AVX-512 build adds amx.h: the
row-tile kernel (4-bit weights, int8 with group steps) on tile registers for batches of 4 or more
rows, with exactly the vector kernel's results (`amx_passes`; ``INHOUSE_NATIVE_AMX=0`` builds
without it; ``INHOUSE_NATIVE_AMX=emulate`` builds it on any AVX-512 CPU with the tile instructions
in scalar code, amx_emulate.h, for the tests).

The library is built once per source/PyTorch/Python version into ``$INHOUSE_KERNEL_CACHE``
(default ``~/.cache/inhouse/kernels``; about 10 s on two cores) and loaded from there
afterwards. Where it cannot be used — another architecture, a CPU with neither instruction set, no
compiler, a failed build, or ``INHOUSE_NATIVE_KERNELS=0`` — `native_kernels_available` says False
once, with the reason in the log, and the linears keep PyTorch's kernels.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import AbstractSet, Optional

import torch

logger = logging.getLogger("inhouse.kernels")

_HERE = Path(__file__).parent
_SOURCES = [_HERE / "quant_cpu.cpp", _HERE / "decode_cpu.cpp"]
_HEADERS = [_HERE / "quant_cpu.h", _HERE / "simd.h", _HERE / "amx.h", _HERE / "amx_emulate.h"]
# Per instruction set (best first): the /proc/cpuinfo flags it needs and the compiler flags that select it in simd.h.
ISAS = {
    "avx512": (("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx2", "f16c", "fma"),
               ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mavx512bf16", "-mavx2", "-mf16c", "-mfma"]),
    "avx2": (("avx2", "f16c", "fma"), ["-mavx2", "-mf16c", "-mfma"]),
}
_BASE_CFLAGS = ["-O3", "-fopenmp"]
# Where the CPU also has AMX-INT8 (Intel Sapphire Rapids and later), the AVX-512 build adds the 4-bit
# kernel on tiles for passes of 4-8 activation rows (amx.h: the same results; batch-8 decode +11%, BENCHMARKS.md).
_AMX = (("amx_tile", "amx_int8"), ["-mamx-tile", "-mamx-int8"])
_state: Optional[bool] = None
_isa: Optional[str] = None
_amx_failed = False  # the compiler could not build the AMX kernel: build without it


def kernel_cache_dir() -> Path:
    """Where built kernels are kept between runs."""
    env = os.environ.get("INHOUSE_KERNEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "inhouse" / "kernels"


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AVX512-BF16 or AMX).

    Without it (AVX2 machines: AMD Zen 2/3, most Intel desktops), PyTorch emulates bf16 matmuls,
    about 6x slower than fp32 on two cores; prompt chunks and training then compute in fp32.
    """
    flags = _cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_isa(flags: Optional[AbstractSet[str]] = None) -> Optional[str]:
    """The best instruction set of `ISAS` the CPU has (``"avx512"``, ``"avx2"``), or None.

    ``INHOUSE_NATIVE_ISA`` names one to use instead (it must be one the CPU has).
    """
    flags = _cpu_flags() if flags is None else flags
    have = [isa for isa, (needs, _) in ISAS.items() if all(f in flags for f in needs)]
    wanted = os.environ.get("INHOUSE_NATIVE_ISA")
    if wanted:
        return wanted if wanted in have else None
    return have[0] if have else None


def native_kernels_possible() -> bool:
    """Whether this machine and configuration could use the native kernels (CPU, platform,
    settings), without building or loading them (`native_kernels_available` does that)."""
    return _why_not() is None


def _why_not() -> Optional[str]:
    if os.environ.get("INHOUSE_NATIVE_KERNELS", "1") == "0":
        return "INHOUSE_NATIVE_KERNELS=0"
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"no native kernel for {sys.platform}/{platform.machine()}"
    wanted = os.environ.get("INHOUSE_NATIVE_ISA")
    if wanted and wanted not in ISAS:
        return f"INHOUSE_NATIVE_ISA={wanted!r} is not one of {', '.join(ISAS)}"
    if cpu_isa() is None:
        if wanted:
            return f"INHOUSE_NATIVE_ISA={wanted}, but the CPU lacks " + ", ".join(f for f in ISAS[wanted][0] if f not in _cpu_flags())
        return "the CPU has neither AVX-512 VNNI/BF16 nor AVX2 with FMA and F16C"
    if not torch.backends.openmp.is_available():
        return "this PyTorch build has no OpenMP"
    return None


def _cflags(isa: str) -> list[str]:
    wanted = os.environ.get("INHOUSE_NATIVE_AMX", "1")
    if isa == "avx512" and wanted == "emulate":  # the tile instructions in scalar code (amx_emulate.h): tests only
        return _BASE_CFLAGS + ISAS[isa][1] + ["-DINHOUSE_AMX_EMULATE"]
    amx = isa == "avx512" and all(f in _cpu_flags() for f in _AMX[0]) and not _amx_failed and wanted != "0"
    return _BASE_CFLAGS + ISAS[isa][1] + (_AMX[1] if amx else [])


def _build_name(isa: str) -> str:
    h = hashlib.sha256()
    for f in _SOURCES + _HEADERS:
        h.update(f.read_bytes())
    h.update(f"{torch.__version__}|{sys.version_info[:2]}|{' '.join(_cflags(isa))}".encode())
    return f"inhouse_quant_cpu_{isa}_" + h.hexdigest()[:12]


def native_isa() -> Optional[str]:
    """The instruction set the loaded native kernels were built for, or None if they are not used."""
    return _isa if native_kernels_available() else None


def amx_passes(on: Optional[bool] = None) -> bool:
    """Whether the row-tile kernel computes passes of 4-8 activation rows on AMX tiles (results are the
    same bit for bit either way); `on` turns that off or on again first. False without the native
    kernels or without AMX (in the CPU, the build or what Linux grants the process)."""
    if not native_kernels_available():
        return False
    return bool(torch.ops.inhouse.use_amx(-1 if on is None else int(on)))


def native_kernels_available() -> bool:
    """Whether ``torch.ops.inhouse.int4_mm`` can be used here (builds and loads it the first time)."""
    global _state, _isa
    if _state is not None:
        return _state
    reason = _why_not()
    if reason is not None:
        logger.info("native CPU kernels not used (%s): PyTorch's kernels instead", reason)
    else:
        isa = cpu_isa()
        reason = _load(isa)
        if reason is not None and _AMX[1][0] in _cflags(isa):  # an older compiler: the build without AMX
            global _amx_failed
            logger.info("native CPU kernels: the AMX build failed (%s); building without it", reason)
            _amx_failed = True
            reason = _load(isa)
        if reason is not None:  # the CPU could run them: say it loudly, decode is several times slower without
            logger.warning("native CPU kernels unavailable (%s): PyTorch's slower kernels instead", reason)
        else:
            _isa = isa
            logger.debug("native CPU kernels loaded (%s)", isa)
    _state = reason is None
    return _state


def _load(isa: str) -> Optional[str]:
    name = _build_name(isa)
    build_dir = kernel_cache_dir() / name
    lib = build_dir / f"{name}.so"
    try:
        if not lib.exists():
            from torch.utils import cpp_extension

            # built (and loaded) in a directory of its own, then moved into place: another
            # process never loads a half-written library
            work = build_dir / f"build-{os.getpid()}"
            work.mkdir(parents=True, exist_ok=True)
            logger.warning("building the native CPU kernels (%s) once (10-40 s; kept in %s)", isa, build_dir)
            t = time.perf_counter()
            cpp_extension.load(name=name, sources=[str(f) for f in _SOURCES], extra_cflags=_cflags(isa),
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
    def _(x, w, steps, mins, n=-1):
        return x.new_empty((x.shape[0], w.shape[0] if n < 0 else n))

    @torch.library.register_fake("inhouse::int8_mm")
    def _(x, w, row_scales, n=-1):
        return x.new_empty((x.shape[0], w.shape[0] if n < 0 else n))

    @torch.library.register_fake("inhouse::int4_dequantize")
    def _(w, steps, mins, fp32=False, n=-1):
        return w.new_empty((w.shape[0] if n < 0 else n, w.shape[1] * 2), dtype=torch.float32 if fp32 else torch.bfloat16)
