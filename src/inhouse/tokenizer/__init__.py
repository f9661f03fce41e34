"""Tokenizers: text <-> token ids for Llama 3 (Meta tiktoken), Hugging Face and GGUF vocabularies.

Entry points:

* `llama3_tokenizer()` — Meta's Llama 3 tokenizer shipped with ``llama_models`` (cached).
* `load_tokenizer(directory)` — the tokenizer of a model directory (``tokenizer.model``
  in tiktoken format, or ``tokenizer.json``), recognised by content.
* `tokenizer_from_gguf_metadata(meta)` — the vocabulary embedded in a GGUF file.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from functools import lru_cache
from typing import Any, Mapping

from .base import Tokenizer, TokenizerError
from .detokenizer import IncrementalDetokenizer
from .hf import HFTokenizer
from .llama3 import Llama3Tokenizer

logger = logging.getLogger(__name__)

__all__ = [
    "HFTokenizer",
    "IncrementalDetokenizer",
    "Llama3Tokenizer",
    "Tokenizer",
    "TokenizerError",
    "llama3_tokenizer",
    "load_tokenizer",
    "tokenizer_from_gguf_metadata",
]


def llama3_tokenizer_path() -> str:
    """Path of Meta's Llama 3 ``tokenizer.model`` inside the installed ``llama_models`` package.

    Raises:
        TokenizerError: ``llama_models`` is not installed or lacks the file.
    """
    spec = importlib.util.find_spec("llama_models")
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerError("the llama_models package (which ships Meta's Llama 3 tokenizer.model) is not installed")
    path = os.path.join(list(spec.submodule_search_locations)[0], "llama3", "tokenizer.model")
    if not os.path.exists(path):
        raise TokenizerError(f"{path}: Meta's Llama 3 tokenizer.model is missing")
    return path


@lru_cache(maxsize=1)
def llama3_tokenizer() -> Tokenizer:
    """Meta's Llama 3 tokenizer (the ``tokenizer.model`` shipped in ``llama_models``), loaded once.

    Returns:
        The shared `Llama3Tokenizer`.

    Raises:
        TokenizerError: the file cannot be found or read.
    """
    return Llama3Tokenizer(llama3_tokenizer_path())


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """Load the tokenizer of a model directory.

    ``tokenizer.json`` is preferred when present (it carries added tokens and, with
    ``tokenizer_config.json``, the chat template). Otherwise ``tokenizer.model`` must
    be a tiktoken BPE file (Meta's Llama 3 format); a SentencePiece protobuf
    (Llama 2) is rejected.

    Args:
        directory: the model directory.

    Returns:
        The tokenizer.

    Raises:
        TokenizerError: no usable tokenizer file, or the file's content is not a supported format.
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise TokenizerError(f"{directory}: not a directory")
    if os.path.exists(os.path.join(directory, "tokenizer.json")):
        return HFTokenizer.from_directory(directory)
    model = os.path.join(directory, "tokenizer.model")
    if os.path.exists(model):
        return Llama3Tokenizer(model)
    raise TokenizerError(f"{directory}: no tokenizer.json or tokenizer.model found")


def tokenizer_from_gguf_metadata(meta: Mapping[str, Any], path: str = "") -> Tokenizer:
    """Build the tokenizer embedded in a GGUF file.

    Args:
        meta: GGUF metadata as a plain dict (``tokenizer.ggml.model``, ``.pre``, ``.tokens``,
            ``.token_type``, ``.merges``, ``.bos_token_id``, ``.eos_token_id``,
            ``.add_bos_token``, ``tokenizer.chat_template``).
        path: the GGUF file, for error messages.

    Returns:
        The tokenizer.

    Raises:
        TokenizerError: the metadata describes an unsupported or malformed tokenizer.
    """
    return HFTokenizer.from_gguf_metadata(meta, path)
