"""LoRA adapters through the server: a request's ``model`` picks the base model or an adapter;
concurrent requests for different ones share batches and answer what they answer one at a time.
Also `inhouse serve --adapter NAME=DIR` as a subprocess: wiring and one-line errors."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from inhouse import LLM
from inhouse.tokenizer import llama3_tokenizer

H = sys.modules["_inhouse_tests_server_helpers"]  # tests/server/helpers.py, loaded by conftest.py
BASE = "tiny-llama"
PROMPTS = ["The capital of France is", "def fib(n):"]


def write_adapter(make_model, out, targets: str, rank: int, seed: int) -> str:
    """A PEFT adapter with random A and random non-zero B for the model `make_model()` builds."""
    return sys.modules["_inhouse_tests_tiny"].write_random_adapter(make_model(), out, targets, rank, seed,
                                                                   b_seed=100 + seed, b_std=0.3)


@pytest.fixture(scope="module")
def adapter_server(tmp_path_factory, keyfile):
    d = tmp_path_factory.mktemp("adapters")
    support = write_adapter(H.make_tiny_llama, d / "support", "wq,wv,w2", rank=4, seed=1)
    legal = write_adapter(H.make_tiny_llama, d / "legal", "all", rank=8, seed=2)
    llm = LLM.from_model(H.make_tiny_llama(), llama3_tokenizer(), name=BASE, max_model_len=256, max_num_seqs=16)
    llm.add_lora(support, name="support")
    llm.add_lora(legal, name="legal")
    batches: list[list[int]] = []

    def slow_and_recorded(module, args):
        batches.append(list(llm.engine.adapters.rows.per_row))
        time.sleep(0.01)  # steps long enough for concurrent requests to overlap

    llm.model.register_forward_pre_hook(slow_and_recorded)
    app = H.create_app(llm, api_keys=H.ApiKeys.from_file(str(keyfile)))
    with H.ServerThread(app) as s:
        s.batches = batches
        yield s


def complete(client, model: str, prompt: str) -> str:
    r = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0)
    assert r.model == model
    return r.choices[0].text


def test_models_lists_base_and_adapters(adapter_server):
    client = H.openai_client(adapter_server.base)
    assert [m.id for m in client.models.list().data] == [BASE, "support", "legal"]
    data = httpx.get(adapter_server.base + "/v1/models", headers={"Authorization": f"Bearer {H.API_KEY}"}).json()
    assert [m.get("parent") for m in data["data"]] == [None, BASE, BASE]
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="hi", max_tokens=2)
    assert e.value.body["code"] == "model_not_found" and "tiny-llama, support, legal" in e.value.body["message"]


def test_concurrent_mixed_models_equal_one_at_a_time(adapter_server):
    client = H.openai_client(adapter_server.base)
    jobs = [(m, p) for m in (BASE, "support", "legal") for p in PROMPTS]
    alone = {job: complete(client, *job) for job in jobs}
    for p in PROMPTS:
        assert len({alone[(m, p)] for m in (BASE, "support", "legal")}) == 3  # each adapter changes the answer
    adapter_server.batches.clear()
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = dict(zip(jobs, pool.map(lambda job: complete(client, *job), jobs)))
    assert together == alone
    # The concurrent requests really shared forwards: base rows and rows of both adapters in one batch.
    assert any(0 in b and len(set(b) - {0}) == 2 for b in adapter_server.batches)
    chat = [{"role": "user", "content": "Hi"}]
    base_reply = client.chat.completions.create(model=BASE, messages=chat, max_tokens=8, temperature=0)
    legal_reply = client.chat.completions.create(model="legal", messages=chat, max_tokens=8, temperature=0)
    assert legal_reply.model == "legal" and legal_reply.choices[0].message.content != base_reply.choices[0].message.content
    metrics = httpx.get(adapter_server.base + "/metrics", headers={"Authorization": f"Bearer {H.API_KEY}"}).text
    assert 'inhouse_model_requests_total{model="legal"} 5' in metrics


def test_chat_page_picker_lists_adapters(adapter_server):
    import json
    import os

    if not os.path.exists("/usr/bin/chromium"):
        pytest.fail("/usr/bin/chromium is missing: the test set-up installs it with `apt-get install -y chromium`")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True,
                                    args=["--headless", "--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            bodies: list[dict] = []
            page.on("request", lambda r: bodies.append(json.loads(r.post_data)) if r.method == "POST" else None)
            page.goto(adapter_server.base + "/")
            page.fill("#api-key", H.API_KEY)
            page.dispatch_event("#api-key", "change")
            page.wait_for_function("() => document.querySelectorAll('#model option').length === 3")
            options = page.eval_on_selector_all("#model option", "os => os.map(o => [o.value, o.textContent])")
            assert options == [[BASE, BASE], ["support", f"support (adapter of {BASE})"],
                               ["legal", f"legal (adapter of {BASE})"]]
            page.select_option("#model", "legal")
            page.fill("#temperature", "0")
            page.fill("#input", "Hi")
            page.click("#send")
            page.wait_for_function("() => !document.getElementById('send').disabled", timeout=60000)
            assert bodies[-1]["model"] == "legal"
            assert page.locator(".msg.assistant .status").count() == 0  # no error shown
        finally:
            browser.close()


# ------------------------------------------------------------------ the CLI
def serve_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "inhouse.cli", "serve", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_bad_adapter_arguments_exit_2_with_one_line(tmp_path):
    r = serve_cli("--adapter", "bad")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["inhouse: error: --adapter 'bad': expected NAME=DIR (the name clients "
                                             "put in 'model', and a PEFT adapter directory)"]
    r = serve_cli("--adapter", f"a={tmp_path / 'missing'}")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"inhouse: error: --adapter 'a={tmp_path / 'missing'}': "
                                             f"{tmp_path / 'missing'} is not a directory"]
    r = serve_cli("--adapter", f"a={tmp_path}", "--adapter", f"a={tmp_path}")
    assert r.returncode == 2 and "the name 'a' is given twice" in r.stderr
    # An adapter for another model: found out once the (embedded) model is loaded, before serving.
    other = write_adapter(H.make_tiny_llama, tmp_path / "other", "w2", rank=2, seed=0)
    r = serve_cli("-q", "--max-model-len", "256", "--adapter", f"other={other}")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0] == (f"inhouse: error: adapter {other}: layers.0.feed_forward.w2 has A (2, 128) and B (64, 2); rank 2 "
                                        "on this model needs A (2, 1536) and B (576, 2) (an adapter for another model?)")


def test_serve_cli_with_adapters(tmp_path):
    from inhouse.config import ModelArgs
    from inhouse.finetune.merge import export_hf
    from inhouse.model.transformer import Transformer
    from inhouse.resolve import preset_tokenizer

    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=49152, hidden_dim=192,
                     norm_eps=1e-5, rope_theta=10000.0, max_seq_len=2048, tie_embeddings=True)

    def make():
        torch.manual_seed(0)
        m = Transformer(args)
        with torch.no_grad():
            for p in m.parameters():
                p.normal_(0, 0.05)
        m.tie_weights()
        return m.eval()

    export_hf(make(), preset_tokenizer("smollm2-135m"), str(tmp_path / "model"), dtype=torch.float32)
    ad = write_adapter(make, tmp_path / "ad", "all", rank=4, seed=3)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "inhouse.cli", "serve", str(tmp_path / "model"), "--port", str(port),
           "--max-model-len", "256", "--dtype", "float32", "--adapter", f"mine={ad}", "--max-loras", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "inhouse serve did not come up"
            time.sleep(0.2)
        models = httpx.get(base + "/v1/models").json()["data"]
        assert [(m["id"], m["parent"]) for m in models] == [("model", None), ("mine", "model")]
        texts = {}
        for name in ("model", "mine"):
            r = httpx.post(base + "/v1/completions", timeout=60,
                           json={"model": name, "prompt": "Hello", "max_tokens": 6, "temperature": 0})
            assert r.status_code == 200, r.text
            texts[name] = r.json()["choices"][0]["text"]
        assert texts["model"] != texts["mine"]
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=60)
    assert "LoRA adapters: mine (at most 1 resident at once)" in out
