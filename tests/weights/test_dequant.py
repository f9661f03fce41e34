"""Our vectorized dequantization against the gguf package's reference (gguf.quants.dequantize).

Tolerance: none. Our kernels do the float32 arithmetic in the same order as the reference, so
every comparison is bit-exact (compared as raw float32 bit patterns; NaN only in the plain-float
types, where NaN positions must match).
"""

from __future__ import annotations

import warnings

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from inhouse.weights.quants import GGML_BLOCK_SIZES, GGML_TYPE_NAMES, SUPPORTED_TYPES, dequantize

Q = gguf.GGMLQuantizationType

# Byte offsets of the fp16 scale fields inside one block, per type (ggml block structs).
FP16_FIELDS = {
    Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q5_0: [0], Q.Q5_1: [0, 2], Q.Q8_0: [0],
    Q.Q2_K: [80, 82], Q.Q3_K: [108], Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208],
}
QUANTIZED = list(FP16_FIELDS)
# 1 block, a few, and enough to cross the 2**18-value chunk boundary inside dequantize.
BLOCK_COUNTS = [1, 3, 37, 8195]


def _bits_equal(ours: torch.Tensor, ref: np.ndarray) -> None:
    a = ours.numpy().reshape(-1)
    b = np.asarray(ref, dtype=np.float32).reshape(-1)
    assert a.shape == b.shape
    nan_a, nan_b = np.isnan(a), np.isnan(b)
    np.testing.assert_array_equal(nan_a, nan_b)
    ok = ~nan_a
    mismatch = np.flatnonzero(a[ok].view(np.uint32) != b[ok].view(np.uint32))
    assert mismatch.size == 0, f"{mismatch.size} values differ, first at {mismatch[0]}: {a[ok][mismatch[0]]} vs {b[ok][mismatch[0]]}"


def _random_blocks(qtype: Q, n_blocks: int, seed: int) -> np.ndarray:
    """Random bytes per block, with every fp16 scale replaced by a finite value of either sign."""
    rng = np.random.default_rng(seed)
    _, type_size = GGML_BLOCK_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for at in FP16_FIELDS[qtype]:
        scale = (rng.standard_normal((n_blocks, 1)) * 0.05).astype(np.float16)
        blocks[:, at : at + 2] = scale.view(np.uint8)
    return blocks.reshape(-1)


def test_supported_types_cover_the_brief():
    names = set(SUPPORTED_TYPES.values())
    assert {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"} <= names
    assert {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K"} <= names
    for type_id, name in SUPPORTED_TYPES.items():
        assert Q(type_id).name == name


def test_type_tables_match_ggml():
    for type_id, name in GGML_TYPE_NAMES.items():
        assert Q(type_id).name == name
        assert GGML_BLOCK_SIZES[type_id] == gguf.GGML_QUANT_SIZES[Q(type_id)]
    assert set(GGML_BLOCK_SIZES) == {int(t) for t in gguf.GGML_QUANT_SIZES}


@pytest.mark.parametrize("n_blocks", BLOCK_COUNTS)
@pytest.mark.parametrize("qtype", QUANTIZED, ids=lambda t: t.name)
def test_random_blocks_match_gguf(qtype, n_blocks):
    raw = _random_blocks(qtype, n_blocks, seed=int(qtype) * 1000 + n_blocks)
    block_size, _ = GGML_BLOCK_SIZES[qtype]
    ours = dequantize(raw, int(qtype), n_blocks * block_size)
    assert ours.dtype == torch.float32 and ours.shape == (n_blocks * block_size,)
    assert ours.abs().max() > 0  # the random blocks really decode to something
    _bits_equal(ours, gguf_dequantize(raw, qtype))


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0], ids=lambda t: t.name)
def test_gguf_quantized_data_matches_gguf(qtype):
    rng = np.random.default_rng(int(qtype))
    values = rng.standard_normal((7, 96)).astype(np.float32)
    raw = gguf_quantize(values, qtype).reshape(-1)
    ours = dequantize(raw, int(qtype), values.size)
    _bits_equal(ours, gguf_dequantize(raw, qtype))
    # ...and it is a reasonable approximation of what was quantized (catches a shared mistake).
    assert torch.allclose(ours.view(7, 96), torch.from_numpy(values), atol=0.5)


def _special_floats() -> np.ndarray:
    return np.array([0.0, -0.0, 1.0, -2.5, np.inf, -np.inf, np.nan, 1e-40, 3.0e38, 65504.0, 6e-8], np.float32)


def test_f32_f16_bf16_match_gguf():
    rng = np.random.default_rng(1)
    values = np.concatenate([_special_floats(), rng.standard_normal(1000).astype(np.float32)])

    raw32 = values.view(np.uint8)
    _bits_equal(dequantize(raw32, 0, values.size), gguf_dequantize(raw32, Q.F32))

    with np.errstate(over="ignore"):  # 3e38 -> inf in float16, on purpose
        raw16 = values.astype(np.float16).view(np.uint8)
    _bits_equal(dequantize(raw16, 1, values.size), gguf_dequantize(raw16, Q.F16))

    raw_bf16 = gguf_quantize(values, Q.BF16).reshape(-1)
    ours = dequantize(raw_bf16, 30, values.size)
    _bits_equal(ours, gguf_dequantize(raw_bf16, Q.BF16))
    # BF16 keeps the top 16 bits of float32 (round to nearest even): check against torch too.
    finite = np.isfinite(values)
    expected = torch.from_numpy(values).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(ours.numpy()[finite], expected[finite])


