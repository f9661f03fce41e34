"""The native int4/int8 CPU kernels (inhouse/kernels/quant_cpu.cpp) against float64 references.

On this machine kind (x86-64 with AVX-512 VNNI or AVX2) the kernels must build and load: a failed
build would silently fall back to PyTorch's kernels, so availability itself is asserted here. On an
AVX-512 CPU the AVX2 build is tested too (`test_the_avx2_build_passes_these_tests_too`).
"""

import pytest
import torch

from inhouse.kernels import cpu_isa, native_kernels_available
from inhouse.model.native_layout import native_order
from inhouse.model.quant import Int4Codes, Int4Linear, Int8Linear

pytestmark = pytest.mark.skipif(cpu_isa() is None, reason="the native kernels need AVX-512 VNNI or AVX2")


def spec_order(k: int, lanes: int = 0) -> list[int]:
    """The kernels' column order as inhouse/kernels/quant_cpu.h describes it, written out by hand:
    groups of 32 in blocks of `lanes` (16 on AVX-512, 8 on AVX2: this CPU's by default), the rest in
    blocks of lanes/2, lanes/4, ... 2; block chunk c holds columns w*c .. w*c + w-1 of each of its P
    groups, w = 32 / P."""
    lanes = lanes or (16 if cpu_isa() == "avx512" else 8)
    order, g, G = [], 0, k // 32
    while g < G:
        P = lanes
        while P > G - g:
            P //= 2
        w = 32 // P
        for c in range(P):
            for group in range(g, g + P):
                order += [32 * group + w * c + i for i in range(w)]
        g += P
    return order


@pytest.mark.parametrize("lanes", [16, 8])
@pytest.mark.parametrize("k", [64, 128, 192, 576, 960, 1536])
def test_native_order_is_the_documented_one(k, lanes):
    order, inverse = native_order(k, lanes)
    assert order.tolist() == spec_order(k, lanes)
    assert torch.equal(order[inverse], torch.arange(k))


def test_blocks_are_as_wide_as_the_instruction_set():
    # 576 columns = 18 groups: a block of 16 and one of 2 (AVX-512), or two of 8 and one of 2 (AVX2)
    assert spec_order(576, 16)[:4] == [0, 1, 32, 33] and spec_order(576, 16)[512:516] == [512, 513, 514, 515]
    assert spec_order(576, 8)[:6] == [0, 1, 2, 3, 32, 33]
    assert native_order(576)[0].tolist() == spec_order(576)


def tile_rows() -> int:
    return 16 if cpu_isa() == "avx512" else 8


