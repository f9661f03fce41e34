"""Shared fixtures. Tests have no packages (pytest --import-mode=importlib), so helper modules
are loaded by file path here."""

import importlib.util
from pathlib import Path

import pytest


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(f"_inhouse_tests_{path.parent.name}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def weights_helpers():
    """tests/weights/helpers.py: tiny checkpoints in every format."""
    return _load(Path(__file__).parent / "weights" / "helpers.py")
