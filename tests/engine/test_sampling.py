"""Sampling functions: exact sets on hand-made distributions, parity with transformers' logits
processors, seeded reproducibility independent of the batch, and empirical frequencies vs softmax."""

import math

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from inhouse.engine.params import SamplingParams
from inhouse.engine.sampling import (
    SamplingTensors,
    apply_min_tokens,
    apply_penalties,
    apply_temperature,
    apply_top_k_top_p_min_p,
    compute_logprobs,
    make_generator,
    sample,
    sample_tokens,
    token_counts,
)

NEG_INF = float("-inf")


def _logits_from_probs(probs):
    return torch.tensor(probs, dtype=torch.float64).log().float().unsqueeze(0)  # (1, V)


def _kept(logits_row):
    return sorted(torch.nonzero(torch.isfinite(logits_row)).flatten().tolist())


def _filter(probs, top_k=0, top_p=1.0, min_p=0.0):
    out = apply_top_k_top_p_min_p(
        _logits_from_probs(probs), torch.tensor([top_k]), torch.tensor([top_p]), torch.tensor([min_p])
    )
    return _kept(out[0])


def _chi2_sf(stat, df):
    """Survival function of the chi-square distribution (regularised upper gamma Q(df/2, stat/2))."""
    y = stat / 2.0
    if df % 2 == 0:
        return math.exp(-y) * sum(y**i / math.factorial(i) for i in range(df // 2))
    return math.erfc(math.sqrt(y)) + sum(
        math.exp(-y) * y ** (j + 0.5) / math.gamma(j + 1.5) for j in range((df - 1) // 2)
    )


def _chi2_stat(counts, expected_probs, n):
    stat, df = 0.0, -1
    for c, p in zip(counts, expected_probs):
        if p == 0:
            assert c == 0, "drew a token of probability 0"
            continue
        stat += (c - n * p) ** 2 / (n * p)
        df += 1
    return stat, df


def test_chi2_helper_known_values():
    # Textbook critical values: P(chi2_1 > 3.841) = 0.05, P(chi2_4 > 9.488) = 0.05, P(chi2_5 > 20.515) = 0.001.
    assert _chi2_sf(3.841, 1) == pytest.approx(0.05, abs=1e-4)
    assert _chi2_sf(9.488, 4) == pytest.approx(0.05, abs=1e-4)
    assert _chi2_sf(20.515, 5) == pytest.approx(0.001, abs=1e-5)


# --- greedy -------------------------------------------------------------------------------------


def test_greedy_is_argmax():
    torch.manual_seed(0)
    logits = torch.randn(6, 1000)
    tokens = sample(logits, torch.zeros(6), [None] * 6)
    assert tokens.dtype == torch.int64
    assert torch.equal(tokens, logits.argmax(-1))


def test_greedy_rows_in_a_mixed_batch_are_argmax_and_draw_nothing():
    torch.manual_seed(1)
    logits = torch.randn(3, 50)
    gen = make_generator(5)
    state = gen.get_state()
    tokens = sample(logits, torch.tensor([0.0, 1.0, 0.0]), [gen, None, None])
    assert tokens[0] == logits[0].argmax() and tokens[2] == logits[2].argmax()
    assert torch.equal(gen.get_state(), state)  # the greedy row's generator was not consumed


def test_sample_tokens_all_greedy_is_argmax_of_penalised_logits():
    logits = torch.tensor([[2.0, 1.9, -1.0], [0.1, 0.2, 0.3]])
    params = [SamplingParams(temperature=0.0, repetition_penalty=1.5), SamplingParams(temperature=0.0)]
    st = SamplingTensors.from_params(params)
    counts = token_counts([[0], []], 3)
    tokens = sample_tokens(logits, st, [None, None], output_counts=counts, prompt_mask=counts > 0)
    # Row 0: 2.0 / 1.5 = 1.33 < 1.9, so the penalty moves the argmax from 0 to 1.
    assert tokens.tolist() == [1, 2]


def test_top_k_one_equals_greedy():
    torch.manual_seed(2)
    logits = torch.randn(5, 300)
    st = SamplingTensors.from_params([SamplingParams(temperature=1.5, top_k=1)] * 5)
    gens = [make_generator(i) for i in range(5)]
    for _ in range(3):
        assert torch.equal(sample_tokens(logits, st, gens), logits.argmax(-1))


# --- seeded sampling ----------------------------------------------------------------------------


def _run_seeded(logits_row, seed, position, batch, steps=30):
    """Sample `steps` tokens for one seeded row placed at `position` of a batch of other rows."""
    torch.manual_seed(1234 + batch)  # the other (unseeded) rows use the default generator
    gen = make_generator(seed)
    others = [make_generator(100 + i) if i % 2 else None for i in range(batch)]
    out = []
    for step in range(steps):
        rows = torch.randn(batch, logits_row.shape[0]) * (1 + step % 3)
        rows[position] = logits_row
        temps = torch.tensor([0.0 if i % 3 == 0 else 0.5 + i for i in range(batch)])
        temps[position] = 0.9
        gens = list(others)
        gens[position] = gen
        out.append(int(sample(rows, temps, gens)[position]))
    return out


def test_seeded_row_independent_of_batch_composition():
    torch.manual_seed(3)
    row = torch.randn(64)
    alone = _run_seeded(row, seed=42, position=0, batch=1)
    in_batch = _run_seeded(row, seed=42, position=3, batch=7)
    in_other_batch = _run_seeded(row, seed=42, position=1, batch=4)
    assert alone == in_batch == in_other_batch
    assert len(set(alone)) > 3  # it is really sampling, not collapsing to one token
    assert _run_seeded(row, seed=43, position=0, batch=1) != alone


def test_seeded_sample_tokens_reproducible():
    torch.manual_seed(4)
    logits = torch.randn(2, 100)
    params = [SamplingParams(temperature=0.8, top_p=0.9, seed=7), SamplingParams(temperature=1.0, top_k=20, seed=8)]
    st = SamplingTensors.from_params(params)

    def run():
        gens = [make_generator(p.seed) for p in params]
        return [sample_tokens(logits, st, gens).tolist() for _ in range(20)]

    first = run()
    assert run() == first
    assert len({tuple(t) for t in first}) > 2


# --- top-k / top-p / min-p ----------------------------------------------------------------------

PROBS = [0.4, 0.3, 0.2, 0.1]  # cumulative 0.4, 0.7, 0.9, 1.0


@pytest.mark.parametrize(
    "top_p, kept", [(0.3, [0]), (0.6, [0, 1]), (0.8, [0, 1, 2]), (0.95, [0, 1, 2, 3]), (1.0, [0, 1, 2, 3])]
)
def test_top_p_keeps_minimal_nucleus(top_p, kept):
    assert _filter(PROBS, top_p=top_p) == kept
    # Same set whatever the vocabulary order.
    perm = [2, 0, 3, 1]
    assert _filter([PROBS[i] for i in perm], top_p=top_p) == sorted(perm.index(i) for i in kept)


def test_top_p_mass_exactly_equal_to_top_p_is_enough():
    # The nucleus is the smallest set with mass >= top_p: at top_p == p(token 0) exactly, token 0 alone.
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    p0 = torch.softmax(logits, -1)[0, 0].item()
    out = apply_top_k_top_p_min_p(logits, torch.tensor([0]), torch.tensor([p0]), torch.tensor([0.0]))
    assert _kept(out[0]) == [0]
    out = apply_top_k_top_p_min_p(logits, torch.tensor([0]), torch.tensor([p0 * 1.001]), torch.tensor([0.0]))
    assert _kept(out[0]) == [0, 1]


def test_top_p_keeps_all_ties_at_the_boundary():
    # Documented choice: the nucleus ends inside a tie, so every tied token survives
    # (transformers/vLLM would keep one of the 0.2s, chosen by sort order).
    assert _filter([0.4, 0.2, 0.2, 0.2], top_p=0.5) == [0, 1, 2, 3]
    assert _filter([0.3, 0.3, 0.2, 0.2], top_p=0.2) == [0, 1]
    assert _filter([0.3, 0.3, 0.2, 0.2], top_p=0.65) == [0, 1, 2, 3]


def test_top_k_keeps_ties_at_the_boundary():
    assert _filter([0.4, 0.3, 0.2, 0.1], top_k=2) == [0, 1]
    assert _filter([0.4, 0.2, 0.2, 0.2], top_k=2) == [0, 1, 2, 3]
    assert _filter([0.4, 0.3, 0.2, 0.1], top_k=-1) == [0, 1, 2, 3]
    assert _filter([0.4, 0.3, 0.2, 0.1], top_k=10) == [0, 1, 2, 3]


def test_min_p_threshold_exact():
    # Token 1 has p1 / p_max = exp(-1); min_p just below keeps it, just above drops it.
    logits = torch.tensor([[3.0, 2.0, 0.0, 2.5]])
    ratio = math.exp(-1.0)

    def kept(min_p):
        return _kept(apply_top_k_top_p_min_p(logits, torch.tensor([0]), torch.tensor([1.0]), torch.tensor([min_p]))[0])

    assert kept(ratio * (1 - 1e-4)) == [0, 1, 3]
    assert kept(ratio * (1 + 1e-4)) == [0, 3]
    assert kept(0.0) == [0, 1, 2, 3]
    assert kept(1.0) == [0]


def test_order_min_p_then_top_p_renormalised():
    # vLLM v1 order: min_p drops 0.2 (< 0.5 * 0.5); renormalised [0.625, 0.375]: top_p=0.6 keeps only token 0.
    assert _filter([0.5, 0.3, 0.2], min_p=0.5, top_p=0.6) == [0]
    assert _filter([0.5, 0.3, 0.2], top_p=0.6) == [0, 1]
    # top-k then top-p on the renormalised survivors: [0.4, 0.3] -> [0.571, 0.429]; top_p=0.5 keeps token 0.
    assert _filter(PROBS, top_k=2, top_p=0.5) == [0]
    assert _filter(PROBS, top_p=0.5) == [0, 1]


def test_filters_per_row_in_a_batch():
    logits = _logits_from_probs(PROBS).repeat(3, 1)
    out = apply_top_k_top_p_min_p(logits, torch.tensor([0, 1, 0]), torch.tensor([1.0, 1.0, 0.6]), torch.zeros(3))
    assert [_kept(r) for r in out] == [[0, 1, 2, 3], [0], [0, 1]]
    assert torch.equal(out[0], logits[0])  # untouched rows keep their exact values


def test_disabled_top_p_keeps_tiny_probabilities():
    # fp32 cumulative mass reaches 1.0 before these tails; a row with top_p=1 must still keep them all
    # even when another row of the batch enables top-p.
    logits = torch.tensor([[0.0, -20.0, -25.0, -30.0]]).repeat(2, 1)
    out = apply_top_k_top_p_min_p(logits, torch.tensor([0, 0]), torch.tensor([1.0, 0.5]), torch.zeros(2))
    assert _kept(out[0]) == [0, 1, 2, 3]
    assert _kept(out[1]) == [0]


@pytest.mark.parametrize("k", [1, 5, 37])
def test_top_k_matches_transformers(k):
    torch.manual_seed(5)
    logits = torch.randn(4, 200)
    ours = apply_top_k_top_p_min_p(logits, torch.full((4,), k), torch.ones(4), torch.zeros(4))
    ref = TopKLogitsWarper(top_k=k)(None, logits.clone())
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.77, 0.95])
def test_top_p_matches_transformers_without_ties(top_p):
    torch.manual_seed(6)
    logits = torch.randn(4, 200) * 2
    ours = apply_top_k_top_p_min_p(logits, torch.zeros(4, dtype=torch.long), torch.full((4,), top_p), torch.zeros(4))
    ref = TopPLogitsWarper(top_p=top_p)(None, logits.clone())
    assert torch.equal(torch.isfinite(ours), torch.isfinite(ref))
    assert 1 <= int(torch.isfinite(ours).sum(-1).min()) and int(torch.isfinite(ours).sum(-1).max()) < 200


@pytest.mark.parametrize("min_p", [0.01, 0.1, 0.5])
def test_min_p_matches_transformers(min_p):
    torch.manual_seed(7)
    logits = torch.randn(4, 200) * 2
    ours = apply_top_k_top_p_min_p(logits, torch.zeros(4, dtype=torch.long), torch.ones(4), torch.full((4,), min_p))
    ref = MinPLogitsWarper(min_p=min_p)(None, logits.clone())
    assert torch.equal(ours, ref)


def test_temperature_scales_only_random_rows():
    logits = torch.tensor([[1.0, -2.0], [1.0, -2.0]])
    out = apply_temperature(logits, torch.tensor([0.0, 0.5]))
    assert out.tolist() == [[1.0, -2.0], [2.0, -4.0]]


# --- penalties ----------------------------------------------------------------------------------


def test_penalties_hand_computed():
    logits = torch.tensor([[2.0, -1.0, 0.5, 0.0, 3.0], [2.0, -1.0, 0.5, 0.0, 3.0]])
    prompt = token_counts([[0, 1, 1], [0, 1]], 5) > 0
    output = token_counts([[2, 4, 2], [2]], 5)
    out = apply_penalties(
        logits, output, prompt,
        repetition_penalty=torch.tensor([2.0, 1.0]),
        presence_penalty=torch.tensor([0.5, 0.0]),
        frequency_penalty=torch.tensor([0.25, 0.0]),
    )  # fmt: skip
    # Row 0: t0 prompt: 2/2; t1 prompt: -1*2; t2 output x2: 0.5/2 - 2*0.25 - 0.5; t3 unseen;
    # t4 output x1: 3/2 - 0.25 - 0.5.
    assert out[0].tolist() == [1.0, -2.0, -0.75, 0.0, 0.75]
    assert torch.equal(out[1], logits[1])  # neutral penalties leave the row bitwise unchanged
    assert logits[0].tolist() == [2.0, -1.0, 0.5, 0.0, 3.0]  # input not modified


def test_presence_and_frequency_ignore_prompt_tokens():
    logits = torch.zeros(1, 4)
    prompt = token_counts([[0, 0, 1]], 4) > 0
    output = token_counts([[1, 1, 1, 3]], 4)
    out = apply_penalties(logits, output, prompt, torch.tensor([1.0]), torch.tensor([1.0]), torch.tensor([-0.5]))
    # t0 prompt only: untouched; t1 output x3: -(1.0) - 3*(-0.5); t3 output x1: -(1.0) + 0.5.
    assert out[0].tolist() == [0.0, 0.5, 0.0, -0.5]


@pytest.mark.parametrize("penalty", [0.7, 1.3, 2.0])
def test_repetition_penalty_matches_transformers(penalty):
    torch.manual_seed(8)
    logits = torch.randn(3, 100) * 3
    prompts = [[1, 5, 5, 9], [0, 99, 42, 43], [7, 7, 7, 7]]
    outputs = [[9, 10, 11], [2, 3, 50], [60, 61, 7]]
    ours = apply_penalties(
        logits,
        token_counts(outputs, 100),
        token_counts(prompts, 100) > 0,
        torch.full((3,), penalty),
        torch.zeros(3),
        torch.zeros(3),
    )
    input_ids = torch.tensor([p + o for p, o in zip(prompts, outputs)])  # HF sees prompt + output
    ref = RepetitionPenaltyLogitsProcessor(penalty=penalty)(input_ids, logits.clone())
    assert torch.equal(ours, ref)
    assert not torch.equal(ours, logits)


def test_token_counts():
    counts = token_counts([[1, 1, 3], [], [4]], 5)
    assert counts.tolist() == [[0, 2, 0, 1, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 1]]
    assert counts.dtype == torch.int64
    with pytest.raises(ValueError, match=r"row 1 has token ids \[5\] outside the vocabulary \[0, 5\)"):
        token_counts([[0], [5]], 5)


def test_min_tokens_bans_stop_ids_until_reached():
    logits = torch.zeros(3, 6)
    out = apply_min_tokens(logits, num_output_tokens=[0, 2, 5], min_tokens=[3, 3, 3], stop_token_ids=[{5}, [4, 5], [5]])
    assert _kept(out[0]) == [0, 1, 2, 3, 4]
    assert _kept(out[1]) == [0, 1, 2, 3]
    assert _kept(out[2]) == [0, 1, 2, 3, 4, 5]
    assert torch.isfinite(logits).all()


# --- empirical frequencies ----------------------------------------------------------------------

N_DRAWS = 20_000
# With a fixed seed the outcome is deterministic; the bound says the frequencies are those of the
# target distribution: a correct sampler fails it with probability 1e-4 over seeds, a sampler that
# is off by 2 percentage points on one token fails it with near certainty at 20k draws.
P_VALUE_FLOOR = 1e-4


def _chi2_p_value(tokens, expected):
    counts = torch.bincount(tokens, minlength=len(expected)).tolist()
    stat, df = _chi2_stat(counts, expected, len(tokens))
    return _chi2_sf(stat, df), counts


def test_unseeded_frequencies_match_softmax():
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0, 2.0])
    temperature = 0.8
    expected = torch.softmax(logits / temperature, -1).tolist()
    torch.manual_seed(9)
    tokens = sample(logits.expand(N_DRAWS, -1), torch.full((N_DRAWS,), temperature), [None] * N_DRAWS)
    p_value, counts = _chi2_p_value(tokens, expected)
    assert p_value > P_VALUE_FLOOR, (counts, expected)
    # Power check: the same counts are rejected against a distribution off by 2 points on two tokens.
    wrong = list(expected)
    wrong[0] += 0.02
    wrong[5] -= 0.02
    assert _chi2_sf(*_chi2_stat(counts, wrong, N_DRAWS)) < P_VALUE_FLOOR


