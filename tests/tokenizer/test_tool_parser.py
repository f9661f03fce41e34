"""Tool-call parsing: every branch positive and negative, agreement with Meta's parser, fuzzing."""

from __future__ import annotations

import importlib.util
import logging
import random
import re
from pathlib import Path

import pytest
from llama_models.datatypes import StopReason
from llama_models.llama3.chat_format import ChatFormat
from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

from inhouse.tokenizer.tool_parser import ParsedAssistant, ToolCall, parse_assistant_output

TOKENIZER_MODEL = Path(importlib.util.find_spec("llama_models").submodule_search_locations[0]) / "llama3" / "tokenizer.model"


@pytest.fixture(scope="module")
def meta_format():
    return ChatFormat(MetaTokenizer(TOKENIZER_MODEL))


def calls(text, **kwargs):
    return [(c.name, c.arguments, c.builtin) for c in parse_assistant_output(text, **kwargs).tool_calls]


def content(text, **kwargs):
    return parse_assistant_output(text, **kwargs).content


# --- agreement with Meta on the forms Meta accepts ---------------------------------------------------

META_ACCEPTED = [
    '<|python_tag|>brave_search.call(query="latest price of 1oz gold")<|eom_id|>',
    'wolfram_alpha.call(query="100th decimal of pi")',
    '<|start_header_id|>assistant<|end_header_id|>\n\nbrave_search.call(query="سعر الذهب 🪙")<|eom_id|>',
    'photogen.call(query="a cat")',
    '<|python_tag|>{\n    "type": "function",\n    "name": "trending_songs",\n    "parameters": {\n'
    '        "n": "10",\n        "genre": "all"\n    }\n}<|eom_id|>',
    '{"name": "get_weather", "parameters": {"city": "Paris", "days": 3}}',
    '{"type": "function", "name": "get_time", "parameters": {}}',
    '<function=trending_songs>{"n": 10}</function><|eot_id|>',
    "<function=get_weather>{'city': 'Paris'}</function>",
    'Sure. <function=get_weather>{"city": "Paris"}</function>',
    '[get_weather(city="Paris", days=3, metric=True, extra=None)]',
    '[get_time()]',
    '<|python_tag|>def is_prime(n):\n    return n > 1\n\nprint(is_prime(7))<|eom_id|>',
    'custom_tool.call(query="x y")',
    '{"name": "brave_search", "parameters": {"query": "weather"}}',
    '<function=wolfram_alpha>{"query": "2+2"}</function>',
    "Plain answer, no tools.",
    "  Spaces around.  <|eot_id|>",
    "<|start_header_id|>assistant<|end_header_id|>\n\nHello there!",
]


@pytest.mark.parametrize("text", META_ACCEPTED)
def test_agrees_with_meta(meta_format, text):
    meta = meta_format.decode_assistant_message_from_content(text, StopReason.end_of_turn)
    ours = parse_assistant_output(text)
    meta_calls = [(getattr(c.tool_name, "value", c.tool_name), c.arguments) for c in meta.tool_calls]
    assert [(c.name, c.arguments) for c in ours.tool_calls] == meta_calls
    if not meta_calls:
        assert ours.content == meta.content


def test_meta_keeps_only_the_first_call_we_keep_all(meta_format):
    text = '[get_weather(city="Paris"), get_weather(city="Rome")]'
    assert len(meta_format.decode_assistant_message_from_content(text, StopReason.end_of_turn).tool_calls) == 1
    assert calls(text) == [("get_weather", {"city": "Paris"}, False), ("get_weather", {"city": "Rome"}, False)]


# --- function tags -----------------------------------------------------------------------------------


def test_function_tag_several_with_text_and_nested_json():
    text = 'Checking.<function=a>{"x": {"y": [1, 2]}}</function> and <function=b>{}</function> done'
    parsed = parse_assistant_output(text)
    assert [(c.name, c.arguments) for c in parsed.tool_calls] == [("a", {"x": {"y": [1, 2]}}), ("b", {})]
    assert parsed.content == "Checking. and  done"


def test_function_tag_without_closing_tag():
    assert calls('<function=get_time>{"tz": "UTC"}') == [("get_time", {"tz": "UTC"}, False)]


