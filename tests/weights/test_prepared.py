"""The prepared-weights cache: a second load of a quantized GGUF file reads back, bit for bit,
what the first one converted; a changed file, a damaged entry or the cache turned off fall back
to converting the file."""

import logging
import os
import shutil

import pytest
import torch

import inhouse.weights as weights
from inhouse import LLM, SamplingParams
from inhouse.model.quant import native_kernel_fits
from inhouse.resolve import embedded_model_path, open_model
from inhouse.weights import prepared

needs_native = pytest.mark.skipif(not native_kernel_fits(64),
                                  reason="the cache holds native-kernel layouts only (x86-64 with AVX2 or AVX-512)")


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """A copy of the embedded model (its modification time is the tests' to change)."""
    path = tmp_path_factory.mktemp("model") / "smollm2.gguf"
    shutil.copyfile(embedded_model_path(), path)
    return str(path)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("INHOUSE_WEIGHT_CACHE", str(d))
    return d


def _entries(cache):
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


def _tensors(model):
    return dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))


def _no_conversion(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the file was read although an entry exists")
    monkeypatch.setattr(weights, "inspect_checkpoint", refuse)


@needs_native
def test_a_second_load_reads_back_exactly_what_the_first_converted(model_file, cache, monkeypatch):
    first = open_model(model_file)
    [name] = _entries(cache)
    files = sorted(p.name for p in (cache / name).iterdir())
    assert files == ["manifest.json", "tokenizer.json", "weights.bin"]
    assert all((cache / name / f).stat().st_mode & 0o077 == 0 for f in files)  # private, like the model

    _no_conversion(monkeypatch)
    second = open_model(model_file)
    assert (second.dtype, second.quantize, second.source, second.args) == (first.dtype, first.quantize, "gguf", first.args)
    a, b = _tensors(first.model), _tensors(second.model)
    assert a.keys() == b.keys() and len(a) > 600
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k
    # the tie is kept, not copied: the embedding (the file's Q8_0 rows) and the output's pass share one matrix
    emb, out = second.model.tok_embeddings, second.model.output
    assert out.rows is None and emb.weight_int8 is out.approx.weight_int8 and emb.scales is out.approx.scales
    assert repr(second.model) == repr(first.model)
    # every tensor in one block: the engine's huge-page move has nothing left to do
    assert len({t.untyped_storage().data_ptr() for t in b.values()}) == 1

    ta, tb = first.tokenizer, second.tokenizer
    for attr in ("vocab_size", "bos_id", "eos_id", "stop_ids", "chat_template", "add_bos", "special_tokens"):
        assert getattr(ta, attr) == getattr(tb, attr), attr
    text = "Hello <|im_start|> wörld 😀 مرحبا\n\ndef f(x):\n    return x"
    for allow in (False, True):
        assert ta.encode(text, allow_special=allow) == tb.encode(text, allow_special=allow)
    ids = torch.tensor([ta.encode("The capital of France is")])
    with torch.no_grad():
        assert torch.equal(first.model(ids), second.model(ids))


@needs_native
def test_greedy_outputs_from_an_entry_equal_the_converted_files(model_file, cache):
    params = SamplingParams(temperature=0, max_tokens=12)
    prompt = [{"role": "user", "content": "Name three colors."}]
    converted = LLM(model_file, max_model_len=256, max_num_seqs=2).chat(prompt, params)[0].outputs[0]
    assert len(_entries(cache)) == 1
    read_back = LLM(model_file, max_model_len=256, max_num_seqs=2).chat(prompt, params)[0].outputs[0]
    assert read_back.token_ids == converted.token_ids and len(converted.token_ids) == 12


@needs_native
def test_a_changed_file_is_converted_again_and_its_old_entry_removed(model_file, cache, monkeypatch):
    open_model(model_file)
    [old] = _entries(cache)
    st = os.stat(model_file)
    os.utime(model_file, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    calls = []
    real = weights.inspect_checkpoint
    monkeypatch.setattr(weights, "inspect_checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    open_model(model_file)
    assert calls == [1]
    [new] = _entries(cache)
    assert new != old and new.split("-")[0] == old.split("-")[0]  # the same file and options, a new version


@needs_native
def test_a_damaged_entry_is_dropped_and_the_file_converted(model_file, cache, caplog):
    reference = open_model(model_file)
    [name] = _entries(cache)
    size = (cache / name / "weights.bin").stat().st_size
    assert size > 90e6  # SmolLM2-135M: 4-bit layers and the Q8_0 vocabulary, as in the file
    with open(cache / name / "weights.bin", "r+b") as f:
        f.truncate(1000)
    with caplog.at_level(logging.WARNING, logger="inhouse.weights"):
        again = open_model(model_file)
    assert any("not used" in r.getMessage() and "ends after" in r.getMessage() for r in caplog.records)
    a, b = _tensors(reference.model), _tensors(again.model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    [rewritten] = _entries(cache)  # converted and written again
    assert rewritten == name and (cache / name / "weights.bin").stat().st_size == size


@needs_native
def test_only_the_most_recently_used_entries_are_kept(model_file, cache, monkeypatch):
    monkeypatch.setattr(prepared, "MAX_ENTRIES", 1)
    open_model(model_file, quantize="int4")
    [int4] = _entries(cache)
    open_model(model_file, quantize="int8")
    [int8] = _entries(cache)
    assert int8 != int4 and int8.split("-")[0] != int4.split("-")[0]


def test_the_cache_can_be_turned_off(model_file, tmp_path, monkeypatch):
    monkeypatch.setenv("INHOUSE_WEIGHT_CACHE", "0")
    monkeypatch.setattr(os.path, "expanduser", lambda p: str(tmp_path / "home"))
    assert prepared.cache_dir() is None and prepared.entry_key(model_file, "auto", "auto") is None
    open_model(model_file)
    assert not (tmp_path / "home").exists()


def test_no_entry_without_the_native_layout_or_for_unquantized_runs(model_file, cache, monkeypatch):
    monkeypatch.setenv("INHOUSE_NATIVE_KERNELS", "0")
    assert prepared.entry_key(model_file, "auto", "auto") is None
    monkeypatch.undo()
    monkeypatch.setenv("INHOUSE_WEIGHT_CACHE", str(cache))
    open_model(model_file, quantize="none")  # nothing to gain: the file's tensors are used as they are
    assert _entries(cache) == []


@needs_native
@pytest.mark.parametrize("vocabulary", ["q4", "q8"])
def test_a_quantized_embedding_comes_back_as_the_same_shared_rows(model_file, cache, vocabulary):
    """A model whose tied embedding is the file's rows (a Q4_1 or Q8_0 token_embd): the entry
    rebuilds the `Int4Embedding` / `Int8Embedding` and the output's pass on one matrix, bit for bit."""
    import sys

    model, _ = sys.modules["_inhouse_tests_tiny"].tiny_with_file_vocabulary(vocabulary)
    tokenizer = open_model(model_file).tokenizer
    key = prepared.entry_key(model_file, torch.bfloat16, "int4")
    assert prepared.save(key, model, tokenizer, source=model_file, dtype=torch.bfloat16, quantize="int4")
    back = prepared.load(key, model_file).model
    assert repr(back) == repr(model)
    table = "weight_q4" if vocabulary == "q4" else "weight_int8"
    assert getattr(back.tok_embeddings, table) is getattr(back.output.approx, table) and back.output.rows is None
    assert back.dtype == torch.bfloat16
    a, b = _tensors(model), _tensors(back)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.tensor([[5, 17, 99, 1000]])
    with torch.no_grad():
        assert torch.equal(model(ids), back(ids))
