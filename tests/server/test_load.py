"""Overload (429 + Retry-After), client disconnects, per-request time limit: scripted Llama slowed down."""

from __future__ import annotations

import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest


H = sys.modules["_inhouse_tests_server_helpers"]  # tests/server/helpers.py, loaded by conftest.py
MAX_NUM_SEQS, MAX_QUEUE, MAX_MODEL_LEN = 2, 2, 1024


def metric(base: str, name: str) -> float:
    text = httpx.get(base + "/metrics", headers={"Authorization": f"Bearer {H.API_KEY}"}).text
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def wait_for(cond, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def slow_server(keyfile):
    llm = H.scripted_llm(delay=0.03, max_model_len=MAX_MODEL_LEN, max_num_seqs=MAX_NUM_SEQS)
    app = H.create_app(llm, api_keys=H.ApiKeys.from_file(str(keyfile)), max_queue=MAX_QUEUE, request_timeout=20)
    with H.ServerThread(app) as s:
        yield s


def test_overload_gets_429_and_admitted_requests_complete(slow_server):
    base = slow_server.base
    admitted = MAX_NUM_SEQS + MAX_QUEUE
    n = 4 * admitted
    expected = " ".join(H.LONG_REPLY.split()[:6])
    body = {"model": "scripted-llama", "messages": [{"role": "user", "content": "a long answer"}], "max_tokens": 12}

    def one(_):
        return httpx.post(base + "/v1/chat/completions", json=body, timeout=120,
                          headers={"Authorization": f"Bearer {H.API_KEY}"})

    with ThreadPoolExecutor(n) as pool:
        responses = list(pool.map(one, range(n)))
    ok = [r for r in responses if r.status_code == 200]
    busy = [r for r in responses if r.status_code == 429]
    assert len(ok) + len(busy) == n, [r.status_code for r in responses]
    assert len(ok) >= admitted and len(busy) >= n - 2 * admitted
    for r in busy:
        assert r.headers["Retry-After"].isdigit()
        assert r.json()["error"]["type"] == "rate_limit_error"
    for r in ok:  # every admitted request is intact
        data = r.json()
        assert data["choices"][0]["message"]["content"].startswith(expected)
        assert data["choices"][0]["finish_reason"] == "length" and data["usage"]["completion_tokens"] == 12
    assert metric(base, "inhouse_rejected_total") == len(busy)
    # Memory stays bounded: the cache never holds more rows than max_num_seqs, each at most the context.
    per_token = 2 * 2 * 2 * 16 * 4  # K and V, 2 layers, 2 KV heads, head_dim 16, fp32
    assert metric(base, "inhouse_kv_cache_allocated_bytes") <= MAX_NUM_SEQS * MAX_MODEL_LEN * per_token
    assert wait_for(lambda: metric(base, "inhouse_num_requests_running") == 0)


def test_disconnect_cancels_and_frees_the_cache(slow_server):
    base = slow_server.base
    client = H.openai_client(base)
    before = metric(base, 'inhouse_request_finish_total{reason="abort"}') if "abort" in httpx.get(
        base + "/metrics", headers={"Authorization": f"Bearer {H.API_KEY}"}).text else 0.0
    stream = client.chat.completions.create(model="scripted-llama", stream=True, max_tokens=500,
                                            messages=[{"role": "user", "content": "a long story"}])
    got = []
    for chunk in stream:
        got.append(chunk)
        if len(got) == 4:
            break
    assert metric(base, "inhouse_num_requests_running") == 1
    stream.close()  # the client goes away
    assert wait_for(lambda: metric(base, "inhouse_num_requests_running") == 0, timeout=10)
    assert metric(base, "inhouse_kv_cache_tokens") == 0
    assert metric(base, 'inhouse_request_finish_total{reason="abort"}') == before + 1
    # and the server still answers
    r = client.chat.completions.create(model="scripted-llama", messages=[{"role": "user", "content": "hi"}])
    assert r.choices[0].message.content == "Hello! I am a scripted model."


def test_request_time_limit(keyfile):
    # 500 tokens take >= 5 s at 0.01 s a step, far past the 2 s limit; the short reply after them
    # (~10 steps) stays far inside it even on a slow, busy machine.
    llm = H.scripted_llm(delay=0.01, max_model_len=MAX_MODEL_LEN, max_num_seqs=2)
    app = H.create_app(llm, api_keys=None, request_timeout=2.0)
    with H.ServerThread(app) as s:
        client = H.openai_client(s.base, key=None)
        msgs = [{"role": "user", "content": "a long story"}]
        with pytest.raises(openai.APIStatusError) as e:
            client.chat.completions.create(model="scripted-llama", messages=msgs, max_tokens=500)
        assert e.value.status_code == 504 and e.value.code == "request_timeout"
        with pytest.raises(openai.APIError):
            for _ in client.chat.completions.create(model="scripted-llama", messages=msgs, max_tokens=500,
                                                    stream=True):
                pass
        r = client.chat.completions.create(model="scripted-llama", messages=[{"role": "user", "content": "hi"}])
        assert r.choices[0].message.content == "Hello! I am a scripted model."
