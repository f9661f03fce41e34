"""transformers' LlamaForCausalLM vs our Transformer loaded from its safetensors save.

A tiny Llama 3.1-style model (GQA, llama3 RoPE scaling with factor 8 and original context
8192), weights large enough that any RoPE mistake shows, run over 8,400 tokens so that
positions past the original context are covered.
"""

import json
import os

import pytest
import torch

from inhouse.model.transformer import Transformer
from inhouse.weights import inspect_checkpoint, load_model

transformers = pytest.importorskip("transformers")

SEQ_LEN = 8400  # runs past original_max_position_embeddings = 8192
ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=512, max_position_embeddings=16384, rms_norm_eps=1e-5,
        rope_parameters={**ROPE, "rope_theta": 500000.0}, tie_word_embeddings=False,
        initializer_range=0.2,  # std of every matrix: q.k scores of a few units, so RoPE matters
    )
    config._attn_implementation = "sdpa"
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # not all ones, so a swapped norm would show
                p.add_(0.1 * torch.randn_like(p))
    tokens = torch.randint(0, 512, (1, SEQ_LEN), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = model(input_ids=tokens).logits.float()

    # As saved by transformers 5 (rope_parameters), and rewritten in the older rope_scaling style.
    new_style = str(tmp_path_factory.mktemp("hf_rope_parameters"))
    model.save_pretrained(new_style, safe_serialization=True)
    old_style = str(tmp_path_factory.mktemp("hf_rope_scaling"))
    model.save_pretrained(old_style, safe_serialization=True)
    with open(os.path.join(old_style, "config.json")) as f:
        cfg = json.load(f)
    params = cfg.pop("rope_parameters")
    cfg["rope_theta"] = params.pop("rope_theta")
    cfg["rope_scaling"] = params
    with open(os.path.join(old_style, "config.json"), "w") as f:
        json.dump(cfg, f)
    return {"rope_parameters": new_style, "rope_scaling": old_style}, tokens, logits


@pytest.mark.parametrize("style", ["rope_parameters", "rope_scaling"])
def test_logits_match_transformers(hf_run, style):
    paths, tokens, hf_logits = hf_run
    with open(os.path.join(paths[style], "config.json")) as f:
        assert style in json.load(f)
    info = inspect_checkpoint(paths[style])
    assert info.args.rope_scaling is not None and info.args.rope_scaling.factor == 8.0
    assert info.args.rope_theta == 500000.0 and info.args.n_kv_heads == 2
    model, _ = load_model(info)
    with torch.no_grad():
        ours = model(tokens)
    assert ours.shape == hf_logits.shape == (1, SEQ_LEN, 512)
    err = (ours - hf_logits).abs().max().item()
    assert err < 1e-4, err
    # ... also beyond the original context, where llama3 scaling matters most.
    assert (ours[:, 8192:] - hf_logits[:, 8192:]).abs().max().item() < 1e-4


def test_parity_test_detects_missing_rope_scaling(hf_run):
    paths, tokens, hf_logits = hf_run
    model, info = load_model(paths["rope_parameters"])
    unscaled = Transformer(info.args.replace(rope_scaling=None))
    unscaled.load_state_dict(model.state_dict())
    with torch.no_grad():
        wrong = unscaled(tokens[:, :512])
    assert (wrong - hf_logits[:, :512]).abs().max().item() > 1e-2
