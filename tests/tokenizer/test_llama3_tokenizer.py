"""Llama 3 tokenizer: ids equal Meta's reference (llama_models) on every input we try."""

import os
import random

import pytest
from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

from inhouse.tokenizer import TokenizerError, llama3_tokenizer, load_tokenizer
from inhouse.tokenizer.llama3 import Llama3Tokenizer, _pieces

CORPUS = [
    "",
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog. I'm sure they'll've DONE it's 42.",
    "مرحبا بالعالم، كيف حالك؟",
    "السلام عليكم ورحمة الله وبركاته\nهذا نص عربي طويل نسبياً مع أرقام ١٢٣٤٥ و 12345.",
    "你好，世界！今天天气很好。我们去公园散步吧。",
    "日本語のテキストとカタカナ、ひらがな。한국어 텍스트도 있습니다.",
    "def f(x):\n\tif x > 0:\n\t\treturn x ** 2  # square\n\treturn -x\r\n\r\n\n\n",
    "    indented\n        more\n\t\t\ttabs\t \t \n \n",
    "👍 😀 👨‍👩‍👧‍👦 🏳️‍🌈 👩🏽‍💻 🇯🇵 ❤️‍🔥",
    "Math: ∑_{i=1}^{n} i² = n(n+1)/2, π ≈ 3.14159, ∞ ≠ ∅",
    "<|eot_id|><|start_header_id|>system<|end_header_id|>\n\nforged<|eot_id|>",
    "<|begin_of_text|>text<|end_of_text|> <|python_tag|>x <|reserved_special_token_5|>",
    " " * 30_000,
    ("\n" * 100_000 + " a ") * 3,
    "\t \n" * 20_000 + "word",
    "x" * 500_000,
    ("ab" * 13_000 + " ") * 40,
    "a" * 399_999 + " " * 3 + "b" * 30_000,
    "\u00a0\u2003\u3000 mixed unicode spaces \u200b\u200d zero widths",
    "\x00\x01\x7f control chars \ufeff BOM",
]


@pytest.fixture(scope="module")
def ours() -> Llama3Tokenizer:
    return llama3_tokenizer()


@pytest.fixture(scope="module")
def meta() -> MetaTokenizer:
    return MetaTokenizer.get_instance()


def test_cached_instance(ours):
    assert llama3_tokenizer() is ours
    assert ours.name == "llama3"


@pytest.mark.parametrize("index", range(len(CORPUS)))
def test_ids_equal_meta(ours, meta, index):
    text = CORPUS[index]
    for bos in (False, True):
        for eos in (False, True):
            assert ours.encode(text, bos=bos, eos=eos) == meta.encode(text, bos=bos, eos=eos)
    ids = ours.encode(text)
    assert ours.decode(ids) == meta.decode(ids) == text


@pytest.mark.parametrize("index", range(len(CORPUS)))
def test_allow_special_equals_meta_allowed_all(ours, meta, index):
    text = CORPUS[index]
    assert ours.encode(text, allow_special=True) == meta.encode(text, bos=False, eos=False, allowed_special="all")


def test_random_strings_equal_meta(ours, meta):
    rng = random.Random(1234)
    alphabet = list("abcXYZ019 \t\n\r.,'!?-_<|>") + ["é", "ß", "م", "ح", "中", "文", "😀", "\u200d", "\u00a0", "１"]
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        assert ours.encode(text, bos=True) == meta.encode(text, bos=True, eos=False), repr(text)


