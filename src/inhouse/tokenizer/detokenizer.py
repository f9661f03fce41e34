"""Streaming token ids -> text without ever splitting a UTF-8 character.

One token can hold part of a character (an Arabic letter or an emoji is often
spread over two or three byte-level tokens), so decoding token by token would
emit U+FFFD in the middle of a stream. `IncrementalDetokenizer` collects the raw
bytes of each token and emits only complete characters; bytes that can still
become a character wait for the next token.
"""

from __future__ import annotations

import codecs

from .base import Tokenizer


class IncrementalDetokenizer:
    """Turn a stream of token ids into a stream of text chunks.

    The concatenation of every chunk returned by `push` and `flush` equals
    ``tokenizer.decode(ids)`` (with special tokens left out when `skip_special`).
    Bytes that can never form a character become U+FFFD as soon as that is
    certain, exactly where `decode` puts them.

    Args:
        tokenizer: the tokenizer that produced the ids.
        skip_special: leave special tokens (e.g. ``<|eot_id|>``) out of the text.

    Attributes:
        text: everything emitted so far.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self.text = ""
        # Python's incremental UTF-8 decoder holds back an incomplete trailing
        # sequence and replaces invalid bytes the same way bytes.decode does.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Add one token.

        Args:
            token_id: the next generated id.

        Returns:
            The text completed by this token (possibly empty).

        Raises:
            TokenizerError: `token_id` is not in the vocabulary.
        """
        data = self.tokenizer.token_bytes(token_id)
        if self.skip_special and self.tokenizer.is_special(token_id):
            return ""
        chunk = self._decoder.decode(data)
        self.text += chunk
        return chunk

    def flush(self) -> str:
        """End the stream.

        Returns:
            Whatever is left; an incomplete trailing character becomes U+FFFD, as in `decode`.
        """
        chunk = self._decoder.decode(b"", final=True)
        self.text += chunk
        return chunk
