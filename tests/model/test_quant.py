"""Weight-only int4/int8 (and the bf16 path): exact kernels where they must be, quality measured, not assumed.

Quality is measured on the embedded SmolLM2-135M-Instruct against the unquantized fp32
reference (the same GGUF dequantized to fp32), on a fixed English text (~550 tokens): perplexity
within 1% and top-1 next-token agreement, for the default path (int4: the file's Q4_1 blocks
re-laid out) through both kernels (one token at a time through the KV cache, and whole-prompt
forwards), for plain bf16 and for int8.

The issue's bar is >= 98% top-1 agreement and perplexity within 1%. Measured (2 cores, AVX-512):
the default int4 path (the file's Q4_1 blocks, an fp32 residual stream, the vocabulary projection
as a pass over the file's Q8_0 rows with its top 32 logits recomputed exactly) agrees on 98.4% of
positions (whole text) and 100% (token by token, eager and fused), perplexity within 0.1%: it is
held to the 98% bar. Before the
fp32 residual stream it was 96.4-97.0%, whatever the weights: the flips come from rounding the
residual sum to bf16 at every layer. int8 re-quantizes the file's 4-bit grid with one scale per row
(it cannot follow the grid) and measures 97.4% / 96.5%, perplexity within 0.6%; it exists for
float checkpoints, and `auto` never picks it for 4-bit files. Plain bf16 (no quantization, bf16
residual stream as in Meta's bf16 reference) measures 96.4% / 96.9%. Their bars are the measured
level minus a margin, not the goal.
"""

import math

import pytest
import torch
from torch import nn

from inhouse.model.quant import Int4Linear, Int8Linear, QuantizeError, RescoredOutput, quantize_int8, quantize_model, quantized_mode
from inhouse.resolve import open_model, resolve_quantize

TEXT = (
    "The lighthouse stood at the end of a long stone pier, and for ninety years a keeper had climbed its "
    "spiral stairs every evening to light the lamp. The last keeper, a woman named Elsa, kept a logbook in "
    "which she wrote the weather, the ships that passed, and the birds that rested on the rail. When the "
    "light was finally automated, she was asked to leave the island. She packed the logbooks into two "
    "wooden crates and took the morning ferry to the mainland, where she rented a small room above a bakery. "
    "Every night she still woke at the hour when the lamp had to be trimmed, and every night she went to "
    "the window and looked out toward the sea, where the beam swept the water as it always had, without her. "
    "In the spring a historian from the university came to ask about the logbooks. They spent the summer "
    "reading them together, and the historian said that no other record of the coast was so complete. "
    "Bread is one of the oldest prepared foods. Early bakers mixed ground grain with water and cooked the "
    "paste on hot stones; later, people learned that dough left to rest would rise, because wild yeasts "
    "in the air fed on the sugars in the flour and released gas. Today most bread is made with cultivated "
    "yeast, but many bakeries still keep a sourdough starter, a living culture of yeast and bacteria that "
    "gives the loaf its sour taste and chewy crust. A good baker watches the dough rather than the clock, "
    "since warm kitchens make it rise faster and cold ones slow it down. "
    "To plant a tree, dig a hole twice as wide as the root ball but no deeper. Loosen the roots gently, set "
    "the tree so that the top of the roots is level with the ground, and fill the hole with the soil you "
    "removed. Water it deeply once a week during the first summer, and spread a layer of mulch around the "
    "base, keeping it away from the trunk. In a few years the tree will need much less care, and in a few "
    "decades it will shade the house in summer and let the sun through in winter, once its leaves have fallen. "
    "The committee met on Tuesday to discuss the budget for the coming year. The treasurer reported that "
    "income from membership fees had risen by eight percent, while the cost of renting the hall had doubled. "
    "After a long discussion, the members agreed to look for a cheaper place to meet and to ask volunteers "
    "to help with the newsletter, which had until then been printed by a company in the next town."
)


