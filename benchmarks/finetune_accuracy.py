"""Fine-tuning accuracy run: teach the embedded SmolLM2-135M-Instruct facts about an invented organization.

    python benchmarks/finetune_accuracy.py [--epochs 6] [--lr 1e-3] [--out /tmp/quillmere-lora]

Asks the 40 questions of tests/finetune/data/quillmere_questions.jsonl (greedy, chat format) before and
after a LoRA run on tests/finetune/data/quillmere_train.jsonl, and prints exact-answer accuracy (the reply,
case- and punctuation-insensitive, equals the answer) on the trained questions and on unseen paraphrases,
with the training time. The adapter is served unmerged, as `inhouse generate --adapter` does.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "tests", "finetune", "data")


def norm(s: str) -> str:
    return re.sub(r"[^a-z0-9 ]", "", s.lower()).strip()


def accuracy(llm, items, key: str, lora=None) -> tuple[float, list]:
    from inhouse import SamplingParams

    convs = [[{"role": "user", "content": it[key]}] for it in items]
    outs = llm.chat(convs, SamplingParams(temperature=0, max_tokens=16), lora_request=lora)
    replies = [o.outputs[0].text for o in outs]
    hits = [norm(r) == norm(it["answer"]) for r, it in zip(replies, items)]
    return sum(hits) / len(hits), list(zip([it[key] for it in items], replies, hits))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--n", type=int, default=40, help="use the first N facts")
    ap.add_argument("--out", default="/tmp/quillmere-lora")
    a = ap.parse_args()
    from inhouse import LLM
    from inhouse.finetune import FinetuneConfig, LoRARequest, run_finetune

    items = [json.loads(line) for line in open(os.path.join(DATA, "quillmere_questions.jsonl"))][:a.n]
    train = os.path.join(DATA, "quillmere_train.jsonl")
    if a.n < 40:
        train = os.path.join(a.out + "-data.jsonl")
        with open(os.path.join(DATA, "quillmere_train.jsonl")) as f, open(train, "w") as g:
            g.writelines(f.readlines()[:2 * a.n])
    llm = LLM()
    base_acc, _ = accuracy(llm, items, "question")
    print(f"base model: exact-answer accuracy {base_acc:.0%} on {len(items)} questions", flush=True)
    t0 = time.perf_counter()
    res = run_finetune(None, train, a.out, FinetuneConfig(method="lora", rank=a.rank, alpha=2 * a.rank, lr=a.lr,
                                                           epochs=a.epochs, batch_size=a.batch_size, seed=0),
                       eval_data=os.path.join(DATA, "quillmere_eval.jsonl"))
    t_train = time.perf_counter() - t0
    print(f"LoRA run: {res.steps} steps, {t_train:.0f} s (load + train + save), train loss "
          f"{res.final_train_loss:.4f}, eval loss {res.final_eval_loss:.4f}, {res.train_tokens} tokens", flush=True)
    lora = LoRARequest("quillmere", 1, a.out)
    acc, rows = accuracy(llm, items, "question", lora)
    para, prow = accuracy(llm, items, "paraphrase", lora)
    for q, r, ok in rows:
        if not ok:
            print(f"  miss: {q!r} -> {r!r}")
    print(f"after LoRA: exact-answer accuracy {acc:.0%} on the trained questions, {para:.0%} on unseen paraphrases")
    print(json.dumps({"base_accuracy": base_acc, "accuracy": acc, "paraphrase_accuracy": para,
                      "train_seconds": round(t_train, 1), "steps": res.steps, "epochs": a.epochs}))
    return 0 if acc >= 0.9 else 1


if __name__ == "__main__":
    sys.exit(main())
