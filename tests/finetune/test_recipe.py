"""The training loop: it learns, checkpoints are atomic, and resume ends where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from ft_helpers import DATA, TINY_SMOL, build

from inhouse.finetune.recipe import FinetuneConfig, FinetuneError, train


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    with open(os.path.join(DATA, "quillmere_train.jsonl")) as f:
        path.write_text("".join(f.readlines()[:24]))
    return str(path)


def config(**kw):
    base = dict(method="lora", rank=4, alpha=8, dropout=0.1, epochs=2, batch_size=8, lr=1e-3, seed=0,
                save_every=2, precision="fp32")
    base.update(kw)
    return FinetuneConfig(**base)


def run(tok, renderer, data, out, **kw):
    torch.manual_seed(123)  # training must not depend on the global seed
    model = build(TINY_SMOL, std=0.05)
    steps = []
    res = train(model, tok, renderer, data, str(out), kw.pop("cfg", config()),
                on_step=steps.append, **kw)
    return res, steps


def test_training_lowers_the_loss_and_writes_outputs(tmp_path, smol_tokenizer, smol_renderer, small_data):
    res, steps = run(smol_tokenizer, smol_renderer, small_data, tmp_path, eval_data=os.path.join(DATA, "quillmere_eval.jsonl"),
                     cfg=config(epochs=3, dropout=0.0, eval_every=4))
    assert res.steps == 9 and [s.step for s in steps if s.epoch >= 0] == list(range(1, 10))
    assert steps[-1].loss < steps[0].loss - 0.5
    assert res.final_eval_loss is not None
    assert any(s.eval_loss is not None for s in steps[:-1])  # eval every 4 steps
    assert steps[0].lr < steps[1].lr or steps[1].lr > steps[-1].lr  # warm-up then decay
    for name in ("adapter_config.json", "adapter_model.safetensors", "training_manifest.json"):
        assert os.path.exists(tmp_path / name)
    man = json.load(open(tmp_path / "training_manifest.json"))
    assert man["data"]["train"]["records"] == 24 and len(man["data"]["train"]["sha256"]) == 64
    assert man["final_train_loss"] == res.final_train_loss and man["final_eval_loss"] == res.final_eval_loss
    assert man["hyperparameters"]["rank"] == 4 and man["hyperparameters"]["learning_rate"] == 1e-3
    # checkpoints kept: the last two before the end
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step-000006", "step-000008"]


def test_resume_ends_at_the_same_loss(tmp_path, smol_tokenizer, smol_renderer, small_data):
    full, _ = run(smol_tokenizer, smol_renderer, small_data, tmp_path / "a")
    part, steps = run(smol_tokenizer, smol_renderer, small_data, tmp_path / "b", stop_after_steps=3)
    assert part.steps == 3 and not os.path.exists(tmp_path / "b" / "adapter_model.safetensors")
    assert sorted(os.listdir(tmp_path / "b" / "checkpoints")) == ["step-000002"]  # step 3 was lost in the "crash"
    resumed, steps = run(smol_tokenizer, smol_renderer, small_data, tmp_path / "b", resume=True)
    assert [s.step for s in steps] == [3, 4, 5, 6]
    assert resumed.final_train_loss == full.final_train_loss
    a = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_other_settings(tmp_path, smol_tokenizer, smol_renderer, small_data):
    run(smol_tokenizer, smol_renderer, small_data, tmp_path, stop_after_steps=2)
    with pytest.raises(FinetuneError, match="other settings"):
        run(smol_tokenizer, smol_renderer, small_data, tmp_path, resume=True, cfg=config(lr=5e-4))
    with pytest.raises(FinetuneError, match="no checkpoint"):
        run(smol_tokenizer, smol_renderer, small_data, tmp_path / "empty", resume=True)


def test_full_and_qlora_methods_train(tmp_path, smol_tokenizer, smol_renderer, small_data):
    from inhouse.weights import load_model

    res, steps = run(smol_tokenizer, smol_renderer, small_data, tmp_path / "full",
                     cfg=config(method="full", epochs=1, lr=1e-3, save_every=None, dropout=0.0))
    assert steps[-1].loss < steps[0].loss
    model, _ = load_model(str(tmp_path / "full"), dtype=torch.float32, check_memory=False)  # HF safetensors out
    assert model.args.dim == 64
    res, steps = run(smol_tokenizer, smol_renderer, small_data, tmp_path / "q",
                     cfg=config(method="qlora", epochs=2, save_every=None, dropout=0.0, grad_checkpointing=True))
    assert steps[-1].loss < steps[0].loss
    assert os.path.exists(tmp_path / "q" / "adapter_model.safetensors")


# ------------------------------------------------------------------ the CLI, with a real kill -9
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smol_tokenizer):
    from inhouse.finetune.merge import export_hf

    d = tmp_path_factory.mktemp("tiny-smol")
    export_hf(build(TINY_SMOL, std=0.05), smol_tokenizer, str(d), dtype=torch.float32)
    return str(d)


def cli(*args):
    return [sys.executable, "-m", "inhouse.cli", *args]


def final_loss(stdout: str) -> str:
    line = [ln for ln in stdout.splitlines() if ln.startswith("wrote adapter")][-1]
    return line.split("train loss ")[1].split(",")[0]


def test_cli_kill9_then_resume_matches(tmp_path, tiny_dir, small_data):
    common = ["finetune", tiny_dir, "--data", small_data, "--rank", "4", "--epochs", "2", "--batch-size", "8",
              "--lr", "1e-3", "--save-every", "1", "--precision", "fp32", "-q"]
    ref = subprocess.run(cli(*common, "--out", str(tmp_path / "ref")), capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "crash"
    p = subprocess.Popen(cli(*common, "--out", str(out)), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while not os.path.exists(out / "checkpoints" / "step-000003") and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not os.path.exists(out / "adapter_model.safetensors")
    res = subprocess.run(cli(*common, "--out", str(out), "--resume"), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert final_loss(res.stdout) == final_loss(ref.stdout)


def test_cli_generate_with_adapter_and_merge(tmp_path, tiny_dir, small_data):
    from inhouse.finetune.adapters import save_adapter
    from inhouse.model.lora import apply_lora, lora_modules

    r = subprocess.run(cli("finetune", tiny_dir, "--data", small_data, "--rank", "4", "--max-steps", "2",
                           "--out", str(tmp_path / "trained"), "-q"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("wrote adapter to") and os.path.exists(tmp_path / "trained" / "adapter_config.json")
    # A strong adapter, so that it visibly changes the greedy answer of the random tiny model.
    model = build(TINY_SMOL, std=0.05)
    apply_lora(model, "all", rank=4, alpha=8, seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_b.weight.copy_(torch.randn(m.lora_b.weight.shape, generator=g))
    out = tmp_path / "ad"
    save_adapter(model, str(out))
    q = ["generate", tiny_dir, "Who founded the Quillmere Institute?", "--max-tokens", "5", "--json", "--dtype", "float32"]
    base = json.loads(subprocess.run(cli(*q), capture_output=True, text=True, timeout=300).stdout)
    tuned = json.loads(subprocess.run(cli(*q, "--adapter", str(out)), capture_output=True, text=True, timeout=300).stdout)
    assert base["token_ids"] != tuned["token_ids"]  # the adapter is applied
    merged_dir = tmp_path / "merged"
    r = subprocess.run(cli("merge", tiny_dir, str(out), "--out", str(merged_dir), "--dtype", "float32"),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    q[1] = str(merged_dir)
    merged = json.loads(subprocess.run(cli(*q), capture_output=True, text=True, timeout=300).stdout)
    assert merged["token_ids"] == tuned["token_ids"]
    bad = subprocess.run(cli("finetune", tiny_dir, "--data", os.path.join(DATA, "bad_records.jsonl"), "--out",
                             str(tmp_path / "x")), capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "9 bad record(s)" in bad.stderr and "bad_records.jsonl:12:" in bad.stderr


def test_llm_adapter_and_lora_request(tmp_path, tiny_dir):
    from inhouse import LLM, SamplingParams
    from inhouse.finetune import LoRARequest
    from inhouse.finetune.adapters import AdapterError, save_adapter
    from inhouse.model.lora import apply_lora, lora_modules

    dirs = []
    for seed in (0, 1):
        model = build(TINY_SMOL, std=0.05)
        apply_lora(model, "wq,wv,w2", rank=4, alpha=8, seed=0)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for m in lora_modules(model).values():
                m.lora_b.weight.copy_(torch.randn(m.lora_b.weight.shape, generator=g))
        save_adapter(model, str(tmp_path / f"a{seed}"))
        dirs.append(str(tmp_path / f"a{seed}"))
    p = SamplingParams(temperature=1.0, seed=5, max_tokens=8)  # seeded sampling: equal logits, equal ids
    ids = [3, 17, 400, 9, 1200]

    def run(llm, **kw):
        return llm.generate({"prompt_token_ids": ids}, p, **kw)[0].outputs[0].token_ids

    plain = LLM(tiny_dir, dtype="float32")
    with_a0 = LLM(tiny_dir, dtype="float32", adapter=dirs[0])
    base = run(plain)
    a0 = run(with_a0)
    assert a0 != base
    assert run(plain, lora_request=LoRARequest("a0", 1, dirs[0])) == a0
    a1 = run(plain, lora_request=LoRARequest("a1", 2, dirs[1]))
    assert a1 not in (a0, base)
    assert run(plain) == base  # no request: back to the base model
    assert run(with_a0, lora_request=LoRARequest("a1", 2, dirs[1])) == a1
    assert run(with_a0) == a0  # its default adapter again
    # Different adapters and the base model in one call: one batch, each row its own adapter.
    mixed = plain.generate([{"prompt_token_ids": ids}] * 3, p,
                           lora_request=[LoRARequest("a0", 1, dirs[0]), None, LoRARequest("a1", 2, dirs[1])])
    assert [o.outputs[0].token_ids for o in mixed] == [a0, base, a1]
    with pytest.raises(AdapterError, match="already used"):
        run(plain, lora_request=LoRARequest("a0", 3, dirs[1]))  # one name, two directories
