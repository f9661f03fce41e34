"""The server as a black box through the official `openai` client, on the scripted Llama
(a random-weight Llama 3 with forced logits that replies with scripted Llama 3.1 outputs; see conftest)."""

from __future__ import annotations

import json
import logging
import math
import sys

import httpx
import openai
import pytest

from inhouse.tokenizer import llama3_tokenizer


H = sys.modules["_inhouse_tests_server_helpers"]  # tests/server/helpers.py, loaded by conftest.py
API_KEY, ARABIC_REPLY, default_script, openai_client = H.API_KEY, H.ARABIC_REPLY, H.default_script, H.openai_client

MODEL = "scripted-llama"
HELLO = "Hello! I am a scripted model."
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
                   "required": ["city"]}}}
TIME_TOOL = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}}}}


@pytest.fixture(scope="module")
def tok():
    return llama3_tokenizer()


@pytest.fixture(scope="module")
def client(scripted_server):
    return openai_client(scripted_server.base)


def reply_len(tok, text: str) -> int:
    return len(tok.encode(text, allow_special=True)) + 1  # + the end token


def test_models_list(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].owned_by == "inhouse"


def test_chat_non_stream(client, scripted_server, tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == HELLO
    assert r.choices[0].finish_reason == "stop"
    llm = scripted_server.server.config.app.state.inhouse.llm
    assert r.usage.prompt_tokens == len(llm.encode_chat(messages))
    assert r.usage.completion_tokens == reply_len(tok, HELLO)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_invariants(client, tok):
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == HELLO
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == reply_len(tok, HELLO)
    assert all(c.usage is None for c in chunks[:-1])
    # Without include_usage: no usage chunk.
    plain = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True))
    assert all(c.choices for c in plain) and plain[-1].choices[0].finish_reason == "stop"


def test_arabic_streams_whole_characters(client):
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "مرحبا"}],
                                                 stream=True))
    pieces = [c.choices[0].delta.content or "" for c in chunks]
    assert "".join(pieces) == ARABIC_REPLY
    assert all("\ufffd" not in p for p in pieces)


def test_tool_call_json_form(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "weather in Paris?"}],
                                       tools=[WEATHER_TOOL])
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls"
    assert ch.message.content is None
    (call,) = ch.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "celsius"}


def test_tool_calls_function_tags_two_calls(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "two calls please"}],
                                       tools=[WEATHER_TOOL, TIME_TOOL], tool_choice="required")
    calls = r.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["get_weather", "get_time"]
    assert [json.loads(c.function.arguments) for c in calls] == [{"city": "Paris"}, {"tz": "UTC"}]
    assert len({c.id for c in calls}) == 2


def test_builtin_tool_call_ends_with_eom(client):
    tools = [{"type": "function", "function": {"name": "brave_search", "parameters": {"type": "object"}}}]
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "search the web"}],
                                       tools=tools)
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "brave_search"
    assert json.loads(call.function.arguments) == {"query": "inhouse server"}


def test_tool_calls_streamed_as_deltas(client):
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "two calls"}], tools=[WEATHER_TOOL, TIME_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert [d.index for d in deltas] == [0, 1]
    assert [d.function.name for d in deltas] == ["get_weather", "get_time"]
    assert json.loads(deltas[1].function.arguments) == {"tz": "UTC"}
    assert all(d.id.startswith("call_") and d.type == "function" for d in deltas)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not "".join(c.choices[0].delta.content or "" for c in chunks)  # the call text is not shown as content


def test_tool_choice_none_leaves_the_reply_as_text(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "weather?"}],
                                       tools=[WEATHER_TOOL], tool_choice="none")
    assert r.choices[0].message.tool_calls is None
    assert r.choices[0].message.content == default_script("weather")[0]
    assert r.choices[0].finish_reason == "stop"


def test_tool_result_messages_become_ipython(client, scripted_server):
    messages = [
        {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
    ]
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL])
    assert r.choices[0].message.content == H.TOOL_RESULT_REPLY and r.choices[0].finish_reason == "stop"
    llm = scripted_server.server.config.app.state.inhouse.llm
    ids = llm.chat_renderer.encode(messages, tools=[WEATHER_TOOL], tool_choice="auto")
    assert r.usage.prompt_tokens == len(ids)
    text = llm.tokenizer.decode(ids)
    assert '<|start_header_id|>ipython<|end_header_id|>\n\n{"temp": 21}<|eot_id|>' in text


def test_chat_logprobs(client, tok):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert "".join(t.token for t in content[:-1]) == HELLO
    assert content[-1].token == "<|eot_id|>"
    # Forced logits: 30 for the scripted token, 0 for the other 128,255 ids.
    expected = -math.log1p(128255 * math.exp(-30.0))
    for t in content:
        assert t.logprob == pytest.approx(expected, abs=1e-6)
        assert len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token
        assert t.top_logprobs[1].logprob == pytest.approx(-30.0 + expected, abs=1e-4)
        assert bytes(t.bytes).decode() == t.token


def test_stop_strings_and_max_tokens(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], stop=["scripted"])
    assert r.choices[0].message.content == "Hello! I am a " and r.choices[0].finish_reason == "stop"
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert r.choices[0].message.content == "Hello!" and r.choices[0].finish_reason == "length"
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                       max_completion_tokens=1)
    assert r.usage.completion_tokens == 1 and r.choices[0].finish_reason == "length"


def test_n_choices(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], n=3,
                                       temperature=0.8, seed=1)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert all(c.message.content == HELLO for c in r.choices)


