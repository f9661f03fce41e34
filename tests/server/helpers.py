"""Helpers for the server tests (loaded by path: tests have no packages). Servers for the tests: uvicorn in a thread on a free loopback port, stopped afterwards.

Two models:
  * a *scripted* Llama: a random-weight 2-layer Llama 3 (real 128,256-id vocabulary, real Llama 3
    tokenizer and native Llama 3.1 chat format) whose logits are forced so that the reply to a prompt
    is a scripted Llama 3.1 output (tool calls in every form the parser knows). It runs the real
    forward pass and KV cache underneath; only the final logits are replaced.
  * the embedded SmolLM2-135M-Instruct (real weights), for greedy parity under concurrency.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from inhouse import LLM
from inhouse.model.transformer import Transformer
from inhouse.server import ApiKeys, create_app
from inhouse.tokenizer import llama3_tokenizer

API_KEY = "sk-test-0123456789abcdef"
USER_HEADER = "<|start_header_id|>user<|end_header_id|>\n\n"
ASSISTANT_HEADER = "<|start_header_id|>assistant<|end_header_id|>\n\n"

ARABIC_REPLY = "مرحبا بك! كيف يمكنني مساعدتك اليوم؟"
TOOL_RESULT_REPLY = "It is 21 °C in Paris."
LONG_REPLY = " ".join(f"word{i}" for i in range(400))


def default_script(prompt_text: str) -> tuple[str, str]:
    """(reply text, end token) for a rendered prompt, chosen by the last user message."""
    after_user = prompt_text.rsplit(USER_HEADER, 1)[-1]
    if "<|start_header_id|>ipython<|end_header_id|>" in after_user:  # a tool result came back
        return TOOL_RESULT_REPLY, "<|eot_id|>"
    last_user = after_user.split("<|eot_id|>", 1)[0]
    if "weather" in last_user:  # JSON custom call, as Llama 3.1 writes it
        return '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}', "<|eot_id|>"
    if "two calls" in last_user:  # function-tag form, two calls
        return ('<function=get_weather>{"city": "Paris"}</function><function=get_time>{"tz": "UTC"}</function>',
                "<|eot_id|>")
    if "search" in last_user:  # built-in tool: python tag, ends with eom
        return '<|python_tag|>brave_search.call(query="inhouse server")', "<|eom_id|>"
    if "مرحبا" in last_user:
        return ARABIC_REPLY, "<|eot_id|>"
    if "long" in last_user:
        return LONG_REPLY, "<|eot_id|>"
    if "markdown" in last_user:
        return ("Here is **bold** and `code` <img src=x onerror=\"window.__pwned=1\">\n\n"
                "```python\nprint('<b>hi</b>')\n```\nDone."), "<|eot_id|>"
    return "Hello! I am a scripted model.", "<|eot_id|>"


class ScriptedLlama(torch.nn.Module):
    """A random-weight Llama whose last-position logits force a scripted reply.

    The reply is chosen from the prompt text (everything before the last assistant header) by
    `script`; once it is exhausted the model emits the script's end token. Each cache row keeps the
    ids it was fed, so the model knows how much of the reply it has produced.
    """

    def __init__(self, inner: Transformer, tokenizer, script: Callable[[str], tuple[str, str]] = default_script,
                 delay: float = 0.0):
        super().__init__()
        self.inner, self.tok, self.script, self.delay = inner, tokenizer, script, delay
        self.args = inner.args
        self.tok_embeddings = inner.tok_embeddings
        self.header = tokenizer.encode(ASSISTANT_HEADER, allow_special=True)
        self.rows: dict[int, list[int]] = {}
        self._last_prefill: list[int] = []
        self._replies: dict[tuple[int, ...], list[int]] = {}

    def new_caches(self, *a, **k):
        return self.inner.new_caches(*a, **k)

    def _reply(self, prompt: list[int]) -> list[int]:
        key = tuple(prompt)
        if key not in self._replies:
            text, end = self.script(self.tok.decode(prompt))
            self._replies[key] = self.tok.encode(text, allow_special=True) + [self.tok.special_tokens[end]]
        return self._replies[key]

    def _next(self, hist: list[int]) -> int:
        h = len(self.header)
        at = max((i for i in range(len(hist) - h + 1) if hist[i:i + h] == self.header), default=None)
        if at is None:  # not a chat prompt: continue with the default reply
            reply, done = self._reply(hist[:1]), 0
        else:
            reply, done = self._reply(hist[:at]), len(hist) - at - h
        return reply[min(done, len(reply) - 1)]

    def forward(self, tokens, input_pos=None, caches=None, last_only=False, cache_rows=None):
        if self.delay:
            time.sleep(self.delay)
        logits = self.inner(tokens, input_pos=input_pos, caches=caches, last_only=last_only, cache_rows=cache_rows)
        forced = torch.zeros_like(logits)
        rows = cache_rows.tolist() if cache_rows is not None else list(range(tokens.shape[0]))
        for b, row in enumerate(rows):
            hist = self.rows.setdefault(row, [])
            start = int(input_pos[b, 0])
            if len(hist) < start:  # a row forked from its parent's cache (n > 1): same prompt
                hist[:] = self._last_prefill[:start]
            del hist[start:]
            hist.extend(tokens[b].tolist())
            if tokens.shape[1] > 1:
                self._last_prefill = list(hist)
            forced[b, -1, self._next(hist)] = 30.0
        return forced


def make_tiny_llama(seed: int = 0) -> Transformer:
    return sys.modules["_inhouse_tests_tiny"].make_tiny_llama(seed, max_seq_len=4096)  # tests/tiny.py


def scripted_llm(delay: float = 0.0, max_model_len: int = 2048, max_num_seqs: int = 8) -> LLM:
    tok = llama3_tokenizer()
    model = ScriptedLlama(make_tiny_llama(), tok, delay=delay)
    return LLM.from_model(model, tok, name="scripted-llama", max_model_len=max_model_len, max_num_seqs=max_num_seqs)


class ServerThread:
    """uvicorn serving `app` on 127.0.0.1:<free port> in a daemon thread."""

    def __init__(self, app):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.base = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", log_config=None, access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


def write_keys(path: Path) -> Path:
    path.write_text(f"# test keys\nalice {API_KEY}\n")
    path.chmod(0o600)
    return path


def openai_client(base: str, key: Optional[str] = API_KEY, **kw):
    import openai

    return openai.OpenAI(base_url=f"{base}/v1", api_key=key or "none", max_retries=0, timeout=120, **kw)
