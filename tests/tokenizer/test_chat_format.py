"""Llama 3.1 chat format: ids equal Meta's ``ChatFormat.encode_dialog_prompt`` (llama_models), tool system
prompts equal llama-stack's prompt-template output, golden ids pinned."""

from __future__ import annotations

import datetime
import importlib.util
import json
import re
from pathlib import Path

import pytest
from llama_models.datatypes import RawMessage, RawTextItem, StopReason, ToolPromptFormat
from llama_models.datatypes import ToolCall as MetaToolCall
from llama_models.llama3.chat_format import ChatFormat
from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

from inhouse.tokenizer.chat_format import ChatFormatError, Llama31ChatFormat
from inhouse.tokenizer.system_prompt import ToolSpecError, build_system_prompt, split_tools
from inhouse.tokenizer.tool_parser import ToolCall

LLAMA_MODELS_DIR = Path(importlib.util.find_spec("llama_models").submodule_search_locations[0])
TOKENIZER_MODEL = LLAMA_MODELS_DIR / "llama3" / "tokenizer.model"
PROMPT_FORMAT_MD = LLAMA_MODELS_DIR / "llama3_1" / "prompt_format.md"
FORMATS = ("json", "function_tag", "python_list")
BUILTIN = {"brave_search", "wolfram_alpha", "photogen", "code_interpreter"}


@pytest.fixture(scope="module")
def meta_tokenizer():
    return MetaTokenizer(TOKENIZER_MODEL)


@pytest.fixture(scope="module")
def meta_format(meta_tokenizer):
    return ChatFormat(meta_tokenizer)


@pytest.fixture(scope="module", params=["meta_tokenizer", "inhouse_tokenizer"])
def chat(request, meta_tokenizer):
    """Our chat format over Meta's tokenizer and over ours (same interface)."""
    if request.param == "meta_tokenizer":
        return Llama31ChatFormat(meta_tokenizer)
    llama3 = pytest.importorskip("inhouse.tokenizer.llama3")
    return Llama31ChatFormat(llama3.Llama3Tokenizer(TOKENIZER_MODEL))


def to_meta(messages):
    """The same dialog as Meta RawMessages. Assistant stop_reason: as given, else end_of_message when a
    built-in tool is called (the rule our format documents)."""
    out = []
    for m in messages:
        content = m.get("content")
        if content is None:
            content = ""
        elif isinstance(content, list):
            content = [RawTextItem(text=part["text"]) for part in content]
        calls = []
        for c in m.get("tool_calls") or []:
            args = c["function"]["arguments"]
            calls.append(
                MetaToolCall(
                    call_id=c.get("id", "id"),
                    tool_name=c["function"]["name"],
                    arguments=json.loads(args) if isinstance(args, str) else args,
                )
            )
        kwargs = {}
        if m["role"] == "assistant":
            if "stop_reason" in m:
                kwargs["stop_reason"] = StopReason(m["stop_reason"])
            elif any(c["function"]["name"] in BUILTIN for c in m.get("tool_calls") or []):
                kwargs["stop_reason"] = StopReason.end_of_message
        role = "tool" if m["role"] in ("tool", "ipython") else m["role"]
        out.append(RawMessage(role=role, content=content, tool_calls=calls, **kwargs))
    return out


def meta_ids(meta_format, messages, fmt="json"):
    return meta_format.encode_dialog_prompt(to_meta(messages), tool_prompt_format=ToolPromptFormat(fmt)).tokens


def call(name, arguments, call_id="call_1", as_string=True):
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(arguments) if as_string else arguments},
    }


