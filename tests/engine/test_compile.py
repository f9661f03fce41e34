"""The opt-in compiled decode step gives the eager step's greedy tokens."""

import importlib.util
from pathlib import Path

import pytest
import torch

from inhouse import LLM, SamplingParams

_spec = importlib.util.spec_from_file_location("_engine_conftest", Path(__file__).parent / "conftest.py")
_conftest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_conftest)


@pytest.mark.slow
def test_compiled_decode_matches_eager(tmp_path, monkeypatch, tok):
    monkeypatch.setenv("INHOUSE_COMPILE_CACHE", str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    model = _conftest.make_tiny_llama()
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = [{"prompt_token_ids": [1, 2, 3, 4, 5]}, {"prompt_token_ids": [7, 8, 9]}]
    eager = LLM.from_model(model, tok, max_model_len=64).generate(prompts, params)
    compiled_llm = LLM.from_model(model, tok, max_model_len=64, compile=True)
    assert compiled_llm.engine._decode_model is not model
    compiled = compiled_llm.generate(prompts, params)
    for e, c in zip(eager, compiled):
        assert c.outputs[0].token_ids == e.outputs[0].token_ids
    torch._dynamo.reset()


@pytest.mark.slow
def test_warm_up_compiles_every_kind_of_decode_step(tmp_path, monkeypatch, tok):
    """After `Engine.warm_up`, batches of any size, at any cache rows, compile nothing more.

    Before, every batch size and first cache row was a compilation of its own (~40 s each on the
    embedded model): a server under changing load stalled on them.
    """
    monkeypatch.setenv("INHOUSE_COMPILE_CACHE", str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    torch._dynamo.reset()
    model = _conftest.make_tiny_llama()
    llm = LLM.from_model(model, tok, max_model_len=64, max_num_seqs=8, compile=True)
    assert llm.engine.warm_up() == 5
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    out, compiled_frames = {}, None
    for name, e in (("compiled", llm.engine), ("eager", None)):
        if e is None:
            compiled_frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            e = LLM.from_model(_conftest.make_tiny_llama(), tok, max_model_len=64, max_num_seqs=8).engine
        reqs = []
        # requests join one step apart and finish at different lengths: batches of 1..8 rows,
        # starting at different cache rows, contiguous and (once some finish) scattered
        for i in range(8):
            reqs.append(e.add_request([1 + i, 2, 3 + i], SamplingParams(temperature=0, max_tokens=4 + 3 * (i % 3),
                                                                        ignore_eos=True)))
            e.step()
        while e.has_unfinished():
            e.step()
        out[name] = [r.seqs[0].output_ids for r in reqs]
    assert out["compiled"] == out["eager"]
    assert compiled_frames == frames  # nothing compiled after the warm-up
    torch._dynamo.reset()