@pytest.mark.parametrize(
    "text",
    ["<function=f>not json</function>", "<function=>{}</function>", '<function=f>["a"]</function>', "<function=f>{"],
)
def test_function_tag_malformed_is_content(text):
    parsed = parse_assistant_output(text)
    assert parsed.tool_calls == [] and parsed.content == text


# --- JSON ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        '{"name": "f", "arguments": {"a": 1}}',
        '{"name": "f", "arguments": "{\\"a\\": 1}"}',
        '{"type": "function", "function": {"name": "f", "arguments": "{\\"a\\": 1}"}}',
        '[{"name": "f", "parameters": {"a": 1}}]',
        'Let me call it.<|python_tag|>{"name": "f", "parameters": {"a": 1}}',
    ],
)
def test_json_variants(text):
    parsed = parse_assistant_output(text)
    assert [(c.name, c.arguments, c.builtin) for c in parsed.tool_calls] == [("f", {"a": 1}, False)]
    assert parsed.content == ("Let me call it." if text.startswith("Let") else "")


def test_json_several_separated_by_semicolons():
    text = '{"name": "f", "parameters": {"a": 1}}; {"name": "g", "arguments": {}}\n{"name": "h", "parameters": null}'
    assert calls(text) == [("f", {"a": 1}, False), ("g", {}, False), ("h", {}, False)]
    assert content(text) == ""


@pytest.mark.parametrize(
    "text",
    [
        '{"a": 1}',
        '{"name": "f"}',
        '{"name": "f", "arguments": "{bad"}',
        '{"name": "f", "parameters": [1, 2]}',
        '{"name": 3, "parameters": {}}',
        '{"name": "f", "parameters": {}}; {"city": "Paris"}',
        'The answer: {"name": "f", "parameters": {}}',
        '{"name": "f", "parameters": {}} trailing words',
    ],
)
def test_json_negative_is_content(text):
    parsed = parse_assistant_output(text)
    assert parsed.tool_calls == [] and parsed.content == text


# --- python list -------------------------------------------------------------------------------------


def test_python_list_values():
    text = '[search(q="x", n=2, f=1.5, b=False, t=(1, 2), l=["a"], d={"k": None}), now()]'
    assert calls(text) == [
        ("search", {"q": "x", "n": 2, "f": 1.5, "b": False, "t": (1, 2), "l": ["a"], "d": {"k": None}}, False),
        ("now", {}, False),
    ]


@pytest.mark.parametrize(
    "text", ['[f("positional")]', "[f(a=b)]", "[f(**kw)]", "[]", "[1, 2]", "[f(a=1)", "[obj.f(a=1)]", "[f(a=1)] x"]
)
def test_python_list_negative_is_content(text):
    parsed = parse_assistant_output(text)
    assert parsed.tool_calls == [] and parsed.content == text


# --- built-in calls ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("brave_search.call(query='single quotes')", [("brave_search", {"query": "single quotes"}, True)]),
        ('brave_search.call(query="say \\"hi\\"")', [("brave_search", {"query": 'say "hi"'}, True)]),
        ('brave_search.call("positional")', [("brave_search", {"query": "positional"}, True)]),
        ('code_interpreter.call(code="print(1)")', [("code_interpreter", {"code": "print(1)"}, True)]),
        (
            'brave_search.call(query="a"); wolfram_alpha.call(query="b")',
            [("brave_search", {"query": "a"}, True), ("wolfram_alpha", {"query": "b"}, True)],
        ),
    ],
)
def test_builtin_variants(text, expected):
    assert calls(text) == expected
    assert content(text) == ""


def test_builtin_call_inside_prose_keeps_the_prose():
    parsed = parse_assistant_output('I will search. brave_search.call(query="x")')
    assert [(c.name, c.builtin) for c in parsed.tool_calls] == [("brave_search", True)]
    assert parsed.content == "I will search."


@pytest.mark.parametrize(
    "text",
    [
        'You could use client.call(query="x") in your code.',
        "brave_search.call(query=unquoted)",
        'brave_search.call(query="unterminated)',
        "brave_search.call()",
    ],
)
def test_builtin_negative_is_content(text):
    parsed = parse_assistant_output(text)
    assert parsed.tool_calls == [] and parsed.content == text