def test_seeded_frequencies_match_softmax():
    logits = torch.tensor([0.3, -0.2, 1.1, 0.0, -2.0])
    expected = torch.softmax(logits, -1).tolist()
    gen = make_generator(2024)
    # Every row draws from the same generator, in turn: the per-row seeded path, 20k times.
    global_state = torch.get_rng_state()
    tokens = sample(logits.expand(N_DRAWS, -1), torch.ones(N_DRAWS), [gen] * N_DRAWS)
    assert torch.equal(torch.get_rng_state(), global_state)  # seeded rows leave the default generator alone
    p_value, counts = _chi2_p_value(tokens, expected)
    assert p_value > P_VALUE_FLOOR, (counts, expected)


def test_filtered_frequencies_match_renormalised_softmax():
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -1.5])
    params = SamplingParams(temperature=0.7, top_k=6, top_p=0.9)
    st = SamplingTensors.from_params([params] * N_DRAWS)
    torch.manual_seed(10)
    tokens = sample_tokens(logits.expand(N_DRAWS, -1), st, [None] * N_DRAWS)
    # Reference: softmax(l / T), keep the top 6, renormalise, keep the minimal nucleus of mass >= 0.9.
    probs = torch.softmax(logits.double() / 0.7, -1)
    probs[6:] = 0
    probs /= probs.sum()
    nucleus = int((torch.cumsum(probs, 0) < 0.9).sum()) + 1
    probs[nucleus:] = 0
    probs /= probs.sum()
    assert 2 <= nucleus < 6  # the nucleus is the binding constraint here
    p_value, counts = _chi2_p_value(tokens, probs.tolist())
    assert p_value > P_VALUE_FLOOR, (counts, probs.tolist())


