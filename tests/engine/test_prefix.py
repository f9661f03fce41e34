"""Prefix reuse: a prompt that starts like one whose keys/values a cache row holds starts from
them, and gives exactly the tokens a fresh computation gives (inhouse.engine.prefix)."""

import sys

import pytest
import torch

import inhouse.engine.engine as engine_module
from inhouse.engine.engine import Engine
from inhouse.engine.params import SamplingParams
from inhouse.engine.prefix import PrefixIndex, common_prefix
from inhouse.kernels import cpu_isa
from inhouse.model.quant import quantize_model
from inhouse.tokenizer import llama3_tokenizer

tiny = sys.modules["_inhouse_tests_tiny"]

needs_fused = pytest.mark.skipif(cpu_isa() is None, reason="prefix reuse runs on the fused native step (AVX2/AVX-512)")


def test_common_prefix_and_the_longest_row():
    assert common_prefix([1, 2, 3, 4], [1, 2, 5], 10) == 2
    assert common_prefix([1, 2, 3], [1, 2, 3], 2) == 2  # the limit
    assert common_prefix([], [1], 5) == 0
    index = PrefixIndex(4)
    a, b = [7, 8, 9, 10, 11], [7, 8, 1]
    index.record(1, a, 4)  # holds a[:4] only
    index.record(3, b, 3)
    assert index.longest([7, 8, 9, 10, 11, 12], 100) == (1, 4)
    assert index.longest([7, 8, 1, 2], 100) == (3, 3)
    assert index.longest([7, 8, 9], 2) == (1, 2)  # ties go to the lowest row
    assert index.longest([5], 100) == (-1, 0)
    assert index.holds(1, a, 4) and not index.holds(1, a, 3) and not index.holds(1, list(a), 4) and index.holds(0, [], 0)
    index.forget(1)
    assert index.longest([7, 8, 9, 10], 100) == (3, 2)


_MODEL = {}


def _engine(max_num_seqs=4):
    """An engine on one int4 tiny model (its fused step applies), with a fresh cache."""
    if "m" not in _MODEL:
        _MODEL["m"] = quantize_model(tiny.make_tiny_llama(seed=11, std=0.3), "int4")
    return Engine(_MODEL["m"], llama3_tokenizer(), max_model_len=96, max_num_seqs=max_num_seqs)


def _run(engine, prompts, params):
    reqs = [engine.add_request(p, params) for p in prompts]
    while engine.has_unfinished():
        engine.step()
    return [[s.output_ids for s in r.seqs] for r in reqs]


SYSTEM = list(range(3, 40))  # a shared "system prompt" of 37 tokens
PROMPTS = [SYSTEM + [50 + i, 60 + i, 70] for i in range(5)]
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


@needs_fused
def test_reused_prefixes_give_the_tokens_of_a_fresh_engine():
    fresh = [_run(_engine(), [p], GREEDY)[0] for p in PROMPTS]  # each alone, on a new engine: nothing to reuse
    e = _engine()
    one_by_one = [_run(e, [p], GREEDY)[0] for p in PROMPTS]  # each after the others: their rows are free
    assert e.prompt_tokens_reused == 4 * len(SYSTEM)
    assert one_by_one == fresh
    e2 = _engine()
    together = _run(e2, PROMPTS[:2], GREEDY)  # nothing cached yet: both computed in one call
    assert e2.prompt_tokens_reused == 0
    # while those two rows are free, two more come: one takes a free row as it is, the other copies it
    later = _run(e2, PROMPTS[2:4], GREEDY)
    assert e2.prompt_tokens_reused == 2 * len(SYSTEM)
    assert together + later == fresh[:4]


@needs_fused
def test_a_running_sequences_row_is_copied_and_generated_tokens_count_too():
    e = _engine()
    first = e.add_request(PROMPTS[0], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    for _ in range(6):
        e.step()  # prompt and 5 generated tokens in its row
    follow_up = first.seqs[0].token_ids[:len(PROMPTS[0]) + 5] + [90, 91]  # a next turn: the answer so far, then more
    second = e.add_request(follow_up, GREEDY)
    while e.has_unfinished():
        e.step()
    assert e.prompt_tokens_reused == len(PROMPTS[0]) + 5
    assert [second.seqs[0].output_ids] == _run(_engine(), [follow_up], GREEDY)[0]


@needs_fused
def test_samples_of_one_request_and_long_prompts(monkeypatch):
    params = SamplingParams(temperature=0.8, max_tokens=6, n=2, seed=5, ignore_eos=True)
    e = _engine()
    _run(e, [PROMPTS[0]], GREEDY)
    reused = _run(e, [PROMPTS[1]], params)
    assert e.prompt_tokens_reused == len(SYSTEM) and reused == _run(_engine(), [PROMPTS[1]], params)
    # prompts over FUSED_PREFILL_MAX run through the eager model: never reused, never a source
    monkeypatch.setattr(engine_module, "FUSED_PREFILL_MAX", 8)
    e = _engine()
    _run(e, PROMPTS[:1], GREEDY)
    _run(e, PROMPTS[1:2], GREEDY)
    assert e.prompt_tokens_reused == 0
