"""Every bad checkpoint gives a WeightsError whose message names the file and the problem."""

import json
import os
import struct

import numpy as np
import pytest
import torch

from inhouse.weights import WeightsError, detect_format, inspect_checkpoint, load_model


@pytest.fixture()
def h(weights_helpers):
    return weights_helpers


@pytest.fixture()
def sd(h):
    return h.random_state_dict(h.TINY)


def _fails(path, *needles, load=True):
    """load_model (or inspect_checkpoint) raises WeightsError mentioning every needle."""
    with pytest.raises(WeightsError) as e:
        load_model(str(path)) if load else inspect_checkpoint(str(path))
    for needle in needles:
        assert str(needle) in str(e.value), (needle, str(e.value))
    return str(e.value)


def test_unknown_format(tmp_path):
    path = tmp_path / "weights.safetensors"  # the name lies; the contents decide
    path.write_bytes(b"hello, this is not a checkpoint" * 10)
    _fails(path, "weights.safetensors", "unknown checkpoint format")
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    _fails(empty_dir, "empty", "neither params.json")
    _fails(tmp_path / "nope.gguf", "nope.gguf", "no such file")


def test_safetensors_header_past_eof(tmp_path, h, sd):
    h.save_hf(str(tmp_path), h.to_hf(sd, h.TINY), h.hf_config(h.TINY))
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    path.write_bytes(data[: 8 + n // 2])
    assert detect_format(str(path)) == "hf"
    _fails(path, "model.safetensors", "truncated", f"header length {n}")


def test_safetensors_data_past_eof(tmp_path, h, sd):
    h.save_hf(str(tmp_path), h.to_hf(sd, h.TINY), h.hf_config(h.TINY))
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    _fails(tmp_path, "model.safetensors", "truncated", "past the end of the file")


def test_corrupt_gguf_header(tmp_path, h, sd):
    path = tmp_path / "model.gguf"
    h.save_gguf(str(path), sd, h.TINY)
    data = bytearray(path.read_bytes())
    data[8:16] = struct.pack("<Q", 1 << 40)  # absurd tensor count
    path.write_bytes(bytes(data))
    _fails(path, "model.gguf")
    path.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x01")  # cut inside the header
    _fails(path, "model.gguf")


def test_unsupported_gguf_quant_type(tmp_path, h, sd):
    import gguf

    path = tmp_path / "quant.gguf"
    # Q8_1 (40 bytes per 32 values; llama.cpp uses it for activations only): a type our
    # dequantizer does not handle. The writer takes the shape in bytes: (rows, bytes per row).
    byte_shape = (h.TINY.hidden_dim, h.TINY.dim // 32 * 40)
    raw = np.zeros(byte_shape, dtype=np.uint8)
    del sd["layers.1.feed_forward.w1.weight"]
    h.save_gguf(str(path), sd, h.TINY,
                extra_tensors={"blk.1.ffn_gate.weight": (raw, byte_shape, gguf.GGMLQuantizationType.Q8_1)})
    _fails(path, "quant.gguf", "Q8_1", "blk.1.ffn_gate.weight", "unsupported", load=False)


def test_missing_meta_shard(tmp_path, h, sd):
    h.save_meta(str(tmp_path), sd, h.PARAMS_JSON, n_shards=4)
    os.remove(tmp_path / "consolidated.02.pth")
    _fails(tmp_path, "consolidated.02.pth", "missing", "consolidated.03.pth")


def test_inconsistent_meta_shard_shapes(tmp_path, h, sd):
    h.save_meta(str(tmp_path), sd, h.PARAMS_JSON, n_shards=2)
    shard = torch.load(tmp_path / "consolidated.01.pth")
    shard["layers.0.attention.wo.weight"] = shard["layers.0.attention.wo.weight"][:-1]  # 63 rows, not 64
    torch.save(shard, tmp_path / "consolidated.01.pth")
    _fails(tmp_path, "consolidated.00.pth", "consolidated.01.pth", "layers.0.attention.wo.weight", "inconsistent")


def test_missing_tensor(tmp_path, h, sd):
    hf_sd = h.to_hf(sd, h.TINY)
    del hf_sd["model.layers.1.mlp.up_proj.weight"]
    h.save_hf(str(tmp_path), hf_sd, h.hf_config(h.TINY))
    _fails(tmp_path, str(tmp_path), "missing tensor", "layers.1.feed_forward.w3.weight")


def test_unexpected_tensor(tmp_path, h, sd):
    hf_sd = h.to_hf(sd, h.TINY)
    hf_sd["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    h.save_hf(str(tmp_path), hf_sd, h.hf_config(h.TINY))
    _fails(tmp_path, "model.safetensors", "unexpected tensor", "q_proj.bias")


def test_shape_mismatch_vs_config(tmp_path, h, sd):
    h.save_hf(str(tmp_path), h.to_hf(sd, h.TINY), {**h.hf_config(h.TINY), "intermediate_size": 160})
    _fails(tmp_path, "model.safetensors", "feed_forward.w", "192", "but the model config needs", "160")
    gguf_path = tmp_path / "model.gguf"
    h.save_gguf(str(gguf_path), sd, h.TINY.replace(n_layers=3))  # metadata says 3 blocks, file has 2
    _fails(gguf_path, "model.gguf", "missing tensor", "layers.2.attention.wq.weight")


def test_unknown_params_json_key(tmp_path, h, sd):
    h.save_meta(str(tmp_path), sd, {**h.PARAMS_JSON, "moe_args": {"num_experts": 16}}, n_shards=1)
    _fails(tmp_path, "params.json", "moe_args", load=False)


def test_unsupported_config_json(tmp_path, h, sd):
    h.save_hf(str(tmp_path), h.to_hf(sd, h.TINY), {**h.hf_config(h.TINY), "model_type": "mistral"})
    _fails(tmp_path, "config.json", "mistral", load=False)
    (tmp_path / "config.json").write_text("{not json")
    _fails(tmp_path, "config.json", load=False)


def test_sharded_index_names_missing_file(tmp_path, h, sd):
    h.save_hf(str(tmp_path), h.to_hf(sd, h.TINY), h.hf_config(h.TINY), n_files=2)
    os.remove(tmp_path / "model-00002-of-00002.safetensors")
    _fails(tmp_path, "model-00002-of-00002.safetensors", "missing")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"]
