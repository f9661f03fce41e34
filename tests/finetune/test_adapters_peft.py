"""PEFT format: inhouse adapter -> HF PEFT on transformers' LlamaForCausalLM (same logits), the reverse, and merge."""

from __future__ import annotations

import json
import os

import pytest
import torch

from ft_helpers import TINY, build
from helpers import hf_config, random_state_dict, to_hf

from inhouse.finetune.adapters import AdapterError, load_adapter, read_adapter, save_adapter
from inhouse.finetune.merge import export_hf
from inhouse.model.lora import apply_lora, lora_modules, merge_lora

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TOKENS = torch.tensor([[1, 5, 9, 200, 17, 3, 42, 7, 99, 128], [8, 8, 100, 2, 250, 31, 0, 64, 11, 12]])


def hf_model():
    """transformers' LlamaForCausalLM with the same weights as `build(TINY)` (q/k permuted as HF stores them)."""
    cfg = transformers.LlamaConfig(**{k: v for k, v in hf_config(TINY).items() if k != "architectures"})
    model = transformers.LlamaForCausalLM(cfg).eval()
    missing, unexpected = model.load_state_dict(to_hf(random_state_dict(TINY, seed=0, std=0.2), TINY), strict=False)
    assert not unexpected and all("rotary" in m for m in missing)
    return model


def lora_model(targets="all", rank=4, alpha=8.0, seed=1):
    model = build(TINY)
    apply_lora(model, targets, rank=rank, alpha=alpha, seed=0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_b.weight.copy_(torch.randn(m.lora_b.weight.shape, generator=g) * 0.05)
    return model


def test_base_models_agree():
    with torch.no_grad():
        torch.testing.assert_close(build(TINY)(TOKENS), hf_model()(TOKENS).logits, atol=1e-4, rtol=1e-4)


def test_inhouse_adapter_loads_in_hf_peft_with_same_logits(tmp_path):
    model = lora_model()
    save_adapter(model, str(tmp_path), base_model_name_or_path="tiny")
    cfg = json.load(open(tmp_path / "adapter_config.json"))
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8.0
    assert sorted(cfg["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                    "down_proj"])
    peft_model = peft.PeftModel.from_pretrained(hf_model(), str(tmp_path)).eval()
    with torch.no_grad():
        ours = model(TOKENS)
        theirs = peft_model(input_ids=TOKENS).logits
        base = build(TINY)(TOKENS)
    assert (ours - base).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_hf_peft_adapter_loads_in_inhouse(tmp_path):
    hf = hf_model()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"],
                          lora_dropout=0.0, init_lora_weights=False)  # random B: a non-trivial adapter
    torch.manual_seed(3)
    peft_model = peft.get_peft_model(hf, cfg).eval()
    peft_model.save_pretrained(str(tmp_path))
    model = build(TINY)
    spec = load_adapter(model, str(tmp_path))
    assert spec.targets == ["w2", "wk", "wq", "wv"]
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS), peft_model(input_ids=TOKENS).logits, atol=1e-4, rtol=1e-4)


def test_inhouse_round_trip(tmp_path):
    model = lora_model(["wq", "wo", "w3"], rank=3, alpha=5.0)
    save_adapter(model, str(tmp_path))
    again = build(TINY)
    load_adapter(again, str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(again(TOKENS), model(TOKENS), atol=0, rtol=0)


def test_adapter_for_another_model_is_refused(tmp_path):
    save_adapter(lora_model(), str(tmp_path))
    wider = build(TINY.replace(hidden_dim=256))
    with pytest.raises(AdapterError, match="shape"):
        load_adapter(wider, str(tmp_path))
    cfg = json.load(open(tmp_path / "adapter_config.json"))
    cfg["use_dora"] = True
    json.dump(cfg, open(tmp_path / "adapter_config.json", "w"))
    with pytest.raises(AdapterError, match="use_dora"):
        read_adapter(str(tmp_path), TINY)
    with pytest.raises(AdapterError, match="not a directory"):
        read_adapter(str(tmp_path / "nope"), TINY)
    os.remove(tmp_path / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match="adapter_model.safetensors is missing"):
        read_adapter(str(tmp_path), TINY)


def test_merged_export_loads_in_transformers_and_inhouse(tmp_path, smol_tokenizer):
    from inhouse.weights import load_model

    model = lora_model()
    with torch.no_grad():
        unmerged = model(TOKENS)
    merge_lora(model)
    export_hf(model, smol_tokenizer, str(tmp_path), dtype=torch.float32)
    assert os.path.exists(tmp_path / "model.safetensors") and os.path.exists(tmp_path / "tokenizer.json")
    hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path), torch_dtype=torch.float32).eval()
    ours, _ = load_model(str(tmp_path), dtype=torch.float32, check_memory=False)
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=TOKENS).logits, unmerged, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ours(TOKENS), unmerged, atol=2e-5, rtol=1e-5)