def pack_int4(codes, steps, mins):
    """(N, K) codes with (N, K/32) steps/mins -> the kernel's row tiles as inhouse/kernels/quant_cpu.h
    describes them, written out element by element: tiles of L rows (16 on AVX-512, 8 on AVX2, N
    padded with zero rows); tile t, group g is 8 units of 2L bytes at (t * G + g) * 16L, byte 2i + h of
    unit u holding row i's code of column 2u + h (low nibble) and of column 16 + 2u + h (high
    nibble); steps and mins at (t * G + g) * L + i."""
    L = tile_rows()
    n, k = codes.shape
    G, T = k // 32, -(-n // L)
    w = torch.zeros(T * L * k // 2, dtype=torch.uint8)
    st = torch.zeros(T * L * G, dtype=torch.float16)
    mn = torch.zeros(T * L * G, dtype=torch.float16)
    c = codes.tolist()
    for row in range(n):
        t, i = divmod(row, L)
        for g in range(G):
            base = (t * G + g) * 16 * L
            for u in range(8):
                for h in range(2):
                    w[base + u * 2 * L + 2 * i + h] = c[row][32 * g + 2 * u + h] | (c[row][32 * g + 16 + 2 * u + h] << 4)
            st[(t * G + g) * L + i] = steps[row, g]
            mn[(t * G + g) * L + i] = mins[row, g]
    return w.view(T * L, k // 2), st.view(T * L, G), mn.view(T * L, G)


def pack_int8(codes, steps):
    """(N, K) int8 codes with (N, K/32) steps -> the kernel's int8 row tiles as quant_cpu.h describes
    them, element by element: tiles of L rows (N padded with zero rows); tile t, group g is 8 units
    of 4L bytes at (t * G + g) * 32L, byte 2i + j of unit u holding row i's code of column 2u + j and
    byte 2L + 2i + j its code of column 16 + 2u + j; steps at (t * G + g) * L + i."""
    L = tile_rows()
    n, k = codes.shape
    G, T = k // 32, -(-n // L)
    w = torch.zeros(T * L * k, dtype=torch.int8)
    st = torch.zeros(T * L * G, dtype=torch.float16)
    c = codes.tolist()
    for row in range(n):
        t, i = divmod(row, L)
        for g in range(G):
            base = (t * G + g) * 32 * L
            for u in range(8):
                for j in range(2):
                    w[base + u * 4 * L + 2 * i + j] = c[row][32 * g + 2 * u + j]
                    w[base + u * 4 * L + 2 * L + 2 * i + j] = c[row][32 * g + 16 + 2 * u + j]
            st[(t * G + g) * L + i] = steps[row, g]
    return w.view(T * L, k), st.view(T * L, G)


def test_int8_group_linear_stores_the_documented_layout():
    from inhouse.model.quant import Int8Codes, Int8Embedding

    g = torch.Generator().manual_seed(4)
    codes = torch.randint(-127, 128, (40, 192), generator=g, dtype=torch.int8)
    steps = torch.rand(40, 6, generator=g).half()
    lin = Int8Linear.from_codes(Int8Codes(codes, steps))
    w, st = pack_int8(codes, steps)
    assert torch.equal(lin.weight_int8, w) and torch.equal(lin.scales, st)
    ref = (codes.float().view(40, 6, 32) * steps.float()[..., None]).view(40, 192)
    idx = torch.tensor([39, 0, 17, 16, 5])
    assert torch.equal(lin.dequantized_rows(idx), ref[idx])  # and back, exactly
    assert torch.equal(lin.dequantized(torch.float32), ref)
    assert torch.equal(Int8Embedding.from_linear(lin, torch.float32)(idx), ref[idx])


def int4_case(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    steps = (torch.rand(n, k // 32, generator=g) * 0.01 + 0.001).half()
    mins = (-torch.rand(n, k // 32, generator=g) * 0.08).half()
    w = (codes.double().view(n, -1, 32) * steps.double()[..., None] + mins.double()[..., None]).view(n, k)
    return (*pack_int4(codes, steps, mins), w)


def test_int4_linear_stores_the_documented_layout():
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 16, (40, 192), generator=g, dtype=torch.uint8)
    steps, mins = torch.rand(40, 6, generator=g).half(), -torch.rand(40, 6, generator=g).half()
    lin = Int4Linear.from_codes(Int4Codes(codes, steps, mins), native=True)
    w, st, mn = pack_int4(codes, steps, mins)
    assert torch.equal(lin.weight_q4, w) and torch.equal(lin.steps, st) and torch.equal(lin.mins, mn)
    assert torch.equal(lin.codes(), codes)  # and back


def test_kernels_build_and_load_here():
    assert native_kernels_available()
    assert hasattr(torch.ops.inhouse, "int4_mm") and hasattr(torch.ops.inhouse, "int8_mm")


@pytest.mark.parametrize("n,k", [(200, 64), (576, 576), (96, 1536), (40, 192)])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8])  # every row-block size of the kernel (4, 3, 2, 1)
def test_int4_mm_matches_float64(n, k, m):
    assert native_kernels_available()
    w_packed, steps, mins, w = int4_case(n, k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1))
    ref = x.double() @ w.T
    y = torch.ops.inhouse.int4_mm(x, w_packed, steps, mins, n)
    assert y.dtype == torch.float32 and y.shape == (m, n)
    # int16 activations per group of 32: ~1e-5 relative (int8 activations were ~5e-3)
    assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-4
    # each row is what it is alone, bit for bit (the server batches rows of different requests)
    for i in range(m):
        assert torch.equal(torch.ops.inhouse.int4_mm(x[i:i + 1], w_packed, steps, mins, n)[0], y[i])


@pytest.mark.parametrize("m", [1, 3, 8])
def test_int8_mm_matches_float64(m):
    assert native_kernels_available()
    g = torch.Generator().manual_seed(2)
    q = torch.randint(-127, 128, (300, 576), generator=g, dtype=torch.int8)
    scales = torch.rand(300, generator=g) * 0.01 + 1e-3
    x = torch.randn(m, 576, generator=g)
    ref = x.double() @ (q.double() * scales.double()[:, None]).T
    q = q[:, spec_order(576)].contiguous()  # the kernel's column order
    y = torch.ops.inhouse.int8_mm(x, q, scales)
    assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-4
    for i in range(m):
        assert torch.equal(torch.ops.inhouse.int8_mm(x[i:i + 1], q, scales)[0], y[i])


@pytest.mark.parametrize("n,k", [(300, 576), (40, 192), (64, 1536)])
@pytest.mark.parametrize("m", [1, 2, 3, 8])
def test_int8_mm_with_group_steps_matches_float64(n, k, m):
    """int8 with one fp16 step per group of 32 (a GGUF Q8_0 matrix as it is)."""
    assert native_kernels_available()
    g = torch.Generator().manual_seed(5)
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    steps = (torch.rand(n, k // 32, generator=g) * 0.01 + 1e-3).half()
    x = torch.randn(m, k, generator=g)
    ref = x.double() @ (q.double().view(n, -1, 32) * steps.double()[..., None]).view(n, k).T
    q, st = pack_int8(q, steps)  # the kernel's row tiles
    y = torch.ops.inhouse.int8_mm(x, q, st, n)
    assert y.shape == (m, n)
    assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-4
    for i in range(m):
        assert torch.equal(torch.ops.inhouse.int8_mm(x[i:i + 1], q, st, n)[0], y[i])
    # a step per group that the kernel misplaced would show: scale one group's steps
    st2 = pack_int8(torch.zeros(n, k, dtype=torch.int8), steps * torch.tensor([1.0, 4.0] + [1.0] * (k // 32 - 2)).half())[1]
    assert not torch.allclose(torch.ops.inhouse.int8_mm(x, q, st2, n), y)
    with pytest.raises(RuntimeError, match=r"fp16 \(N, K/32\) in row tiles"):
        torch.ops.inhouse.int8_mm(x, q, st[:, :-1].contiguous(), n)
    with pytest.raises(RuntimeError, match="rounded up to whole tiles"):
        torch.ops.inhouse.int8_mm(x, q, st, n + 16)


def test_bf16_rows_come_back_bf16_and_bad_shapes_are_named():
    w_packed, steps, mins, w = int4_case(64, 128)
    x = torch.randn(2, 128).to(torch.bfloat16)
    y = torch.ops.inhouse.int4_mm(x, w_packed, steps, mins)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), x.double() @ w.T, rtol=2e-2, atol=2e-2)
    with pytest.raises(RuntimeError, match=r"x must be \(M, 128\)"):
        torch.ops.inhouse.int4_mm(torch.randn(2, 64), w_packed, steps, mins)
    with pytest.raises(RuntimeError, match="multiple of 64"):
        torch.ops.inhouse.int8_mm(torch.randn(1, 96), torch.zeros(4, 96, dtype=torch.int8), torch.ones(4))


@pytest.mark.parametrize("cls", [Int4Linear, Int8Linear])
def test_native_and_torch_layouts_agree(cls):
    """Same matrix, both storage layouts: the same dequantized weights, outputs within bf16 rounding."""
    w = torch.randn(320, 576, generator=torch.Generator().manual_seed(3)) * 0.05
    native, torch_path = cls.from_weight(w, native=True), cls.from_weight(w, native=False)
    assert native.native and not torch_path.native
    torch.testing.assert_close(native.dequantized(torch.float32), torch_path.dequantized(torch.float32),
                               rtol=0, atol=float(w.abs().max()) * 2 ** -8)  # bf16 vs fp16/fp32 scales
    x = torch.randn(5, 576, generator=torch.Generator().manual_seed(4))
    ref = x.double() @ native.dequantized(torch.float32).double().T
    out = native(x)
    assert out.dtype == torch.float32
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-4  # native: int16 activations, fp32 out
    assert ((torch_path(x).double() - ref).norm() / ref.norm()).item() < 2e-2  # bf16 activations


def test_compiled_graph_calls_the_kernel_without_a_break():
    lin = Int4Linear.from_weight(torch.randn(128, 256, generator=torch.Generator().manual_seed(5)), native=True)
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(6))
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: lin(torch.nn.functional.silu(t)) * 2, fullgraph=True, dynamic=True)
    torch.testing.assert_close(compiled(x), lin(torch.nn.functional.silu(x)) * 2, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


def test_int4_dequantize_equals_the_torch_ops_it_replaces():
    """Prompt chunks multiply by this matrix: the same bits as fp32 dequantization (rounded once to bf16)."""
    from inhouse.kernels import cpu_has_fast_bf16
    from inhouse.model.quant import chunk_dtype

    lin = Int4Linear.from_weight(torch.randn(200, 576, generator=torch.Generator().manual_seed(7)), native=True)
    w = torch.ops.inhouse.int4_dequantize(lin.weight_q4, lin.steps, lin.mins, n=lin.out_features)
    assert w.dtype == torch.bfloat16 and torch.equal(w, lin.dequantized(torch.float32).to(torch.bfloat16))
    w32 = torch.ops.inhouse.int4_dequantize(lin.weight_q4, lin.steps, lin.mins, True, lin.out_features)
    assert w32.dtype == torch.float32 and torch.equal(w32, lin.dequantized(torch.float32))
    # bf16 where the CPU multiplies it in hardware; elsewhere fp32, ~6x faster than emulated bf16
    assert chunk_dtype() == (torch.bfloat16 if cpu_has_fast_bf16() else torch.float32)
    x = torch.randn(100, 576, generator=torch.Generator().manual_seed(8))  # > SMALL_BATCH rows: this path
    wc = w if chunk_dtype() == torch.bfloat16 else w32
    torch.testing.assert_close(lin(x), torch.nn.functional.linear(x.to(chunk_dtype()), wc).float())


AVX512_FLAGS = {"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx2", "f16c", "fma", "sse4_2"}


@pytest.mark.parametrize("flags,wanted,isa", [
    (AVX512_FLAGS, None, "avx512"),
    (AVX512_FLAGS, "avx2", "avx2"),                       # asked for: the AVX2 build on an AVX-512 CPU
    (AVX512_FLAGS - {"avx512_bf16"}, None, "avx2"),       # e.g. Intel Ice Lake: VNNI without BF16
    ({"avx2", "f16c", "fma"}, None, "avx2"),              # e.g. AMD Zen 3
    ({"avx2", "f16c", "fma"}, "avx512", None),            # asked for one the CPU lacks: none
    ({"avx", "sse4_2", "f16c"}, None, None),              # no AVX2: PyTorch's kernels
])
def test_instruction_set_choice(monkeypatch, flags, wanted, isa):
    if wanted is None:
        monkeypatch.delenv("INHOUSE_NATIVE_ISA", raising=False)
    else:
        monkeypatch.setenv("INHOUSE_NATIVE_ISA", wanted)
    assert cpu_isa(flags) == isa


def passes_in_a_fresh_process(env: dict, select: str) -> None:
    """The tests here and the fused decode step's that `select` (-k) picks, in a fresh process with
    `env` added (one kernel build per process): all pass, none skipped."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    tests = Path(__file__).parent
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests / "test_native_kernels.py"),
                        str(tests / "test_fused_decode.py"), "-k", select],
                       env=dict(os.environ, **env), capture_output=True, text=True, timeout=1200, cwd=tests.parent.parent)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and " skipped" not in r.stdout.splitlines()[-1]


@pytest.mark.skipif(cpu_isa() != "avx512", reason="on this CPU the AVX2 build is the one every other test here runs")
def test_the_avx2_build_passes_these_tests_too():
    """The AVX2 build of the same sources, on an AVX-512 CPU."""
    passes_in_a_fresh_process({"INHOUSE_NATIVE_ISA": "avx2"}, "not avx2_build_passes and not emulated")


def test_the_loaded_build_is_the_cpus():
    from inhouse.kernels import native_isa

    assert native_kernels_available() and native_isa() == cpu_isa()


@pytest.mark.parametrize("cls", [Int4Linear, Int8Linear])
def test_decode_rows_always_take_the_row_kernels(cls):
    """Many sequences decoding together (x (B, 1, K), B past small_batch) still get their rows
    computed alone; a prompt chunk of as many tokens takes the dense matmul."""
    from inhouse.model.quant import small_batch

    lin = cls.from_weight(torch.randn(96, 576, generator=torch.Generator().manual_seed(10)), native=True)
    B = small_batch(True) + 36
    x = torch.randn(B, 1, 576, generator=torch.Generator().manual_seed(11))
    rows = lin(x)[:, 0]
    for i in (0, B // 2, B - 1):
        assert torch.equal(rows[i], lin(x[i:i + 1])[0, 0])
    chunk = lin(x.view(1, B, 576))[0]  # one sequence's B-token prompt chunk
    assert not torch.equal(chunk, rows)  # another kernel, another rounding
    torch.testing.assert_close(chunk, rows, rtol=2e-2, atol=2e-2 * rows.abs().max().item())


def amx_expected() -> bool:
    """Whether the kernels here have AMX passes: an AVX-512 build on a CPU with AMX-INT8, or one with
    the tile instructions emulated (INHOUSE_NATIVE_AMX=emulate, `test_the_amx_kernels_pass_emulated`)."""
    import os

    from inhouse.kernels import _AMX, _cpu_flags

    if cpu_isa() != "avx512" or os.environ.get("INHOUSE_NATIVE_AMX") == "0":
        return False
    return os.environ.get("INHOUSE_NATIVE_AMX") == "emulate" or all(f in _cpu_flags() for f in _AMX[0])


@pytest.mark.parametrize("kind", ["int4", "int8 group steps"])
def test_amx_passes_are_the_vector_kernels_results_bit_for_bit(kind):
    """With AMX-INT8 (an AVX-512 build on a CPU that has it), row-tile passes of 4+ activation rows
    run on tiles (inhouse/kernels/amx.h): exactly row_tile's numbers, whatever the rows (outliers,
    sizes that leave a partial pass or a padded weight tile), so batches still equal rows alone."""
    from inhouse.kernels import amx_passes
    from inhouse.model.quant import Int8Codes

    expected = amx_expected()
    assert amx_passes() == expected
    g = torch.Generator().manual_seed(11)
    try:
        for n, k in ((320, 128), (1536, 576), (576, 1536), (100, 64)):
            if kind == "int4":
                lin = Int4Linear.from_weight(torch.randn(n, k, generator=g))
            else:
                codes = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
                lin = Int8Linear.from_codes(Int8Codes(codes, (torch.rand(n, k // 32, generator=g) * 0.01).half()))
            for m in (4, 5, 8, 11, 16):
                outliers = torch.where(torch.rand(k, generator=g) < 0.02, 40.0, 1.0)
                x = torch.randn(m, 1, k, generator=g) * outliers
                assert amx_passes(True) == expected
                tiles = lin(x)
                assert not amx_passes(False)
                vector = lin(x)
                assert torch.equal(tiles, vector), (n, k, m)
                assert torch.equal(tiles, torch.cat([lin(x[i:i + 1]) for i in range(m)])), (n, k, m)
                ref = x.reshape(m, k).double() @ lin.dequantized(torch.float32).double().T
                assert (vector.reshape(m, n).double() - ref).abs().max() < 1e-3 * ref.abs().max()  # int16 activations
    finally:
        amx_passes(True)


@pytest.mark.skipif(cpu_isa() != "avx512", reason="the AMX kernels are part of the AVX-512 build only")
def test_the_amx_kernels_pass_emulated():
    """The AMX passes on any AVX-512 CPU: a build with the tile instructions in scalar code
    (INHOUSE_NATIVE_AMX=emulate, inhouse/kernels/amx_emulate.h) in a fresh process, through the
    tests above and the fused decode step's: the tile layouts are checked bit for bit even where
    the CPU has no AMX."""
    passes_in_a_fresh_process({"INHOUSE_NATIVE_AMX": "emulate"}, "amx and not emulated")