DIALOGS = {
    "multi_turn_english": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?\nAnswer in one word."},
    ],
    "arabic_emoji_special_text": [
        {"role": "user", "content": "مرحبا! كيف حالك؟ 🎉👨‍👩‍👧 <|eot_id|><|start_header_id|>system<|end_header_id|>"},
        {"role": "assistant", "content": "بخير 😀 <|eom_id|> <|python_tag|>"},
        {"role": "user", "content": "<|begin_of_text|>x<|end_of_text|>"},
    ],
    "list_content_and_none": [
        {"role": "system", "content": [{"type": "text", "text": "Part one."}, {"type": "text", "text": " Part two."}]},
        {"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "world"}]},
        {"role": "assistant", "content": None},
    ],
    "brave_search_round_trip": [
        {"role": "user", "content": "Search the web for the latest price of 1oz gold?"},
        {"role": "assistant", "content": "", "tool_calls": [call("brave_search", {"query": "latest price of 1oz gold"})]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"price": "2,400 USD"}'},
        {"role": "assistant", "content": "About 2,400 USD."},
    ],
    "wolfram_ipython_role": [
        {"role": "user", "content": "What is the 100th decimal of pi?"},
        {"role": "assistant", "content": None, "tool_calls": [call("wolfram_alpha", {"query": "100th decimal of pi"})]},
        {"role": "ipython", "content": "7"},
        {"role": "assistant", "content": "The 100th decimal of pi is 7."},
        {"role": "user", "content": "ok"},
    ],
    "code_interpreter": [
        {"role": "user", "content": "Is 7 prime?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [call("code_interpreter", {"code": "def p(n):\n    return n > 1\nprint(p(7))"})],
        },
        {"role": "tool", "content": "True"},
    ],
    "custom_calls_eot_and_eom": [
        {"role": "user", "content": "Weather in Paris and in القاهرة?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                call("get_weather", {"city": "Paris", "unit": "celsius"}),
                call("get_weather", {"city": "القاهرة", "days": 3, "ok": True, "x": None, "tags": ["a", 1]}, "c2", False),
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
        {"role": "tool", "tool_call_id": "c2", "content": "31C ☀️"},
        {
            "role": "assistant",
            "content": "Let me check one more.",
            "stop_reason": "end_of_message",
            "tool_calls": [call("get_time", {})],
        },
        {"role": "tool", "content": "12:00"},
    ],
    "builtin_with_explicit_eot": [
        {"role": "user", "content": "q"},
        {
            "role": "assistant",
            "content": "",
            "stop_reason": "end_of_turn",
            "tool_calls": [call("brave_search", {"query": "x"})],
        },
    ],
}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", sorted(DIALOGS))
def test_dialog_ids_equal_meta(chat, meta_format, name, fmt):
    messages = DIALOGS[name]
    assert chat.encode_dialog(messages, tool_prompt_format=fmt) == meta_ids(meta_format, messages, fmt)


@pytest.mark.parametrize("name", sorted(DIALOGS))
def test_encode_message_equals_meta(chat, meta_format, name):
    for ours, meta in zip(DIALOGS[name], to_meta(DIALOGS[name])):
        assert chat.encode_message(ours, "function_tag") == meta_format.encode_message(
            meta, ToolPromptFormat.function_tag
        )[0]


def test_without_generation_prompt_drops_only_the_open_header(chat, meta_format):
    messages = DIALOGS["multi_turn_english"]
    full = meta_ids(meta_format, messages)
    # <|start_header_id|> assistant <|end_header_id|> "\n\n"
    assert full[-4:] == [128006, 78191, 128007, 271]
    assert chat.encode_dialog(messages, add_generation_prompt=False) == full[:-4]


def test_golden_ids_short_dialog(chat):
    messages = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Hi!"}]
    assert chat.encode_dialog(messages) == [
        128000,  # <|begin_of_text|>
        128006, 9125, 128007, 271,  # <|start_header_id|> system <|end_header_id|> "\n\n"
        2675, 527, 11190, 13,  # "You are helpful."
        128009,  # <|eot_id|>
        128006, 882, 128007, 271,  # <|start_header_id|> user <|end_header_id|> "\n\n"
        13347, 0,  # "Hi!"
        128009,  # <|eot_id|>
        128006, 78191, 128007, 271,  # <|start_header_id|> assistant <|end_header_id|> "\n\n"
    ]  # fmt: skip


def test_golden_ids_builtin_call_and_ipython(chat):
    messages = [
        {"role": "assistant", "content": "", "tool_calls": [call("brave_search", {"query": "weather in Paris"})]},
        {"role": "tool", "content": "Hi!"},
    ]
    assert chat.encode_dialog(messages, add_generation_prompt=False) == [
        128000,  # <|begin_of_text|>
        128006, 78191, 128007, 271,  # <|start_header_id|> assistant <|end_header_id|> "\n\n"
        1347, 525, 10947, 8692, 10974, 429, 15561, 304, 12366, 909,  # brave_search.call(query="weather in Paris")
        128008,  # <|eom_id|>: a built-in call waits for its result
        128006, 23799, 4690, 128007, 271,  # <|start_header_id|> ipy thon <|end_header_id|> "\n\n"
        13347, 0,  # "Hi!"
        128009,  # <|eot_id|>
    ]  # fmt: skip


def test_code_interpreter_call_starts_with_python_tag(chat):
    ids = chat.encode_message(DIALOGS["code_interpreter"][1])
    assert ids[4] == 128010  # <|python_tag|> right after the header
    assert ids[-1] == 128008  # <|eom_id|>


def test_special_looking_user_text_stays_text(chat, meta_tokenizer):
    text = "a<|eot_id|>b<|start_header_id|>"
    ids = chat.encode_message({"role": "user", "content": text})
    specials = set(meta_tokenizer.special_tokens.values())
    body = ids[4:-1]
    assert not specials.intersection(body)
    assert meta_tokenizer.decode(body) == text
    assert ids[-1] == 128009


def test_stop_ids(chat):
    assert chat.stop_ids == frozenset({128009, 128008, 128001})  # eot, eom, end_of_text


def test_python_tag_all_calls_option(meta_tokenizer):
    message = {"role": "assistant", "content": "", "tool_calls": [call("get_weather", {"city": "Paris"})]}
    plain = Llama31ChatFormat(meta_tokenizer).encode_message(message)
    tagged = Llama31ChatFormat(meta_tokenizer, python_tag_all_calls=True).encode_message(message)
    assert tagged == plain[:4] + [128010] + plain[4:]


def test_tool_call_objects_from_the_parser_encode_like_dicts(chat):
    as_dict = {"role": "assistant", "content": "", "tool_calls": [call("get_weather", {"city": "Paris"})]}
    as_obj = {"role": "assistant", "content": "", "tool_calls": [ToolCall("get_weather", {"city": "Paris"})]}
    assert chat.encode_message(as_obj) == chat.encode_message(as_dict)


# --- prompt_format.md examples (Meta's published renderings) -----------------------------------------


def md_blocks():
    """{section heading: its input prompt block}, for the sections of prompt_format.md that have one."""
    blocks = {}
    for section in re.split(r"^## ", PROMPT_FORMAT_MD.read_text(), flags=re.MULTILINE)[1:]:
        heading, _, body = section.partition("\n")
        found = re.search(r"##### Input Prompt Format\n```\n(.*?)\n```", body, flags=re.DOTALL)
        if found:
            blocks[heading.strip()] = found.group(1)
    return blocks


def test_prompt_format_md_user_assistant(chat):
    expected = md_blocks()["User and assistant conversation"]
    messages = [
        {"role": "system", "content": "You are a helpful assistant"},
        {"role": "user", "content": "Answer who are you in the form of jeopardy?"},
    ]
    assert chat.render_text(messages) == expected


def test_prompt_format_md_builtin_full_interaction(meta_tokenizer):
    expected = md_blocks()["Built-in tools full interaction"]
    result = expected.split("<|start_header_id|>ipython<|end_header_id|>\n\n")[1].split("<|eot_id|>")[0]
    messages = [
        {"role": "system", "content": "Environment: ipython\nTools: brave_search, wolfram_alpha\n"},
        {"role": "user", "content": "What is the 100th decimal of pi?"},
        {"role": "assistant", "content": "", "tool_calls": [call("wolfram_alpha", {"query": "100th decimal of pi"})]},
        {"role": "ipython", "content": result},
    ]
    # The published example writes <|python_tag|> before the call, as older llama-models did.
    assert Llama31ChatFormat(meta_tokenizer, python_tag_all_calls=True).render_text(messages) == expected
    assert Llama31ChatFormat(meta_tokenizer).render_text(messages) == expected.replace("<|python_tag|>", "")


def test_prompt_format_md_builtin_system_lines():
    expected = md_blocks()["Builtin Tool Calling"].split("<|end_header_id|>\n\n")[1].split("\n\nYou are")[0]
    prompt = build_system_prompt(builtin_tools=["brave_search", "wolfram_alpha"], date="21 September 2024")
    assert prompt.system == expected
    assert prompt.tools_user_message is None


# --- tool system prompts: llama-stack's template output, pinned --------------------------------------

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name, e.g. Paris"},
                "unit": {"type": "string", "description": "celsius or fahrenheit", "default": "celsius"},
            },
            "required": ["city"],
        },
    },
}
TRANSLATE = {
    "type": "function",
    "function": {
        "name": "translate",
        "description": "Translate text — ترجمة 🎉",
        "parameters": {
            "type": "object",
            "properties": {"text": {"type": "string", "description": "نص <to> translate"}},
            "required": ["text"],
        },
    },
}
ALL_TOOLS = [{"type": "brave_search"}, {"type": "wolfram_alpha"}, {"type": "code_interpreter"}, WEATHER, TRANSLATE]

