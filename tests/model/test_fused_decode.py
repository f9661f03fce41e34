"""The fused native decode step (inhouse/kernels/decode_cpu.cpp) against the eager quantized model.

The eager model with the same quantized linears is the reference: the fused step runs the same
row kernels, so on a tiny model the logits agree to float rounding (the order of a few fp32 sums
differs). Its quality against the fp32 model on real text is in tests/model/test_quant.py.
"""

import sys

import pytest
import torch

from inhouse.kernels import cpu_isa
from inhouse.model.fused_decode import FusedDecode, fused_decode_unsupported
from inhouse.model.quant import quantize_model

make_tiny_llama = sys.modules["_inhouse_tests_tiny"].make_tiny_llama
tiny_with_file_vocabulary = sys.modules["_inhouse_tests_tiny"].tiny_with_file_vocabulary

pytestmark = pytest.mark.skipif(cpu_isa() is None, reason="the native kernels need AVX-512 VNNI or AVX2")


def quantized_tiny(mode: str, seed: int = 0):
    return quantize_model(make_tiny_llama(seed=seed, std=0.3), mode)


@torch.inference_mode()
def run_steps(step, model, ids, rows, n_rows=6):
    """Feed `ids` (B, T) one position at a time into cache rows `rows`; logits (B, T, V)."""
    B, T = ids.shape
    caches = model.new_caches(n_rows, T)
    out = [step(ids[:, i:i + 1], input_pos=torch.full((B, 1), i), caches=caches, cache_rows=rows)[:, 0] for i in range(T)]
    return torch.stack(out, 1), caches


def fused_and_eager(model, ids, rows, n_rows=6):
    """Logits of the fused step and of the eager model over `ids` (`run_steps`), relative to the
    largest logit: the first position (no cache read) within 3e-4; 95% of all positions within
    1e-3, every one within 1e-2. Later positions read bf16 keys and values that the two paths
    round from slightly different fp32 sums: now and then an entry lands one bf16 step apart
    (2^-8 relative), which moves that position's logits by up to ~4e-3 on a random tiny model
    (seen on an Intel Xeon: 3.9e-3 at one position, the neighbouring ones ~1e-4)."""
    eager, _ = run_steps(model, model, ids, rows, n_rows)
    fused, _ = run_steps(FusedDecode(model), model, ids, rows, n_rows)
    scale = eager.abs().max().item()
    err = (fused - eager).abs().amax(-1) / scale  # (B, T): per position
    assert err[:, 0].max().item() < 3e-4
    assert (err < 1e-3).float().mean().item() >= 0.95 and err.max().item() < 1e-2
    return fused, eager


@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_fused_step_equals_the_eager_model(mode):
    model = quantized_tiny(mode)
    assert fused_decode_unsupported(model) is None
    fused = FusedDecode(model)
    ids = torch.randint(0, model.args.vocab_size, (3, 24), generator=torch.Generator().manual_seed(1))
    rows = torch.tensor([4, 0, 2])  # scattered cache rows
    eager, eager_caches = run_steps(model, model, ids, rows)
    got, got_caches = run_steps(fused, model, ids, rows)
    assert got.shape == eager.shape == (3, 24, model.args.vocab_size) and got.dtype == torch.float32
    scale = eager.abs().max().item()
    assert scale > 1
    # the first token attends to itself only: float rounding alone
    assert (got[:, 0] - eager[:, 0]).abs().max().item() < 3e-4 * scale
    # later ones read keys/values that a last-bit difference may have rounded to the other
    # neighbouring bf16 value (0.4%): still far below what a wrong head, position or row would do
    assert (got - eager).abs().max().item() < 3e-3 * scale
    assert (got.argmax(-1) == eager.argmax(-1)).float().mean().item() >= 0.95
    # keys and values land in the same cache rows and positions (bf16: equal up to one rounding step)
    for ce, cf in zip(eager_caches, got_caches):
        for a, b in ((ce.k, cf.k), (ce.v, cf.v)):
            torch.testing.assert_close(b.float(), a.float(), rtol=1e-2, atol=1e-3)
            assert b[[1, 3, 5]].abs().sum() == 0  # rows no sequence uses stay untouched


