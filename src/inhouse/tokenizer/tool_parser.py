"""Splits a Llama 3.x assistant reply into plain content and tool calls.

Accepted call forms (tried in this order; the first form that yields a call wins):

1. function tags: ``<function=name>{"a": 1}</function>`` anywhere in the text, several allowed,
   closing tag optional, single-quoted (Python-literal) dicts tolerated;
2. JSON (the whole reply, or everything after ``<|python_tag|>``): ``{"name": ..., "parameters": {...}}``,
   ``"arguments"`` instead of ``"parameters"`` (dict or JSON string), the OpenAI shape
   ``{"type": "function", "function": {...}}``, a JSON list of those, or several objects
   separated by ``;`` or newlines;
3. python list (same scope as JSON): ``[get_weather(city="Paris"), now()]`` -- keyword arguments
   with literal values only;
4. built-in calls ``brave_search.call(query="...")`` / ``wolfram_alpha.call(query="...")`` (also
   ``photogen`` and ``code_interpreter.call(code=...)``), with or without ``<|python_tag|>``,
   anywhere in the text, several allowed; ``other.call(query="...")`` is a custom call only when it
   is the entire reply;
5. code: whatever follows ``<|python_tag|>`` when nothing above matched is a ``code_interpreter``
   call; without the tag, the same holds when the reply ended with ``<|eom_id|>`` and
   ``code_interpreter`` is an enabled built-in tool.

This is a superset of what Meta's reference accepts (``ToolUtils.maybe_extract_custom_tool_call``,
``maybe_extract_builtin_tool_call``, ``ChatFormat.decode_assistant_message_from_content``). Two
deliberate differences: text around a call is kept as ``content`` (Meta drops it), and a custom call
named like a built-in tool (``{"name": "code_interpreter", "parameters": {"code": ...}}``) keeps its
``code`` argument instead of being renamed to ``query``. Malformed calls come back as plain content;
parsing never raises on model output.
"""

from __future__ import annotations

import ast
import json
import logging
import re
import uuid
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from inhouse.tokenizer.system_prompt import BUILTIN_TOOL_NAMES

logger = logging.getLogger(__name__)

PYTHON_TAG = "<|python_tag|>"
EOT = "<|eot_id|>"
EOM = "<|eom_id|>"
ASSISTANT_HEADER = "<|start_header_id|>assistant<|end_header_id|>\n\n"

# Replies longer than this are not searched for JSON / python-list calls (ast and json on huge,
# deeply nested input are slow); they can still hold function-tag and built-in calls.
_MAX_STRUCTURED_CHARS = 200_000


def _new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolCall:
    """One tool call made by the model.

    Attributes:
        name: tool name (``brave_search``, ``wolfram_alpha``, ``code_interpreter``, ``photogen`` or a custom function).
        arguments: parsed arguments; built-in search tools use ``{"query": ...}``, ``code_interpreter`` ``{"code": ...}``.
        builtin: whether ``name`` is a Llama built-in tool.
        call_id: id for OpenAI responses (random, ``call_`` + 24 hex digits); ignored by ``==``.
    """

    name: str
    arguments: dict
    builtin: bool = False
    call_id: str = field(default_factory=_new_call_id, compare=False)

    def to_openai(self) -> dict:
        """Returns the call as an OpenAI ``tool_calls`` entry (arguments as a JSON string)."""
        return {
            "id": self.call_id,
            "type": "function",
            "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)},
        }


@dataclass
class ParsedAssistant:
    """An assistant reply split into text and tool calls.

    Attributes:
        content: the text that is not part of a call (the whole reply when nothing parsed),
            without the assistant header, ``<|python_tag|>`` and the final ``<|eot_id|>``/``<|eom_id|>``.
        tool_calls: calls in order of appearance.
    """

    content: str
    tool_calls: list[ToolCall] = field(default_factory=list)


