"""AdapterBank: PEFT adapters of different ranks and targets in one batch, row by row equal to the
single-adapter path; base rows bit-identical; validation names the directory; LRU eviction and reload."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from ft_helpers import TINY, build

from inhouse.finetune.adapters import AdapterBank, AdapterError, load_adapter, save_adapter
from inhouse.model.lora import apply_lora, lora_modules
from inhouse.model.multi_lora import adapter_rows, multi_lora_modules

TOKENS = torch.tensor([[1, 5, 9, 200, 17, 3, 42, 7], [8, 8, 100, 2, 250, 31, 0, 64], [4, 44, 144, 14, 41, 114, 11, 1],
                       [9, 19, 29, 39, 49, 59, 69, 79], [250, 150, 50, 25, 15, 5, 2, 1]])


def write_adapter(out, targets: str, rank: int, alpha: float, seed: int, rslora: bool = False, args=TINY) -> str:
    """A PEFT adapter for `args` with random A and random non-zero B."""
    model = build(args)
    apply_lora(model, targets, rank=rank, alpha=alpha, use_rslora=rslora, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_b.weight.copy_(torch.randn(m.lora_b.weight.shape, generator=g) * 0.1)
    return save_adapter(model, str(out))


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    d = tmp_path_factory.mktemp("adapters")
    return {
        "x": write_adapter(d / "x", "wq,wv,w2", rank=4, alpha=8.0, seed=1),
        "y": write_adapter(d / "y", "all", rank=8, alpha=4.0, seed=2, rslora=True),
        "z": write_adapter(d / "z", "wk,wo,w1,w3", rank=2, alpha=2.0, seed=3),
    }


def single(path: str) -> torch.Tensor:
    """Logits of TOKENS on a model with only this adapter, through the single-adapter LoRALinear path."""
    model = build(TINY)
    load_adapter(model, path)
    with torch.no_grad():
        return model(TOKENS)


def test_mixed_batch_equals_each_adapter_alone(adapters):
    model = build(TINY)
    with torch.no_grad():
        plain = model(TOKENS)
    bank = AdapterBank(model, max_loras=3)
    for name, path in adapters.items():
        bank.add(name, path)
    slot = {n: bank.acquire(n) for n in adapters}
    assert sorted(slot.values()) == [1, 2, 3]
    rows = [None, "x", "y", "z", "x"]  # base, three adapters (ranks 4, 8, 2; different targets), x again
    with torch.no_grad(), adapter_rows(model, [0 if r is None else slot[r] for r in rows]):
        mixed = model(TOKENS)
    refs = {n: single(p) for n, p in adapters.items()}
    assert torch.equal(mixed[0], plain[0])  # the base row, bit for bit
    for i, name in enumerate(rows):
        if name is not None:
            torch.testing.assert_close(mixed[i], refs[name][i], atol=2e-5, rtol=1e-5)
            assert (refs[name][i] - plain[i]).abs().max() > 0.1  # the adapter changes this row
    with torch.no_grad():
        assert torch.equal(model(TOKENS), plain)  # rows cleared: the base model again


def test_validation_names_the_directory(adapters, tmp_path):
    bank = AdapterBank(build(TINY))
    wider = write_adapter(tmp_path / "wider", "w1", rank=4, alpha=8.0, seed=0, args=TINY.replace(hidden_dim=256))
    with pytest.raises(AdapterError, match=r"wider: layers\.0\.feed_forward\.w1 has A \(4, 64\) and B \(256, 4\)"):
        bank.add("wider", wider)
    with pytest.raises(AdapterError, match="missing"):
        bank.add("empty", str(tmp_path))
    half = tmp_path / "half"
    os.makedirs(half)
    json.dump(json.load(open(os.path.join(adapters["x"], "adapter_config.json"))), open(half / "adapter_config.json", "w"))
    tensors = {k: v for k, v in load_file(os.path.join(adapters["x"], "adapter_model.safetensors")).items()
               if not (".0.self_attn.q_proj." in k and "lora_B" in k)}
    save_file(tensors, str(half / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match=r"half: layers\.0\.attention\.wq has LoRA A but no B"):
        bank.add("half", str(half))
    bank.add("x", adapters["x"])
    bank.add("x", adapters["x"])  # the same again: nothing to do
    with pytest.raises(AdapterError, match="'x' is already used"):
        bank.add("x", adapters["y"])
    assert bank.names() == ["x"]
    with pytest.raises(ValueError, match="max_loras=0"):
        AdapterBank(build(TINY), max_loras=0)
    lora_model = build(TINY)
    apply_lora(lora_model, "wq", rank=2)
    b2 = AdapterBank(lora_model)
    b2.add("x", adapters["x"])
    with pytest.raises(ValueError, match="already has LoRA layers"):
        b2.acquire("x")


def test_lru_eviction_spares_held_adapters_and_reload_is_exact(adapters):
    model = build(TINY)
    bank = AdapterBank(model, max_loras=2)
    for name, path in adapters.items():
        bank.add(name, path)

    def logits(name: str) -> torch.Tensor:
        slot = bank.acquire(name)
        assert slot is not None
        try:
            with torch.no_grad(), adapter_rows(model, [slot] * len(TOKENS)):
                return model(TOKENS)
        finally:
            bank.release(name)

    logits("y")  # rank 8 first: the layers' padded rank stays 8 from here on
    first_x = logits("x")
    assert bank.resident() == ["y", "x"] and bank.loads == 2 and bank.evictions == 0
    logits("y")  # used again: x is now the least recently used
    logits("z")  # evicts x
    assert bank.resident() == ["y", "z"] and bank.evictions == 1
    again_x = logits("x")  # evicts y; x is copied back from the host copy
    assert bank.resident() == ["z", "x"] and bank.loads == 4
    assert torch.equal(again_x, first_x)

    # Held adapters are never evicted: with both slots held, a third adapter has to wait.
    sx, sz = bank.acquire("x"), bank.acquire("z")
    assert bank.acquire("y") is None
    bank.release("z")
    sy = bank.acquire("y")
    assert sy == sz and bank.resident() == ["x", "y"]
    bank.release("x")
    bank.release("y")
    assert {m.rank for m in multi_lora_modules(model).values()} == {8}


def test_a_larger_rank_loaded_later_keeps_earlier_results(adapters):
    model = build(TINY)
    bank = AdapterBank(model, max_loras=2)
    bank.add("x", adapters["x"])
    bank.add("y", adapters["y"])
    sx = bank.acquire("x")
    with torch.no_grad(), adapter_rows(model, [sx] * len(TOKENS)):
        before = model(TOKENS)
    assert {m.rank for m in multi_lora_modules(model).values()} == {4}
    bank.acquire("y")  # rank 8, more targets: every layer is re-padded, x keeps its slot
    assert {m.rank for m in multi_lora_modules(model).values()} == {8}
    with torch.no_grad(), adapter_rows(model, [sx] * len(TOKENS)):
        after = model(TOKENS)
    torch.testing.assert_close(after, before, atol=1e-6, rtol=1e-6)