def test_rows_do_not_depend_on_the_batch():
    """Each sequence is computed alone, bit for bit: the server's greedy outputs stay the sequential ones."""
    model = quantized_tiny("int4", seed=2)
    fused = FusedDecode(model)
    ids = torch.randint(0, model.args.vocab_size, (5, 10), generator=torch.Generator().manual_seed(3))
    together, _ = run_steps(fused, model, ids, torch.arange(5))
    for b in range(5):
        alone, _ = run_steps(fused, model, ids[b:b + 1], torch.tensor([b]))
        assert torch.equal(alone[0], together[b])


@pytest.mark.parametrize("vocabulary", ["int4 model", "q8"])
def test_amx_passes_change_no_bit(vocabulary):
    """Eight sequences at once take the row-tile kernel's AMX passes where the CPU has them
    (amx.h): the same logits and cache entries as the vector kernel's, also through a Q8_0
    vocabulary (int8 row tiles, as SmolLM2's file)."""
    from inhouse.kernels import amx_passes

    model = quantized_tiny("int4", seed=6) if vocabulary == "int4 model" else tiny_with_file_vocabulary("q8", seed=6)[0]
    fused = FusedDecode(model)
    ids = torch.randint(0, model.args.vocab_size, (8, 6), generator=torch.Generator().manual_seed(7))
    try:
        amx_passes(False)
        vector, vc = run_steps(fused, model, ids, torch.arange(8), n_rows=8)
        amx_passes(True)
        tiles, tc = run_steps(fused, model, ids, torch.arange(8), n_rows=8)
    finally:
        amx_passes(True)
    assert torch.equal(tiles, vector)
    for a, b in zip(vc, tc):
        assert torch.equal(a.k, b.k) and torch.equal(a.v, b.v)


def test_more_rows_than_one_kernel_pass_takes():
    """Batches over 8 rows take several passes over the weights (the kernel's tile): same results."""
    model = quantized_tiny("int4", seed=4)
    fused = FusedDecode(model)
    ids = torch.randint(0, model.args.vocab_size, (11, 4), generator=torch.Generator().manual_seed(5))
    rows = torch.arange(11)
    eager, _ = run_steps(model, model, ids, rows, n_rows=11)
    got, _ = run_steps(fused, model, ids, rows, n_rows=11)
    assert (got - eager).abs().max().item() < 3e-3 * eager.abs().max().item()


def test_other_models_are_refused_with_the_reason():
    fp32 = make_tiny_llama()
    why = fused_decode_unsupported(fp32)
    assert why is not None and "output projection" in why
    with pytest.raises(ValueError, match="cannot run this model"):
        FusedDecode(fp32)


def test_swapped_layers_and_longer_steps_go_to_the_fallback():
    model = quantized_tiny("int4")
    calls = []

    def fallback(tokens, **kw):
        calls.append(tokens.shape)
        return model(tokens, **kw)

    fused = FusedDecode(model, fallback=fallback)
    caches = model.new_caches(1, 8)
    with torch.inference_mode():
        fused(torch.tensor([[1, 2]]), input_pos=torch.tensor([[0, 1]]), caches=caches)  # two tokens: eager
        assert calls == [(1, 2)]
        fused(torch.tensor([[3]]), input_pos=torch.tensor([[2]]), caches=caches)
        assert len(calls) == 1  # one token: native
        model.__dict__["layers_changed"] = True  # what applying LoRA layers does
        fused(torch.tensor([[4]]), input_pos=torch.tensor([[3]]), caches=caches)
        assert calls[-1] == (1, 1)


def test_bad_positions_are_errors_not_crashes():
    model = quantized_tiny("int4")
    fused = FusedDecode(model)
    caches = model.new_caches(2, 8)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="position 8 is past the cache length 8"):
        fused(torch.tensor([[1]]), input_pos=torch.tensor([[8]]), caches=caches)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="cache row 2 is outside"):
        fused(torch.tensor([[1]]), input_pos=torch.tensor([[0]]), caches=caches, cache_rows=torch.tensor([2]))


def test_the_engine_decodes_the_embedded_model_natively():
    from inhouse import LLM, SamplingParams

    llm = LLM(max_model_len=256)
    assert isinstance(llm.engine._decode_model, FusedDecode)
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    prompt = [{"role": "user", "content": "What is the capital of France?"}]
    fused = llm.chat(prompt, greedy)[0].outputs[0]
    assert "Paris" in fused.text
    llm.engine._decode_model = llm.model  # the eager quantized model, same weights
    eager = llm.chat(prompt, greedy)[0].outputs[0]
    # float-rounding differences may flip a near-tie late in a long answer; the start must agree
    assert fused.token_ids[:12] == eager.token_ids[:12]


