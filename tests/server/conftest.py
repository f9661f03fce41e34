"""Fixtures of the server tests; the helpers live in helpers.py (loaded by path)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest


def load_helpers():
    """tests/server/helpers.py as a module (one instance per session)."""
    name = "_inhouse_tests_server_helpers"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("helpers.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


H = load_helpers()


@pytest.fixture(scope="module")
def keyfile(tmp_path_factory) -> Path:
    return H.write_keys(tmp_path_factory.mktemp("keys") / "keys.txt")


@pytest.fixture(scope="module")
def scripted_server(keyfile):
    """The scripted Llama behind API keys (max 8 running + 4 queued)."""
    app = H.create_app(H.scripted_llm(), api_keys=H.ApiKeys.from_file(str(keyfile)), max_queue=4)
    with H.ServerThread(app) as s:
        yield s
