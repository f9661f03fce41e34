"""MultiLoRALinear: each row of a batch gets its own adapter; rows on slot 0 are the base layer, bit for bit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from inhouse.model.lora import LoRALinear
from inhouse.model.multi_lora import AdapterRows, MultiLoRALinear, adapter_rows, apply_multi_lora, set_adapter_rows
from inhouse.model.quant import Int4Linear, Int8Linear


def lora(base: nn.Module, rank: int, alpha: float, seed: int, rslora: bool = False) -> LoRALinear:
    """A single-adapter LoRALinear with random A and (non-zero) B."""
    torch.manual_seed(seed)
    m = LoRALinear(base, rank, alpha, use_rslora=rslora)
    with torch.no_grad():
        m.lora_b.weight.normal_(0, 0.3)
    return m.eval()


def stacked(base: nn.Module, adapters: list[LoRALinear]) -> MultiLoRALinear:
    m = MultiLoRALinear(base, AdapterRows(), n_slots=len(adapters) + 1, rank=max(a.rank for a in adapters))
    for slot, a in enumerate(adapters, start=1):
        m.set_slot(slot, a.lora_a.weight, a.lora_b.weight, a.scaling)
    return m


@pytest.mark.parametrize("base_kind", ["fp32", "int8", "int4"])
def test_each_row_gets_its_adapter_and_base_rows_are_exact(base_kind):
    torch.manual_seed(0)
    base = nn.Linear(64, 96, bias=False)
    if base_kind != "fp32":
        base = {"int8": Int8Linear, "int4": Int4Linear}[base_kind].from_weight(base.weight.detach())
    x_ad, y_ad = lora(base, 4, 8.0, seed=1), lora(base, 8, 4.0, seed=2, rslora=True)  # ranks 4 and 8: 4 is padded
    multi = stacked(base, [x_ad, y_ad])
    x = torch.randn(5, 3, 64)  # (B, T, in)
    slots = [0, 1, 2, 0, 1]
    with torch.no_grad():
        multi.adapter_rows.set(slots)
        got = multi(x)
        plain = base(x)
        want = {0: plain, 1: x_ad(x), 2: y_ad(x)}
    for i, s in enumerate(slots):
        if s == 0:
            assert torch.equal(got[i], plain[i])  # no LoRA arithmetic touches a base row
        else:
            torch.testing.assert_close(got[i], want[s][i], atol=1e-6, rtol=1e-6)
            assert not torch.allclose(got[i], plain[i], atol=1e-3)  # the adapter matters


def test_all_rows_on_adapters_and_all_rows_on_base():
    torch.manual_seed(0)
    base = nn.Linear(32, 48, bias=False)
    a1, a2 = lora(base, 2, 4.0, seed=3), lora(base, 6, 12.0, seed=4)
    multi = stacked(base, [a1, a2])
    x = torch.randn(3, 4, 32)
    with torch.no_grad():
        multi.adapter_rows.set([2, 1, 2])
        got = multi(x)
        torch.testing.assert_close(got[1], a1(x)[1], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(got[0], a2(x)[0], atol=1e-6, rtol=1e-6)
        multi.adapter_rows.set([0, 0, 0])
        assert torch.equal(multi(x), base(x))
        multi.adapter_rows.clear()
        assert torch.equal(multi(x), base(x))


def test_bad_slots_and_shapes_are_refused():
    base = nn.Linear(16, 16, bias=False)
    multi = MultiLoRALinear(base, AdapterRows(), n_slots=2, rank=4)
    with pytest.raises(ValueError, match="slot 0 is the base model"):
        multi.set_slot(0, torch.zeros(4, 16), torch.zeros(16, 4), 1.0)
    with pytest.raises(ValueError, match="do not fit"):
        multi.set_slot(1, torch.zeros(8, 16), torch.zeros(16, 8), 1.0)  # rank 8 > the padded 4
    with pytest.raises(ValueError, match=">= 0"):
        multi.adapter_rows.set([0, -1])
    multi.adapter_rows.set([1, 0])
    with pytest.raises(ValueError, match="2 rows, the input has 3"):
        multi(torch.zeros(3, 1, 16))


def test_reserve_keeps_what_the_slots_hold():
    torch.manual_seed(0)
    base = nn.Linear(16, 24, bias=False)
    a = lora(base, 2, 2.0, seed=5)
    multi = stacked(base, [a])
    x = torch.randn(1, 2, 16)
    with torch.no_grad():
        multi.adapter_rows.set([1])
        before = multi(x)
        multi.reserve(4, 8)  # more slots, larger rank: zero-padded
        assert multi.lora_a.shape == (4, 8, 16) and multi.lora_b.shape == (4, 24, 8)
        torch.testing.assert_close(multi(x), before, atol=1e-6, rtol=1e-6)


def test_on_a_transformer_the_rows_are_shared_by_every_layer(weights_helpers):
    from inhouse.model.transformer import Transformer

    args = weights_helpers.TINY
    model = Transformer(args)
    model.load_state_dict(weights_helpers.random_state_dict(args, seed=0), strict=False)
    model.eval()
    tokens = torch.randint(0, args.vocab_size, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model(tokens)
    rows = AdapterRows()
    assert len(apply_multi_lora(model, ["wq", "w2"], rows, n_slots=2, rank=2)) == 2 * args.n_layers
    layers = [m for m in model.modules() if isinstance(m, MultiLoRALinear)]
    assert all(m.adapter_rows is rows for m in layers)
    g = torch.Generator().manual_seed(1)
    for m in layers:
        m.set_slot(1, torch.randn(2, m.in_features, generator=g), torch.randn(m.out_features, 2, generator=g), 0.5)
    with torch.no_grad():
        assert torch.equal(model(tokens), plain)  # no rows set: the base model
        with adapter_rows(model, [1, 0]):
            mixed = model(tokens)
        assert rows.slots is None  # cleared on leaving the block
    assert torch.equal(mixed[1], plain[1]) and not torch.allclose(mixed[0], plain[0], atol=1e-3)
    set_adapter_rows(model, None)
    with pytest.raises(ValueError, match="already has LoRA layers"):
        from inhouse.model.lora import apply_lora

        other = Transformer(args)
        apply_lora(other, "wq", rank=2)
        apply_multi_lora(other, ["wq"], AdapterRows())
