"""Shared fixtures. Tests have no packages (pytest --import-mode=importlib), so helper modules
are loaded by file path here."""

import importlib.util
import sys
from pathlib import Path

import pytest


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(f"_inhouse_tests_{path.parent.name}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load_shared(path: Path, name: str):
    """Load a helper module once and register it as `name`, for test modules to take from sys.modules."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


_load_shared(Path(__file__).parent / "tiny.py", "_inhouse_tests_tiny")  # tests/tiny.py


@pytest.fixture(scope="session")
def weights_helpers():
    """tests/weights/helpers.py: tiny checkpoints in every format."""
    return _load(Path(__file__).parent / "weights" / "helpers.py")


@pytest.fixture(autouse=True, scope="session")
def _prepared_weights_cache(tmp_path_factory):
    """Prepared weights (inhouse.weights.prepared) go to a directory of this run, not ~/.cache:
    the first load of a GGUF file converts and saves it, later ones (in-process or in a CLI
    subprocess, which inherits the variable) read it back."""
    import os

    if "INHOUSE_WEIGHT_CACHE" not in os.environ:
        os.environ["INHOUSE_WEIGHT_CACHE"] = str(tmp_path_factory.mktemp("prepared"))
    yield
