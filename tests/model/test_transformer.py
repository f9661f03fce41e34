"""The decoder on its own: cached decoding equals one full forward; llama3 RoPE scaling is applied."""

import math

import pytest
import torch

from inhouse.config import ModelArgs, RopeScaling
from inhouse.model.transformer import Transformer, rope_inv_freq


def tiny_args(**kw) -> ModelArgs:
    base = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, hidden_dim=160,
                rope_theta=500000.0, rope_scaling=RopeScaling(8.0, 1.0, 4.0, 64), max_seq_len=512)
    base.update(kw)
    return ModelArgs(**base)


def random_model(args: ModelArgs, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    m = Transformer(args)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)  # large enough that a RoPE or mask error changes the logits
    return m.eval()


@torch.inference_mode()
def test_token_by_token_with_cache_equals_full_forward():
    m = random_model(tiny_args())
    tokens = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(1))
    full = m(tokens)  # (2, 40, V)
    caches = m.new_caches(2, 64)
    parts = [m(tokens[:, :7], input_pos=torch.arange(7).expand(2, 7), caches=caches)]
    for i in range(7, 40):
        parts.append(m(tokens[:, i:i + 1], input_pos=torch.full((2, 1), i), caches=caches))
    inc = torch.cat(parts, dim=1)
    assert inc.shape == full.shape
    torch.testing.assert_close(inc, full, rtol=0, atol=1e-4)
    assert full.abs().max() > 1.0  # the comparison is not between near-zero numbers


@torch.inference_mode()
def test_rows_at_different_positions_and_scattered_cache_rows():
    m = random_model(tiny_args(tie_embeddings=True))
    a = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(2))
    b = torch.randint(0, 300, (1, 5), generator=torch.Generator().manual_seed(3))
    ref_a, ref_b = m(a)[0, -1], m(b)[0, -1]
    caches = m.new_caches(4, 32)
    # a lives in cache row 3, b in row 1: prefill separately, then decode both in one batch.
    m(a[:, :11], input_pos=torch.arange(11)[None], caches=caches, cache_rows=torch.tensor([3]))
    m(b[:, :4], input_pos=torch.arange(4)[None], caches=caches, cache_rows=torch.tensor([1]))
    out = m(torch.tensor([[a[0, 11]], [b[0, 4]]]), input_pos=torch.tensor([[11], [4]]), caches=caches,
            cache_rows=torch.tensor([3, 1]))
    torch.testing.assert_close(out[0, 0], ref_a, rtol=0, atol=1e-4)
    torch.testing.assert_close(out[1, 0], ref_b, rtol=0, atol=1e-4)


def test_llama3_rope_scaling_bands():
    hd, theta = 128, 500000.0
    s = RopeScaling(8.0, 1.0, 4.0, 8192)
    base = rope_inv_freq(hd, theta, None)
    scaled = rope_inv_freq(hd, theta, s)
    wavelen = 2 * math.pi / base
    high = wavelen < 8192 / 4  # short wavelengths: unchanged
    low = wavelen > 8192 / 1  # long wavelengths: divided by the factor
    assert high.any() and low.any() and (~high & ~low).any()
    torch.testing.assert_close(scaled[high], base[high])
    torch.testing.assert_close(scaled[low], base[low] / 8.0)
    mid = ~high & ~low
    assert ((scaled[mid] < base[mid]) & (scaled[mid] > base[mid] / 8.0)).all()
    # factor 32 (Llama 3.2) differs from factor 8 (3.1): read from the config, not hard-coded
    s32 = RopeScaling(32.0, 1.0, 4.0, 8192)
    torch.testing.assert_close(rope_inv_freq(hd, theta, s32)[low], base[low] / 32.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.inference_mode()
def test_half_precisions_track_fp32(dtype):
    m = random_model(tiny_args())
    tokens = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(4))
    ref = m(tokens)
    low = m.to(dtype)(tokens)
    assert low.dtype == torch.float32  # logits come back in fp32
    # random weights with std 0.3 give large logits; compare relative to their scale
    assert (low - ref).abs().max() / ref.abs().max() < 0.1
    caches = m.new_caches(1, 16)
    assert caches[0].k.dtype == dtype


def test_presets_match_published_sizes():
    # parameter counts of the published models (tied embeddings counted once)
    expected = {"llama3.1-8b": 8.03e9, "llama3.1-70b": 70.55e9, "llama3.1-405b": 405.85e9,
                "llama3.2-1b": 1.24e9, "llama3.2-3b": 3.21e9, "smollm2-135m": 0.1348e9}
    for name, n in expected.items():
        got = ModelArgs.from_preset(name).num_parameters()
        assert abs(got - n) / n < 0.01, (name, got)
    assert ModelArgs.from_preset("llama3.1-8b").rope_scaling.factor == 8.0
    assert ModelArgs.from_preset("llama3.2-1b").rope_scaling.factor == 32.0