def test_quantize_int8_rounds_to_the_nearest_level():
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(0))
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() == 127
    err = (q.float() * scale[:, None] - w).abs()
    assert bool((err <= scale[:, None] / 2 + 1e-6).all())


@pytest.mark.parametrize("rows", [1, 3, 200])  # 200 > SMALL_BATCH: the dequantize + bf16 matmul path
def test_int8_linear_equals_its_dequantized_matrix(rows):
    w = torch.randn(160, 96, generator=torch.Generator().manual_seed(1))
    lin = Int8Linear.from_weight(w)
    x = torch.randn(rows, 96, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    ref = x.float() @ lin.dequantized(torch.float32).T
    out = lin(x)
    assert out.dtype == torch.bfloat16 and out.shape == (rows, 160)
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())  # bf16 rounding
    assert ref.abs().max() > 5  # not a comparison of near-zeros


@pytest.mark.parametrize("rows", [1, 3, 200])
def test_int4_linear_equals_its_dequantized_matrix(rows):
    w = torch.randn(160, 96, generator=torch.Generator().manual_seed(1))
    lin = Int4Linear.from_weight(w)
    x = torch.randn(rows, 96, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    ref = x.float() @ lin.dequantized(torch.float32).T
    out = lin(x)
    assert out.dtype == torch.bfloat16 and out.shape == (rows, 160)
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())
    # 16 levels per group of 32: the error is at most half a step (+ bf16 rounding of scale/zero)
    step = (w.view(160, 3, 32).amax(-1) - w.view(160, 3, 32).amin(-1)) / 15
    err = (lin.dequantized(torch.float32) - w).view(160, 3, 32).abs().amax(-1)
    assert bool((err <= step / 2 + 0.02).all())


def test_int4_recovers_a_q4_1_grid_exactly():
    """A matrix already on a Q4_1 grid (d * code + m per block of 32) comes back unchanged."""
    g = torch.Generator().manual_seed(5)
    codes = torch.randint(0, 16, (64, 4, 32), generator=g).float()
    codes[..., 0], codes[..., 1] = 0, 15  # Q4_1 maps each block's min to 0 and max to 15
    d = torch.rand(64, 4, 1, generator=g).mul(0.01).add(0.001).bfloat16().float()
    m = torch.randn(64, 4, 1, generator=g).mul(0.01).bfloat16().float()
    w = (codes * d + m).view(64, 128)
    lin = Int4Linear.from_weight(w)
    torch.testing.assert_close(lin.dequantized(torch.float32), w, rtol=0, atol=float(d.max()) * 0.02 + 1e-4)


def test_int4_codes_are_read_back_from_the_kernel_layout():
    """No second copy of the 4-bit codes: prompt chunks dequantize from PyTorch's kernel's own packing."""
    from inhouse.model.quant import int4pack_block_n, unpack_int4pack

    # PyTorch's layout with its AVX-512 kernel (blocks of 64 rows) or its AVX2 one (32), on this machine kind
    assert int4pack_block_n() in (64, 32)
    codes = torch.randint(0, 16, (192, 96), generator=torch.Generator().manual_seed(7), dtype=torch.int32)
    packed = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
    assert torch.equal(unpack_int4pack(packed, 192, 96).to(torch.int32), codes)
    other = 32 if int4pack_block_n() == 64 else 64  # the other block size misreads it
    assert not torch.equal(unpack_int4pack(packed, 192, 96, block_n=other).to(torch.int32), codes)
    lin = Int4Linear.from_weight(torch.randn(192, 96, generator=torch.Generator().manual_seed(8)), native=False)
    assert lin.weight_nibbles.numel() == 0
    x = torch.randn(3, 96, generator=torch.Generator().manual_seed(9)).to(torch.bfloat16)
    kernel = torch._weight_int4pack_mm_for_cpu(x, lin.weight_int4pack, 32, lin.scales_and_zeros).float()
    ref = x.float() @ lin.dequantized(torch.float32).T
    torch.testing.assert_close(kernel, ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())


