"""Reusing cached keys/values of a shared prompt prefix, exactly.

Requests to one server mostly start alike: the chat template's system prompt, a shared
instruction, the earlier turns of a conversation. When the engine runs a prompt through the fused
step's rows (`inhouse.model.fused_decode.FusedDecode.rows`), the key and value it writes at
position p are a function of the tokens at positions 0..p alone, computed the same way whatever
else shares the step; so a cache row that holds the same first L tokens already holds, bit for
bit, the keys and values a new sequence would compute for them. Copying those L positions (or
taking that row itself, when it is free) and starting the new sequence at position L gives the
same logits, hence the same tokens, as computing the prompt from scratch: a request's output does
not depend on which requests came before it.

`PrefixIndex` remembers, per cache row, the tokens whose keys/values it holds *exactly so* (rows
filled any other way, such as the eager model's prompt chunks, are forgotten) and finds the row
sharing the longest prefix with a new prompt.
"""

from __future__ import annotations

from typing import Optional, Sequence


def common_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    """The length of the longest common prefix of `a` and `b`, at most `limit`."""
    n = min(len(a), len(b), limit)
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PrefixIndex:
    """Per cache row: the token ids whose keys/values it holds as the fused step computes them.

    Args:
        n_rows: cache rows.
    """

    def __init__(self, n_rows: int):
        self._held: list[Optional[tuple[list[int], int]]] = [None] * n_rows

    def record(self, row: int, token_ids: list[int], n: int) -> None:
        """Row `row` holds, exactly, the keys/values of ``token_ids[:n]`` (`token_ids` may grow
        afterwards; only its first `n` ids are read)."""
        self._held[row] = (token_ids, n)

    def holds(self, row: int, token_ids: list[int], n: int) -> bool:
        """Whether row `row` holds exactly the keys/values of ``token_ids[:n]``, as recorded for this
        very list (a sequence continuing on its own row) — always true for n = 0."""
        if n == 0:
            return True
        held = self._held[row]
        return held is not None and held[0] is token_ids and held[1] == n

    def forget(self, row: int) -> None:
        """Row `row` is being filled in some other way."""
        self._held[row] = None

    def clear(self) -> None:
        self._held = [None] * len(self._held)

    def longest(self, prompt: Sequence[int], limit: int) -> tuple[int, int]:
        """``(row, length)`` of the row sharing the longest prefix (at most `limit` tokens) with
        `prompt`; ``(-1, 0)`` if none shares any. Ties go to the lowest row."""
        best_row, best = -1, 0
        for row, held in enumerate(self._held):
            if held is None:
                continue
            ids, n = held
            k = common_prefix(prompt, ids, min(n, limit))
            if k > best:
                best_row, best = row, k
        return best_row, best
