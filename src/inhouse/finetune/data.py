"""Training data: JSONL records -> validated conversations -> token ids with a loss mask -> batches.

Two record shapes are accepted, one per line:

* chat, OpenAI's fine-tuning shape: ``{"messages": [{"role": ..., "content": ...}, ...], "tools": [...]}``;
  assistant messages may carry ``tool_calls`` and ``"weight": 0`` (seen as context, not learned);
* ``{"prompt": "...", "completion": "..."}``: one user turn and one assistant turn.

Every record is rendered with the model's chat format through `ChatRenderer` -- the same object
serving uses, so training and serving prompts cannot drift apart -- and the loss covers the
assistant turns only: the tokens a conversation gains when an assistant message is appended to
the prompt that asks for it, up to and including the end-of-turn token.

All records are checked before anything is trained; `DataError` lists every bad record as
``file:line: reason``. Records longer than ``max_seq_len`` are an error unless the caller asks
to drop or truncate them, and each such record is reported either way.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

logger = logging.getLogger("inhouse.finetune")

IGNORE = -100  # target id that carries no loss (as in torch's cross_entropy ignore_index)
ROLES = ("system", "user", "assistant", "tool", "ipython")
OVERLONG_POLICIES = ("error", "drop", "truncate")


class DataError(ValueError):
    """Bad training data; ``problems`` holds ``(file, line, reason)`` for each bad record."""

    def __init__(self, problems: list[tuple[str, int, str]], hint: str = ""):
        self.problems = problems
        shown = problems[:50]
        lines = [f"{f}:{n}: {r}" for f, n, r in shown]
        if len(problems) > len(shown):
            lines.append(f"... and {len(problems) - len(shown)} more")
        head = f"{len(problems)} bad record(s)" + (f" ({hint})" if hint else "")
        super().__init__(head + ":\n" + "\n".join(lines))


@dataclass
class Example:
    """One rendered record: ``ids`` and, for each id, whether it is a target of the loss."""

    ids: list[int]
    loss_mask: list[bool]
    source: str  # "file:line"

    @property
    def n_targets(self) -> int:
        return sum(self.loss_mask[1:])


@dataclass
class Dataset:
    """Rendered examples of one file, with what was done to them."""

    path: str
    examples: list[Example]
    n_records: int
    sha256: str
    dropped: list[str] = field(default_factory=list)  # "file:line (N tokens)"
    truncated: list[str] = field(default_factory=list)

    @property
    def n_tokens(self) -> int:
        return sum(len(e.ids) for e in self.examples)


# --------------------------------------------------------------------------- validation
def _check_tool_call(tc: Any, where: str) -> Optional[str]:
    if not isinstance(tc, dict):
        return f"{where} must be an object, got {type(tc).__name__}"
    fn = tc.get("function", tc)
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn.get("name"):
        return f"{where}.function.name must be a non-empty string"
    args = fn.get("arguments", {})
    if not isinstance(args, (str, dict)):
        return f"{where}.function.arguments must be a JSON string or an object, got {type(args).__name__}"
    return None


def _check_message(m: Any, i: int) -> Optional[str]:
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        return f"{where} must be an object, got {type(m).__name__}"
    if "role" not in m:
        return f"{where} has no 'role'"
    role = m["role"]
    if not isinstance(role, str) or role not in ROLES:
        return f"{where}.role={role!r}; expected one of {', '.join(ROLES)}"
    c = m.get("content")
    if c is not None and not isinstance(c, (str, list)):
        return f"{where}.content must be a string or a list of parts, got {type(c).__name__}"
    if isinstance(c, list):
        for j, part in enumerate(c):
            if not isinstance(part, dict) or part.get("type", "text") != "text" or not isinstance(part.get("text"), str):
                return f"{where}.content[{j}] must be a text part {{'type': 'text', 'text': '...'}}"
    tcs = m.get("tool_calls")
    if tcs is not None:
        if role != "assistant":
            return f"{where}: only assistant messages have tool_calls (role is {role!r})"
        if not isinstance(tcs, list):
            return f"{where}.tool_calls must be a list, got {type(tcs).__name__}"
        for j, tc in enumerate(tcs):
            err = _check_tool_call(tc, f"{where}.tool_calls[{j}]")
            if err:
                return err
    text = c if isinstance(c, str) else "".join(p["text"] for p in c) if isinstance(c, list) else ""
    if role == "assistant" and not text.strip() and not tcs:
        return f"{where}: empty assistant turn (no content and no tool_calls)"
    if role != "assistant" and c is None:
        return f"{where} ({role}) has no 'content'"
    if "weight" in m and (m["weight"] not in (0, 1) or isinstance(m["weight"], bool)):
        return f"{where}.weight={m['weight']!r}; expected 0 or 1"
    if "weight" in m and role != "assistant":
        return f"{where}: 'weight' is only allowed on assistant messages"
    return None


def validate_record(rec: Any) -> Optional[str]:
    """Why a decoded JSON record is not a usable training record, or None when it is."""
    if not isinstance(rec, dict):
        return f"a record must be a JSON object, got {type(rec).__name__}"
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            return "'messages' must be a non-empty list"
        for i, m in enumerate(msgs):
            err = _check_message(m, i)
            if err:
                return err
        if not any(m["role"] == "assistant" and m.get("weight", 1) for m in msgs):
            return "no assistant turn to learn from"
        tools = rec.get("tools")
        if tools is not None and not isinstance(tools, list):
            return f"'tools' must be a list, got {type(tools).__name__}"
        return None
    if "prompt" in rec or "completion" in rec:
        for key in ("prompt", "completion"):
            if key not in rec:
                return f"missing '{key}'"
            if not isinstance(rec[key], str):
                return f"'{key}' must be a string, got {type(rec[key]).__name__}"
        if not rec["completion"].strip():
            return "empty assistant turn ('completion' is empty)"
        return None
    return "a record needs 'messages' (chat) or 'prompt' and 'completion'"


def read_records(path: str) -> tuple[list[tuple[int, dict]], list[tuple[str, int, str]], str]:
    """Read a JSONL file: ``(records with their line numbers, problems, sha256 of the file)``.

    Blank lines are skipped; every other line must be a valid record (`validate_record`).

    Raises:
        DataError: the file cannot be read or is empty.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError([(path, 0, f"cannot read: {e.strerror}")]) from None
    digest = hashlib.sha256(raw).hexdigest()
    records, problems = [], []
    for n, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append((path, n, f"bad JSON: {e.msg} at column {e.colno}"))
            continue
        err = validate_record(rec)
        if err:
            problems.append((path, n, err))
        else:
            records.append((n, rec))
    if not records and not problems:
        problems.append((path, 0, "no records (the file is empty)"))
    return records, problems, digest


