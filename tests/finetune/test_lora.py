"""LoRALinear, apply/merge/remove, and the NF4 base of QLoRA."""

from __future__ import annotations

import pytest
import torch

from inhouse.model.lora import (
    LoRALinear, NF4_LEVELS, NF4Linear, apply_lora, lora_modules, lora_state_dict, merge_lora, nf4_dequantize,
    nf4_quantize, normalize_targets, remove_lora, set_lora_enabled,
)

TOKENS = torch.tensor([[1, 5, 9, 200, 17, 3, 42, 7], [8, 8, 100, 2, 250, 31, 0, 64]])


def randomize_b(model, seed=1, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_b.weight.copy_(torch.randn(m.lora_b.weight.shape, generator=g) * scale)


def test_fresh_lora_leaves_logits_unchanged(tiny_model):
    before = tiny_model(TOKENS)
    paths = apply_lora(tiny_model, "all", rank=4, alpha=8, seed=0)
    assert len(paths) == 7 * 2
    assert all(float(m.lora_a.weight.detach().abs().sum()) > 0 for m in lora_modules(tiny_model).values())  # A is random
    assert torch.equal(tiny_model(TOKENS), before)  # B = 0: exactly the base model


def test_lora_changes_logits_and_only_lora_is_trainable(tiny_model):
    before = tiny_model(TOKENS)
    apply_lora(tiny_model, ["wq", "v_proj"], rank=4, alpha=8, seed=0)
    trainable = [n for n, p in tiny_model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_a." in n or ".lora_b." in n for n in trainable)
    assert {n.split(".")[3] for n in trainable} == {"wq", "wv"}
    randomize_b(tiny_model)
    after = tiny_model(TOKENS)
    assert not torch.allclose(after, before, atol=1e-3)
    set_lora_enabled(tiny_model, False)
    assert torch.equal(tiny_model(TOKENS), before)


def test_merged_equals_unmerged(tiny_model):
    apply_lora(tiny_model, "all", rank=4, alpha=8, seed=0)
    randomize_b(tiny_model)
    unmerged = tiny_model(TOKENS)
    assert merge_lora(tiny_model) == 14
    assert not lora_modules(tiny_model)
    assert all(type(m) is torch.nn.Linear for n, m in tiny_model.named_modules() if n.endswith(("wq", "w2")))
    torch.testing.assert_close(tiny_model(TOKENS), unmerged, atol=2e-5, rtol=1e-5)


def test_remove_restores_base(tiny_model):
    before = tiny_model(TOKENS)
    apply_lora(tiny_model, "all", rank=2, alpha=4)
    randomize_b(tiny_model)
    assert remove_lora(tiny_model) == 14
    assert torch.equal(tiny_model(TOKENS), before)


def test_lora_state_dict_names_and_shapes(tiny_model):
    apply_lora(tiny_model, ["wk"], rank=3, alpha=3)
    sd = lora_state_dict(tiny_model)
    assert set(sd) == {f"layers.{i}.attention.wk.lora_{ab}.weight" for i in range(2) for ab in "ab"}
    assert sd["layers.0.attention.wk.lora_a.weight"].shape == (3, 64)
    assert sd["layers.0.attention.wk.lora_b.weight"].shape == (2 * 16, 3)


def test_bad_targets_and_double_apply(tiny_model):
    with pytest.raises(ValueError, match="qproj"):
        normalize_targets("wq,qproj")
    assert normalize_targets("q_proj, gate_proj,wq") == ["wq", "w1"]
    apply_lora(tiny_model, "wq")
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(tiny_model, "wv")


def test_nf4_roundtrip_is_within_half_a_level():
    w = torch.randn(32, 128) * 0.3
    codes, absmax = nf4_quantize(w)
    assert codes.dtype == torch.uint8 and codes.numel() == w.numel() // 2
    assert absmax.shape == (w.numel() // 64,)
    deq = nf4_dequantize(codes, absmax, tuple(w.shape))
    blocks = w.reshape(-1, 64)
    # Each value is at a level, and the nearest one: error at most half the widest gap of the levels.
    max_gap = float((NF4_LEVELS[1:] - NF4_LEVELS[:-1]).max())
    err = (deq.reshape(-1, 64) - blocks).abs() / blocks.abs().amax(1, keepdim=True)
    assert float(err.max()) <= max_gap / 2 + 1e-6
    # The extreme of each block is exact (level +-1 times absmax).
    idx = blocks.abs().argmax(1)
    torch.testing.assert_close(deq.reshape(-1, 64).gather(1, idx[:, None]), blocks.gather(1, idx[:, None]))


def test_nf4_linear_forward_and_input_grad():
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 64, bias=False)
    q = NF4Linear.from_linear(lin)
    w = q.dequantize()
    x = torch.randn(3, 5, 128, requires_grad=True)
    y = q(x)
    torch.testing.assert_close(y, x @ w.T)
    y.square().sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    (x2 @ w.T).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    assert not any(p.requires_grad for p in q.parameters())


def test_qlora_base_is_4bit_and_close(tiny_model):
    import copy

    build_ref = copy.deepcopy(tiny_model)
    before = tiny_model(TOKENS)
    apply_lora(tiny_model, "all", rank=4, alpha=8, quantize_base=True)
    bases = [m.base for m in lora_modules(tiny_model).values()]
    assert all(isinstance(b, NF4Linear) for b in bases)
    after = tiny_model(TOKENS)
    # 4-bit weights: each matrix within ~10% (relative Frobenius error), logits close but not equal.
    for name, m in lora_modules(tiny_model).items():
        orig = dict(build_ref.named_parameters())[name + ".weight"]
        assert float((m.base.dequantize() - orig.detach()).norm() / orig.norm()) < 0.12, name
    assert not torch.equal(after, before)
    assert float(torch.nn.functional.cosine_similarity(after.flatten(), before.flatten(), 0)) > 0.9
    loss = after.square().mean()
    randomize_b(tiny_model)
    tiny_model(TOKENS).square().mean().backward()
    grads = {n: p.grad for n, p in tiny_model.named_parameters() if p.grad is not None}
    assert grads and all(".lora_" in n for n in grads)
    del loss
