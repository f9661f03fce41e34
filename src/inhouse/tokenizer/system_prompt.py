"""The system prompt (and tool instructions) that llama-stack builds for Llama 3.x tool use.

The text produced here is character-for-character what llama-stack's
``chat_completion_request_to_messages`` produces with its prompt-template generators
(``BuiltinToolGenerator``, ``SystemDefaultGenerator``, ``JsonCustomToolGenerator``,
``FunctionTagCustomToolGenerator``, ``PythonListCustomToolGenerator``), but it is written
with plain string building instead of Jinja templates.

Two layouts exist:

* Llama 3.1 (``tool_prompt_format`` ``"json"`` or ``"function_tag"``): one system message
  with the ``Environment: ipython`` / ``Tools: ...`` lines, the knowledge-cutoff and date
  lines and the caller's own system text, followed -- only when custom tools exist -- by a
  *user* message describing the custom tools.
* Llama 3.2 / 3.3 (``"python_list"``): one system message holding the built-in tool lines,
  the python-list function description and the caller's system text; no date lines.

Tool definitions are OpenAI-style dicts. A Llama built-in tool is named either by its own
``type`` (``{"type": "brave_search"}``) or by a function whose name is a built-in name
(``{"type": "function", "function": {"name": "brave_search"}}``); the latter mirrors the
reference, whose ``ToolDefinition`` turns any built-in name into the built-in tool.
"""

from __future__ import annotations

import datetime
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

# Names the Llama 3.1 reference treats as built-in tools (llama_models ``BuiltinTool``).
# photogen is in Meta's enum but not documented for Llama 3.1; it is accepted for parity.
BUILTIN_TOOL_NAMES: frozenset[str] = frozenset({"brave_search", "wolfram_alpha", "photogen", "code_interpreter"})
TOOL_PROMPT_FORMATS: tuple[str, ...] = ("json", "function_tag", "python_list")
KNOWLEDGE_CUTOFF = "December 2023"


class ToolSpecError(ValueError):
    """A tool definition, tool prompt format or tool choice that cannot be used."""


@dataclass(frozen=True)
class CustomTool:
    """A user-defined function tool.

    Attributes:
        name: function name the model must call.
        description: free text; ``None`` renders as ``None``, as in the reference.
        parameters: JSON schema of the arguments (``{"type": "object", "properties": ..., "required": ...}``).
    """

    name: str
    description: str | None = None
    parameters: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ToolPrompt:
    """The messages that carry the tool instructions.

    Attributes:
        system: full text of the system message.
        tools_user_message: Llama 3.1 JSON / function-tag styles put the custom tool list in a
            user message right after the system message; ``None`` when there is none.
    """

    system: str
    tools_user_message: str | None = None

    def as_messages(self) -> list[dict]:
        """Returns the prompt as OpenAI-style message dicts (system first)."""
        messages = [{"role": "system", "content": self.system}]
        if self.tools_user_message is not None:
            messages.append({"role": "user", "content": self.tools_user_message})
        return messages


def split_tools(tools: Iterable[Mapping[str, Any] | CustomTool | str]) -> tuple[list[str], list[CustomTool]]:
    """Sorts tool definitions into built-in tool names and custom tools, keeping their order.

    Args:
        tools: OpenAI-style tool dicts, ``{"type": "<builtin name>"}`` dicts, bare built-in
            names, or ``CustomTool`` objects.

    Returns:
        ``(builtin_names, custom_tools)``.

    Raises:
        ToolSpecError: a tool has an unknown type, no function name, or a non-dict schema.
    """
    builtin: list[str] = []
    custom: list[CustomTool] = []
    for index, tool in enumerate(tools):
        if isinstance(tool, CustomTool):
            if tool.name in BUILTIN_TOOL_NAMES:
                builtin.append(tool.name)
            else:
                custom.append(tool)
            continue
        if isinstance(tool, str):
            if tool not in BUILTIN_TOOL_NAMES:
                raise ToolSpecError(f"tools[{index}]: {tool!r} is not a built-in tool name {sorted(BUILTIN_TOOL_NAMES)}")
            builtin.append(tool)
            continue
        if not isinstance(tool, Mapping):
            raise ToolSpecError(f"tools[{index}]: expected a dict, got {type(tool).__name__}")
        kind = tool.get("type", "function")
        if kind in BUILTIN_TOOL_NAMES:
            builtin.append(kind)
            continue
        if kind != "function":
            raise ToolSpecError(
                f"tools[{index}].type: {kind!r} is neither 'function' nor a built-in tool {sorted(BUILTIN_TOOL_NAMES)}"
            )
        function = tool.get("function")
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str) or not function["name"]:
            raise ToolSpecError(f"tools[{index}].function.name: missing or not a non-empty string in {tool!r}")
        name = function["name"]
        if name in BUILTIN_TOOL_NAMES:
            builtin.append(name)
            continue
        parameters = function.get("parameters") or {}
        if not isinstance(parameters, Mapping):
            raise ToolSpecError(f"tools[{index}].function.parameters: expected a JSON schema object, got {parameters!r}")
        custom.append(CustomTool(name=name, description=function.get("description"), parameters=parameters))
    return builtin, custom