def test_custom_named_like_builtin_becomes_builtin():
    assert calls('{"name": "code_interpreter", "parameters": {"code": "1+1"}}') == [
        ("code_interpreter", {"code": "1+1"}, True)
    ]
    assert calls('{"name": "brave_search", "parameters": {"q": "x"}}') == [("brave_search", {"query": "x"}, True)]


# --- code interpreter fallback ---------------------------------------------------------------------------


def test_tagged_code_keeps_leading_text():
    parsed = parse_assistant_output("Running it.<|python_tag|>print(2 ** 10)<|eom_id|>")
    assert [(c.name, c.arguments) for c in parsed.tool_calls] == [("code_interpreter", {"code": "print(2 ** 10)"})]
    assert parsed.content == "Running it."


def test_untagged_code_needs_eom_and_enabled_code_interpreter():
    code = "import math\nprint(math.pi)"
    assert calls(code, ended_with_eom=True, builtin_tools=["code_interpreter"]) == [
        ("code_interpreter", {"code": code}, True)
    ]
    assert calls(code + "<|eom_id|>", builtin_tools={"code_interpreter"}) == [("code_interpreter", {"code": code}, True)]
    assert calls(code, ended_with_eom=True, builtin_tools=["brave_search"]) == []
    assert calls(code, builtin_tools=["code_interpreter"]) == []


def test_empty_after_tag_is_not_a_call():
    assert parse_assistant_output("<|python_tag|>   <|eom_id|>") == ParsedAssistant(content="", tool_calls=[])


# --- data types ------------------------------------------------------------------------------------------


def test_tool_call_ids_and_openai_shape():
    a, b = parse_assistant_output('[f(a=1), f(a=1)]').tool_calls
    assert a == b  # call_id is not compared
    assert a.call_id != b.call_id and re.fullmatch(r"call_[0-9a-f]{24}", a.call_id)
    assert ToolCall("f", {"city": "القاهرة"}, call_id="call_x").to_openai() == {
        "id": "call_x",
        "type": "function",
        "function": {"name": "f", "arguments": '{"city": "القاهرة"}'},
    }


def test_non_string_input_raises_type_error():
    with pytest.raises(TypeError, match="text must be str"):
        parse_assistant_output(None)


# --- fuzz: never raises, never logs a parser failure -------------------------------------------------

PIECES = [
    "<function=", "f", ">", "</function>", "{", "}", '"', "'", ":", ",", ";", "[", "]", "(", ")", "=", ".call(",
    "query=", "code=", "brave_search", "code_interpreter", "<|python_tag|>", "<|eom_id|>", "<|eot_id|>", "\\",
    "name", "parameters", "arguments", " ", "\n", "1", "True", "None", "مرحبا", "🎉", "**", "lambda", "\x00",
    '"name": "f"', '"parameters": {', "a=", "<|start_header_id|>assistant<|end_header_id|>\n\n",
]  # fmt: skip
VALID = [
    '<function=f>{"a": {"b": [1, "x"]}}</function>',
    '{"name": "f", "parameters": {"a": "b"}}; {"name": "g", "arguments": "{}"}',
    '[f(a=1, b="x"), g(c=[1, 2])]',
    '<|python_tag|>brave_search.call(query="q"); wolfram_alpha.call(query="w")<|eom_id|>',
]


def test_fuzz_random_strings_never_raise(caplog):
    rng = random.Random(1234)
    samples = ["".join(rng.choice(PIECES) for _ in range(rng.randint(0, 40))) for _ in range(3000)]
    for valid in VALID:  # every truncation and random single-character damage of valid calls
        samples += [valid[:i] for i in range(len(valid) + 1)]
        for _ in range(200):
            i = rng.randrange(len(valid))
            samples.append(valid[:i] + rng.choice(PIECES) + valid[i + 1 :])
    samples += ["[" * 2000 + "]" * 2000, "{" * 5000, "(" * 300, '{"name": "f", "parameters": ' * 500]
    with caplog.at_level(logging.WARNING, logger="inhouse.tokenizer.tool_parser"):
        for text in samples:
            parsed = parse_assistant_output(text, ended_with_eom=rng.random() < 0.5, builtin_tools=["code_interpreter"])
            assert isinstance(parsed.content, str)
            for c in parsed.tool_calls:
                assert isinstance(c, ToolCall) and isinstance(c.name, str) and c.name
                assert isinstance(c.arguments, dict)
    assert [r.getMessage() for r in caplog.records] == []
