"""The web chat page in a real headless browser (Debian's chromium driven by Playwright):
load, send, stream, stop, Arabic laid out right to left, Markdown rendered without HTML injection,
history kept in the browser, system prompt and API key fields. Model: the scripted Llama, slowed down."""

from __future__ import annotations

import json
import os
import re
import sys
import time

import httpx
import pytest


H = sys.modules["_inhouse_tests_server_helpers"]  # tests/server/helpers.py, loaded by conftest.py
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def page_server(keyfile):
    llm = H.scripted_llm(delay=0.02)
    app = H.create_app(llm, api_keys=H.ApiKeys.from_file(str(keyfile)))
    with H.ServerThread(app) as s:
        yield s


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: the test set-up installs it with `apt-get install -y chromium`")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield b
        b.close()


def running(base: str) -> float:
    text = httpx.get(base + "/metrics", headers={"Authorization": f"Bearer {H.API_KEY}"}).text
    return float(re.search(r"^inhouse_num_requests_running (\S+)$", text, re.M).group(1))


def last_assistant(page):
    return page.locator(".msg.assistant").last


def send(page, text: str) -> None:
    page.fill("#input", text)
    page.click("#send")


def wait_idle(page) -> None:
    page.wait_for_function("() => !document.getElementById('send').disabled", timeout=30000)


def test_chat_page(page_server, browser):
    base = page_server.base
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    outside: list[str] = []
    page.on("request", lambda r: None if r.url.startswith(base) else outside.append(r.url))
    bodies: list[dict] = []
    page.on("request", lambda r: bodies.append(json.loads(r.post_data)) if r.method == "POST" else None)

    page.goto(base + "/")
    assert page.title() == "inhouse chat"
    # Without the key the model list is refused; with it the picker fills.
    page.wait_for_function("() => document.getElementById('notice').textContent.includes('API key')")
    page.fill("#api-key", H.API_KEY)
    page.dispatch_event("#api-key", "change")
    page.wait_for_function("() => document.querySelectorAll('#model option').length === 1")
    assert page.input_value("#model") == "scripted-llama"

    # Send with a system prompt; the streamed answer appears whole.
    page.click("#system-box summary")
    page.fill("#system", "You are terse.")
    send(page, "hi")
    wait_idle(page)
    assert last_assistant(page).locator(".body").inner_text() == "Hello! I am a scripted model."
    assert bodies[-1]["messages"][0] == {"role": "system", "content": "You are terse."}
    assert bodies[-1]["stream"] is True

    # Stream a long answer, see it grow, stop it: partial text stays, the server cancels the request.
    send(page, "a long story please")
    page.wait_for_function("() => { const m = [...document.querySelectorAll('.msg.assistant .body')].pop();"
                           " return m && m.textContent.split(' ').length >= 5; }")
    partial = last_assistant(page).locator(".body").inner_text()
    assert partial and H.LONG_REPLY.startswith(partial.strip())
    page.click("#stop")
    wait_idle(page)
    assert last_assistant(page).locator(".status").inner_text() == "stopped"
    stopped_text = last_assistant(page).locator(".body").inner_text()
    assert len(stopped_text) < len(H.LONG_REPLY)
    deadline = time.monotonic() + 10
    while running(base) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert running(base) == 0

    # Arabic: laid out right to left, per message; the English ones stay left to right.
    send(page, "مرحبا")
    wait_idle(page)
    reply = last_assistant(page)
    assert reply.locator(".body").inner_text() == H.ARABIC_REPLY
    direction = "e => getComputedStyle(e).direction"
    assert reply.evaluate(direction) == "rtl"
    assert page.locator(".msg.user").last.evaluate(direction) == "rtl"
    assert page.locator(".msg.assistant").first.evaluate(direction) == "ltr"

    # Markdown and code blocks render; HTML in model output stays text.
    send(page, "markdown please")
    wait_idle(page)
    md = last_assistant(page)
    assert md.locator("strong").inner_text() == "bold"
    assert md.locator("pre code").inner_text() == "print('<b>hi</b>')"
    assert md.locator("img").count() == 0 and md.locator("pre b").count() == 0
    assert "<img src=x" in md.locator(".body").inner_text()
    assert page.evaluate("() => window.__pwned === undefined")

    # History survives a reload; a new conversation starts empty and the old one is still listed.
    n_msgs = page.locator(".msg").count()
    page.reload()
    page.wait_for_function(f"() => document.querySelectorAll('.msg').length === {n_msgs}")
    assert page.input_value("#system") == "You are terse."
    page.click("#new-chat")
    assert page.locator(".msg").count() == 0
    assert page.locator("#conversations li").count() == 2
    page.locator("#conversations li").nth(1).click()
    assert page.locator(".msg").count() == n_msgs

    assert errors == [] and outside == []
    page.close()
