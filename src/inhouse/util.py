"""Small helpers shared across the package."""

from __future__ import annotations

import contextlib
import gc
from typing import Iterator


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector for a block that creates many objects that live on.

    Reading a tokenizer (a GGUF file's 49k-150k tokens and merges, each a string or a list) makes
    the collector run again and again over a heap that only grows: building SmolLM2's tokenizer
    spent ~0.2 s of its 0.8 s there. Reference counting still frees everything; the collector
    is switched back on (if it was on) when the block ends.
    """
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()


def import_torch_frozen() -> int:
    """Import torch and inhouse's engine with the collector paused, then freeze what they made.

    For processes that load a model (the command line's verbs). `import torch` creates ~180k
    objects that live as long as the process, and while they are made the collector walks them
    again and again: 0.16-0.18 s of a 1.4-2.3 s import on a 2-core Xeon, and ~0.1 s more for one
    full pass when inhouse's modules follow, ~10% of the time to a first token. Paused during the
    imports, then `gc.freeze()`: they go to the permanent generation, which later collections
    skip (also no ~0.1 s full pass over them in the middle of serving); reference counting still
    frees whatever becomes garbage. Returns the number of objects frozen.
    """
    with gc_paused():
        import torch  # noqa: F401

        import inhouse.engine.llm  # noqa: F401

        gc.freeze()  # before the collector is back: its next pass would walk all of them once (~0.1 s)
    return gc.get_freeze_count()
