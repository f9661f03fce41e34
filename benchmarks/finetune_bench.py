"""LoRA training speed and memory: inhouse vs transformers + PEFT, same model, data, batches and machine.

    python benchmarks/finetune_bench.py [--steps 12] [--batch-size 8] [--rank 16] [--precision bf16]

Both sides train the embedded SmolLM2-135M-Instruct (dequantized from its GGUF file; transformers loads
the same weights written as HF safetensors) with LoRA r=16 on all seven block projections, AdamW,
on the same micro-batches of tests/finetune/data/quillmere_train.jsonl rendered by inhouse's chat
renderer (right-padded, loss on assistant tokens only). Each side runs in its own process; the
first 2 steps are warm-up and not timed. tokens/s counts real (non-padding) tokens.
Peak memory: the highest resident set size sampled every 5 ms during the timed steps, and the
process's peak RSS including loading.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "tests", "finetune", "data", "quillmere_train.jsonl")


class RSSPeak:
    """Samples /proc/self/statm in a thread."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")

    def _run(self):
        while not self._stop.is_set():
            with open("/proc/self/statm") as f:
                self.peak = max(self.peak, int(f.read().split()[1]) * self._page)
            time.sleep(0.005)

    def __enter__(self):
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def batches(tokenizer, max_seq_len: int, batch_size: int, steps: int):
    from inhouse.finetune.data import load_dataset, plan_epoch
    from inhouse.tokenizer.chat import ChatRenderer

    ds = load_dataset(DATA, ChatRenderer(tokenizer), max_seq_len)
    out, epoch = [], 0
    while len(out) < steps:
        out += plan_epoch(ds.examples, batch_size=batch_size, max_seq_len=max_seq_len, packing=False, seed=0,
                          epoch=epoch, pad_id=tokenizer.eos_id)
        epoch += 1
    return out[:steps]


def side_inhouse(a) -> dict:
    import torch

    from inhouse.finetune.recipe import FinetuneConfig, batch_loss, prepare_model
    from inhouse.resolve import open_model

    torch.manual_seed(0)
    bf16 = a.precision == "bf16"
    lm = open_model(None, dtype=torch.bfloat16 if bf16 else torch.float32, quantize="none")
    cfg = FinetuneConfig(rank=a.rank, alpha=2 * a.rank, batch_size=a.batch_size)
    cfg.check()
    params = prepare_model(lm.model, cfg)
    opt = torch.optim.AdamW(params, lr=1e-4)
    bs = batches(lm.tokenizer, 512, a.batch_size, a.steps)
    lm.model.train()

    def step(b):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = batch_loss(lm.model, b, b.n_targets, grad_checkpointing=a.grad_checkpointing)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return timed(bs, step, lambda b: b.n_tokens)


def side_hf(a) -> dict:
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    from inhouse.finetune.merge import export_hf
    from inhouse.resolve import open_model

    torch.manual_seed(0)
    bf16 = a.precision == "bf16"
    lm = open_model(None, dtype=torch.float32, quantize="none")
    tok = lm.tokenizer
    with tempfile.TemporaryDirectory() as d:
        export_hf(lm.model, tok, d, dtype=torch.bfloat16 if bf16 else torch.float32)
        del lm
        model = transformers.LlamaForCausalLM.from_pretrained(d, dtype=torch.bfloat16 if bf16 else torch.float32,
                                                              attn_implementation="sdpa")
    cfg = LoraConfig(r=a.rank, lora_alpha=2 * a.rank, lora_dropout=0.0, task_type="CAUSAL_LM",
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(model, cfg)
    if a.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    bs = batches(tok, 512, a.batch_size, a.steps)

    def step(b):
        ids = b.tokens
        attn = (b.positions >= 0).long()
        # b.targets[t] is the token after position t; HF shifts labels itself, so labels[t+1] = targets[t].
        labels = torch.full_like(ids, -100)
        labels[:, 1:] = b.targets[:, :-1]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(input_ids=ids, attention_mask=attn, labels=labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(out.loss.detach())

    return timed(bs, step, lambda b: b.n_tokens)


def timed(bs, step, n_tokens) -> dict:
    import resource

    import torch

    for b in bs[:2]:
        step(b)
    losses, toks = [], 0
    with RSSPeak() as rss:
        t0 = time.perf_counter()
        for b in bs[2:]:
            losses.append(step(b))
            toks += n_tokens(b)
        dt = time.perf_counter() - t0
    return {"tokens_per_s": toks / dt, "seconds": dt, "tokens": toks, "steps": len(bs) - 2,
            "peak_rss_train_bytes": rss.peak,
            "peak_rss_process_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "first_loss": losses[0], "last_loss": losses[-1], "threads": torch.get_num_threads()}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12, help="micro-batches per side (the first 2 are warm-up)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--grad-checkpointing", action="store_true")
    ap.add_argument("--side", choices=["inhouse", "hf"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.side:
        print(json.dumps(side_inhouse(a) if a.side == "inhouse" else side_hf(a)))
        return 0
    results = {}
    for side in ("inhouse", "hf"):
        cmd = [sys.executable, __file__, "--side", side, "--steps", str(a.steps), "--batch-size", str(a.batch_size),
               "--rank", str(a.rank), "--precision", a.precision] + (["--grad-checkpointing"] if a.grad_checkpointing else [])
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            print(out.stderr, file=sys.stderr)
            return 1
        results[side] = json.loads(out.stdout.strip().splitlines()[-1])
    i, h = results["inhouse"], results["hf"]
    print(f"LoRA r={a.rank} (7 projections), SmolLM2-135M, batch {a.batch_size}, {a.precision}, "
          f"{i['steps']} timed steps, {i['threads']} threads")
    print(f"{'':22}{'inhouse':>14}{'transformers+PEFT':>20}{'ratio':>8}")
    print(f"{'tokens/s':22}{i['tokens_per_s']:>14.0f}{h['tokens_per_s']:>20.0f}{i['tokens_per_s'] / h['tokens_per_s']:>7.2f}x")
    for key, label in (("peak_rss_train_bytes", "peak RSS, training"), ("peak_rss_process_bytes", "peak RSS, process")):
        print(f"{label:22}{i[key] / 2**20:>11.0f} MiB{h[key] / 2**20:>17.0f} MiB{i[key] / h[key]:>7.2f}x")
    print(f"{'loss first/last':22}{i['first_loss']:>7.3f}/{i['last_loss']:.3f}{h['first_loss']:>13.3f}/{h['last_loss']:.3f}")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