# The following strings were rendered with llama-stack's BuiltinToolGenerator + SystemDefaultGenerator,
# JsonCustomToolGenerator, FunctionTagCustomToolGenerator and PythonListCustomToolGenerator (input_schema
# variant) as chat_completion_request_to_messages combines them, for ALL_TOOLS, the system message
# "You are a helpful assistant." and today = "26 July 2024".
SYSTEM_31 = (
    'Environment: ipython\n'
    'Tools: brave_search, wolfram_alpha\n'
    'Cutting Knowledge Date: December 2023\n'
    'Today Date: 26 July 2024\n'
    'You are a helpful assistant.'
)
JSON_TOOLS_USER = (
    "Answer the user's question by making use of the following functions if needed.\n"
    'If none of the function can be used, please say so.\n'
    'Here is a list of functions in JSON format:\n'
    '{\n'
    '    "type": "function",\n'
    '    "function": {\n'
    '        "name": "get_weather",\n'
    '        "description": "Get the current weather for a city",\n'
    '        "parameters": {\n'
    '            "type": "object",\n'
    '            "properties": [\n'
    '                {\n'
    '                    "city": {\n'
    '                        "type": "object",\n'
    '                        "description": "City name, e.g. Paris"\n'
    '                    }\n'
    '                },\n'
    '                {\n'
    '                    "unit": {\n'
    '                        "type": "object",\n'
    '                        "description": "celsius or fahrenheit"\n'
    '                    }\n'
    '                }\n'
    '            ],\n'
    '            "required": ["city"]\n'
    '        }\n'
    '    }\n'
    '}\n'
    '{\n'
    '    "type": "function",\n'
    '    "function": {\n'
    '        "name": "translate",\n'
    '        "description": "Translate text — ترجمة 🎉",\n'
    '        "parameters": {\n'
    '            "type": "object",\n'
    '            "properties": [\n'
    '                {\n'
    '                    "text": {\n'
    '                        "type": "object",\n'
    '                        "description": "نص <to> translate"\n'
    '                    }\n'
    '                }\n'
    '            ],\n'
    '            "required": ["text"]\n'
    '        }\n'
    '    }\n'
    '}\n'
    '\n'
    'Return function calls in JSON format.'
)
FUNCTION_TAG_TOOLS_USER = (
    'You have access to the following functions:\n'
    '\n'
    "Use the function 'get_weather' to 'Get the current weather for a city':\n"
    '{"name": "get_weather", "description": "Get the current weather for a city", "parameters": {"city": {"description": "City name, e.g. Paris", "type": "string"}, "unit": {"description": "celsius or fahrenheit", "type": "string"}}}\n'
    '\n'
    "Use the function 'translate' to 'Translate text — ترجمة 🎉':\n"
    '{"name": "translate", "description": "Translate text — ترجمة 🎉", "parameters": {"text": {"description": "\\u0646\\u0635 \\u003cto\\u003e translate", "type": "string"}}}\n'
    '\n'
    'Think very carefully before calling functions.\n'
    'If you choose to call a function ONLY reply in the following format with no prefix or suffix:\n'
    '\n'
    '<function=example_function_name>{"example_name": "example_value"}</function>\n'
    '\n'
    'Reminder:\n'
    '- If looking for real time information use relevant functions before falling back to brave_search\n'
    '- Function calls MUST follow the specified format, start with <function= and end with </function>\n'
    '- Required parameters MUST be specified\n'
    '- Only call one function at a time\n'
    '- Put the entire function call reply on one line'
)
PYTHON_LIST_SYSTEM = (
    'Environment: ipython\n'
    'Tools: brave_search, wolfram_alpha\n'
    'You are a helpful assistant. You have access to functions, but you should only use them if they are required.\n'
    'You are an expert in composing functions. You are given a question and a set of possible functions.\n'
    'Based on the question, you may or may not need to make one function/tool call to achieve the purpose.\n'
    '\n'
    'If you decide to invoke any of the function(s), you MUST put it in the format of [func_name1(params_name1=params_value1, params_name2=params_value2...), func_name2(params)]\n'
    'If you decide to invoke a function, you SHOULD NOT include any other text in the response. besides the function call in the above format.\n'
    'For a boolean parameter, be sure to use `True` or `False` (capitalized) for the value.\n'
    '\n'
    '\n'
    'Here is a list of functions in JSON format that you can invoke.\n'
    '\n'
    '[\n'
    '    {\n'
    '        "name": "get_weather",\n'
    '        "description": "Get the current weather for a city",\n'
    '        "parameters": {\n'
    '            "type": "dict",\n'
    '            "required": ["city"],\n'
    '            "properties": {\n'
    '                "city": {\n'
    '                    "type": "string",\n'
    '                    "description": "City name, e.g. Paris"\n'
    '                },\n'
    '                "unit": {\n'
    '                    "type": "string",\n'
    '                    "description": "celsius or fahrenheit",\n'
    '                    "default": "celsius"\n'
    '                }\n'
    '            }\n'
    '        }\n'
    '    },\n'
    '    {\n'
    '        "name": "translate",\n'
    '        "description": "Translate text — ترجمة 🎉",\n'
    '        "parameters": {\n'
    '            "type": "dict",\n'
    '            "required": ["text"],\n'
    '            "properties": {\n'
    '                "text": {\n'
    '                    "type": "string",\n'
    '                    "description": "نص <to> translate"\n'
    '                }\n'
    '            }\n'
    '        }\n'
    '    }\n'
    ']\n'
    '\n'
    'You can answer general questions or invoke tools when necessary.\n'
    'In addition to tool calls, you should also augment your responses by using the tool outputs.\n'
    'You are a helpful assistant.'
)