# --- logprobs -----------------------------------------------------------------------------------


def test_logprobs_equal_log_softmax():
    torch.manual_seed(11)
    logits = torch.randn(4, 500, dtype=torch.bfloat16)
    token_ids = torch.tensor([3, 499, 0, 250])
    sampled, top_ids, top_lp = compute_logprobs(logits, token_ids, k=5)
    ref = torch.log_softmax(logits.float(), -1)
    assert torch.equal(sampled, ref[torch.arange(4), token_ids])
    ref_lp, ref_ids = torch.topk(ref, 5, -1)
    assert torch.equal(top_ids, ref_ids) and torch.equal(top_lp, ref_lp)
    assert top_lp.dtype == torch.float32 and top_ids.dtype == torch.int64
    assert bool((top_lp[:, :-1] >= top_lp[:, 1:]).all())
    assert torch.allclose(ref.exp().sum(-1), torch.ones(4))


def test_logprobs_zero_k_and_bounds():
    logits = torch.randn(2, 10)
    sampled, ids, lps = compute_logprobs(logits, torch.tensor([1, 2]), k=0)
    assert ids.shape == (2, 0) and lps.shape == (2, 0) and sampled.shape == (2,)
    assert compute_logprobs(logits, torch.tensor([1, 2]), k=10)[1].shape == (2, 10)
    with pytest.raises(ValueError, match=r"k=11 must be in \[0, vocab_size=10\]"):
        compute_logprobs(logits, torch.tensor([1, 2]), k=11)