def parse_assistant_output(
    text: str, *, ended_with_eom: bool = False, builtin_tools: Collection[str] = ()
) -> ParsedAssistant:
    """Parses generated assistant text into content and tool calls.

    Args:
        text: decoded assistant output; special tokens may be present as text or already removed.
        ended_with_eom: generation stopped on ``<|eom_id|>`` (a trailing ``<|eom_id|>`` in ``text`` counts too).
        builtin_tools: built-in tools enabled for the request; only ``code_interpreter`` matters,
            for untagged code ended by ``<|eom_id|>``.

    Returns:
        A ``ParsedAssistant``. Never raises on malformed calls: they stay in ``content``.

    Raises:
        TypeError: ``text`` is not a string.
    """
    if not isinstance(text, str):
        raise TypeError(f"parse_assistant_output: text must be str, got {type(text).__name__}")
    try:
        return _parse(text, ended_with_eom, builtin_tools)
    except (RecursionError, MemoryError, ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        # Model output is untrusted; a parser bug must not turn a reply into a server error.
        logger.warning("tool-call parsing failed (%s: %s); returning the reply as plain content", type(exc).__name__, exc)
        return ParsedAssistant(content=text, tool_calls=[])


def _parse(text: str, ended_with_eom: bool, builtin_tools: Collection[str]) -> ParsedAssistant:
    body = text.strip(" ")
    if body.startswith(ASSISTANT_HEADER):
        body = body[len(ASSISTANT_HEADER) :]
    if body.endswith(EOT):
        body = body[: -len(EOT)]
    elif body.endswith(EOM):
        body = body[: -len(EOM)]
        ended_with_eom = True

    tag_at = body.find(PYTHON_TAG)
    tagged = tag_at >= 0
    prefix, region = (body[:tag_at], body[tag_at + len(PYTHON_TAG) :]) if tagged else ("", body)
    untagged = body.replace(PYTHON_TAG, "")

    calls, rest = _function_tag_calls(untagged)
    if calls:
        return _result(rest, calls)

    if len(region) <= _MAX_STRUCTURED_CHARS:
        for extract in (_json_calls, _python_list_calls):
            calls = extract(region.strip())
            if calls:
                return _result(prefix, calls)

    calls, rest = _builtin_calls(untagged)
    if calls:
        return _result(rest, calls)

    if region.strip() and (tagged or (ended_with_eom and "code_interpreter" in builtin_tools)):
        return _result(prefix, [ToolCall("code_interpreter", {"code": region}, builtin=True)])

    return ParsedAssistant(content=untagged.strip() if tagged else body, tool_calls=[])


def _result(content: str, calls: list[ToolCall]) -> ParsedAssistant:
    content = content.strip()
    if not content.strip(";, \n\t"):  # only separators were left between the calls
        content = ""
    return ParsedAssistant(content=content, tool_calls=calls)


def _make_call(name: Any, arguments: Any) -> ToolCall | None:
    """Validates a (name, arguments) pair; maps built-in names to their argument convention."""
    if not isinstance(name, str) or not name.strip() or not isinstance(arguments, dict):
        return None
    name = name.strip()
    if name not in BUILTIN_TOOL_NAMES:
        return ToolCall(name, arguments, builtin=False)
    key = "code" if name == "code_interpreter" else "query"
    if key in arguments or not arguments:
        return ToolCall(name, dict(arguments), builtin=True)
    # A built-in called in custom style with another argument name (Meta takes the first value).
    return ToolCall(name, {key: next(iter(arguments.values()))}, builtin=True)


# --- 1. function tags ------------------------------------------------------------------------

_FUNCTION_TAG = re.compile(r"<function=\s*([^>{}\s][^>{}]*?)\s*>")
_FUNCTION_END = re.compile(r"\s*</function>")


def _function_tag_calls(text: str) -> tuple[list[ToolCall], str]:
    calls: list[ToolCall] = []
    kept: list[str] = []
    pos = 0
    for match in _FUNCTION_TAG.finditer(text):
        if match.start() < pos:
            continue
        parsed = _loose_dict_at(text, match.end())
        if parsed is None:
            continue
        arguments, end = parsed
        call = _make_call(match.group(1), arguments)
        if call is None:
            continue
        closing = _FUNCTION_END.match(text, end)
        if closing:
            end = closing.end()
        kept.append(text[pos : match.start()])
        calls.append(call)
        pos = end
    kept.append(text[pos:])
    return calls, "".join(kept)


def _loose_dict_at(text: str, start: int) -> tuple[dict, int] | None:
    """A dict literal starting at ``start`` (after optional spaces): JSON first, then Python / quote-swapped forms."""
    while start < len(text) and text[start] in " \t":
        start += 1
    if start >= len(text) or text[start] != "{":
        return None
    try:
        value, end = json.JSONDecoder().raw_decode(text, start)
        return (value, end) if isinstance(value, dict) else None
    except json.JSONDecodeError:
        pass
    # Single-quoted dicts: find the shortest balanced-looking span that parses.
    for close in _closing_braces(text, start):
        snippet = text[start : close + 1]
        for candidate in (snippet, snippet.replace("'", '"')):
            value = _literal(candidate)
            if isinstance(value, dict):
                return value, close + 1
    return None


def _closing_braces(text: str, start: int, limit: int = 64):
    count = 0
    pos = text.find("}", start)
    while pos >= 0 and count < limit:
        yield pos
        count += 1
        pos = text.find("}", pos + 1)


def _literal(snippet: str) -> Any:
    try:
        return ast.literal_eval(snippet)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        try:
            return json.loads(snippet)
        except (ValueError, RecursionError):
            return None


# --- 2. JSON ------------------------------------------------------------------------------------


def _json_calls(region: str) -> list[ToolCall]:
    if not region.startswith(("{", "[")):
        return []
    decoder = json.JSONDecoder()
    values = []
    pos = 0
    while pos < len(region):
        try:
            value, pos = decoder.raw_decode(region, pos)
        except (json.JSONDecodeError, RecursionError):
            return []
        values.extend(value if isinstance(value, list) else [value])
        while pos < len(region) and region[pos] in " \t\r\n;,":
            pos += 1
    calls = []
    for value in values:
        call = _json_call(value)
        if call is None:
            return []  # one non-call object means the reply is data, not calls
        calls.append(call)
    return calls


def _json_call(value: Any) -> ToolCall | None:
    if not isinstance(value, dict):
        return None
    if isinstance(value.get("function"), dict) and "name" in value["function"]:
        value = value["function"]  # OpenAI shape {"type": "function", "function": {...}}
    if "name" not in value:
        return None
    if "parameters" in value:
        arguments = value["parameters"]
    elif "arguments" in value:
        arguments = value["arguments"]
    else:
        return None
    if arguments is None:
        arguments = {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except (ValueError, RecursionError):
            return None
    return _make_call(value["name"], arguments)


# --- 3. python list -----------------------------------------------------------------------------


def _python_list_calls(region: str) -> list[ToolCall]:
    if not (region.startswith("[") and region.endswith("]")):
        return []
    try:
        tree = ast.parse(region, mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return []
    if not isinstance(tree.body, ast.List) or not tree.body.elts:
        return []
    calls = []
    for node in tree.body.elts:
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
            return []
        arguments = {}
        for keyword in node.keywords:
            if keyword.arg is None:  # **kwargs
                return []
            try:
                arguments[keyword.arg] = ast.literal_eval(keyword.value)
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                return []
        call = _make_call(node.func.id, arguments)
        if call is None:
            return []
        calls.append(call)
    return calls


# --- 4. built-in calls ----------------------------------------------------------------------------

_QUOTED = r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\''
_BUILTIN_CALL = re.compile(r"\b(\w+)\.call\(\s*(?:(\w+)\s*=\s*)?(" + _QUOTED + r")\s*\)", re.DOTALL)


def _unquote(quoted: str) -> str:
    inner = quoted[1:-1]
    if "\\" not in inner:
        return inner
    # Undo only quote and backslash escapes; other backslashes are kept as written.
    return re.sub(r"\\([\\\"'])", r"\1", inner)


def _builtin_calls(text: str) -> tuple[list[ToolCall], str]:
    calls: list[ToolCall] = []
    kept: list[str] = []
    pos = 0
    matches = list(_BUILTIN_CALL.finditer(text))
    for match in matches:
        name, keyword, quoted = match.group(1), match.group(2), match.group(3)
        whole_reply = len(matches) == 1 and text.strip() == match.group(0)
        if name not in BUILTIN_TOOL_NAMES and not whole_reply:
            continue
        default_key = "code" if name == "code_interpreter" else "query"
        call = _make_call(name, {keyword or default_key: _unquote(quoted)})
        if call is None:
            continue
        kept.append(text[pos : match.start()])
        calls.append(call)
        pos = match.end()
    kept.append(text[pos:])
    return calls, "".join(kept)
