"""Tokenizers backed by the Hugging Face `tokenizers` library.

Two sources:

* a ``tokenizer.json`` (plus ``tokenizer_config.json`` / ``generation_config.json``
  for the chat template, BOS/EOS and stop tokens) — `HFTokenizer.from_directory`;
* the vocabulary embedded in a GGUF file (``tokenizer.ggml.*`` metadata) —
  `HFTokenizer.from_gguf_metadata`. We build the same byte-level BPE that
  transformers' GGUF conversion builds (``integrations/gguf/gguf_tokenizer_mapping.py``):
  vocabulary respelled in the byte alphabet, merges from the file, CONTROL tokens
  added as special tokens and USER_DEFINED ones as added tokens, and the split
  regex chosen by ``tokenizer.ggml.pre``. For Llama 3 files (``pre="llama-bpe"``)
  we also ignore merges for whole-word tokens and cut long inputs as Meta does,
  so ids equal Meta's tiktoken tokenizer.

Text that looks like an added token is plain text unless ``allow_special=True``.
We keep two backends for that: one that matches added tokens, and one in which
every added token is marked special and ``encode_special_tokens`` is on, so none
is matched.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

import tokenizers

from inhouse.util import gc_paused

from .base import Tokenizer, TokenizerError
from .llama3 import LLAMA3_SPLIT_PATTERN, _pieces

logger = logging.getLogger(__name__)

# Token names that end a turn / a text in the vocabularies we serve. Any that
# exist as added tokens join the EOS in `stop_ids`.
END_OF_TURN_TOKENS = (
    "<|end_of_text|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<end_of_turn>",
    "<|end|>",
)

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
GGUF_TOKEN_NORMAL = 1
GGUF_TOKEN_CONTROL = 3
GGUF_TOKEN_USER_DEFINED = 4

# tokenizer.ggml.pre values whose merges were learned with the Llama 3 split.
LLAMA3_PRE = frozenset(
    {"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "dbrx", "smaug-bpe"}
)
# tokenizer.ggml.pre values that need a split we do not implement (transformers
# knows them); anything else gets GPT-2's byte-level regex, as in transformers.
UNSUPPORTED_PRE = frozenset(
    {"tekken", "qwen2", "deepseek-r1-qwen", "qwen35", "gpt-4o", "llama4", "kanana2", "minimax-m2", "megrez", "kormo"}
)


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte alphabet: each byte 0..255 spelled as one printable character.

    Printable Latin-1 bytes stand for themselves; the others (controls, space, ...)
    are shifted to code points 256 and up, in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shift)
            shift += 1
    return table


@lru_cache(maxsize=1)
def _unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


def _has_byte_level_decoder(decoder: Mapping[str, Any] | None) -> bool:
    if not decoder:
        return False
    if decoder.get("type") == "ByteLevel":
        return True
    if decoder.get("type") == "Sequence":
        return any(_has_byte_level_decoder(d) for d in decoder.get("decoders", ()))
    return False


class HFTokenizer(Tokenizer):
    """A `tokenizers` tokenizer behind the inhouse `Tokenizer` interface.

    Build it with `from_directory` or `from_gguf_metadata` rather than directly.

    Args:
        tokenizer_json: the tokenizer in ``tokenizer.json`` form (a dict).
        name: backend name ("hf" or "gguf").
        source: file the tokenizer came from (for messages).
        bos_id: BOS id or None.
        eos_id: EOS id or None.
        extra_stop_ids: stop ids besides EOS (e.g. from generation_config.json).
        chat_template: jinja chat template or None.
        add_bos: whether prompts start with BOS by default.
        meta_chunking: cut long inputs like Meta's Llama 3 tokenizer before encoding.
        backend_json: the backend's own JSON when already at hand (`state`): `tokenizer_json` with
            every added token marked special; `tokenizer_json` then needs only its ``added_tokens``,
            ``model.byte_fallback`` and ``decoder``.

    Raises:
        TokenizerError: the JSON cannot be loaded by `tokenizers`.
    """

    def __init__(
        self,
        tokenizer_json: dict[str, Any],
        *,
        name: str = "hf",
        source: str = "",
        bos_id: int | None = None,
        eos_id: int | None = None,
        extra_stop_ids: Sequence[int] = (),
        chat_template: str | None = None,
        add_bos: bool = False,
        meta_chunking: bool = False,
        backend_json: str | None = None,
    ) -> None:
        self.name = name
        self.source = source
        added = tokenizer_json.get("added_tokens") or []
        # One backend for both kinds of encoding (a 49k-token BPE tokenizer takes ~25 MB and ~0.3 s
        # to build): every added token is marked special, and `encode` says per call whether the
        # text may spell them (`encode_special_tokens` False) or not (True: plain text throughout).
        if backend_json is None:
            backend_json = json.dumps(dict(tokenizer_json, added_tokens=[dict(t, special=True) for t in added]))
        try:
            self._backend = tokenizers.Tokenizer.from_str(backend_json)
        except Exception as e:  # tokenizers raises its own Exception type
            raise TokenizerError(f"{source or 'tokenizer.json'}: `tokenizers` cannot load it: {e}") from e
        self._encode_lock = threading.Lock()  # the flag is the backend's: one encode at a time sets it

        self.vocab_size = self._backend.get_vocab_size(with_added_tokens=True)
        self.special_tokens = {t["content"]: int(t["id"]) for t in added}
        self._special_ids = frozenset(int(t["id"]) for t in added if t.get("special", False))
        for what, tid in (("bos", bos_id), ("eos", eos_id), *(("stop", i) for i in extra_stop_ids)):
            if tid is not None and not 0 <= tid < self.vocab_size:
                raise TokenizerError(f"{source}: {what} token id {tid} is outside the vocabulary (size {self.vocab_size})")
        self.bos_id = bos_id
        self.eos_id = eos_id
        stops = {i for i in (eos_id, *extra_stop_ids) if i is not None}
        stops.update(self.special_tokens[t] for t in END_OF_TURN_TOKENS if t in self.special_tokens)
        self.stop_ids = frozenset(stops)
        self.chat_template = chat_template
        self.add_bos = add_bos
        self._meta_chunking = meta_chunking

        model = tokenizer_json.get("model") or {}
        self._byte_level = _has_byte_level_decoder(tokenizer_json.get("decoder"))
        self._byte_fallback = bool(model.get("byte_fallback"))
        if not self._byte_level:
            logger.info("%s: no ByteLevel decoder; token_bytes() approximates SentencePiece spelling", source)

    # ------------------------------------------------------------ constructors
    @classmethod
    def from_directory(cls, directory: str | os.PathLike) -> "HFTokenizer":
        """Load ``tokenizer.json`` with its ``tokenizer_config.json`` and ``generation_config.json``.

        The chat template is read from ``tokenizer_config.json`` (``chat_template``;
        a list of named templates picks "default") or from ``chat_template.jinja``.

        Args:
            directory: the model directory.

        Returns:
            The tokenizer.

        Raises:
            TokenizerError: a file is missing or malformed, or a configured token is unknown.
        """
        directory = os.fspath(directory)
        tj_path = os.path.join(directory, "tokenizer.json")
        tokenizer_json = _read_json(tj_path)
        if not isinstance(tokenizer_json, dict) or "model" not in tokenizer_json:
            raise TokenizerError(f"{tj_path}: not a tokenizers JSON file (no 'model' entry)")
        config_path = os.path.join(directory, "tokenizer_config.json")
        config = _read_json(config_path) if os.path.exists(config_path) else {}
        gen_path = os.path.join(directory, "generation_config.json")
        gen = _read_json(gen_path) if os.path.exists(gen_path) else {}

        ids = {t["content"]: int(t["id"]) for t in tokenizer_json.get("added_tokens") or []}
        vocab = (tokenizer_json.get("model") or {}).get("vocab")
        vocab = vocab if isinstance(vocab, dict) else {}

        def token_id(field: str) -> int | None:
            value = config.get(field)
            if isinstance(value, dict):
                value = value.get("content")
            if value is None:
                return None
            if value in ids:
                return ids[value]
            if value in vocab:
                return int(vocab[value])
            raise TokenizerError(f"{config_path}: {field}={value!r} is not a token of {tj_path}")

        bos_id, eos_id = token_id("bos_token"), token_id("eos_token")
        gen_eos = gen.get("eos_token_id")
        extra = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
        if eos_id is None and extra:
            eos_id = extra[0]

        if "add_bos_token" in config:
            add_bos = bool(config["add_bos_token"])
        else:  # infer from the post-processor: does it put BOS first?
            add_bos = bos_id is not None and _post_processor_adds(tokenizer_json.get("post_processor"), bos_id)

        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default")
        jinja_path = os.path.join(directory, "chat_template.jinja")
        if template is None and os.path.exists(jinja_path):
            with open(jinja_path, encoding="utf-8") as f:
                template = f.read()

        return cls(
            tokenizer_json,
            name="hf",
            source=tj_path,
            bos_id=bos_id,
            eos_id=eos_id,
            extra_stop_ids=[int(i) for i in extra],
            chat_template=template,
            add_bos=add_bos,
            # A Llama 3 tokenizer.json: cut long inputs as Meta does, so ids equal Meta's everywhere.
            meta_chunking=_splits_with(tokenizer_json.get("pre_tokenizer"), LLAMA3_SPLIT_PATTERN),
        )

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any], path: str = "") -> "HFTokenizer":
        """Build the tokenizer a GGUF file embeds (``tokenizer.ggml.model == "gpt2"``).

        Args:
            meta: GGUF metadata as a plain dict (key -> Python value / list).
            path: the GGUF file, for messages.

        Returns:
            The tokenizer.

        Raises:
            TokenizerError: a required key is missing, or the tokenizer kind / pre-tokenizer is unsupported.
        """
        with gc_paused():
            return cls._from_gguf_metadata(meta, path)

    @classmethod
    def _from_gguf_metadata(cls, meta: Mapping[str, Any], path: str) -> "HFTokenizer":
        where = path or "GGUF metadata"
        kind = meta.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise TokenizerError(
                f"{where}: tokenizer.ggml.model={kind!r} is not supported; only byte-level BPE ('gpt2') is"
            )
        pre = meta.get("tokenizer.ggml.pre", "default")
        if pre in UNSUPPORTED_PRE:
            raise TokenizerError(f"{where}: tokenizer.ggml.pre={pre!r} needs a split regex inhouse does not implement")
        for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
            if key not in meta:
                raise TokenizerError(f"{where}: missing {key}")
        tokens = [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in meta["tokenizer.ggml.tokens"]]
        merges = [m.decode("utf-8") if isinstance(m, bytes) else str(m) for m in meta["tokenizer.ggml.merges"]]
        types = [int(t) for t in meta.get("tokenizer.ggml.token_type", [GGUF_TOKEN_NORMAL] * len(tokens))]
        if len(types) != len(tokens):
            raise TokenizerError(
                f"{where}: tokenizer.ggml.token_type has {len(types)} entries but tokenizer.ggml.tokens has {len(tokens)}"
            )

        # Vocabulary in the byte alphabet (tokens spelled otherwise are respelled from their UTF-8).
        spelling = bytes_to_unicode()
        alphabet = set(spelling.values())
        vocab: dict[str, int] = {}
        for i, tok in enumerate(tokens):
            key = tok if set(tok) <= alphabet else "".join(spelling[b] for b in tok.encode("utf-8"))
            vocab[key] = i  # a duplicate spelling keeps its last id, as in transformers
        pairs = []
        for n, m in enumerate(merges):
            parts = m.split(" ")
            if len(parts) != 2:
                raise TokenizerError(f"{where}: tokenizer.ggml.merges[{n}]={m!r} is not two tokens separated by a space")
            pairs.append(parts)

        added = []
        for i, (tok, typ) in enumerate(zip(tokens, types)):
            # A CONTROL token spelled outside the byte alphabet is a llama.cpp mislabel; transformers skips it.
            if typ == GGUF_TOKEN_CONTROL and set(tok) <= alphabet:
                added.append(_added(i, tok, special=True))
            elif typ == GGUF_TOKEN_USER_DEFINED and tok in vocab:
                added.append(_added(vocab[tok], tok, special=False))

        llama3 = pre in LLAMA3_PRE
        if llama3:
            pre_tokenizer = {
                "type": "Sequence",
                "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT_PATTERN}, "behavior": "Isolated", "invert": False},
                    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
                ],
            }
        else:
            if pre not in ("default", "gpt2", "gpt-2", "smollm", "starcoder", "refact"):
                logger.info("%s: tokenizer.ggml.pre=%r: using GPT-2's byte-level split", where, pre)
            pre_tokenizer = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
        tokenizer_json = {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": added,
            "normalizer": None,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {
                "type": "BPE",
                "dropout": None,
                "unk_token": None,
                "continuing_subword_prefix": "",
                "end_of_word_suffix": "",
                "fuse_unk": False,
                "byte_fallback": False,
                # tiktoken (Meta) takes a whole pre-token that is in the vocabulary as is.
                "ignore_merges": llama3,
                "vocab": vocab,
                "merges": pairs,
            },
        }

        def special_id(key: str) -> int | None:
            value = meta.get(key)
            if value is None:
                return None
            if not 0 <= int(value) < len(tokens):
                raise TokenizerError(f"{where}: {key}={value} is outside the vocabulary (size {len(tokens)})")
            return int(value)

        add_bos = meta.get("tokenizer.ggml.add_bos_token")
        tokenizer = cls(
            tokenizer_json,
            name="gguf",
            source=where,
            bos_id=special_id("tokenizer.ggml.bos_token_id"),
            eos_id=special_id("tokenizer.ggml.eos_token_id"),
            chat_template=meta.get("tokenizer.chat_template"),
            add_bos=bool(add_bos) if add_bos is not None else llama3,
            meta_chunking=llama3,
        )
        # Ids stay as the file numbers them even if two tokens share a spelling.
        tokenizer.vocab_size = max(tokenizer.vocab_size, len(tokens))
        return tokenizer

    def state(self) -> dict[str, Any]:
        """Everything `from_state` needs to build this tokenizer again (JSON-serializable; its
        ``backend_json`` is the backend's own, a few MB): the prepared-weights cache keeps it so that
        a later start skips rebuilding the vocabulary from a GGUF file."""
        config = {
            "added_tokens": [{"id": i, "content": c, "special": i in self._special_ids}
                             for c, i in sorted(self.special_tokens.items(), key=lambda kv: kv[1])],
            "model": {"byte_fallback": self._byte_fallback},
            "decoder": {"type": "ByteLevel"} if self._byte_level else None,
        }
        return {
            "backend_json": self._backend.to_str(),
            "config": config,
            "name": self.name,
            "source": self.source,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "extra_stop_ids": sorted(i for i in self.stop_ids if i != self.eos_id),
            "chat_template": self.chat_template,
            "add_bos": self.add_bos,
            "meta_chunking": self._meta_chunking,
            "vocab_size": self.vocab_size,
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> "HFTokenizer":
        """The tokenizer `state` describes (see `state`).

        Raises:
            TokenizerError: the state is incomplete or its JSON cannot be loaded.
        """
        try:
            tokenizer = cls(state["config"], name=state["name"], source=state["source"], bos_id=state["bos_id"],
                            eos_id=state["eos_id"], extra_stop_ids=state["extra_stop_ids"],
                            chat_template=state["chat_template"], add_bos=state["add_bos"],
                            meta_chunking=state["meta_chunking"], backend_json=state["backend_json"])
            tokenizer.vocab_size = int(state["vocab_size"])
        except (KeyError, TypeError, ValueError) as e:
            raise TokenizerError(f"a saved tokenizer state is incomplete or malformed: {e!r}") from e
        return tokenizer

    # --------------------------------------------------------------- interface
    def encode(self, text: str, *, bos: bool = False, eos: bool = False, allow_special: bool = False) -> list[int]:
        """See `Tokenizer.encode`."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        backend = self._backend
        with self._encode_lock:
            backend.encode_special_tokens = not allow_special
            if self._meta_chunking:
                ids = [i for piece in _pieces(text) for i in backend.encode(piece, add_special_tokens=False).ids]
            else:
                ids = list(backend.encode(text, add_special_tokens=False).ids)
        return self._wrap(ids, bos, eos)

    def decode(self, ids: Sequence[int]) -> str:
        """See `Tokenizer.decode`."""
        ids = [int(i) for i in ids]
        for i in ids:
            self._check_id(i)
        return self._backend.decode(ids, skip_special_tokens=False)

    def token_bytes(self, id: int) -> bytes:
        """See `Tokenizer.token_bytes`."""
        self._check_id(id)
        return self._token_bytes(id)

    def is_special(self, id: int) -> bool:
        """See `Tokenizer.is_special`: added tokens marked special."""
        return id in self._special_ids

    def to_json(self) -> str:
        """The tokenizer in ``tokenizer.json`` form, its added tokens special or not as they came."""
        data = json.loads(self._backend.to_str())
        for t in data.get("added_tokens") or []:
            t["special"] = int(t["id"]) in self._special_ids
        return json.dumps(data, ensure_ascii=False)

    # ----------------------------------------------------------------- helpers
    def _token_bytes(self, id: int) -> bytes:
        token = self._backend.id_to_token(id)
        if token is None:
            raise TokenizerError(f"{self.source}: token id {id} has no token")
        if self._byte_level:
            # What the ByteLevel decoder does per token: map every character back to its
            # byte, or keep the UTF-8 of the token when a character is outside the alphabet.
            table = _unicode_to_bytes()
            try:
                return bytes(table[c] for c in token)
            except KeyError:
                return token.encode("utf-8")
        if self._byte_fallback and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            return bytes([int(token[3:5], 16)])
        return token.replace("\u2581", " ").encode("utf-8")


def _added(id: int, content: str, *, special: bool) -> dict[str, Any]:
    return {
        "id": id,
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": special,
    }


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise TokenizerError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path}: invalid JSON ({e})") from None


def _splits_with(pre_tokenizer: Mapping[str, Any] | None, pattern: str) -> bool:
    """Whether a pre-tokenizer (or one in a Sequence) is a Split on the regex `pattern`."""
    if not pre_tokenizer:
        return False
    if pre_tokenizer.get("type") == "Sequence":
        return any(_splits_with(p, pattern) for p in pre_tokenizer.get("pretokenizers", ()))
    return pre_tokenizer.get("type") == "Split" and (pre_tokenizer.get("pattern") or {}).get("Regex") == pattern


def _post_processor_adds(post_processor: Mapping[str, Any] | None, token_id: int) -> bool:
    """Whether a TemplateProcessing post-processor starts a single sequence with `token_id`."""
    if not post_processor:
        return False
    if post_processor.get("type") == "Sequence":
        return any(_post_processor_adds(p, token_id) for p in post_processor.get("processors", ()))
    if post_processor.get("type") != "TemplateProcessing":
        return False
    single = post_processor.get("single") or []
    if not single or "SpecialToken" not in single[0]:
        return False
    name = single[0]["SpecialToken"].get("id")
    entry = (post_processor.get("special_tokens") or {}).get(name) or {}
    return token_id in entry.get("ids", ())