def test_a_decoder_built_before_the_weights_move_keeps_working():
    """The decoder holds raw pointers: moving the model's tensors afterwards (huge pages) must not pull
    its memory away (it keeps references of its own to what it points into)."""
    from inhouse.model.arena import move_to_huge_pages

    model = quantized_tiny("int4", seed=6)
    fused = FusedDecode(model)
    ids = torch.randint(0, model.args.vocab_size, (2, 6), generator=torch.Generator().manual_seed(7))
    before, _ = run_steps(fused, model, ids, torch.arange(2))
    move_to_huge_pages(model)
    import gc

    gc.collect()
    after, _ = run_steps(fused, model, ids, torch.arange(2))
    assert torch.equal(before, after)
    assert torch.equal(run_steps(FusedDecode(model), model, ids, torch.arange(2))[0], before)


@torch.inference_mode()
def test_prompt_rows_equal_token_by_token_steps_bit_for_bit():
    """`FusedDecode.rows`: a prompt fed whole, in chunks, or mixed with another sequence's rows leaves
    the same keys/values and gives the same logits as one decode step per token: what makes the
    engine's prefix reuse exact."""
    model = quantized_tiny("int4", seed=6)
    fused = FusedDecode(model)
    V = model.args.vocab_size
    ids = torch.randint(0, V, (2, 13), generator=torch.Generator().manual_seed(7))
    steps, step_caches = run_steps(fused, model, ids, torch.tensor([1, 3]))  # reference: one token per call

    def rows_call(caches, parts):
        """parts: [(sequence, start, stop)] in one call; logits of each part's last row."""
        tok, pos, row, last = [], [], [], []
        for b, i0, i1 in parts:
            tok += ids[b, i0:i1].tolist()
            pos += list(range(i0, i1))
            row += [[1, 3][b]] * (i1 - i0)
            last.append(len(tok) - 1)
        out = fused.rows(torch.tensor(tok), torch.tensor(pos), torch.tensor(row), caches, torch.tensor(last))
        assert out.shape == (len(parts), 1, V)
        return out[:, 0]

    whole = model.new_caches(6, 13)
    got = rows_call(whole, [(0, 0, 13), (1, 0, 13)])  # both prompts in one call
    assert torch.equal(got[0], steps[0, -1]) and torch.equal(got[1], steps[1, -1])
    chunked = model.new_caches(6, 13)
    rows_call(chunked, [(0, 0, 5)])
    rows_call(chunked, [(0, 5, 9), (1, 0, 2)])  # another sequence's rows share the call
    got = rows_call(chunked, [(1, 2, 13), (0, 9, 13)])
    assert torch.equal(got[1], steps[0, -1]) and torch.equal(got[0], steps[1, -1])
    for ref, a, b in zip(step_caches, whole, chunked):
        for x, y, z in ((ref.k, a.k, b.k), (ref.v, a.v, b.v)):
            assert torch.equal(x, y) and torch.equal(x, z)
    with pytest.raises(RuntimeError, match="logit row"):
        fused.rows(torch.tensor([1, 2]), torch.tensor([0, 1]), torch.tensor([0, 0]), whole, torch.tensor([2]))



