"""ModelArgs from the three config sources, strictly."""

import pytest

from inhouse.config import ConfigError, ModelArgs, RopeScaling

# Meta's published params.json of Llama 3.1 8B.
META_8B = {"dim": 4096, "ffn_dim_multiplier": 1.3, "multiple_of": 1024, "n_heads": 32, "n_kv_heads": 8,
           "n_layers": 32, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True, "vocab_size": 128256}

# The published Hugging Face config.json of Llama 3.2 1B (architecture keys).
HF_1B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192,
         "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
         "rope_theta": 500000.0, "max_position_embeddings": 131072, "tie_word_embeddings": True, "vocab_size": 128256,
         "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                          "original_max_position_embeddings": 8192, "rope_type": "llama3"},
         "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "head_dim": 64, "torch_dtype": "bfloat16"}


def test_meta_params_8b_equals_preset():
    assert ModelArgs.from_meta_params(META_8B) == ModelArgs.from_preset("llama3.1-8b")


def test_meta_params_unknown_key_raises():
    with pytest.raises(ConfigError, match="unknown keys.*'moe_layers'"):
        ModelArgs.from_meta_params({**META_8B, "moe_layers": 4})


def test_hf_config_1b_equals_preset():
    assert ModelArgs.from_hf_config(HF_1B) == ModelArgs.from_preset("llama3.2-1b")


def test_hf_rope_parameters_form():
    cfg = {k: v for k, v in HF_1B.items() if k not in ("rope_scaling", "rope_theta")}
    cfg["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    a = ModelArgs.from_hf_config(cfg)
    assert a.rope_theta == 500000.0 and a.rope_scaling == RopeScaling(32.0, 1.0, 4.0, 8192)


def test_hf_rejects_other_architectures_and_scalings():
    with pytest.raises(ConfigError, match="model_type='mistral'"):
        ModelArgs.from_hf_config({**HF_1B, "model_type": "mistral"})
    with pytest.raises(ConfigError, match="'yarn'"):
        ModelArgs.from_hf_config({**HF_1B, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ConfigError, match="lacks 'low_freq_factor'"):
        ModelArgs.from_hf_config({**HF_1B, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0,
                                                            "original_max_position_embeddings": 8192}})


def test_gguf_metadata():
    meta = {"general.architecture": "llama", "llama.block_count": 30, "llama.context_length": 8192,
            "llama.embedding_length": 576, "llama.feed_forward_length": 1536, "llama.attention.head_count": 9,
            "llama.attention.head_count_kv": 3, "llama.rope.freq_base": 100000.0,
            "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.vocab_size": 49152, "llama.rope.dimension_count": 64}
    assert ModelArgs.from_gguf_metadata(meta, has_output_tensor=False) == ModelArgs.from_preset("smollm2-135m")
    with pytest.raises(ConfigError, match="'qwen2'"):
        ModelArgs.from_gguf_metadata({**meta, "general.architecture": "qwen2"})


def test_invalid_geometry_is_named():
    with pytest.raises(ConfigError, match="n_heads=6 is not a multiple of n_kv_heads=4"):
        ModelArgs(dim=48, n_layers=1, n_heads=6, n_kv_heads=4, vocab_size=10, hidden_dim=8)