def test_completions_text_ids_echo_logprobs(client, tok):
    r = client.completions.create(model=MODEL, prompt="The sea is", max_tokens=3, logprobs=2)
    assert r.object == "text_completion"
    c = r.choices[0]
    assert c.finish_reason == "length" and r.usage.completion_tokens == 3
    assert len(c.logprobs.tokens) == 3 and all(len(t) == 2 for t in c.logprobs.top_logprobs)
    assert c.text == "".join(c.logprobs.tokens)
    ids = tok.encode("The sea is", bos=True)
    r2 = client.completions.create(model=MODEL, prompt=ids, max_tokens=3, echo=True, logprobs=1)
    assert r2.usage.prompt_tokens == len(ids)
    lp = r2.choices[0].logprobs
    assert len(lp.tokens) == len(ids) + 3
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(isinstance(x, float) for x in lp.token_logprobs[1:])
    assert r2.choices[0].text.startswith("<|begin_of_text|>The sea is")
    assert r2.choices[0].text.endswith(c.text)
    stream = list(client.completions.create(model=MODEL, prompt=["a", "b"], max_tokens=2, stream=True,
                                            stream_options={"include_usage": True}))
    by_index: dict[int, str] = {}
    for ch in stream:
        for x in ch.choices:
            by_index[x.index] = by_index.get(x.index, "") + x.text
    assert set(by_index) == {0, 1}
    assert stream[-1].usage.completion_tokens == 4


# ------------------------------------------------------------------------------------------ errors
def _post(base: str, path: str, body, key=API_KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, (bytes, str)):
        return httpx.post(base + path, content=body, headers={**headers, "Content-Type": "application/json"},
                          timeout=60)
    return httpx.post(base + path, json=body, headers=headers, timeout=60)


def _error(resp: httpx.Response, status: int, param=None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    if param is not None:
        assert err["param"] == param
    return err


def test_error_bodies(scripted_server, client, caplog):
    base = scripted_server.base
    secret = "PURPLE-ELEPHANT-PROMPT"
    wrong_key = "sk-wrong-but-secret-key"
    ok_msgs = [{"role": "user", "content": "hi"}]
    with caplog.at_level(logging.INFO, logger="inhouse.server"):
        _error(_post(base, "/v1/chat/completions", b'{"model": "x", "messages": [}'), 400)
        _error(_post(base, "/v1/chat/completions", b"[1, 2]"), 400)
        _error(_post(base, "/v1/chat/completions", {"messages": ok_msgs, "temperature": "hot"}), 400, "temperature")
        _error(_post(base, "/v1/chat/completions", {"messages": "hi"}), 400, "messages")
        _error(_post(base, "/v1/chat/completions", {"model": MODEL}), 400, "messages")
        _error(_post(base, "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}), 400)
        _error(_post(base, "/v1/chat/completions", {"messages": ok_msgs, "max_tokens": 0}), 400, "max_tokens")
        _error(_post(base, "/v1/chat/completions", {"messages": ok_msgs, "temperature": 3}), 400, "temperature")
        _error(_post(base, "/v1/chat/completions", {"messages": ok_msgs, "n": "2"}), 400, "n")
        _error(_post(base, "/v1/completions", {"prompt": [1, "a"]}), 400, "prompt")
        _error(_post(base, "/v1/completions", {"prompt": [999999999]}), 400, "prompt")

        with pytest.raises(openai.NotFoundError) as e:
            client.chat.completions.create(model="gpt-4", messages=ok_msgs)
        assert e.value.code == "model_not_found" and e.value.status_code == 404
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=[])
        assert e.value.body["param"] == "messages"

        long = [{"role": "user", "content": (secret + " ") * 1500}]
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=long)
        assert e.value.code == "context_length_exceeded" and "2048" in e.value.message
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=ok_msgs, max_tokens=5000)
        assert e.value.body["param"] == "max_tokens" and "2048" in e.value.message and "5000" in e.value.message

        bad_tools = [
            [{"type": "function", "function": {"parameters": {"type": "object"}}}],  # no name
            [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}],
            [{"type": "function", "function": {"name": "f", "parameters": "not a schema"}}],
            [{"type": "retrieval"}],
        ]
        for tools in bad_tools:
            with pytest.raises(openai.BadRequestError) as e:
                client.chat.completions.create(model=MODEL, messages=ok_msgs, tools=tools)
            assert e.value.body["param"] == "tools"
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=ok_msgs, tools=[WEATHER_TOOL],
                                           tool_choice={"type": "function", "function": {"name": "nope"}})
        assert e.value.body["param"] == "tool_choice"
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model=MODEL, messages=ok_msgs, tool_choice="required")

        # Authentication.
        for key in (None, wrong_key):
            err = _error(_post(base, "/v1/chat/completions", {"messages": ok_msgs}, key=key), 401)
            assert err["type"] == "authentication_error"
        with pytest.raises(openai.AuthenticationError):
            openai_client(base, key=wrong_key).models.list()
        assert httpx.get(base + "/metrics").status_code == 401
        assert httpx.get(base + "/health").status_code == 200
        _error(httpx.get(base + "/v1/nothing-here", headers={"Authorization": f"Bearer {API_KEY}"}), 404)

    # Still serving after all of that, and nothing secret was logged.
    assert client.chat.completions.create(model=MODEL, messages=ok_msgs).choices[0].message.content == HELLO
    assert "400" in caplog.text and "401" in caplog.text
    assert secret not in caplog.text and wrong_key not in caplog.text and API_KEY not in caplog.text