# --------------------------------------------------------------------------- rendering
def record_messages(rec: dict) -> list[dict]:
    """The conversation of a validated record (prompt/completion becomes user + assistant)."""
    if "messages" in rec:
        return rec["messages"]
    return [{"role": "user", "content": rec["prompt"]}, {"role": "assistant", "content": rec["completion"]}]


def _clean(m: dict) -> dict:
    return {k: v for k, v in m.items() if k != "weight"}


def render_example(renderer, rec: dict, source: str = "") -> Example:
    """Token ids of a record in the model's chat format, with the loss on assistant turns only.

    For assistant message i, its tokens are what ``messages[:i+1]`` (no generation prompt) adds to
    ``messages[:i]`` (with the generation prompt); they must be a prefix-extension of each other and
    of the whole conversation, which holds for the Llama 3.1 format and for ordinary templates.
    Tokens after the turn's last stop token (a template's trailing newline) carry no loss.

    Args:
        renderer: a `inhouse.tokenizer.chat.ChatRenderer`.
        rec: a validated record.

    Raises:
        ValueError: the chat format cannot render the record, or does not render it incrementally.
    """
    msgs = record_messages(rec)
    tools = rec.get("tools")
    clean = [_clean(m) for m in msgs]
    full = renderer.encode(clean, tools=tools, add_generation_prompt=False)
    mask = [False] * len(full)
    stops = renderer.stop_ids
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        if i == 0:
            raise ValueError("a conversation cannot start with an assistant turn")
        before = renderer.encode(clean[:i], tools=tools, add_generation_prompt=True)
        upto = renderer.encode(clean[:i + 1], tools=tools, add_generation_prompt=False)
        if upto[:len(before)] != before or full[:len(upto)] != upto:
            raise ValueError("the chat format does not render this conversation incrementally, so the "
                             "assistant tokens cannot be located")
        span = list(range(len(before), len(upto)))
        last_stop = max((j for j in span if full[j] in stops), default=None)
        if last_stop is not None:
            span = [j for j in span if j <= last_stop]
        if m.get("weight", 1):
            for j in span:
                mask[j] = True
    return Example(full, mask, source)


