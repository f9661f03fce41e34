"""The tiny Llama 3.1-shaped model and random LoRA adapters that engine, server and adapter tests share.

Loaded once by tests/conftest.py as ``sys.modules["_inhouse_tests_tiny"]`` (tests have no packages)."""

from __future__ import annotations

import torch

from inhouse.config import ModelArgs, RopeScaling
from inhouse.finetune.adapters import save_adapter
from inhouse.model.lora import apply_lora, lora_modules
from inhouse.model.transformer import Transformer


def make_tiny_llama(seed: int = 0, std: float = 0.2, max_seq_len: int = 256) -> Transformer:
    """A 2-layer Llama 3.1-shaped model (GQA, llama3 RoPE scaling) on the real 128,256-id vocabulary."""
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256, hidden_dim=128,
                     rope_scaling=RopeScaling(8.0, 1.0, 4.0, 64), max_seq_len=max_seq_len)
    torch.manual_seed(seed)
    m = Transformer(args)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, std)
    return m.eval()


def write_random_adapter(model: Transformer, out, targets: str, rank: int, seed: int, *, b_seed: int,
                         b_std: float) -> str:
    """Apply LoRA to `model` (A as initialised with `seed`, B random non-zero) and save it in PEFT format."""
    apply_lora(model, targets, rank=rank, alpha=2.0 * rank, seed=seed)
    g = torch.Generator().manual_seed(b_seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_b.weight.copy_(torch.randn(m.lora_b.weight.shape, generator=g) * b_std)
    return save_adapter(model, str(out))


def _int4_codes(w: torch.Tensor):
    """`w` (N, K) on a Q4_1-style grid, as the GGUF loader hands such a matrix over."""
    from inhouse.model.quant import Int4Codes

    n, k = w.shape
    g = w.view(n, k // 32, 32)
    lo, hi = g.amin(-1), g.amax(-1)
    step = ((hi - lo) / 15).clamp(min=1e-6).half()
    lo = lo.half()
    codes = torch.round((g - lo.float()[..., None]) / step.float()[..., None]).clamp(0, 15).to(torch.uint8).view(n, k)
    return Int4Codes(codes, step, lo)


def _int8_codes(w: torch.Tensor):
    """`w` (N, K) on a Q8_0 grid (ggml's rounding: step = absmax / 127 in fp16), as the GGUF loader
    hands such a matrix over."""
    from inhouse.model.quant import Int8Codes

    n, k = w.shape
    g = w.view(n, k // 32, 32)
    step = (g.abs().amax(-1) / 127).clamp(min=1e-6).half()
    codes = torch.round(g / step.float()[..., None]).clamp(-127, 127).to(torch.int8).view(n, k)
    return Int8Codes(codes, step)


def tiny_with_file_vocabulary(vocabulary: str = "q4", seed: int = 0):
    """A tied tiny model loaded the way a GGUF file with 4-bit matrices is: every matrix as 4-bit
    codes, the tied token_embd as Q4_1 codes too ("q4") or as Q8_0 ones ("q8", as SmolLM2's file);
    and the same weights dense in fp32 (the file's values)."""
    from inhouse.model.quant import quantize_tensor
    from inhouse.model.transformer import Transformer

    dense = make_tiny_llama(seed=seed, std=0.3)
    args = dense.args.replace(tie_embeddings=True)
    with torch.device("meta"):
        model = Transformer(args)
    ref = Transformer(args)  # the same weights, dense fp32: the file's values
    with torch.no_grad():
        for name, p in dense.named_parameters():
            if name == "output.weight":
                continue
            if p.dim() != 2:
                value = p.detach()
            elif name == "tok_embeddings.weight" and vocabulary == "q8":
                value = _int8_codes(p.detach())
            else:
                value = _int4_codes(p.detach())
            ref.get_parameter(name).copy_(value.dense() if p.dim() == 2 else value)
            quantize_tensor(model, name, value, "int4")
    model.inv_freq = ref.inv_freq
    return model.eval(), ref.eval()

