"""SamplingParams: vLLM defaults, normalisation, and one failing case per validated field."""

import dataclasses
import math

import pytest

from inhouse.engine.params import SamplingParams, SamplingParamsError


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.0, 0.0, 0.0)
    assert p.seed is None
    assert p.max_tokens == 16
    assert p.min_tokens == 0
    assert p.stop == [] and p.stop_token_ids == []
    assert p.ignore_eos is False
    assert p.logprobs is None and p.prompt_logprobs is None
    assert p.include_stop_str_in_output is False
    assert p.skip_special_tokens is True
    assert p.is_greedy is False


def test_field_names_cover_the_vllm_subset():
    names = [f.name for f in dataclasses.fields(SamplingParams)]
    assert names == [
        "n", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
        "frequency_penalty", "seed", "max_tokens", "min_tokens", "stop", "stop_token_ids", "ignore_eos",
        "logprobs", "prompt_logprobs", "include_stop_str_in_output", "skip_special_tokens",
    ]  # fmt: skip


def test_stop_normalised_to_list():
    assert SamplingParams(stop="\n\n").stop == ["\n\n"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(stop_token_ids=[7, 3, 7, 9, 3]).stop_token_ids == [7, 3, 9]


def test_seed_minus_one_means_none():
    assert SamplingParams(seed=-1).seed is None
    assert SamplingParams(seed=0).seed == 0


def test_logprobs_bool_spellings():
    assert SamplingParams(logprobs=True).logprobs == 1
    assert SamplingParams(logprobs=False).logprobs is None
    assert SamplingParams(prompt_logprobs=True).prompt_logprobs == 1
    assert SamplingParams(logprobs=0).logprobs == 0


@pytest.mark.parametrize("temperature, greedy", [(0.0, True), (1e-6, True), (1e-5, False), (0.7, False)])
def test_is_greedy_threshold(temperature, greedy):
    assert SamplingParams(temperature=temperature).is_greedy is greedy


def test_greedy_resets_truncation_knobs():
    p = SamplingParams(temperature=0.0, top_p=0.5, top_k=5, min_p=0.2)
    assert (p.top_p, p.top_k, p.min_p) == (1.0, 0, 0.0)
    q = SamplingParams(temperature=0.5, top_p=0.5, top_k=5, min_p=0.2)
    assert (q.top_p, q.top_k, q.min_p) == (0.5, 5, 0.2)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"top_p": 1.0}, {"top_k": -1}, {"top_k": 0}, {"top_k": 1}, {"min_p": 1.0}, {"min_p": 0.0},
        {"presence_penalty": -2.0}, {"frequency_penalty": 2.0}, {"max_tokens": None}, {"max_tokens": 1},
        {"min_tokens": 16}, {"temperature": 5.0}, {"temperature": 0}, {"repetition_penalty": 0.01},
        {"max_tokens": None, "min_tokens": 1000}, {"logprobs": 20}, {"prompt_logprobs": 0},
    ],
)  # fmt: skip
def test_boundary_values_accepted(kwargs):
    p = SamplingParams(**kwargs)
    for name, value in kwargs.items():
        assert getattr(p, name) == value


@pytest.mark.parametrize(
    "field, value",
    [
        ("n", 0),
        ("n", 1.5),
        ("temperature", -0.1),
        ("temperature", math.inf),
        ("temperature", math.nan),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("top_p", math.nan),
        ("top_k", -2),
        ("top_k", 2.0),
        ("min_p", -0.1),
        ("min_p", 1.5),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("repetition_penalty", math.inf),
        ("presence_penalty", 2.5),
        ("presence_penalty", -2.01),
        ("frequency_penalty", 3.0),
        ("frequency_penalty", math.nan),
        ("seed", 1.5),
        ("max_tokens", 0),
        ("max_tokens", 2.0),
        ("min_tokens", -1),
        ("logprobs", -1),
        ("prompt_logprobs", -3),
        ("stop", ["ok", ""]),
        ("stop", 5),
        ("stop_token_ids", [1, -2]),
        ("stop_token_ids", [1, "2"]),
        ("ignore_eos", "yes"),
        ("skip_special_tokens", 1),
    ],
)
def test_invalid_value_names_field_and_value(field, value):
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(**{field: value})
    assert isinstance(info.value, ValueError)
    assert info.value.field == field
    assert f"SamplingParams.{field} " in str(info.value)
    assert str(info.value).endswith(f"got {value!r}")


def test_min_tokens_above_max_tokens():
    with pytest.raises(SamplingParamsError, match=r"SamplingParams\.min_tokens .*max_tokens=4.*got 5"):
        SamplingParams(max_tokens=4, min_tokens=5)


def test_greedy_with_n_above_one_rejected():
    with pytest.raises(SamplingParamsError, match=r"SamplingParams\.n .*greedy.*got 2"):
        SamplingParams(temperature=0.0, n=2)
    assert SamplingParams(temperature=0.8, n=2).n == 2


def test_replace_revalidates():
    p = SamplingParams(temperature=0.7)
    with pytest.raises(SamplingParamsError, match="top_p"):
        dataclasses.replace(p, top_p=2.0)