def load_dataset(path: str, renderer, max_seq_len: int, overlong: str = "error") -> Dataset:
    """Validate, render and length-check every record of a JSONL file.

    Args:
        path: the JSONL file.
        renderer: the model's `ChatRenderer`.
        max_seq_len: most tokens of one example.
        overlong: what to do with longer records: "error" (default), "drop" or "truncate"
            (keep the first max_seq_len tokens). Each dropped/truncated record is logged.

    Raises:
        DataError: any bad record (all of them are listed), or over-long records with "error".
    """
    if overlong not in OVERLONG_POLICIES:
        raise ValueError(f"overlong={overlong!r}; expected one of {', '.join(OVERLONG_POLICIES)}")
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len={max_seq_len}; need at least 2 tokens")
    records, problems, digest = read_records(path)
    examples: list[Example] = []
    for n, rec in records:
        try:
            examples.append(render_example(renderer, rec, f"{path}:{n}"))
        except ValueError as e:  # TokenizerError, ChatFormatError, template errors
            problems.append((path, n, f"cannot render with the model's chat format: {e}"))
        except Exception as e:  # jinja raises its own exception types
            problems.append((path, n, f"cannot render with the model's chat format: {type(e).__name__}: {e}"))
    if problems:
        raise DataError(problems)
    long = [e for e in examples if len(e.ids) > max_seq_len]
    ds = Dataset(path, [], len(records), digest)
    if long and overlong == "error":
        raise DataError([(e.source.rsplit(":", 1)[0], int(e.source.rsplit(":", 1)[1]),
                          f"{len(e.ids)} tokens, more than max_seq_len={max_seq_len}") for e in long],
                        hint="raise --max-seq-len, or pass --overlong drop|truncate")
    for e in examples:
        if len(e.ids) <= max_seq_len:
            ds.examples.append(e)
            continue
        if overlong == "truncate":
            cut = Example(e.ids[:max_seq_len], e.loss_mask[:max_seq_len], e.source)
            if cut.n_targets:
                logger.warning("%s: %d tokens, truncated to max_seq_len=%d", e.source, len(e.ids), max_seq_len)
                ds.truncated.append(f"{e.source} ({len(e.ids)} tokens)")
                ds.examples.append(cut)
                continue
            logger.warning("%s: %d tokens; truncated to %d nothing is left to learn from: dropped",
                           e.source, len(e.ids), max_seq_len)
        else:
            logger.warning("%s: %d tokens, more than max_seq_len=%d: dropped", e.source, len(e.ids), max_seq_len)
        ds.dropped.append(f"{e.source} ({len(e.ids)} tokens)")
    if not ds.examples:
        raise DataError([(path, 0, "no example is left after dropping over-long records")])
    if ds.dropped or ds.truncated:
        logger.warning("%s: %d record(s) dropped, %d truncated (max_seq_len=%d)", path, len(ds.dropped),
                       len(ds.truncated), max_seq_len)
    return ds