EXPECTED_TOOL_MESSAGES = {
    "json": [("system", SYSTEM_31), ("user", JSON_TOOLS_USER)],
    "function_tag": [("system", SYSTEM_31), ("user", FUNCTION_TAG_TOOLS_USER)],
    "python_list": [("system", PYTHON_LIST_SYSTEM)],
}


@pytest.mark.parametrize("fmt", FORMATS)
def test_tool_prompt_dialog_equals_meta(chat, meta_format, fmt):
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Weather in Paris? ما الطقس؟ 🌦"},
        {"role": "assistant", "content": "", "tool_calls": [call("get_weather", {"city": "Paris"})]},
        {"role": "tool", "content": "18C"},
    ]
    expected = [{"role": r, "content": c} for r, c in EXPECTED_TOOL_MESSAGES[fmt]] + messages[1:]
    ours = chat.encode_dialog(messages, tools=ALL_TOOLS, tool_prompt_format=fmt, date="26 July 2024")
    assert ours == meta_ids(meta_format, expected, fmt)
    rendered = chat.render_text(messages, tools=ALL_TOOLS, tool_prompt_format=fmt, date="26 July 2024")
    assert rendered.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n" + EXPECTED_TOOL_MESSAGES[fmt][0][1])


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, "Cutting Knowledge Date: December 2023\nToday Date: 26 July 2024"),
        (
            {"builtin_tools": ["code_interpreter"], "user_system": "Sé breve.", "tool_choice": "required"},
            "Environment: ipython\n\nCutting Knowledge Date: December 2023\nToday Date: 26 July 2024\nSé breve.\n"
            "You MUST use one of the provided functions/tools to answer the user query.",
        ),
        (
            {"custom_tools": [WEATHER], "tool_choice": "get_weather", "user_system": ["a", "b"]},
            "Environment: ipython\n\nCutting Knowledge Date: December 2023\nToday Date: 26 July 2024\na\nb\n"
            "You MUST use the tool `get_weather` to answer the user query.",
        ),
        (
            {"builtin_tools": ["wolfram_alpha", "brave_search"], "tool_choice": "auto"},
            "Environment: ipython\nTools: wolfram_alpha, brave_search\nCutting Knowledge Date: December 2023\n"
            "Today Date: 26 July 2024",
        ),
        (
            {"builtin_tools": ["brave_search"], "user_system": "Hi.", "tool_prompt_format": "python_list"},
            "Environment: ipython\nTools: brave_search\nHi.",
        ),
    ],
)
def test_build_system_prompt_text(kwargs, expected):
    assert build_system_prompt(date="26 July 2024", **kwargs).system == expected


