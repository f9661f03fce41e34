import sys

import pytest

from inhouse.tokenizer import llama3_tokenizer


make_tiny_llama = sys.modules["_inhouse_tests_tiny"].make_tiny_llama  # tests/tiny.py


@pytest.fixture(scope="session")
def tok():
    return llama3_tokenizer()


@pytest.fixture(scope="session")
def tiny_model():
    return make_tiny_llama()