def today_string(now: datetime.date | None = None) -> str:
    """Formats a date the way the reference does (``"26 July 2024"``, ``%d %B %Y``)."""
    return (now or datetime.date.today()).strftime("%d %B %Y")


def build_system_prompt(
    *,
    builtin_tools: Iterable[str] = (),
    custom_tools: Iterable[Mapping[str, Any] | CustomTool] = (),
    tool_prompt_format: str = "json",
    user_system: str | list[str] | None = None,
    date: str | None = None,
    tool_choice: str | None = None,
) -> ToolPrompt:
    """Builds the tool system prompt exactly as llama-stack does.

    Args:
        builtin_tools: built-in tool names (``brave_search``, ``wolfram_alpha``, ``code_interpreter``, ``photogen``).
        custom_tools: OpenAI-style function tools or ``CustomTool`` objects.
        tool_prompt_format: ``"json"`` / ``"function_tag"`` (Llama 3.1 layout) or ``"python_list"`` (3.2/3.3 layout).
        user_system: the caller's own system message text (a list is joined with newlines).
        date: the ``Today Date`` text, used verbatim; ``None`` means today as ``%d %B %Y``.
            Only the Llama 3.1 layout has date lines.
        tool_choice: ``None``/``"auto"``/``"none"`` add nothing, ``"required"`` or a tool name add
            the reference's instruction line.

    Returns:
        A ``ToolPrompt``.

    Raises:
        ToolSpecError: unknown format or built-in name, or a malformed custom tool.
    """
    if tool_prompt_format not in TOOL_PROMPT_FORMATS:
        raise ToolSpecError(f"tool_prompt_format: {tool_prompt_format!r} is not one of {TOOL_PROMPT_FORMATS}")
    builtin, custom = split_tools([*builtin_tools, *custom_tools])
    if isinstance(user_system, list):
        user_system = "\n".join(user_system)
    choice_line = _tool_choice_line(tool_choice)

    if tool_prompt_format == "python_list":
        text = ""
        if builtin:
            text += _environment_block(builtin) + "\n"
        if custom:
            text += _PYTHON_LIST_PREAMBLE + _python_list_functions(custom) + "\n"
        if user_system is not None:
            text += user_system
        if choice_line:
            text += "\n" + choice_line
        return ToolPrompt(system=text.strip("\n"))

    text = ""
    if builtin or custom:
        text += _environment_block(builtin) + "\n"
    text += f"Cutting Knowledge Date: {KNOWLEDGE_CUTOFF}\nToday Date: {today_string() if date is None else date}"
    if user_system is not None:
        text += "\n" + user_system
    if choice_line:
        text += "\n" + choice_line
    tools_message = None
    if custom:
        tools_message = _json_tools_message(custom) if tool_prompt_format == "json" else _function_tag_message(custom)
    return ToolPrompt(system=text, tools_user_message=tools_message)


def _tool_choice_line(tool_choice: str | None) -> str:
    if tool_choice in (None, "auto", "none"):
        return ""
    if tool_choice == "required":
        return "You MUST use one of the provided functions/tools to answer the user query."
    if not isinstance(tool_choice, str) or not tool_choice:
        raise ToolSpecError(f"tool_choice: {tool_choice!r} is not 'auto', 'none', 'required' or a tool name")
    return f"You MUST use the tool `{tool_choice}` to answer the user query."


def _environment_block(builtin: list[str]) -> str:
    # "Environment: ipython" enables code_interpreter by itself, so it is never listed on the Tools line.
    listed = [name for name in builtin if name != "code_interpreter"]
    if listed:
        return "Environment: ipython\nTools: " + ", ".join(listed).strip()
    return "Environment: ipython\n"


def _text(value: Any) -> str:
    """How the reference's templates print a value: ``str()``, so ``None`` becomes ``"None"``."""
    return value if isinstance(value, str) else str(value)


def _html_safe_json(value: Any) -> str:
    """JSON as the reference's ``tojson`` filter writes it: sorted keys, ASCII, HTML-sensitive characters escaped."""
    dumped = json.dumps(value, sort_keys=True)
    return dumped.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026").replace("'", "\\u0027")


