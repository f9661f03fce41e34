"""Validation (the bad-record report), rendering with the chat format, loss masks, over-long records, packing."""

from __future__ import annotations

import json
import os

import pytest
import torch

from ft_helpers import DATA, TINY_SMOL, build

from inhouse.finetune.data import IGNORE, DataError, load_dataset, plan_epoch, render_example
from inhouse.finetune.recipe import batch_loss


def masked_text(tok, ex):
    """The masked ids as runs of text, one per contiguous span."""
    spans, cur = [], []
    for t, m in zip(ex.ids, ex.loss_mask):
        if m:
            cur.append(t)
        elif cur:
            spans.append(tok.decode(cur))
            cur = []
    if cur:
        spans.append(tok.decode(cur))
    return spans


def test_bad_record_report_lists_every_bad_line(smol_renderer):
    path = os.path.join(DATA, "bad_records.jsonl")
    with pytest.raises(DataError) as ei:
        load_dataset(path, smol_renderer, 256)
    got = {line: reason for _, line, reason in ei.value.problems}
    assert sorted(got) == [2, 3, 4, 5, 7, 8, 9, 10, 12]  # 1 and 11 are good, 6 is blank
    assert "bad JSON" in got[2]
    assert "messages[0] has no 'role'" in got[3]
    assert "messages[0].content must be a string" in got[4] and "int" in got[4]
    assert "empty assistant turn" in got[5]
    assert "'completion' must be a string" in got[7]
    assert "no assistant turn" in got[8]
    assert "needs 'messages'" in got[9]
    assert "must be a JSON object" in got[10]
    assert "role='wizard'" in got[12]
    msg = str(ei.value)
    assert msg.startswith("9 bad record(s)")
    assert f"{path}:2: bad JSON" in msg and f"{path}:12: " in msg


def test_mask_covers_assistant_turns_only_template(smol_tokenizer, smol_renderer):
    rec = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Hello there"}, {"role": "user", "content": "Motto?"},
                        {"role": "assistant", "content": "Every tide remembers"}]}
    ex = render_example(smol_renderer, rec)
    assert ex.ids == smol_renderer.encode([{k: v for k, v in m.items()} for m in rec["messages"]],
                                          add_generation_prompt=False)
    assert masked_text(smol_tokenizer, ex) == ["Hello there<|im_end|>", "Every tide remembers<|im_end|>"]
    rec["messages"][2]["weight"] = 0
    assert masked_text(smol_tokenizer, render_example(smol_renderer, rec)) == ["Every tide remembers<|im_end|>"]
    pc = render_example(smol_renderer, {"prompt": "Year?", "completion": "1887"})
    assert masked_text(smol_tokenizer, pc) == ["1887<|im_end|>"]
    # The prompt part is exactly what serving sends for the same question.
    first = pc.loss_mask.index(True)
    assert pc.ids[:first] == smol_renderer.encode([{"role": "user", "content": "Year?"}])


def test_mask_llama31_native_with_tool_calls():
    from inhouse.tokenizer import llama3_tokenizer
    from inhouse.tokenizer.chat import ChatRenderer

    tok = llama3_tokenizer()
    r = ChatRenderer(tok)
    assert r.mode == "llama3"
    rec = {"messages": [
        {"role": "user", "content": "Weather in Saltreach?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"town\": \"Saltreach\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "{\"temp\": 11}"},
        {"role": "assistant", "content": "It is 11 degrees."}],
        "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a town",
                                                     "parameters": {"type": "object", "properties": {"town": {"type": "string"}}}}}]}
    ex = render_example(r, rec)
    spans = masked_text(tok, ex)
    assert len(spans) == 2
    assert "get_weather" in spans[0] and "Saltreach" in spans[0] and spans[0].endswith(("<|eot_id|>", "<|eom_id|>"))
    assert spans[1] == "It is 11 degrees.<|eot_id|>"
    assert tok.decode(ex.ids).count("<|start_header_id|>assistant") == 2


def test_overlong_records_error_drop_truncate(tmp_path, smol_renderer, caplog):
    path = tmp_path / "d.jsonl"
    long_answer = " ".join(["tide"] * 80)
    path.write_text(json.dumps({"prompt": "short", "completion": "ok"}) + "\n"
                    + json.dumps({"prompt": "long one", "completion": long_answer}) + "\n")
    with pytest.raises(DataError, match=r"d.jsonl:2: \d+ tokens, more than max_seq_len=60"):
        load_dataset(str(path), smol_renderer, 60)
    ds = load_dataset(str(path), smol_renderer, 60, overlong="drop")
    assert len(ds.examples) == 1 and len(ds.dropped) == 1 and ds.dropped[0].startswith(f"{path}:2")
    assert "dropped" in caplog.text
    ds = load_dataset(str(path), smol_renderer, 60, overlong="truncate")
    assert len(ds.examples) == 2 and len(ds.examples[1].ids) == 60 and ds.truncated


def test_packing_gives_the_same_loss_as_separate_rows(smol_renderer):
    torch.manual_seed(0)
    model = build(TINY_SMOL, std=0.05)
    ds = load_dataset(os.path.join(DATA, "quillmere_train.jsonl"), smol_renderer, 256)
    examples = ds.examples[:6]
    packed = plan_epoch(examples, batch_size=8, max_seq_len=256, packing=True, seed=0, epoch=0)
    plain = plan_epoch(examples, batch_size=8, max_seq_len=256, packing=False, seed=0, epoch=0)
    assert len(packed) == 1 and packed[0].tokens.shape[0] == 2 and packed[0].doc_ids is not None
    assert plain[0].tokens.shape[0] == 6 and plain[0].doc_ids is None
    assert packed[0].n_targets == plain[0].n_targets == sum(e.n_targets for e in examples)
    with torch.no_grad():
        a = batch_loss(model, packed[0], 1)
        b = batch_loss(model, plain[0], 1)
        # and one example at a time through the model's own forward
        c = 0.0
        for e in examples:
            logits = model(torch.tensor([e.ids[:-1]]))[0]
            tgt = torch.tensor([t if m else IGNORE for t, m in zip(e.ids[1:], e.loss_mask[1:])])
            c += float(torch.nn.functional.cross_entropy(logits, tgt, reduction="sum", ignore_index=IGNORE))
    torch.testing.assert_close(float(a), c, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(float(b), c, rtol=1e-4, atol=1e-3)


def test_epoch_order_depends_on_seed_and_epoch_only(smol_renderer):
    ds = load_dataset(os.path.join(DATA, "quillmere_train.jsonl"), smol_renderer, 256)
    a = plan_epoch(ds.examples, batch_size=4, max_seq_len=256, packing=False, seed=3, epoch=1)
    b = plan_epoch(ds.examples, batch_size=4, max_seq_len=256, packing=False, seed=3, epoch=1)
    c = plan_epoch(ds.examples, batch_size=4, max_seq_len=256, packing=False, seed=3, epoch=2)
    assert all(torch.equal(x.tokens, y.tokens) for x, y in zip(a, b))
    assert not all(x.tokens.shape == y.tokens.shape and torch.equal(x.tokens, y.tokens) for x, y in zip(a, c))