@pytest.mark.parametrize("vocabulary", ["q4", "q8"])
def test_a_quantized_vocabulary_is_the_files_rows_and_runs_fused(vocabulary):
    """A tied token_embd given as Q4_1 or Q8_0 codes stays the file's rows, one matrix shared by the
    embedding lookup and the output pass, in the eager model and the fused step."""
    from inhouse.model.quant import Int4Embedding, Int4Linear, Int8Embedding, Int8Linear, RescoredOutput

    model, ref = tiny_with_file_vocabulary(vocabulary)
    emb, out = model.tok_embeddings, model.output
    assert type(out) is RescoredOutput and out.rows is None
    if vocabulary == "q4":
        assert type(emb) is Int4Embedding and type(out.approx) is Int4Linear
        assert emb.weight_q4 is out.approx.weight_q4  # one matrix, not two
    else:
        assert type(emb) is Int8Embedding and type(out.approx) is Int8Linear and out.approx.groups
        assert emb.weight_int8 is out.approx.weight_int8 and emb.scales is out.approx.scales
        assert emb.weight_int8.dtype == torch.int8 and emb.scales.dtype == torch.float16
    assert model.dtype == torch.bfloat16
    ids = torch.randint(0, model.args.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
    # the embedding's rows are the file's values, exactly
    assert torch.equal(emb(ids), ref.tok_embeddings(ids))
    # logits: the top ones recomputed from those rows, exact to fp32 rounding; the rest within the
    # int16 activations' rounding
    with torch.no_grad():
        h = torch.randn(5, model.args.dim, generator=torch.Generator().manual_seed(4))
        got, want = out(h), (h.double() @ ref.tok_embeddings.weight.double().T)
    top = want.topk(8, dim=-1).indices
    torch.testing.assert_close(got.gather(1, top).double(), want.gather(1, top), rtol=1e-5, atol=1e-5)
    assert ((got.double() - want).norm() / want.norm()).item() < 1e-4
    # the fused step reads the same rows
    assert fused_decode_unsupported(model) is None
    fused, eager = fused_and_eager(model, ids, torch.tensor([1, 3]))
    assert (fused.argmax(-1) == eager.argmax(-1)).float().mean().item() >= 0.95


@pytest.mark.parametrize("head_dim,n_heads,n_kv_heads", [(64, 3, 1), (64, 10, 2), (128, 4, 1), (128, 6, 2), (128, 2, 2)])
def test_grouped_query_attention_reads_each_kv_head_once_for_its_queries(head_dim, n_heads, n_kv_heads):
    """The fused step attends all the query heads of a kv head in one pass over its cache (a few at a
    time: 4 of 64 dims, 2 of 128): every group size and head width against the eager model, over
    more positions than one block of 16 scores."""
    from inhouse.config import ModelArgs
    from inhouse.model.transformer import Transformer

    args = ModelArgs(dim=n_heads * head_dim, n_layers=2, n_heads=n_heads, n_kv_heads=n_kv_heads, vocab_size=256,
                     hidden_dim=128, max_seq_len=64)
    torch.manual_seed(7)
    model = Transformer(args).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    model = quantize_model(model, "int4")
    assert fused_decode_unsupported(model) is None
    ids = torch.randint(0, 256, (2, 37), generator=torch.Generator().manual_seed(8))
    fused_and_eager(model, ids, torch.tensor([1, 0]), n_rows=2)


@torch.inference_mode()
def test_a_q8_0_file_in_int8_mode_keeps_every_matrix_as_it_is_and_runs_fused():
    """Every matrix given as Q8_0 codes, quantize=int8: each linear is the group form of
    `Int8Linear` (the file's values exactly), and the fused step agrees with the eager model."""
    from inhouse.model.quant import Int8Embedding, Int8Linear, quantize_tensor
    from inhouse.model.transformer import Transformer

    tiny = sys.modules["_inhouse_tests_tiny"]
    dense = tiny.make_tiny_llama(seed=2, std=0.3)
    args = dense.args.replace(tie_embeddings=True)
    with torch.device("meta"):
        model = Transformer(args)
    ref = Transformer(args)
    for name, p in dense.named_parameters():
        if name == "output.weight":
            continue
        value = tiny._int8_codes(p.detach()) if p.dim() == 2 else p.detach()
        ref.get_parameter(name).copy_(value.dense() if p.dim() == 2 else value)
        quantize_tensor(model, name, value, "int8")
    model.inv_freq = ref.inv_freq
    model.eval()
    wq = model.layers[0].attention.wq
    assert type(wq) is Int8Linear and wq.groups
    assert torch.equal(wq.dequantized(torch.float32), ref.layers[0].attention.wq.weight)
    assert type(model.tok_embeddings) is Int8Embedding
    assert fused_decode_unsupported(model) is None
    ids = torch.randint(0, args.vocab_size, (2, 10), generator=torch.Generator().manual_seed(5))
    fused_and_eager(model, ids, torch.tensor([0, 2]))
    # and the model reads the file's values: logits of the dense fp32 model, to the activations' rounding
    want = ref(ids)
    got = model(ids)
    assert ((got - want).norm() / want.norm()).item() < 1e-2