# --------------------------------------------------------------------------- batching
@dataclass
class Batch:
    """One micro-batch.

    tokens, targets, positions: (B, T) int64; targets are the next token or `IGNORE`.
    doc_ids: (B, T) int64 when rows pack several examples (attention stays inside one), else None.
    """

    tokens: torch.Tensor
    targets: torch.Tensor
    positions: torch.Tensor
    doc_ids: Optional[torch.Tensor]

    @property
    def n_targets(self) -> int:
        return int((self.targets != IGNORE).sum())

    @property
    def n_tokens(self) -> int:
        """Real (non-padding) input tokens."""
        return int((self.positions >= 0).sum())


def _shifted(e: Example) -> tuple[list[int], list[int]]:
    """Inputs ids[:-1] and targets ids[1:] (IGNORE where no loss)."""
    inputs = e.ids[:-1]
    targets = [t if m else IGNORE for t, m in zip(e.ids[1:], e.loss_mask[1:])]
    return inputs, targets


def _rows_to_batch(rows: list[list[tuple[list[int], list[int]]]], pad_id: int) -> Batch:
    T = max(sum(len(i) for i, _ in row) for row in rows)
    B = len(rows)
    tokens = torch.full((B, T), pad_id, dtype=torch.long)
    targets = torch.full((B, T), IGNORE, dtype=torch.long)
    positions = torch.full((B, T), -1, dtype=torch.long)
    docs = torch.full((B, T), -1, dtype=torch.long)
    packed = False
    for b, row in enumerate(rows):
        packed |= len(row) > 1
        at = 0
        for d, (inp, tgt) in enumerate(row):
            n = len(inp)
            tokens[b, at:at + n] = torch.tensor(inp)
            targets[b, at:at + n] = torch.tensor(tgt)
            positions[b, at:at + n] = torch.arange(n)
            docs[b, at:at + n] = d
            at += n
    return Batch(tokens, targets, positions, docs if packed else None)


def plan_epoch(examples: list[Example], *, batch_size: int, max_seq_len: int, packing: bool, seed: int,
               epoch: int, pad_id: int = 0) -> list[Batch]:
    """The micro-batches of one epoch, in a shuffled order that depends only on (seed, epoch).

    Without packing each row is one example, padded (on the right) to the batch's longest row.
    With packing, examples are laid end to end into rows of at most ``max_seq_len - 1`` inputs
    (first fit, in shuffled order), each keeping its own positions 0..n-1 and attending only to
    itself.
    """
    order = list(range(len(examples)))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    items = [_shifted(examples[i]) for i in order]
    items = [it for it in items if any(t != IGNORE for t in it[1])]
    rows: list[list[tuple[list[int], list[int]]]] = []
    if packing:
        cap = max_seq_len - 1
        room: list[int] = []
        for it in items:
            n = len(it[0])
            for r, free in enumerate(room):
                if n <= free:
                    rows[r].append(it)
                    room[r] -= n
                    break
            else:
                rows.append([it])
                room.append(cap - n)
    else:
        rows = [[it] for it in items]
    return [_rows_to_batch(rows[i:i + batch_size], pad_id) for i in range(0, len(rows), batch_size)]


def file_sha256(path: str, chunk: int = 1 << 24) -> str:
    """sha256 of a file (or of a directory's regular files, by sorted name)."""
    h = hashlib.sha256()
    paths = [path] if os.path.isfile(path) else sorted(
        os.path.join(path, n) for n in os.listdir(path) if os.path.isfile(os.path.join(path, n)))
    for p in paths:
        if os.path.isdir(path):
            h.update(os.path.basename(p).encode() + b"\0")
        with open(p, "rb") as f:
            while True:
                b = f.read(chunk)
                if not b:
                    break
                h.update(b)
    return h.hexdigest()


__all__ = ["IGNORE", "DataError", "Example", "Dataset", "Batch", "validate_record", "read_records",
           "record_messages", "render_example", "load_dataset", "plan_epoch", "file_sha256"]
