"""The embedded SmolLM2-135M-Instruct: our greedy generation equals transformers' from the same GGUF."""

import os

import pytest
import torch

from inhouse import LLM, SamplingParams
from inhouse.resolve import embedded_model_path

PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain what a prime number is.",
    "ما هي عاصمة فرنسا؟",
    "اكتب جملة عن القمر.",
]
N_TOKENS = 40


@pytest.fixture(scope="module")
def hf():
    transformers = pytest.importorskip("transformers")
    path = embedded_model_path()
    d, f = os.path.split(path)
    tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    return tok, model


@pytest.fixture(scope="module")
def ours():
    return LLM(dtype="float32", max_model_len=2048)


def test_greedy_generation_equals_transformers(hf, ours):
    hf_tok, hf_model = hf
    for prompt in PROMPTS:
        msgs = [{"role": "user", "content": prompt}]
        hf_ids = hf_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        if isinstance(hf_ids, dict) or hasattr(hf_ids, "input_ids"):
            hf_ids = hf_ids["input_ids"]
        assert ours.encode_chat(msgs) == list(hf_ids), prompt  # same prompt ids through the same template
        with torch.inference_mode():
            # An explicit attention mask: the prompt contains <|im_end|>, which is also the pad id, and
            # generate() would otherwise mask those positions out.
            x = torch.tensor([hf_ids])
            ref = hf_model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=N_TOKENS, do_sample=False,
                                    eos_token_id=None, pad_token_id=hf_tok.eos_token_id)[0, len(hf_ids):].tolist()
        got = ours.generate({"prompt_token_ids": list(hf_ids)},
                            SamplingParams(temperature=0, max_tokens=N_TOKENS, ignore_eos=True))[0].outputs[0]
        assert got.token_ids == ref, (prompt, hf_tok.decode(ref), got.text)
        assert len(ref) == N_TOKENS


def test_capital_of_france_is_answered(ours):
    out = ours.chat([{"role": "user", "content": "What is the capital of France?"}],
                    SamplingParams(temperature=0, max_tokens=32))[0].outputs[0]
    assert "Paris" in out.text
    assert out.finish_reason == "stop" and out.stop_reason is None  # ended on <|im_end|>, the model's EOS
    assert out.token_ids[-1] == 2  # <|im_end|>
