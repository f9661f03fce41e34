"""Meta's Llama 3 tokenizer: tiktoken byte-level BPE read from ``tokenizer.model``.

The file lists 128,000 mergeable tokens, one per line as ``<base64 bytes> <rank>``.
Meta appends 256 special tokens after them (ids 128000..128255). Ids here equal
those of ``llama_models.llama3.tokenizer.Tokenizer`` on every input, including the
way it cuts very long inputs before handing them to tiktoken (see `_pieces`).
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import re
from collections.abc import Iterator, Sequence

import tiktoken

from .base import Tokenizer, TokenizerError

logger = logging.getLogger(__name__)

# Pre-tokenizer split of Llama 3 (contractions, letters, up to 3 digits,
# punctuation runs, newline runs, other whitespace).
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Names of the 256 special tokens, in id order after the base vocabulary.
_NAMED_SPECIALS = (
    "<|begin_of_text|>",  # 128000
    "<|end_of_text|>",  # 128001
    "<|reserved_special_token_0|>",  # 128002
    "<|reserved_special_token_1|>",  # 128003
    "<|finetune_right_pad_id|>",  # 128004
    "<|step_id|>",  # 128005
    "<|start_header_id|>",  # 128006
    "<|end_header_id|>",  # 128007
    "<|eom_id|>",  # 128008, end of message (a tool call awaits its result)
    "<|eot_id|>",  # 128009, end of turn
    "<|python_tag|>",  # 128010
    "<|image|>",  # 128011
)
NUM_SPECIAL_TOKENS = 256
LLAMA3_SPECIAL_TOKEN_NAMES: tuple[str, ...] = _NAMED_SPECIALS + tuple(
    f"<|reserved_special_token_{n}|>" for n in range(2, 2 + NUM_SPECIAL_TOKENS - len(_NAMED_SPECIALS))
)

# Meta hands tiktoken at most this many characters at a time ...
_CHUNK_CHARS = 400_000
# ... and cuts runs of whitespace / non-whitespace longer than this
# (tiktoken's BPE degrades badly on huge single pieces, openai/tiktoken#195).
_MAX_RUN_CHARS = 25_000

# Python's str.isspace() and the `\s` class of `re` on str patterns agree
# (both are Py_UNICODE_ISSPACE), so runs can be found with a regex.
_RUNS = re.compile(r"\s+|\S+")

_TIKTOKEN_LINE = re.compile(rb"^[A-Za-z0-9+/]+={0,2} [0-9]+$")


def _pieces(text: str) -> Iterator[str]:
    """Cut `text` exactly where Meta's tokenizer does before BPE.

    First into chunks of 400,000 characters; then, inside each chunk, every maximal
    run of whitespace or of non-whitespace is cut every 25,000 characters (the
    cut falls after the 25,000th character of the run). The pieces are encoded one
    by one and the ids concatenated.
    """
    for start in range(0, len(text), _CHUNK_CHARS):
        chunk = text[start : start + _CHUNK_CHARS]
        piece_start = 0
        for run in _RUNS.finditer(chunk):
            a, b = run.span()
            for cut in range(a + _MAX_RUN_CHARS, b, _MAX_RUN_CHARS):
                yield chunk[piece_start:cut]
                piece_start = cut
        yield chunk[piece_start:]


def read_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Read a tiktoken BPE file (``<base64 token> <rank>`` per line).

    Args:
        path: the file.

    Returns:
        Token bytes -> rank.

    Raises:
        TokenizerError: the file is not a tiktoken BPE file (for example a
            SentencePiece protobuf, as Llama 2 ships) or a line is malformed.
    """
    with open(path, "rb") as f:
        data = f.read()
    first_line = data.split(b"\n", 1)[0].strip()
    if not _TIKTOKEN_LINE.match(first_line):
        kind = "a SentencePiece model (Llama 2 style)" if data[:1] == b"\n" else "not a tiktoken BPE file"
        raise TokenizerError(
            f"{path}: expected a tiktoken BPE file ('<base64 token> <rank>' per line), but this looks like {kind}; "
            "only Llama 3 tiktoken files (or a tokenizer.json) are supported"
        )
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError("expected two fields")
            token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
        except (ValueError, binascii.Error) as e:
            raise TokenizerError(f"{path}, line {lineno}: malformed tiktoken entry {line[:80]!r} ({e})") from None
        if token in ranks:
            raise TokenizerError(f"{path}, line {lineno}: token {token!r} listed twice")
        ranks[token] = rank
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(f"{path}: ranks are not exactly 0..{len(ranks) - 1}")
    return ranks


class Llama3Tokenizer(Tokenizer):
    """The Llama 3 / 3.1 / 3.2 tiktoken tokenizer.

    Args:
        model_path: Meta's ``tokenizer.model`` (tiktoken format).
        chat_template: a jinja chat template to expose (Meta checkpoints ship none).

    Raises:
        TokenizerError: the file is not a tiktoken BPE file.
    """

    name = "llama3"

    def __init__(self, model_path: str | os.PathLike, chat_template: str | None = None) -> None:
        ranks = read_tiktoken_ranks(model_path)
        num_base = len(ranks)
        if num_base != 128_000:
            logger.warning("%s has %d base tokens; Llama 3 has 128000", model_path, num_base)
        self.special_tokens = {text: num_base + i for i, text in enumerate(LLAMA3_SPECIAL_TOKEN_NAMES)}
        self._special_ids = frozenset(self.special_tokens.values())
        self._encoding = tiktoken.Encoding(
            name=os.path.basename(os.fspath(model_path)),
            pat_str=LLAMA3_SPLIT_PATTERN,
            mergeable_ranks=ranks,
            special_tokens=self.special_tokens,
        )
        self.vocab_size = num_base + NUM_SPECIAL_TOKENS
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.stop_ids = frozenset(
            self.special_tokens[t] for t in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")
        )
        self.chat_template = chat_template
        self.add_bos = True
        self.path = os.fspath(model_path)

    def encode(self, text: str, *, bos: bool = False, eos: bool = False, allow_special: bool = False) -> list[int]:
        """See `Tokenizer.encode`. Long inputs are cut as Meta's tokenizer cuts them."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        ids: list[int] = []
        for piece in _pieces(text):
            if allow_special:
                ids.extend(self._encoding.encode(piece, allowed_special="all", disallowed_special=()))
            else:
                ids.extend(self._encoding.encode_ordinary(piece))
        return self._wrap(ids, bos, eos)

    def decode(self, ids: Sequence[int]) -> str:
        """See `Tokenizer.decode`."""
        ids = [int(i) for i in ids]
        for i in ids:
            self._check_id(i)
        return self._encoding.decode(ids, errors="replace")

    def token_bytes(self, id: int) -> bytes:
        """See `Tokenizer.token_bytes`."""
        self._check_id(id)
        return self._encoding.decode_single_token_bytes(id)

    def is_special(self, id: int) -> bool:
        """See `Tokenizer.is_special`: ids 128000..128255."""
        return id in self._special_ids
