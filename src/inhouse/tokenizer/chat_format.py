"""The Llama 3.1 instruct chat format, token for token as Meta's reference ``ChatFormat`` encodes it.

A dialog is ``<|begin_of_text|>`` followed by one block per message::

    <|start_header_id|>{role}<|end_header_id|>\\n\\n{content}{tool calls}<|eot_id|>   (or <|eom_id|>)

and, for generation, an open ``assistant`` header. Role ``tool`` is written ``ipython``. Every piece
of message text is encoded as plain text, so text that looks like a special token (``<|eot_id|>``)
never becomes one. As in the reference, each text part of a list-valued content, and each tool call,
is encoded separately and the ids are concatenated.

Assistant tool calls are written the way the reference writes them: ``brave_search.call(query="...")``
for the search-style built-ins, the bare code for ``code_interpreter`` (preceded by ``<|python_tag|>``
when it is the first call -- the reference adds the tag only in that case), and for custom functions
JSON ``{"type": "function", "name": ..., "parameters": ...}``, ``<function=name>{...}</function>`` or
``[name(a=1)]`` depending on ``tool_prompt_format``. An assistant message ends with ``<|eom_id|>`` when it
has ``"stop_reason": "end_of_message"``, or, when no ``stop_reason`` is given, when it calls a built-in tool.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from inhouse.tokenizer.system_prompt import BUILTIN_TOOL_NAMES, TOOL_PROMPT_FORMATS, build_system_prompt, split_tools
from inhouse.tokenizer.tool_parser import ToolCall

logger = logging.getLogger(__name__)

BEGIN_OF_TEXT = "<|begin_of_text|>"
END_OF_TEXT = "<|end_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"
EOM = "<|eom_id|>"
PYTHON_TAG = "<|python_tag|>"

ROLES = ("system", "user", "assistant", "tool", "ipython")
_STOP_REASONS = {"end_of_message": True, "eom": True, "end_of_turn": False, "eot": False}

# A rendered dialog is a list of segments: (text, is_special). Special segments are token names.
Segment = tuple[str, bool]


class ChatFormatError(ValueError):
    """A message or tool call that cannot be written in the Llama 3.1 format."""


class Llama31ChatFormat:
    """Encodes OpenAI-style dialogs into Llama 3.1 token ids.

    Args:
        tokenizer: object with ``encode(text, bos=False, eos=False) -> list[int]`` that keeps
            special-looking text as plain text, and ``special_tokens: dict[str, int]``.
        python_tag_all_calls: write ``<|python_tag|>`` before every assistant tool call, as older
            llama-models releases did and as the model itself emits (prompt_format.md). Default
            ``False``: only before a leading ``code_interpreter`` call, as llama_models 0.3 does.

    Raises:
        ChatFormatError: the tokenizer lacks one of the Llama 3 special tokens.
    """

    def __init__(self, tokenizer: Any, *, python_tag_all_calls: bool = False):
        self.tokenizer = tokenizer
        self.python_tag_all_calls = python_tag_all_calls
        needed = (BEGIN_OF_TEXT, END_OF_TEXT, START_HEADER, END_HEADER, EOT, EOM, PYTHON_TAG)
        missing = [name for name in needed if name not in tokenizer.special_tokens]
        if missing:
            raise ChatFormatError(f"tokenizer {type(tokenizer).__name__}: missing Llama 3 special tokens {missing}")
        self.stop_ids: frozenset[int] = frozenset(tokenizer.special_tokens[name] for name in (EOT, EOM, END_OF_TEXT))

    # -- public API ---------------------------------------------------------------------------

    def encode_message(self, message: Mapping[str, Any], tool_prompt_format: str = "json") -> list[int]:
        """Encodes one message (header, content, tool calls, end token); no ``<|begin_of_text|>``.

        Args:
            message: OpenAI-style message dict.
            tool_prompt_format: how custom tool calls are written: ``json``, ``function_tag`` or ``python_list``.

        Returns:
            Token ids.

        Raises:
            ChatFormatError: unknown role, content part or format, or a malformed tool call.
        """
        _check_format(tool_prompt_format)
        return self._ids(
            message_segments(message, tool_prompt_format, where="message", python_tag_all_calls=self.python_tag_all_calls)
        )

    def encode_dialog(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        tool_prompt_format: str = "json",
        date: str | None = None,
        tool_choice: str | None = None,
    ) -> list[int]:
        """Encodes a dialog; the ids start with ``<|begin_of_text|>``.

        Args:
            messages: OpenAI-style message dicts.
            tools: ``None`` encodes ``messages`` as given (like Meta's ``encode_dialog_prompt``). A list
                (even empty) first rewrites the dialog as llama-stack does: the leading system message
                is replaced by the built tool system prompt (see ``system_prompt.build_system_prompt``).
            add_generation_prompt: end with an open assistant header for the model to complete.
            tool_prompt_format: ``json`` / ``function_tag`` (Llama 3.1) or ``python_list`` (Llama 3.2/3.3).
            date: ``Today Date`` text for the tool system prompt (default: today, ``%d %B %Y``).
            tool_choice: ``auto``/``none``/``required``/a tool name, for the tool system prompt.

        Returns:
            Token ids.

        Raises:
            ChatFormatError: a malformed message (the error names its index).
            ToolSpecError: a malformed tool definition.
        """
        return self._ids(
            dialog_segments(
                messages,
                tools=tools,
                add_generation_prompt=add_generation_prompt,
                tool_prompt_format=tool_prompt_format,
                date=date,
                tool_choice=tool_choice,
                python_tag_all_calls=self.python_tag_all_calls,
            )
        )

    def render_text(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        tool_prompt_format: str = "json",
        date: str | None = None,
        tool_choice: str | None = None,
    ) -> str:
        """Same arguments as ``encode_dialog``; returns the prompt as text (special tokens by name)."""
        segments = dialog_segments(
            messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            tool_prompt_format=tool_prompt_format,
            date=date,
            tool_choice=tool_choice,
            python_tag_all_calls=self.python_tag_all_calls,
        )
        return "".join(text for text, _ in segments)

    # -- internals ----------------------------------------------------------------------------

    def _ids(self, segments: list[Segment]) -> list[int]:
        ids: list[int] = []
        for text, special in segments:
            if special:
                ids.append(self.tokenizer.special_tokens[text])
            elif text:
                ids.extend(self.tokenizer.encode(text, bos=False, eos=False))
        return ids


def _check_format(tool_prompt_format: str) -> None:
    if tool_prompt_format not in TOOL_PROMPT_FORMATS:
        raise ChatFormatError(f"tool_prompt_format: {tool_prompt_format!r} is not one of {TOOL_PROMPT_FORMATS}")


def dialog_segments(
    messages: Sequence[Mapping[str, Any]],
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = True,
    tool_prompt_format: str = "json",
    date: str | None = None,
    tool_choice: str | None = None,
    python_tag_all_calls: bool = False,
) -> list[Segment]:
    """The dialog as ``(text, is_special)`` segments; see ``Llama31ChatFormat.encode_dialog``."""
    _check_format(tool_prompt_format)
    messages = list(messages)
    if tools is not None:
        messages = apply_tool_prompt(
            messages, tools, tool_prompt_format=tool_prompt_format, date=date, tool_choice=tool_choice
        )
    segments: list[Segment] = [(BEGIN_OF_TEXT, True)]
    for index, message in enumerate(messages):
        segments.extend(
            message_segments(
                message, tool_prompt_format, where=f"messages[{index}]", python_tag_all_calls=python_tag_all_calls
            )
        )
    if add_generation_prompt:
        segments.extend(_header("assistant"))
    return segments


def apply_tool_prompt(
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]],
    *,
    tool_prompt_format: str = "json",
    date: str | None = None,
    tool_choice: str | None = None,
) -> list[dict]:
    """Rewrites a dialog the way llama-stack does before encoding: the tool system prompt replaces the
    leading system message (whose text it includes), custom-tool instructions follow it as needed.

    Raises:
        ChatFormatError: a system message that is not the first message, or non-text system content.
    """
    rest = [dict(m) for m in messages]
    user_system = None
    if rest and rest[0].get("role") == "system":
        user_system = _text_parts(rest.pop(0).get("content"), where="messages[0].content")
        user_system = user_system if len(user_system) != 1 else user_system[0]
    skipped = len(messages) - len(rest)
    for index, message in enumerate(rest):
        if message.get("role") == "system":
            raise ChatFormatError(f"messages[{index + skipped}]: only the first message may be a system message")
    builtin, custom = split_tools(tools)
    prompt = build_system_prompt(
        builtin_tools=builtin,
        custom_tools=custom,
        tool_prompt_format=tool_prompt_format,
        user_system=user_system,
        date=date,
        tool_choice=tool_choice,
    )
    return prompt.as_messages() + rest


def message_segments(
    message: Mapping[str, Any], tool_prompt_format: str, *, where: str, python_tag_all_calls: bool = False
) -> list[Segment]:
    """One message as segments (header, content parts, tool calls, end token)."""
    if not isinstance(message, Mapping):
        raise ChatFormatError(f"{where}: expected a message dict, got {type(message).__name__}")
    role = message.get("role")
    if role not in ROLES:
        raise ChatFormatError(f"{where}.role: {role!r} is not one of {ROLES}")
    segments = _header(role)
    parts = _text_parts(message.get("content"), where=f"{where}.content")
    calls = _tool_calls(message.get("tool_calls"), where=f"{where}.tool_calls") if role == "assistant" else []
    if message.get("tool_calls") and role != "assistant":
        raise ChatFormatError(f"{where}.tool_calls: only assistant messages may carry tool calls (role {role!r})")

    if calls and (python_tag_all_calls or calls[0].name == "code_interpreter"):
        segments.append((PYTHON_TAG, True))
    segments.extend((part, False) for part in parts)
    for index, call in enumerate(calls):
        segments.append((tool_call_text(call, tool_prompt_format, where=f"{where}.tool_calls[{index}]"), False))
    segments.append((EOM if role == "assistant" and _ends_with_eom(message, calls, where) else EOT, True))
    return segments


def tool_call_text(call: ToolCall, tool_prompt_format: str = "json", *, where: str = "tool call") -> str:
    """The text an assistant tool call is written as (without ``<|python_tag|>``).

    Raises:
        ChatFormatError: a built-in call without its ``query``/``code`` argument, or an unknown format.
    """
    _check_format(tool_prompt_format)
    if call.name in BUILTIN_TOOL_NAMES:
        key = "code" if call.name == "code_interpreter" else "query"
        if key not in call.arguments:
            raise ChatFormatError(f"{where}: built-in tool {call.name!r} needs argument {key!r}, got {call.arguments!r}")
        if key == "code":
            return _text(call.arguments["code"])
        return f'{call.name}.call(query="{_text(call.arguments["query"])}")'
    if tool_prompt_format == "json":
        return json.dumps({"type": "function", "name": call.name, "parameters": call.arguments})
    if tool_prompt_format == "function_tag":
        return f"<function={call.name}>{json.dumps(call.arguments)}</function>"
    arguments = ", ".join(f"{key}={_python_value(value, where)}" for key, value in call.arguments.items())
    return f"[{call.name}({arguments})]"


def _python_value(value: Any, where: str) -> str:
    """A value written the way the reference writes python-list arguments (strings in double quotes, as-is)."""
    if isinstance(value, str):
        return f'"{value}"'
    if value is None or isinstance(value, (bool, int, float)):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_python_value(v, where) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}={_python_value(v, where)}" for k, v in value.items()) + "}"
    raise ChatFormatError(f"{where}: argument value {value!r} of type {type(value).__name__} cannot be written")


def _text(value: Any) -> str:
    return value if isinstance(value, str) else str(value)


def _header(role: str) -> list[Segment]:
    return [(START_HEADER, True), ("ipython" if role == "tool" else role, False), (END_HEADER, True), ("\n\n", False)]


def _text_parts(content: Any, *, where: str) -> list[str]:
    if content is None:
        return []
    if isinstance(content, str):
        return [content]
    if not isinstance(content, Sequence):
        raise ChatFormatError(f"{where}: expected a string, null or a list of text parts, got {type(content).__name__}")
    parts = []
    for index, part in enumerate(content):
        if isinstance(part, str):
            parts.append(part)
        elif isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str):
            parts.append(part["text"])
        else:
            raise ChatFormatError(f"{where}[{index}]: only text parts are supported, got {part!r}")
    return parts


def _tool_calls(raw: Any, *, where: str) -> list[ToolCall]:
    if not raw:
        return []
    if not isinstance(raw, Sequence) or isinstance(raw, (str, bytes)):
        raise ChatFormatError(f"{where}: expected a list, got {type(raw).__name__}")
    calls = []
    for index, item in enumerate(raw):
        here = f"{where}[{index}]"
        if isinstance(item, ToolCall):
            calls.append(item)
            continue
        function = item.get("function") if isinstance(item, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str) or not function["name"]:
            raise ChatFormatError(f"{here}.function.name: missing or not a non-empty string in {item!r}")
        arguments = function.get("arguments")
        if arguments is None or arguments == "":
            arguments = {}
        elif isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError as exc:
                raise ChatFormatError(f"{here}.function.arguments: not valid JSON ({exc}): {arguments!r}") from exc
        if not isinstance(arguments, Mapping):
            raise ChatFormatError(f"{here}.function.arguments: expected a JSON object, got {arguments!r}")
        name = function["name"]
        calls.append(
            ToolCall(name, dict(arguments), builtin=name in BUILTIN_TOOL_NAMES, call_id=str(item.get("id") or ""))
        )
    return calls


def _ends_with_eom(message: Mapping[str, Any], calls: list[ToolCall], where: str) -> bool:
    stop_reason = message.get("stop_reason")
    if stop_reason is None:
        return any(call.name in BUILTIN_TOOL_NAMES for call in calls)
    if stop_reason not in _STOP_REASONS:
        raise ChatFormatError(f"{where}.stop_reason: {stop_reason!r} is not one of {sorted(_STOP_REASONS)}")
    return _STOP_REASONS[stop_reason]
