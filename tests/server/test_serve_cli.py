"""`inhouse serve` as a subprocess: loopback by default, loud when open, keys enforced, clean stop;
plus the small pure pieces (key file, sizes, Prometheus text)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from inhouse.server.auth import ApiKeys, KeyFileError
from inhouse.server.cli import parse_size, seqs_for_budget
from inhouse.server.metrics import Histogram, ServerMetrics


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "inhouse.cli", "serve", "--port", str(port), "--max-model-len", "256", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"inhouse serve exited with {proc.returncode}: {proc.stdout.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("inhouse serve did not come up")


def stop(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    return out


def test_serve_open_says_so_loudly_and_binds_loopback():
    port = free_port()
    proc = start([], port)
    try:
        r = httpx.get(f"http://127.0.0.1:{port}/v1/models")
        assert r.status_code == 200 and r.json()["data"][0]["id"] == "SmolLM2-135M-Instruct"
        listening = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True).stdout
        if listening:
            assert f"127.0.0.1:{port}" in listening and f"0.0.0.0:{port}" not in listening
        page = httpx.get(f"http://127.0.0.1:{port}/")
        assert page.status_code == 200 and "inhouse chat" in page.text
        assert "https://" not in page.text  # no CDN: everything comes from the package
        for asset in ("app.js", "markdown.js", "style.css"):
            assert httpx.get(f"http://127.0.0.1:{port}/static/{asset}").status_code == 200
    finally:
        out = stop(proc)
    assert proc.returncode in (0, 130), out  # 130: uvicorn re-raises the Ctrl-C it handled
    assert "NO API KEY FILE" in out and "OPEN" in out


def test_serve_with_key_file(tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("bob sk-cli-test-key-123456\n")
    keys.chmod(0o600)
    port = free_port()
    proc = start(["--api-key-file", str(keys)], port)
    try:
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(base + "/v1/models").status_code == 401
        good = {"Authorization": "Bearer sk-cli-test-key-123456"}
        r = httpx.post(base + "/v1/chat/completions", headers=good, timeout=60,
                       json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    finally:
        out = stop(proc)
    assert "NO API KEY FILE" not in out
    assert "sk-cli-test-key-123456" not in out and "key=bob" in out


def test_key_file_parsing(tmp_path):
    f = tmp_path / "k"
    f.write_text("# comment\n\nalice sk-aaaaaaaaaaaa\nsk-bbbbbbbbbbbb\n")
    keys = ApiKeys.from_file(str(f))
    assert keys.check("Bearer sk-aaaaaaaaaaaa") == "alice"
    assert keys.check("Bearer sk-bbbbbbbbbbbb") == "key2"
    for bad in (None, "", "Bearer", "Basic sk-aaaaaaaaaaaa", "Bearer sk-aaaaaaaaaaa", "sk-aaaaaaaaaaaa"):
        assert keys.check(bad) is None
    for text, needle in (("", "no keys"), ("short\n", "at least"), ("a b c\n", "line 1")):
        f.write_text(text)
        with pytest.raises(KeyFileError, match=needle):
            ApiKeys.from_file(str(f))
    with pytest.raises(KeyFileError, match="missing"):
        ApiKeys.from_file(str(tmp_path / "missing"))


def test_sizes_and_budget():
    from inhouse.config import ModelArgs

    assert parse_size("2GiB") == 2 * 1024**3 and parse_size("512MB") == 512 * 10**6 and parse_size("1000") == 1000
    with pytest.raises(ValueError, match="lots"):
        parse_size("lots")
    args = ModelArgs.from_preset("llama3.1-8b")
    per_row = args.kv_cache_bytes(8192, 2)  # 1 GiB: 32 layers x 8 KV heads x 128 x 8192 x 2 (K, V) x 2 bytes
    assert per_row == 2**30
    assert seqs_for_budget(args, 8192, 2, 10 * 2**30) == 10
    with pytest.raises(ValueError, match="does not hold one sequence"):
        seqs_for_budget(args, 8192, 2, 2**29)


def test_prometheus_text():
    h = Histogram("t_seconds", "help", (0.1, 1.0))
    for v in (0.05, 0.5, 0.5, 5.0):
        h.observe(v)
    lines = list(h.render())
    assert lines == ['t_seconds_bucket{le="0.1"} 1', 't_seconds_bucket{le="1"} 3', 't_seconds_bucket{le="+Inf"} 4',
                     "t_seconds_sum 6.05", "t_seconds_count 4"]
    m = ServerMetrics()
    m.requests.inc(1, "/v1/models", "200")
    text = m.render()
    assert '# TYPE inhouse_requests_total counter\ninhouse_requests_total{endpoint="/v1/models",status="200"} 1' in text
    assert "# TYPE inhouse_time_to_first_token_seconds histogram" in text
    assert "inhouse_num_requests_waiting 0" in text