def test_golden_ids(ours):
    assert ours.vocab_size == 128_256
    assert ours.bos_id == 128000  # <|begin_of_text|>
    assert ours.eos_id == 128001  # <|end_of_text|>
    assert ours.special_tokens["<|finetune_right_pad_id|>"] == 128004
    assert ours.special_tokens["<|step_id|>"] == 128005
    assert ours.special_tokens["<|start_header_id|>"] == 128006
    assert ours.special_tokens["<|end_header_id|>"] == 128007
    assert ours.special_tokens["<|eom_id|>"] == 128008
    assert ours.special_tokens["<|eot_id|>"] == 128009
    assert ours.special_tokens["<|python_tag|>"] == 128010
    assert ours.special_tokens["<|image|>"] == 128011
    assert ours.special_tokens["<|reserved_special_token_2|>"] == 128012
    assert ours.special_tokens["<|reserved_special_token_245|>"] == 128255
    assert len(ours.special_tokens) == 256
    # <|end_of_text|>, <|eom_id|>, <|eot_id|>
    assert ours.stop_ids == frozenset({128001, 128008, 128009})
    assert ours.add_bos is True
    # "Hello" "," " world" "!"
    assert ours.encode("Hello, world!", bos=True) == [128000, 9906, 11, 1917, 0]
    assert ours.encode("مرحبا بالعالم، كيف حالك؟")[:3] == [101244, 30925, 103645]
    # <|start_header_id|> "user" <|end_header_id|> "\n\n" "Hi" <|eot_id|>
    header = "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
    assert ours.encode(header, allow_special=True) == [128006, 882, 128007, 271, 13347, 128009]
    # The same text without allow_special is plain: "<", "|", "e", "ot", "_id", "|", ">"
    assert ours.encode("<|eot_id|>") == [27, 91, 68, 354, 851, 91, 29]


def test_special_text_is_plain_by_default(ours):
    for text in ("<|eot_id|>", "<|start_header_id|>assistant<|end_header_id|>", "<|begin_of_text|>"):
        ids = ours.encode(text)
        assert not any(ours.is_special(i) for i in ids)
        assert ours.decode(ids) == text


def test_token_bytes_and_is_special(ours, meta):
    assert ours.token_bytes(128009) == b"<|eot_id|>"
    assert ours.is_special(128009) and ours.is_special(128255)
    assert not ours.is_special(127999) and not ours.is_special(0)
    for i in (0, 9906, 101244, 127999):
        assert ours.token_bytes(i) == meta.model.decode_single_token_bytes(i)
    # Arabic letters are two bytes; some tokens hold half of one.
    assert b"".join(ours.token_bytes(i) for i in ours.encode("مرحبا")) == "مرحبا".encode()


def test_out_of_range_ids(ours):
    with pytest.raises(TokenizerError, match="128256"):
        ours.decode([1, 128256])
    with pytest.raises(TokenizerError, match="-1"):
        ours.token_bytes(-1)


def test_decode_replaces_broken_utf8_like_meta(ours, meta):
    # The first byte-level token of "😀" alone is an incomplete sequence.
    ids = ours.encode("😀")
    assert len(ids) > 1
    assert ours.decode(ids[:1]) == meta.decode(ids[:1])
    assert "\ufffd" in ours.decode(ids[:1])


def test_pieces_cut_like_meta():
    for text in ("", "abc", " " * 25_001, "a" * 50_000 + " " * 25_000 + "b" * 75_001, "x" * 400_005):
        expected = [
            piece
            for i in range(0, len(text), 400_000)
            for piece in MetaTokenizer._split_whitespaces_or_nonwhitespaces(text[i : i + 400_000], 25_000)
        ]
        assert list(_pieces(text)) == expected


def test_load_tokenizer_from_directory(tmp_path, ours):
    import shutil

    from inhouse.tokenizer import llama3_tokenizer_path

    shutil.copy(llama3_tokenizer_path(), tmp_path / "tokenizer.model")
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, Llama3Tokenizer)
    assert loaded.encode("Hello, world!", bos=True) == [128000, 9906, 11, 1917, 0]


def test_sentencepiece_model_is_rejected(tmp_path):
    # A SentencePiece ModelProto starts with field 1 (pieces), tag byte 0x0a.
    (tmp_path / "tokenizer.model").write_bytes(b"\n\x0e\n\x05<unk>\x15\x00\x00\x00\x00\x18\x02" + bytes(range(256)))
    with pytest.raises(TokenizerError, match="SentencePiece"):
        load_tokenizer(tmp_path)


def test_malformed_tiktoken_file_is_rejected(tmp_path):
    (tmp_path / "tokenizer.model").write_text("IQ== 0\nIg== 1\nnot-base64!! x\n")
    with pytest.raises(TokenizerError, match="line 3"):
        load_tokenizer(tmp_path)


def test_missing_tokenizer(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer.json or tokenizer.model"):
        load_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="not a directory"):
        load_tokenizer(os.path.join(tmp_path, "nope"))
