"""Rendering jinja chat templates the way Hugging Face transformers does.

Models ship a chat template (``tokenizer_config.json`` or GGUF
``tokenizer.chat_template``). transformers' ``apply_chat_template(tokenize=False)``
is the de-facto reference for how it renders, so we reproduce its environment:
a sandboxed, immutable jinja environment with ``trim_blocks`` and ``lstrip_blocks``,
the ``loopcontrols`` extension, a ``{% generation %}`` block tag (rendered as its
body), a ``tojson`` filter that does not HTML-escape, and the globals
``raise_exception``, ``strftime_now``, ``dict`` and ``namespace``. Messages are
passed with their ``None`` values dropped; reasoning is also exposed as
``reasoning_content`` / ``thinking`` as transformers does.

Templates are untrusted input: the sandbox refuses attribute access to Python
internals, and namespaces refuse underscore names.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

logger = logging.getLogger(__name__)


class ChatTemplateError(ValueError):
    """A chat template that does not compile, or that raised while rendering (``raise_exception``)."""


class _GenerationBlock(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` marks assistant text for training masks; it renders its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson HTML-escapes (<, >, &, '); chat templates want plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _TemplateDict:
    """``dict(...)`` / ``dict.fromkeys(...)`` for templates, without exposing the type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """jinja's ``namespace`` refusing underscore-prefixed names (no reaching CPython internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # same signature trick as jinja's Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore-prefixed namespace attribute {name!r}")


@lru_cache(maxsize=32)
def compile_chat_template(template: str) -> jinja2.Template:
    """Compile a chat template in the transformers-compatible sandbox (cached).

    Args:
        template: jinja source.

    Returns:
        The compiled template.

    Raises:
        ChatTemplateError: the template has a syntax error.
    """
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template does not compile: {e.message} (line {e.lineno})") from e


_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _prepare_message(message: Any, index: int) -> dict:
    if not isinstance(message, Mapping):
        raise ChatTemplateError(f"messages[{index}] must be a dict, got {type(message).__name__}")
    prepared = {key: value for key, value in message.items() if value is not None}
    reasoning = next((prepared[k] for k in _REASONING_FIELDS if prepared.get(k) is not None), None)
    if reasoning is not None:
        prepared = {"thinking": reasoning, **prepared, "reasoning_content": reasoning}
    return prepared


def render_chat_template(
    template: str,
    messages: list[dict],
    *,
    add_generation_prompt: bool = True,
    tools: list[dict] | None = None,
    bos_token: str = "",
    eos_token: str = "",
    **extra: Any,
) -> str:
    """Render a chat as transformers' ``apply_chat_template(..., tokenize=False)`` would.

    Args:
        template: the jinja chat template.
        messages: chat messages (dicts with "role", "content", maybe "tool_calls", ...);
            keys whose value is None are dropped before rendering.
        add_generation_prompt: end with the header that opens the assistant's turn.
        tools: tool JSON schemas (OpenAI function format), or None.
        bos_token: text of the BOS token, visible to the template as ``bos_token``.
        eos_token: text of the EOS token, visible as ``eos_token``.
        **extra: further template variables (``documents``, ``date_string``, ``enable_thinking``, ...).

    Returns:
        The rendered prompt text.

    Raises:
        ChatTemplateError: the template does not compile, raised an exception while rendering,
            or the inputs are malformed (empty chat, non-dict message, non-dict tool).
    """
    if not messages:
        raise ChatTemplateError("cannot render a chat template for an empty conversation")
    chat = [_prepare_message(m, i) for i, m in enumerate(messages)]
    if tools is not None:
        for i, tool in enumerate(tools):
            if not isinstance(tool, Mapping):
                raise ChatTemplateError(f"tools[{i}] must be a JSON schema dict, got {type(tool).__name__}")
    variables = {"bos_token": bos_token, "eos_token": eos_token, **extra}
    variables.setdefault("documents", None)
    compiled = compile_chat_template(template)
    try:
        return compiled.render(messages=chat, tools=tools, add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"chat template failed while rendering: {e}") from e