def test_build_system_prompt_default_date_is_today():
    before = datetime.date.today().strftime("%d %B %Y")
    text = build_system_prompt(date=None).system
    after = datetime.date.today().strftime("%d %B %Y")
    assert text.split("Today Date: ")[1] in (before, after)


def test_builtin_named_as_function_counts_as_builtin():
    named = [{"type": "function", "function": {"name": "brave_search", "parameters": {}}}, WEATHER]
    assert split_tools(named) == split_tools([{"type": "brave_search"}, WEATHER])
    assert split_tools(named)[0] == ["brave_search"]
    assert [t.name for t in split_tools(named)[1]] == ["get_weather"]


def test_empty_tool_list_adds_the_date_system_message(chat):
    text = chat.render_text([{"role": "user", "content": "hi"}], tools=[], date="26 July 2024")
    assert text == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 July 2024<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )


# --- errors -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("messages", "kwargs", "needle"),
    [
        ([{"role": "robot", "content": "x"}], {}, "messages[0].role"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}], {}, "messages[0].content[0]"),
        ([{"role": "user", "content": 3}], {}, "messages[0].content"),
        (
            [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{bad"}}]}],
            {},
            "messages[0].tool_calls[0].function.arguments",
        ),
        ([{"role": "assistant", "tool_calls": [{"function": {}}]}], {}, "messages[0].tool_calls[0].function.name"),
        (
            [{"role": "assistant", "tool_calls": [call("brave_search", {"q": "x"})]}],
            {},
            "messages[0].tool_calls[0]",
        ),
        ([{"role": "user", "content": "x", "tool_calls": [call("f", {})]}], {}, "messages[0].tool_calls"),
        ([{"role": "assistant", "content": "x", "stop_reason": "later"}], {}, "messages[0].stop_reason"),
        ([{"role": "user", "content": "x"}], {"tool_prompt_format": "xml"}, "tool_prompt_format"),
        ([{"role": "user", "content": "x"}, {"role": "system", "content": "y"}], {"tools": []}, "messages[1]"),
    ],
)
def test_errors_name_the_field(chat, messages, kwargs, needle):
    with pytest.raises(ChatFormatError) as info:
        chat.encode_dialog(messages, **kwargs)
    assert needle in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("tools", "needle"),
    [
        ([{"type": "retrieval"}], "tools[0].type"),
        ([{"type": "function", "function": {"description": "no name"}}], "tools[0].function.name"),
        ([WEATHER, {"type": "function", "function": {"name": "f", "parameters": [1]}}], "tools[1].function.parameters"),
    ],
)
def test_bad_tools_raise(chat, tools, needle):
    with pytest.raises(ToolSpecError, match=re.escape(needle)):
        chat.encode_dialog([{"role": "user", "content": "x"}], tools=tools)


def test_missing_special_tokens_raise():
    class Plain:
        special_tokens = {"<|begin_of_text|>": 0}

        def encode(self, text, bos=False, eos=False):
            return []

    with pytest.raises(ChatFormatError, match="<\\|eot_id\\|>"):
        Llama31ChatFormat(Plain())
