"""One entry point for turning a conversation into prompt ids, whatever the model's format.

* Llama 3.x tokenizers use the native Llama 3.1 format (`Llama31ChatFormat`), token for token
  as Meta's reference, with tools — unless a jinja template is asked for explicitly.
* Other models (SmolLM2...) use the jinja chat template shipped with them, rendered as HF
  transformers renders it.

In both, text inside messages stays plain text: a user who types ``<|im_end|>`` or
``<|eot_id|>`` gets those characters, never the control token. For jinja templates this is
done by rendering with a placeholder per message and encoding the template's own text (where
control tokens are meant) separately from the messages' text.
"""

from __future__ import annotations

import re
import secrets
from typing import Any, Optional

from inhouse.tokenizer.base import Tokenizer, TokenizerError
from inhouse.tokenizer.template import render_chat_template
from inhouse.tokenizer.tool_parser import ParsedAssistant, parse_assistant_output


class ChatRenderer:
    """Encode conversations for a model and parse its replies.

    Args:
        tokenizer: the model's tokenizer.
        mode: "auto" (native Llama 3.1 for Llama 3 tokenizers, else the model's template),
            "llama3" (native) or "template" (a jinja template).
        template: a jinja chat template overriding the tokenizer's own (implies "template").
    """

    def __init__(self, tokenizer: Tokenizer, mode: str = "auto", template: Optional[str] = None):
        if mode not in ("auto", "llama3", "template"):
            raise ValueError(f"chat format mode={mode!r}; expected auto, llama3 or template")
        is_llama3 = "<|start_header_id|>" in tokenizer.special_tokens and "<|eot_id|>" in tokenizer.special_tokens
        if template is not None:
            mode = "template"
        elif mode == "auto":
            mode = "llama3" if is_llama3 else "template"
        if mode == "llama3" and not is_llama3:
            raise TokenizerError("the Llama 3.1 chat format needs a Llama 3 tokenizer (with <|start_header_id|>)")
        self.tokenizer = tokenizer
        self.mode = mode
        self.template = template if template is not None else tokenizer.chat_template
        if mode == "template" and not self.template:
            raise TokenizerError("this model ships no chat template; give one (chat_template=...) or use plain prompts")
        self._native = None
        if mode == "llama3":
            from inhouse.tokenizer.chat_format import Llama31ChatFormat

            self._native = Llama31ChatFormat(tokenizer)

    @property
    def stop_ids(self) -> frozenset[int]:
        return self._native.stop_ids if self._native is not None else frozenset(self.tokenizer.stop_ids)

    def encode(self, messages: list[dict], *, tools: Optional[list[dict]] = None,
               add_generation_prompt: bool = True, **kwargs: Any) -> list[int]:
        """Prompt ids for a conversation (OpenAI-style message dicts)."""
        _validate_messages(messages)
        if self._native is not None:
            return self._native.encode_dialog(messages, tools=tools, add_generation_prompt=add_generation_prompt, **kwargs)
        return self._encode_template(messages, tools, add_generation_prompt, kwargs)

    def render(self, messages: list[dict], *, tools: Optional[list[dict]] = None,
               add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """The prompt as text (for display and debugging)."""
        return self.tokenizer.decode(self.encode(messages, tools=tools, add_generation_prompt=add_generation_prompt, **kwargs))

    def parse(self, text: str, *, ended_with_eom: bool = False) -> ParsedAssistant:
        """Split a reply into content and tool calls (Llama 3.1 tool forms; plain content otherwise)."""
        if self._native is None:
            return ParsedAssistant(content=text, tool_calls=[])
        return parse_assistant_output(text, ended_with_eom=ended_with_eom)

    # ------------------------------------------------------------------ jinja
    def _special_re(self):
        if getattr(self, "_special_pattern", None) is None:
            names = sorted(self.tokenizer.special_tokens, key=len, reverse=True)
            self._special_pattern = re.compile("|".join(re.escape(n) for n in names) if names else r"(?!)")
        return self._special_pattern

    def _encode_template(self, messages, tools, add_generation_prompt, kwargs) -> list[int]:
        tok = self.tokenizer
        inv = {v: k for k, v in tok.special_tokens.items()}
        bos = inv.get(tok.bos_id, "") if tok.bos_id is not None else ""
        eos = inv.get(tok.eos_id, "") if tok.eos_id is not None else ""
        # Render with a unique placeholder for each text part so that message text can be
        # encoded as plain text while the template's own text may contain control tokens.
        tag = secrets.token_hex(8)
        texts: list[str] = []

        def hole(text: str) -> str:
            texts.append(text)
            return f"\x00{tag}:{len(texts) - 1}\x00"

        masked = [_mask_message(m, hole) for m in messages]
        rendered = render_chat_template(self.template, masked, add_generation_prompt=add_generation_prompt,
                                        tools=tools, bos_token=bos, eos_token=eos, **kwargs)
        # Walk the rendered text: the template's own text may hold control tokens (split there and
        # emit their ids); message text is joined to the surrounding plain text and encoded with
        # control tokens disabled. Splitting only at control tokens is what the tokenizers do
        # themselves, so ordinary text gets exactly the ids of encoding the whole prompt.
        special_re = self._special_re()
        items: list = []  # str pieces to encode as plain text, or int control-token ids
        pos = 0

        def add_template_text(t: str) -> None:
            last = 0
            for m in special_re.finditer(t):
                items.append(t[last:m.start()])
                items.append(tok.special_tokens[m.group(0)])
                last = m.end()
            items.append(t[last:])

        while True:
            start = rendered.find(f"\x00{tag}:", pos)
            if start == -1:
                break
            end = rendered.index("\x00", start + 1)
            idx = int(rendered[start + len(tag) + 2:end])
            add_template_text(rendered[pos:start])
            items.append(texts[idx])
            pos = end + 1
        add_template_text(rendered[pos:])
        ids: list[int] = []
        buf: list[str] = []
        for it in items + [None]:
            if isinstance(it, str):
                buf.append(it)
                continue
            if buf and "".join(buf):
                ids += tok.encode("".join(buf))
            buf = []
            if it is not None:
                ids.append(it)
        real = render_chat_template(self.template, messages, add_generation_prompt=add_generation_prompt,
                                    tools=tools, bos_token=bos, eos_token=eos, **kwargs)
        if "".join(t if isinstance(t, str) else inv[t] for t in items) != real:
            # The template transformed message text (trim, slicing...), so the placeholders do not stand
            # for it exactly: encode the real rendering, refusing text that would become control tokens.
            for m in messages:
                for t in _message_texts(m):
                    hit = special_re.search(t)
                    if hit:
                        raise TokenizerError(f"message text contains the control token {hit.group(0)!r}; "
                                             "this chat template cannot carry it safely")
            ids = tok.encode(real, allow_special=True)
        return ids


def _message_texts(m: dict) -> list[str]:
    c = m.get("content")
    if isinstance(c, str):
        return [c]
    if isinstance(c, list):
        return [p.get("text", "") for p in c if isinstance(p, dict)]
    return []


def _mask_message(m: dict, hole) -> dict:
    out = dict(m)
    c = m.get("content")
    if isinstance(c, str):
        out["content"] = hole(c) if c else c
    elif isinstance(c, list):
        out["content"] = [dict(p, text=hole(p["text"])) if isinstance(p, dict) and p.get("text") else p for p in c]
    return out


ROLES = ("system", "user", "assistant", "tool", "ipython")


def _validate_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be an object with 'role' and 'content', got {type(m).__name__}")
        role = m.get("role")
        if role not in ROLES:
            raise ValueError(f"messages[{i}].role={role!r}; expected one of {', '.join(ROLES)}")
        c = m.get("content")
        if c is not None and not isinstance(c, (str, list)):
            raise ValueError(f"messages[{i}].content must be a string or a list of parts, got {type(c).__name__}")
        if c is None and not m.get("tool_calls"):
            raise ValueError(f"messages[{i}] ({role}) has no content")