def _q8_k_reference(raw: np.ndarray) -> np.ndarray:
    # gguf has no Q8_K dequantizer: block_q8_K is {float d; int8 qs[256]; int16 bsums[16]}, y = d * q.
    blocks = raw.reshape(-1, 292)
    d = blocks[:, :4].copy().view(np.float32)  # (n, 1)
    q = blocks[:, 4:260].view(np.int8).astype(np.float32)  # (n, 256)
    return (q * d).reshape(-1)


@pytest.mark.parametrize("n_blocks", BLOCK_COUNTS)
def test_q8_k_matches_reference_formula(n_blocks):
    rng = np.random.default_rng(n_blocks)
    blocks = rng.integers(0, 256, size=(n_blocks, 292), dtype=np.uint8)
    blocks[:, :4] = rng.standard_normal((n_blocks, 1)).astype(np.float32).view(np.uint8)
    raw = blocks.reshape(-1)
    _bits_equal(dequantize(raw, 15, n_blocks * 256), _q8_k_reference(raw))


def test_hand_made_q4_0_block():
    # d = 0.5; qs[j] = j | (15 - j) << 4 -> value j = (j - 8) * 0.5, value 16 + j = (7 - j) * 0.5
    qs = np.array([j | ((15 - j) << 4) for j in range(16)], dtype=np.uint8)
    raw = np.concatenate([np.array([0.5], np.float16).view(np.uint8), qs])
    expected = [(j - 8) * 0.5 for j in range(16)] + [(7 - j) * 0.5 for j in range(16)]
    assert dequantize(raw, 2, 32).tolist() == expected


def test_read_only_input_is_not_modified_and_warns_nothing():
    raw = _random_blocks(Q.Q4_K, 4, seed=5)
    before = raw.copy()
    raw.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = dequantize(raw, int(Q.Q4_K), 4 * 256)
    np.testing.assert_array_equal(raw, before)
    _bits_equal(ours, gguf_dequantize(before, Q.Q4_K))


def test_zero_elements():
    assert dequantize(np.zeros(0, np.uint8), int(Q.Q6_K), 0).shape == (0,)


def test_errors():
    raw = np.zeros(18, np.uint8)
    with pytest.raises(ValueError, match=r"unsupported ggml type IQ2_XXS \(16\)"):
        dequantize(np.zeros(66, np.uint8), 16, 256)
    with pytest.raises(ValueError, match=r"unsupported ggml type type 99 \(99\)"):
        dequantize(raw, 99, 32)
    with pytest.raises(ValueError, match="not a whole number of Q4_0 blocks of 32"):
        dequantize(raw, 2, 31)
    with pytest.raises(ValueError, match="64 Q4_0 values need 36 bytes, got 18"):
        dequantize(raw, 2, 64)
    with pytest.raises(ValueError, match="1-D uint8"):
        dequantize(raw.view(np.int8), 2, 32)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1], ids=lambda t: t.name)
def test_q4_codes_are_the_dequantized_values_exactly(qtype):
    """A 4-bit GGUF matrix handed to Int4Linear as its codes: code * step + min is gguf's value exactly
    (equal as numbers: Q4_0's zero, 8 * d - 8 * d, is +0 where gguf's (8 - 8) * d may be -0)."""
    from inhouse.kernels import native_kernels_available
    from inhouse.model.quant import Int4Codes, Int4Linear
    from inhouse.weights.quants import q4_codes

    rows, cols = 32, 128  # PyTorch's int4 layout needs rows in multiples of 16
    raw = _random_blocks(qtype, rows * cols // 32, seed=int(qtype) + 7)
    ref = torch.from_numpy(np.asarray(gguf_dequantize(raw, qtype), dtype=np.float32)).view(rows, cols)
    codes, steps, mins = q4_codes(raw, int(qtype), rows, cols)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15 and steps.dtype == mins.dtype == torch.float16
    assert torch.equal(Int4Codes(codes, steps, mins).dense(), ref)
    for native in (False, True) if native_kernels_available() else (False,):
        lin = Int4Linear.from_codes(Int4Codes(codes, steps, mins), native=native)
        assert torch.equal(lin.dequantized(torch.float32), ref), native
    with pytest.raises(ValueError, match="do not match"):
        q4_codes(raw[:-1], int(qtype), rows, cols)


def test_q8_codes_are_the_dequantized_values_exactly():
    """A Q8_0 GGUF matrix handed to Int8Linear as its codes: code * step is gguf's value exactly,
    through the group form's dequantization, its rows and the embedding that shares them."""
    from inhouse.kernels import native_kernels_available
    from inhouse.model.quant import Int8Codes, Int8Embedding, Int8Linear
    from inhouse.weights.quants import q8_codes

    rows, cols = 48, 192
    raw = _random_blocks(Q.Q8_0, rows * cols // 32, seed=11)
    ref = torch.from_numpy(np.asarray(gguf_dequantize(raw, Q.Q8_0), dtype=np.float32)).view(rows, cols)
    codes, steps = q8_codes(raw, rows, cols)
    assert codes.dtype == torch.int8 and steps.dtype == torch.float16 and steps.shape == (rows, cols // 32)
    assert torch.equal(Int8Codes(codes, steps).dense(), ref)
    if native_kernels_available():
        lin = Int8Linear.from_codes(Int8Codes(codes, steps))
        assert lin.groups and lin.native
        assert torch.equal(lin.dequantized(torch.float32), ref)
        idx = torch.tensor([3, 0, 47, 3])
        assert torch.equal(lin.dequantized_rows(idx), ref[idx])
        assert torch.equal(Int8Embedding.from_linear(lin, torch.bfloat16)(idx.view(2, 2)), ref[idx].view(2, 2, cols))
    with pytest.raises(ValueError, match="do not match"):
        q8_codes(raw[:-1], rows, cols)
