"""The engine and the LLM API on a tiny random Llama: references are plain full forwards."""

import pytest
import torch

from inhouse import LLM, SamplingParams
from inhouse.engine.engine import ContextLengthError, EngineError


@pytest.fixture()
def llm(tiny_model, tok):
    return LLM.from_model(tiny_model, tok, name="tiny", max_model_len=128, max_num_seqs=8)


@torch.inference_mode()
def greedy_reference(model, ids, n):
    """Greedy continuation computed with full forwards and no cache."""
    ids = list(ids)
    out = []
    for _ in range(n):
        nxt = int(model(torch.tensor([ids]))[0, -1].argmax())
        out.append(nxt)
        ids.append(nxt)
    return out


def test_greedy_equals_full_forward_reference(llm, tiny_model, tok):
    prompt = tok.encode("The capital of France is", bos=True)
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0]
    assert out.prompt_token_ids == prompt
    assert out.outputs[0].token_ids == greedy_reference(tiny_model, prompt, 20)
    assert out.outputs[0].finish_reason == "length" and out.outputs[0].stop_reason is None
    assert out.outputs[0].text == tok.decode(out.outputs[0].token_ids)


def test_batched_equals_one_at_a_time(llm, tok):
    prompts = ["Hello", "مرحبا بالعالم، كيف حالك؟ " * 3, "def f(x):\n    return x", "🙂 emoji"]
    p = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    together = [o.outputs[0].token_ids for o in llm.generate(prompts, p)]
    alone = [llm.generate(q, p)[0].outputs[0].token_ids for q in prompts]
    assert together == alone


def test_chunked_prefill_equals_whole_prefill(tiny_model, tok):
    prompt = tok.encode("one two three four five six seven eight nine ten " * 3, bos=True)
    p = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, prompt_logprobs=1)
    a = LLM.from_model(tiny_model, tok, max_model_len=128).generate({"prompt_token_ids": prompt}, p)[0]
    b = LLM.from_model(tiny_model, tok, max_model_len=128, max_num_batched_tokens=7).generate(
        {"prompt_token_ids": prompt}, p)[0]
    assert a.outputs[0].token_ids == b.outputs[0].token_ids
    for x, y in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:]):
        tid = next(iter(x))
        assert abs(x[tid].logprob - y[tid].logprob) < 1e-4


def test_seeded_sampling_is_reproducible(llm, tok):
    p = SamplingParams(temperature=1.0, top_p=0.9, seed=123, max_tokens=16, ignore_eos=True, n=3)
    a = llm.generate("Tell me", p)[0]
    b = llm.generate(["Other prompt first", "Tell me"], p)[1]  # other requests in the batch change nothing
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert len({tuple(o.token_ids) for o in a.outputs}) == 3  # the n samples differ
    c = llm.generate("Tell me", SamplingParams(temperature=1.0, top_p=0.9, seed=124, max_tokens=16, ignore_eos=True))[0]
    assert c.outputs[0].token_ids != a.outputs[0].token_ids


def test_n_samples_share_the_prompt_cache(llm):
    # top_k=1 makes every sample greedy: the forked siblings must continue exactly like the first
    out = llm.generate("Same prompt", SamplingParams(temperature=0.7, top_k=1, n=3, max_tokens=6, ignore_eos=True))[0]
    greedy = llm.generate("Same prompt", SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert all(o.token_ids == greedy.outputs[0].token_ids for o in out.outputs)


def test_logprobs_match_log_softmax(llm, tiny_model, tok):
    prompt = tok.encode("Logprobs please", bos=True)
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=3, logprobs=2,
                                                                    prompt_logprobs=0, ignore_eos=True))[0]
    ids = prompt + out.outputs[0].token_ids
    with torch.inference_mode():
        ref = torch.log_softmax(tiny_model(torch.tensor([ids]))[0], -1)
    for i, (tid, lp) in enumerate(zip(out.outputs[0].token_ids, out.outputs[0].logprobs)):
        pos = len(prompt) - 1 + i
        assert abs(lp[tid].logprob - float(ref[pos, tid])) < 1e-4
        assert lp[tid].rank == 1  # greedy picks the top token
        assert len(lp) == 2  # the chosen token is also the top-1 of the 2 alternatives
    assert out.prompt_logprobs[0] is None
    for p in range(1, len(prompt)):
        d = out.prompt_logprobs[p]
        assert abs(d[prompt[p]].logprob - float(ref[p - 1, prompt[p]])) < 1e-4
    cum = sum(lp[t].logprob for t, lp in zip(out.outputs[0].token_ids, out.outputs[0].logprobs))
    assert abs(out.outputs[0].cumulative_logprob - cum) < 1e-5


