"""LoRA adapters in the engine: one call mixing adapters and the base model runs them in the same
batches, and each request's greedy output equals a separate run on a model carrying only its adapter
(applied with the single-adapter `load_adapter` path, independent of the multi-adapter layers)."""

from __future__ import annotations

import sys

import pytest
import torch

from inhouse import LLM, LoRARequest, SamplingParams
from inhouse.engine.engine import EngineError
from inhouse.finetune.adapters import load_adapter

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


T = sys.modules["_inhouse_tests_tiny"]  # tests/tiny.py


def tiny():
    """A fresh copy of the engine tests' tiny Llama (the session fixture must not get adapter layers)."""
    return T.make_tiny_llama()


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    d = tmp_path_factory.mktemp("adapters")
    out = {}
    for i, (name, targets, rank) in enumerate([("x", "wq,wv,w2", 4), ("y", "all", 8), ("z", "wo,w1", 2)]):
        out[name] = T.write_random_adapter(tiny(), d / name, targets, rank, seed=i, b_seed=10 + i, b_std=0.2)
    return out


def reference(tok, adapter_dir, prompts):
    """Greedy ids of `prompts` on a fresh model with only this adapter (None: none)."""
    model = tiny()
    if adapter_dir is not None:
        load_adapter(model, adapter_dir)
    llm = LLM.from_model(model, tok, name="ref", max_model_len=128)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]


def test_mixed_adapters_in_one_call_equal_separate_runs(tok, adapter_dirs):
    texts = ["Hello there", "The capital of France is", "def f(x):\n    return x", "مرحبا بالعالم",
             "One two three four five six seven eight nine ten eleven twelve", "🙂 emoji", "Lorem ipsum", "Why?"]
    which = ["x", None, "y", "z", "x", "y", None, "z"]
    prompts = [{"prompt_token_ids": tok.encode(t, bos=True)} for t in texts]
    reqs = [None if w is None else LoRARequest(w, i + 1, adapter_dirs[w]) for i, w in enumerate(which)]
    # 4 rows, 2 adapter slots for 3 adapters, small prompt chunks: requests wait for rows and for
    # slots, adapters are evicted and loaded again, chunks and one-token rows interleave.
    llm = LLM.from_model(tiny(), tok, name="tiny", max_model_len=128, max_num_seqs=4, max_loras=2,
                         max_num_batched_tokens=8)
    batches: list[list[int]] = []
    llm.model.register_forward_pre_hook(
        lambda mod, args: batches.append(list(llm.engine.adapters.rows.per_row)))
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, lora_request=reqs)]

    for name in (None, "x", "y", "z"):
        idx = [i for i, w in enumerate(which) if w == name]
        want = reference(tok, None if name is None else adapter_dirs[name], [prompts[i] for i in idx])
        assert [got[i] for i in idx] == want, name
    assert len({tuple(got[i]) for i in (0, 1, 2, 3)}) == 4  # the adapters change the output
    bank = llm.engine.adapters
    assert bank.evictions >= 1 and bank.loads == 2 + bank.evictions  # 3 adapters through 2 slots
    assert sorted(bank.names()) == ["x", "y", "z"]
    # Some forward ran base rows and rows of two different adapters together.
    assert any(0 in b and len(set(b) - {0}) >= 2 for b in batches)
    assert all(r == 0 for r in bank.refs.values())  # every request released its adapter


def test_default_adapter_stream_chat_and_errors(tok, adapter_dirs):
    prompt = {"prompt_token_ids": tok.encode("Hello there", bos=True)}
    [want_x] = reference(tok, adapter_dirs["x"], [prompt])
    [want_base] = reference(tok, None, [prompt])
    llm = LLM.from_model(tiny(), tok, name="tiny", max_model_len=128)
    assert llm.add_lora(adapter_dirs["x"]) == "x"  # named after its directory
    llm.default_adapter = "x"  # what LLM(model, adapter=DIR) sets
    assert llm.generate(prompt, GREEDY)[0].outputs[0].token_ids == want_x
    ids = [t for d in llm.stream(prompt["prompt_token_ids"], GREEDY) for t in d.token_ids]
    assert ids == want_x
    llm.default_adapter = None
    ids = [t for d in llm.stream(prompt["prompt_token_ids"], GREEDY, lora_request=LoRARequest("x", 1, adapter_dirs["x"]))
           for t in d.token_ids]
    assert ids == want_x
    assert llm.generate(prompt, GREEDY)[0].outputs[0].token_ids == want_base
    with pytest.raises(EngineError, match="2 lora_request entries for 1 prompts"):
        llm.generate(prompt, GREEDY, lora_request=[None, None])
    with pytest.raises(EngineError, match="unknown LoRA adapter 'nope'; known: x"):
        llm.engine.add_request([1, 2, 3], GREEDY, adapter="nope")
    msgs = [{"role": "user", "content": "Hi"}]
    chat_x = llm.chat(msgs, GREEDY, lora_request=LoRARequest("x", 1, adapter_dirs["x"]))[0].outputs[0].token_ids
    chat_base = llm.chat(msgs, GREEDY)[0].outputs[0].token_ids
    assert chat_x != chat_base


@pytest.mark.slow
def test_compiled_decode_with_mixed_adapters_matches_eager(tok, adapter_dirs, tmp_path, monkeypatch):
    """Adapters loaded, evicted and mixed per row through the compiled decode step give the eager tokens."""
    monkeypatch.setenv("INHOUSE_COMPILE_CACHE", str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    prompts = [{"prompt_token_ids": tok.encode(t, bos=True)} for t in ("Hello there", "Why?", "Lorem ipsum", "One two")]
    which = ["x", None, "y", "z"]
    reqs = [None if w is None else LoRARequest(w, i + 1, adapter_dirs[w]) for i, w in enumerate(which)]

    def run(compile: bool):
        llm = LLM.from_model(tiny(), tok, name="tiny", max_model_len=128, max_num_seqs=4, max_loras=2,
                             compile=compile)
        # base only first: the compiled step that skips module guards; then the adapters' LoRA
        # wrappers swap layers, and the step must see them
        base = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]
        return base, [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, lora_request=reqs)]

    eager_base, eager = run(False)
    assert run(True) == (eager_base, eager)
    assert len({tuple(t) for t in eager}) == 4 and eager != eager_base
    torch._dynamo.reset()