@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear])
def test_rows_do_not_depend_on_the_batch(cls):
    """The server decodes many sequences together: each row must be what it is alone, bit for bit."""
    lin = cls.from_weight(torch.randn(320, 128, generator=torch.Generator().manual_seed(3)))
    x = torch.randn(16, 1, 128, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    together = lin(x)
    alone = torch.cat([lin(x[i:i + 1]) for i in range(16)])
    assert torch.equal(together, alone)


def test_rescored_output_is_exact_at_the_top_and_close_below():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(3000, 64, generator=g).to(torch.bfloat16)
    out = RescoredOutput(Int8Linear.from_weight(w.float()), nn.Parameter(w), k=16)
    x = torch.randn(5, 1, 64, generator=g)
    logits = out(x)  # (5, 1, 3000)
    ref = x.float() @ w.float().T  # exact fp32 over the bf16 rows
    assert logits.shape == (5, 1, 3000) and logits.dtype == torch.float32
    top = ref.topk(8, dim=-1).indices  # well inside the int8 pass's top 16 (its 16th may differ)
    assert torch.equal(logits.argmax(-1), ref.argmax(-1))
    torch.testing.assert_close(logits.gather(-1, top), ref.gather(-1, top), rtol=1e-6, atol=1e-5)
    err = (logits - ref).abs().max().item()
    assert 0 < err < 0.05 * ref.abs().max().item()  # the tail is the int8 pass: close, not exact
    alone = torch.cat([out(x[i:i + 1]) for i in range(5)])
    assert torch.equal(logits, alone)  # each row is what it is alone


def test_quantize_model_swaps_linears_and_keeps_names(tiny_model_factory):
    m = tiny_model_factory()
    names = {n for n, mod in m.named_modules() if isinstance(mod, nn.Linear)}
    quantize_model(m, "int8")
    assert quantized_mode(m) == "int8"
    # the output projection becomes an int8 pass + exact top-k (RescoredOutput.approx)
    assert {n for n, mod in m.named_modules() if isinstance(mod, Int8Linear)} == names - {"output"} | {"output.approx"}
    assert "layers.0.attention.wq.weight_int8" in m.state_dict()
    assert m.output.rows.dtype == torch.bfloat16 and m.inv_freq.dtype == torch.float32
    assert m.norm.weight.dtype == torch.float32 and m.layers[0].ffn_norm.weight.dtype == torch.float32  # fp32 residual
    with pytest.raises(QuantizeError, match="int3"):
        quantize_model(m, "int3")


@pytest.fixture
def tiny_model_factory():
    from inhouse.config import ModelArgs
    from inhouse.model.transformer import Transformer

    def make():
        torch.manual_seed(0)
        args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, hidden_dim=160, max_seq_len=128)
        return Transformer(args).eval()  # fp32: quantize_model casts what it leaves to bf16

    return make


def test_resolve_quantize_choices():
    assert resolve_quantize("auto", torch.bfloat16, "auto", "mixed: Q4_1 x210, F32 x61, Q8_0 x1") == "int4"
    assert resolve_quantize("auto", torch.bfloat16, "auto", "mixed: Q8_0 x210, F32 x61") == "int8"
    assert resolve_quantize("auto", torch.float32, "float32", "mixed: Q4_1 x210, F32 x61") == "none"
    assert resolve_quantize("auto", torch.bfloat16, "bfloat16", "mixed: Q4_1 x210, F32 x61") == "none"  # explicit
    assert resolve_quantize("auto", torch.bfloat16, "auto", "bfloat16") == "none"
    assert resolve_quantize("int8", torch.bfloat16, "auto", "bfloat16") == "int8"
    with pytest.raises(QuantizeError, match="bfloat16 activations"):
        resolve_quantize("int8", torch.float32, "float32", "F32")
    with pytest.raises(QuantizeError, match="'q3'"):
        resolve_quantize("q3", torch.bfloat16, "auto", "F32")