def test_stop_strings_and_stop_token_ids(llm, tok):
    base = llm.generate("Hello there", SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0].outputs[0]
    text = base.text
    assert len(text) > 10
    stop = text[5:8]
    cut = llm.generate("Hello there", SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop]))[0].outputs[0]
    assert cut.text == text[: text.index(stop)]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    keep = llm.generate("Hello there", SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop],
                                                      include_stop_str_in_output=True))[0].outputs[0]
    assert keep.text == text[: text.index(stop) + len(stop)]
    third = base.token_ids[2]
    st = llm.generate("Hello there", SamplingParams(temperature=0, max_tokens=30, ignore_eos=True,
                                                    stop_token_ids=[third]))[0].outputs[0]
    assert st.token_ids == base.token_ids[:3] and st.stop_reason == third and st.finish_reason == "stop"


def test_streaming_concatenates_to_final_text(llm):
    p = SamplingParams(temperature=0, max_tokens=25, ignore_eos=True)
    final = llm.generate("Stream this: مرحبا 🙂", p)[0].outputs[0]
    deltas = list(llm.stream("Stream this: مرحبا 🙂", p))
    assert "".join(d.text for d in deltas) == final.text
    assert [t for d in deltas for t in d.token_ids] == final.token_ids
    assert deltas[-1].finish_reason == "length"
    assert all("\ufffd" not in d.text for d in deltas) or "\ufffd" in final.text


def test_stream_closed_early_frees_the_request(llm):
    gen = llm.stream("abc", SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    next(gen)
    gen.close()
    assert not llm.engine.has_unfinished()
    assert sorted(llm.engine._free_slots) == list(range(8))


def test_context_errors_name_the_numbers(llm):
    with pytest.raises(ContextLengthError, match=r"130 tokens.*max_model_len\) is 128"):
        llm.generate({"prompt_token_ids": [1000] * 130}, SamplingParams(max_tokens=1))
    with pytest.raises(ContextLengthError, match=r"100 tokens and max_tokens is 50: 150 .* 128; at most 28"):
        llm.generate({"prompt_token_ids": [1000] * 100}, SamplingParams(max_tokens=50))
    with pytest.raises(EngineError, match="empty"):
        llm.generate({"prompt_token_ids": []})
    with pytest.raises(EngineError, match="outside the vocabulary"):
        llm.generate({"prompt_token_ids": [5, 999999]})
    # a failed batch leaves nothing behind
    assert not llm.engine.has_unfinished()


def test_max_tokens_none_runs_to_the_context(llm):
    out = llm.generate({"prompt_token_ids": [1000] * 100}, SamplingParams(temperature=0, max_tokens=None, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 28 and out.outputs[0].finish_reason == "length"


def test_chat_uses_llama31_format_and_stops_on_eot(tiny_model, tok):
    llm = LLM.from_model(tiny_model, tok, max_model_len=128)
    msgs = [{"role": "user", "content": "hi <|eot_id|>"}]
    ids = llm.encode_chat(msgs)
    assert ids[0] == 128000 and ids[-4:] == [128006, 78191, 128007, 271]  # ...<|start_header_id|>assistant<|end_header_id|>\n\n
    assert ids.count(128009) == 1  # only the real end of the user turn: typed "<|eot_id|>" stays text
    assert {128001, 128008, 128009} <= llm.engine.stop_ids
    # force the model to end its turn: eot is a stop token and not part of the text
    eot_bias = SamplingParams(temperature=0, max_tokens=5, stop_token_ids=None)
    out = llm.chat(msgs, eot_bias)[0].outputs[0]
    assert out.finish_reason in ("stop", "length")


def test_penalties_reach_the_model_output(llm, tiny_model, tok):
    prompt = tok.encode("la la la la la", bos=True)
    pen = 1.8
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True,
                                                                    repetition_penalty=pen, presence_penalty=0.5))[0]
    ids, ref = list(prompt), []
    with torch.inference_mode():
        for _ in range(10):
            logits = tiny_model(torch.tensor([ids]))[0, -1].clone()
            for t in set(ids):  # repetition: prompt and output tokens
                logits[t] = logits[t] / pen if logits[t] > 0 else logits[t] * pen
            for t in set(ref):  # presence: output tokens only
                logits[t] -= 0.5
            ref.append(int(logits.argmax()))
            ids.append(ref[-1])
    assert out.outputs[0].token_ids == ref
    plain = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0]
    assert plain.outputs[0].token_ids != ref  # the penalties changed something


def test_min_tokens_holds_off_the_stop_token(llm, tiny_model, tok):
    prompt = tok.encode("x", bos=True)
    first = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=1))[0].outputs[0].token_ids[0]
    # make the greedy first token a stop token: without min_tokens it ends at once
    p = SamplingParams(temperature=0, max_tokens=5, stop_token_ids=[first])
    assert llm.generate({"prompt_token_ids": prompt}, p)[0].outputs[0].token_ids == [first]
    p = SamplingParams(temperature=0, max_tokens=5, stop_token_ids=[first], min_tokens=3)
    got = llm.generate({"prompt_token_ids": prompt}, p)[0].outputs[0].token_ids
    assert len(got) >= 3 and first not in got[:3]