def _properties(tool: CustomTool) -> Mapping[str, Any]:
    properties = tool.parameters.get("properties", {})
    return properties if isinstance(properties, Mapping) else {}


def _param_get(param: Any, key: str, default: Any) -> Any:
    return param.get(key, default) if isinstance(param, Mapping) else default


def _json_tools_message(custom: list[CustomTool]) -> str:
    parts = [
        "Answer the user's question by making use of the following functions if needed.\n"
        "If none of the function can be used, please say so.\n"
        "Here is a list of functions in JSON format:\n"
    ]
    for tool in custom:
        entries = []
        for name, param in _properties(tool).items():
            entries.append(
                "\n                {\n"
                f'                    "{_text(name)}": {{\n'
                '                        "type": "object",\n'
                f'                        "description": "{_text(_param_get(param, "description", ""))}"\n'
                "                    }\n"
                "                }"
            )
        parts.append(
            "{\n"
            '    "type": "function",\n'
            '    "function": {\n'
            f'        "name": "{tool.name}",\n'
            f'        "description": "{_text(tool.description)}",\n'
            '        "parameters": {\n'
            '            "type": "object",\n'
            '            "properties": [' + ",".join(entries) + "\n"
            "            ],\n"
            f'            "required": {_html_safe_json(tool.parameters.get("required", []))}\n'
            "        }\n"
            "    }\n"
            "}\n"
        )
    parts.append("\nReturn function calls in JSON format.")
    return "".join(parts)


def _function_tag_message(custom: list[CustomTool]) -> str:
    parts = ["You have access to the following functions:\n\n"]
    for tool in custom:
        # Each property is shown as given, minus its "default".
        shown = {
            name: ({k: v for k, v in param.items() if k != "default"} if isinstance(param, Mapping) else param)
            for name, param in _properties(tool).items()
        }
        description = _text(tool.description)
        parts.append(
            f"Use the function '{tool.name}' to '{description}':\n"
            f'{{"name": "{tool.name}", "description": "{description}", "parameters": {_html_safe_json(shown)}}}\n\n'
        )
    parts.append(
        "Think very carefully before calling functions.\n"
        "If you choose to call a function ONLY reply in the following format with no prefix or suffix:\n\n"
        '<function=example_function_name>{"example_name": "example_value"}</function>\n\n'
        "Reminder:\n"
        "- If looking for real time information use relevant functions before falling back to brave_search\n"
        "- Function calls MUST follow the specified format, start with <function= and end with </function>\n"
        "- Required parameters MUST be specified\n"
        "- Only call one function at a time\n"
        "- Put the entire function call reply on one line"
    )
    return "".join(parts)


_PYTHON_LIST_PREAMBLE = (
    "You are a helpful assistant. You have access to functions, but you should only use them if they are required.\n"
    "You are an expert in composing functions. You are given a question and a set of possible functions.\n"
    "Based on the question, you may or may not need to make one function/tool call to achieve the purpose.\n\n"
    "If you decide to invoke any of the function(s), you MUST put it in the format of "
    "[func_name1(params_name1=params_value1, params_name2=params_value2...), func_name2(params)]\n"
    "If you decide to invoke a function, you SHOULD NOT include any other text in the response. "
    "besides the function call in the above format.\n"
    "For a boolean parameter, be sure to use `True` or `False` (capitalized) for the value.\n\n\n"
)


def _python_list_functions(custom: list[CustomTool]) -> str:
    blocks = []
    for tool in custom:
        entries = []
        for name, param in _properties(tool).items():
            entry = (
                f'\n                "{_text(name)}": {{\n'
                f'                    "type": "{_text(_param_get(param, "type", "string"))}",\n'
                f'                    "description": "{_text(_param_get(param, "description", ""))}"'
            )
            default = _param_get(param, "default", None)
            if default:  # the reference skips falsy defaults (0, False, "")
                entry += f',\n                    "default": "{_text(default)}"'
            entries.append(entry + "\n                }")
        blocks.append(
            "{\n"
            f'        "name": "{tool.name}",\n'
            f'        "description": "{_text(tool.description)}",\n'
            '        "parameters": {\n'
            '            "type": "dict",\n'
            f'            "required": {_html_safe_json(tool.parameters.get("required", []))},\n'
            '            "properties": {' + ",".join(entries) + "\n"
            "            }\n"
            "        }\n"
            "    }"
        )
    return (
        "Here is a list of functions in JSON format that you can invoke.\n\n[\n    "
        + ",\n    ".join(blocks)
        + "\n]\n\n"
        "You can answer general questions or invoke tools when necessary.\n"
        "In addition to tool calls, you should also augment your responses by using the tool outputs."
    )