# --- packing and errors -------------------------------------------------------------------------


def test_sampling_tensors_from_params():
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.7, top_k=-1, top_p=0.9, min_p=0.05, presence_penalty=0.5),
        SamplingParams(temperature=1.2, top_k=40, repetition_penalty=1.1, frequency_penalty=-0.5),
    ]
    st = SamplingTensors.from_params(params, device="cpu")
    assert st.temperature.tolist() == pytest.approx([0.0, 0.7, 1.2])
    assert st.top_k.tolist() == [0, -1, 40] and st.top_k.dtype == torch.int64
    assert st.top_p.tolist() == pytest.approx([1.0, 0.9, 1.0])
    assert st.min_p.tolist() == pytest.approx([0.0, 0.05, 0.0])
    assert st.repetition_penalty.tolist() == pytest.approx([1.0, 1.0, 1.1])
    assert st.presence_penalty.tolist() == [0.0, 0.5, 0.0]
    assert st.frequency_penalty.tolist() == [0.0, 0.0, -0.5]
    assert not (st.all_greedy or st.no_top_k or st.no_top_p or st.no_min_p or st.no_penalties)
    plain = SamplingTensors.from_params([SamplingParams(temperature=0), SamplingParams(temperature=0, top_k=5)])
    assert plain.all_greedy and plain.no_top_k and plain.no_top_p and plain.no_min_p and plain.no_penalties
    with pytest.raises(ValueError, match="empty list"):
        SamplingTensors.from_params([])


def test_argument_errors():
    logits = torch.randn(2, 10)
    with pytest.raises(ValueError, match="got 1 generators for a batch of 2 rows"):
        sample(logits, torch.ones(2), [None])
    st = SamplingTensors.from_params([SamplingParams(presence_penalty=1.0)] * 2)
    with pytest.raises(ValueError, match="output_counts / prompt_mask"):
        sample_tokens(logits, st, [None, None])


def test_functions_do_not_modify_inputs():
    torch.manual_seed(12)
    logits = torch.randn(3, 40)
    before = logits.clone()
    st = SamplingTensors.from_params(
        [SamplingParams(temperature=0.5, top_k=5, top_p=0.8, min_p=0.1, repetition_penalty=1.3, seed=1)] * 3
    )
    counts = token_counts([[1, 2], [3], []], 40)
    sample_tokens(logits, st, [make_generator(1)] * 3, output_counts=counts, prompt_mask=counts > 0)
    compute_logprobs(logits, torch.tensor([0, 1, 2]), 3)
    assert torch.equal(logits, before)
