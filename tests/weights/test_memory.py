"""Memory estimate (weights + KV cache + overhead) and the refusal, with the numbers."""

import pytest
import torch

from inhouse.config import ModelArgs
from inhouse.weights import WeightsError, available_bytes, check_fits, estimate_bytes, load_model
from inhouse.weights import loader, memory

GIB = 1024**3
LLAMA31_8B_PARAMS = 8_030_261_248  # Meta-Llama-3.1-8B, as published


def test_llama31_8b_bf16_estimate():
    args = ModelArgs.from_preset("llama3.1-8b")
    assert args.num_parameters() == LLAMA31_8B_PARAMS
    est = memory.estimate(args, torch.bfloat16, 8192, torch.bfloat16)
    assert est.weights == 2 * LLAMA31_8B_PARAMS  # ~16.06 GB
    # K and V, 32 layers, 8 kv heads of 128, 8192 positions, 2 bytes: exactly 1 GiB.
    assert est.kv_cache == 2 * 32 * 8 * 128 * 8192 * 2 == GIB
    assert est.total == int((2 * LLAMA31_8B_PARAMS + GIB) * 1.1)
    assert estimate_bytes(args, torch.bfloat16, 8192, torch.bfloat16) == est.total
    assert memory.estimate(args, torch.float32, 0, torch.bfloat16).weights == 4 * LLAMA31_8B_PARAMS


def test_check_fits_message_has_the_numbers():
    args = ModelArgs.from_preset("llama3.1-8b")
    est = memory.estimate(args, torch.bfloat16, 8192, torch.bfloat16)
    check_fits(est, est.total, "exact fit")  # no error
    with pytest.raises(WeightsError) as e:
        check_fits(est, 11 * GIB, "loading llama")
    assert str(e.value) == (
        "loading llama: needs 17.6 GiB (weights 15.0 + KV cache 1.0 + 10% overhead), 11.0 GiB available"
    )
    with pytest.raises(ValueError, match=r"model: needs 2\.0 GiB, 1\.5 GiB available"):
        check_fits(2 * GIB, int(1.5 * GIB), "model")


def test_load_model_refuses_before_allocating(monkeypatch):
    monkeypatch.setattr(loader, "available_bytes", lambda: 11 * GIB)
    with pytest.raises(memory.InsufficientMemoryError) as e:
        load_model("random:llama3.1-8b", dtype=torch.bfloat16, max_seq_len_for_estimate=8192)
    msg = str(e.value)
    assert "random:llama3.1-8b" in msg and "bfloat16" in msg
    assert "needs 17.6 GiB (weights 15.0 + KV cache 1.0" in msg and "11.0 GiB available" in msg


def test_load_model_loads_when_it_fits(monkeypatch):
    args = ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=64, hidden_dim=64)
    needed = memory.estimate_bytes(args, torch.float32, 100, torch.float32)
    monkeypatch.setattr(loader, "available_bytes", lambda: needed)
    info = loader.CheckpointInfo("random", "random:tiny", args, "float32", 0)
    model, _ = load_model(info, max_seq_len_for_estimate=100)
    assert model.args == args and not any(p.is_meta for p in model.parameters())
    monkeypatch.setattr(loader, "available_bytes", lambda: needed - 1)
    with pytest.raises(memory.InsufficientMemoryError, match="random:tiny"):
        load_model(info, max_seq_len_for_estimate=100)
    load_model(info, max_seq_len_for_estimate=100, check_memory=False)  # the check can be skipped


def test_available_bytes_is_plausible():
    with open("/proc/meminfo") as f:
        total = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
    assert 0 < available_bytes() <= total
