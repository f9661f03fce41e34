"""The tokenizer interface every backend implements.

A tokenizer turns text into token ids and back. Everything downstream (chat
formats, the engine, the detokenizer) codes against `Tokenizer`, never against a
backend library, so a Meta ``tokenizer.model``, a Hugging Face ``tokenizer.json``
and a vocabulary embedded in a GGUF file are interchangeable.

Special tokens (``<|eot_id|>``, ``<|im_end|>``, ...) end turns and mark roles, so
text that merely *looks* like one is encoded as plain text unless the caller
asks otherwise with ``allow_special=True``: user content can never forge a turn.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence


class TokenizerError(ValueError):
    """A tokenizer file or token id that inhouse cannot use (unknown format, id out of range, ...)."""


class Tokenizer(abc.ABC):
    """Text <-> token ids.

    Attributes:
        name: short backend name ("llama3", "hf", "gguf").
        vocab_size: number of ids, special tokens included.
        bos_id: beginning-of-sequence id, or None when the vocabulary has none.
        eos_id: end-of-sequence id, or None when the vocabulary has none.
        special_tokens: every added/special token, by its text.
        stop_ids: ids that end generation (end of text, end of turn, end of message).
        chat_template: the jinja chat template shipped with the model, if any.
        add_bos: whether prompts start with BOS by default.
    """

    name: str
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    special_tokens: dict[str, int]
    stop_ids: frozenset[int]
    chat_template: str | None
    add_bos: bool

    @abc.abstractmethod
    def encode(self, text: str, *, bos: bool = False, eos: bool = False, allow_special: bool = False) -> list[int]:
        """Encode text into token ids.

        Args:
            text: the text to encode.
            bos: prepend the BOS id.
            eos: append the EOS id.
            allow_special: parse special-token text (e.g. ``"<|eot_id|>"``) as the special
                token. When False (the default) such text is encoded as ordinary text.

        Returns:
            The token ids.

        Raises:
            TokenizerError: `bos`/`eos` requested but the vocabulary has no such token.
        """

    @abc.abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Decode token ids into text; special tokens are rendered as their text.

        Invalid or incomplete UTF-8 byte sequences become U+FFFD.

        Args:
            ids: token ids.

        Returns:
            The decoded text.

        Raises:
            TokenizerError: an id is outside ``[0, vocab_size)``.
        """

    @abc.abstractmethod
    def token_bytes(self, id: int) -> bytes:
        """The raw bytes of one token (a special token: its text in UTF-8).

        Args:
            id: the token id.

        Returns:
            The bytes the token stands for; may be an incomplete UTF-8 sequence.

        Raises:
            TokenizerError: `id` is outside ``[0, vocab_size)``.
        """

    @abc.abstractmethod
    def is_special(self, id: int) -> bool:
        """Whether `id` is a special (control) token, i.e. one a "skip special tokens" decode drops."""

    # ------------------------------------------------------------------ helpers
    def _check_id(self, id: int) -> None:
        if not 0 <= id < self.vocab_size:
            raise TokenizerError(f"token id {id} is out of range for the {self.name} tokenizer (vocab_size={self.vocab_size})")

    def _wrap(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        """Add BOS/EOS around `ids` as requested, raising when the vocabulary lacks them."""
        if bos:
            if self.bos_id is None:
                raise TokenizerError(f"bos=True but the {self.name} tokenizer has no BOS token")
            ids.insert(0, self.bos_id)
        if eos:
            if self.eos_id is None:
                raise TokenizerError(f"eos=True but the {self.name} tokenizer has no EOS token")
            ids.append(self.eos_id)
        return ids

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size})"
