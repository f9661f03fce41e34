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
