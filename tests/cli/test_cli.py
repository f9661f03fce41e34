"""The `inhouse` command as a user runs it: subprocesses on the embedded model, and chat in tmux."""

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent / "inhouse"
CMD = [str(BIN)] if BIN.exists() else [sys.executable, "-m", "inhouse.cli"]


def run(*args, timeout=300, **kw):
    return subprocess.run(CMD + list(args), capture_output=True, text=True, timeout=timeout, **kw)


def test_generate_answers_the_readme_question():
    r = run("generate", "What is the capital of France?")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "Traceback" not in r.stderr


def test_generate_json_is_machine_readable():
    r = run("generate", "--json", "--max-tokens", "12", "--temperature", "0", "Count: one, two,")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["usage"]["completion_tokens"] == len(out["token_ids"]) <= 12
    assert out["finish_reason"] in ("stop", "length")
    assert out["timings"]["time_to_first_token_s"] > 0
    assert r.stderr == ""  # --json keeps the terminal clean for pipes


def test_info_describes_the_embedded_model():
    r = run("info", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["format"] == "gguf"
    assert info["architecture"]["n_layers"] == 30 and info["architecture"]["n_kv_heads"] == 3
    assert info["parameters"] == 134_515_008
    assert "Q4_1" in info["stored_dtype"]
    assert info["context_length"] == 8192
    assert info["memory_needed_bytes"] > info["kv_cache_bytes"] > 0


def test_info_on_a_preset():
    r = run("info", "llama3.1-70b")
    assert r.returncode == 0, r.stderr
    assert "80 layers" in r.stdout and "factor 8" in r.stdout and "131,072" in r.stdout


@pytest.mark.parametrize("args, expected", [
    (["generate", "no/such/model.gguf", "hi"], "is not a file, a directory, a preset"),
    (["generate", "hi", "--max-tokens", "100000"], "max_tokens is 100000"),
    (["generate", "hi", "--temperature", "-1"], "temperature"),
    (["generate", "llama3.1-8b", "hi"], "preset without weights"),
])
def test_user_mistakes_give_one_clear_line(args, expected):
    r = run(*args)
    assert r.returncode == 2
    assert expected in r.stderr
    assert "Traceback" not in r.stderr


def test_corrupt_model_file_is_named(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(64))
    r = run("generate", str(bad), "hi")
    assert r.returncode == 2 and "broken.gguf" in r.stderr and "Traceback" not in r.stderr


# ---------------------------------------------------------------- chat in a real terminal
def _tmux(*args):
    return subprocess.run(["tmux", *args], capture_output=True, text=True, check=True).stdout


def _wait_for(session, predicate, timeout=120):
    end = time.time() + timeout
    screen = ""
    while time.time() < end:
        screen = _tmux("capture-pane", "-p", "-J", "-S", "-200", "-t", session)
        if predicate(screen):
            return screen
        time.sleep(0.5)
    raise AssertionError(f"timed out; screen:\n{screen}")


def test_chat_in_tmux():
    session = f"inhouse-{uuid.uuid4().hex[:8]}"
    cmd = " ".join(CMD) + " chat --max-tokens 40"
    env = {**os.environ, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "200", "-y", "50", cmd], check=True, env=env)
    try:
        _wait_for(session, lambda s: ">>> " in s)
        _tmux("send-keys", "-t", session, "What is the capital of France?", "Enter")
        _wait_for(session, lambda s: "Paris" in s and s.rstrip().endswith(">>>"))
        # multi-turn: the model sees the history
        _tmux("send-keys", "-t", session, "/history", "Enter")
        _wait_for(session, lambda s: "[user] What is the capital of France?" in s and "[assistant]" in s)
        _tmux("send-keys", "-t", session, "/reset", "Enter")
        _wait_for(session, lambda s: "(conversation reset)" in s)
        _tmux("send-keys", "-t", session, "/system You are a pirate.", "Enter")
        _wait_for(session, lambda s: "(system prompt set; conversation reset)" in s)
        # multi-line input between triple quotes
        _tmux("send-keys", "-t", session, '"""', "Enter", "Say hello", "Enter", 'in English."""', "Enter")
        _wait_for(session, lambda s: s.count(">>> ") >= 5 and s.rstrip().endswith(">>>"))
        # Arabic in and out of the terminal, intact
        _tmux("send-keys", "-t", session, "مرحبا، ما اسمك؟", "Enter")
        screen = _wait_for(session, lambda s: "مرحبا، ما اسمك؟" in s and s.count(">>> ") >= 6 and s.rstrip().endswith(">>>"))
        assert "\ufffd" not in screen
        _tmux("send-keys", "-t", session, "/bye", "Enter")
        end = time.time() + 30
        while time.time() < end and subprocess.run(["tmux", "has-session", "-t", session], capture_output=True).returncode == 0:
            time.sleep(0.3)
        assert subprocess.run(["tmux", "has-session", "-t", session], capture_output=True).returncode != 0
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
