"""Shared fixtures: tiny models (Meta names), the SmolLM2 tokenizer and its chat renderer."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from ft_helpers import TINY, TINY_SMOL, build  # noqa: E402


@pytest.fixture(scope="session")
def smol_tokenizer():
    from inhouse.resolve import preset_tokenizer

    return preset_tokenizer("smollm2-135m")


@pytest.fixture(scope="session")
def smol_renderer(smol_tokenizer):
    from inhouse.tokenizer.chat import ChatRenderer

    return ChatRenderer(smol_tokenizer)


@pytest.fixture
def tiny_model():
    return build(TINY)


@pytest.fixture
def tiny_smol_model():
    return build(TINY_SMOL, std=0.05)