# --------------------------------------------------------------------------- quality on the embedded model
@pytest.fixture(scope="module")
def models():
    ref = open_model(None, dtype="float32")
    assert ref.quantize == "none"
    int4 = open_model(None)  # the default path: Q4_1 GGUF -> int4 weights, bf16 activations
    assert int4.quantize == "int4" and int4.dtype == torch.bfloat16
    int8 = open_model(None, quantize="int8")
    bf16 = open_model(None, dtype="bfloat16")
    assert bf16.quantize == "none"
    ids = ref.tokenizer.encode(TEXT, bos=False)
    assert len(ids) > 180
    return ref, {"int4": int4, "int8": int8, "bf16": bf16}, torch.tensor([ids])


@torch.inference_mode()
def _full_logits(model, ids):
    return model(ids)[0].float()  # (T, V): one forward over the whole text


@torch.inference_mode()
def _stepwise_logits(model, ids):
    """One token at a time through the KV cache: the decode kernels (first 256 tokens, for time)."""
    T = ids.shape[1]
    caches = model.new_caches(1, T)
    out = [model(ids[:, i:i + 1], input_pos=torch.tensor([[i]]), caches=caches)[0, 0] for i in range(T)]
    return torch.stack(out).float()


@torch.inference_mode()
def _fused_logits(model, ids):
    """The same, through the fused native decode step (what the engine runs for decode steps)."""
    from inhouse.model.fused_decode import FusedDecode

    fused, T = FusedDecode(model), ids.shape[1]
    caches = model.new_caches(1, T)
    out = [fused(ids[:, i:i + 1], input_pos=torch.tensor([[i]]), caches=caches)[0, 0] for i in range(T)]
    return torch.stack(out).float()


def _agreement_and_ppl(logits, ref_logits, ids):
    target = ids[0, 1:]
    agree = (logits[:-1].argmax(-1) == ref_logits[:-1].argmax(-1)).float().mean().item()

    def ppl(lg):
        return math.exp(torch.nn.functional.cross_entropy(lg[:-1], target).item())

    return agree, ppl(logits), ppl(ref_logits)


@pytest.mark.parametrize("which,how,min_agree,max_ppl", [
    ("int4", "full", 0.98, 0.01), ("int4", "stepwise", 0.98, 0.01), ("int4", "fused", 0.98, 0.01),  # the bar
    ("bf16", "full", 0.955, 0.01), ("bf16", "stepwise", 0.955, 0.01),
    ("int8", "full", 0.955, 0.01), ("int8", "stepwise", 0.95, 0.01), ("int8", "fused", 0.95, 0.01),
])
def test_fast_paths_track_the_fp32_reference(models, which, how, min_agree, max_ppl):
    ref, fast, ids = models
    m = fast[which].model
    fn = {"full": _full_logits, "stepwise": _stepwise_logits, "fused": _fused_logits}[how]
    if how != "full":
        ids = ids[:, :256]
    ref_logits = _full_logits(ref.model, ids)
    agree, ppl, ref_ppl = _agreement_and_ppl(fn(m, ids), ref_logits, ids)
    print(f"{which} {how}: top-1 agreement {agree:.4f}, perplexity {ppl:.4f} vs {ref_ppl:.4f}")
    assert ref_ppl < 30  # the reference itself reads the text sensibly
    assert agree >= min_agree
    assert abs(ppl / ref_ppl - 1) <= max_ppl


def test_default_quantized_greedy_answer_is_sensible():
    from inhouse import LLM, SamplingParams

    llm = LLM(max_model_len=512)
    assert llm.loaded.quantize == "int4"
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0, max_tokens=24))
    assert "Paris" in out[0].outputs[0].text
