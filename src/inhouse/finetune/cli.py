"""The ``inhouse finetune`` and ``inhouse merge`` verbs (parsers and plain functions).

Kept here so that `inhouse.cli` only registers them; importing this module imports no torch.
"""

from __future__ import annotations

import argparse
import sys
import time

DEFAULTS_HELP = "(default: %(default)s)"


def add_parsers(sub, common: argparse.ArgumentParser) -> None:
    """Register ``finetune`` and ``merge`` on the `inhouse` command's subparsers."""
    f = sub.add_parser("finetune", help="fine-tune a model on your chat data (LoRA, QLoRA or full)", parents=[common],
                       description="Fine-tune MODEL (default: the embedded SmolLM2-135M-Instruct) on chat JSONL. "
                                   "LoRA/QLoRA write a PEFT adapter to --out; full writes HF safetensors.")
    f.add_argument("model", nargs="?", default=None)
    f.add_argument("--data", required=True, metavar="JSONL", help='training records: {"messages": [...]} or {"prompt", "completion"}')
    f.add_argument("--eval-data", default=None, metavar="JSONL", help="records for the eval loss")
    f.add_argument("--out", default=None, metavar="DIR", help="output directory (default: finetune-out)")
    f.add_argument("--method", default="lora", choices=["lora", "qlora", "full"], help=DEFAULTS_HELP)
    g = f.add_argument_group("LoRA")
    g.add_argument("--rank", "-r", type=int, default=16, help=DEFAULTS_HELP)
    g.add_argument("--alpha", type=float, default=32.0, help=DEFAULTS_HELP)
    g.add_argument("--dropout", type=float, default=0.0, help=DEFAULTS_HELP)
    g.add_argument("--target-modules", default="all", help="comma-separated: wq,wk,wv,wo,w1,w2,w3 (or q_proj,...), or all "
                   + DEFAULTS_HELP)
    g.add_argument("--rslora", action="store_true", help="rank-stabilised scaling alpha/sqrt(r)")
    t = f.add_argument_group("training")
    t.add_argument("--lr", type=float, default=None, help="learning rate (default: 2e-4 LoRA/QLoRA, 2e-5 full)")
    t.add_argument("--weight-decay", type=float, default=0.0, help=DEFAULTS_HELP)
    t.add_argument("--warmup-steps", type=int, default=None, help="default: 5%% of the steps")
    t.add_argument("--epochs", type=int, default=3, help=DEFAULTS_HELP)
    t.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps (overrides --epochs)")
    t.add_argument("--max-seq-len", type=int, default=1024, help=DEFAULTS_HELP)
    t.add_argument("--batch-size", type=int, default=4, help=DEFAULTS_HELP)
    t.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step " + DEFAULTS_HELP)
    t.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping, 0 = off " + DEFAULTS_HELP)
    t.add_argument("--seed", type=int, default=0, help=DEFAULTS_HELP)
    t.add_argument("--packing", action="store_true", help="pack several examples per row (attention stays within each)")
    t.add_argument("--overlong", default="error", choices=["error", "drop", "truncate"],
                   help="records longer than --max-seq-len " + DEFAULTS_HELP)
    t.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward (less memory)")
    t.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="auto: bf16 autocast where the hardware has bf16 units " + DEFAULTS_HELP)
    t.add_argument("--eval-every", type=int, default=None, metavar="N", help="eval loss every N steps (and at the end)")
    t.add_argument("--save-every", type=int, default=None, metavar="N", help="checkpoint every N steps")
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    f.add_argument("--chat-format", default="auto", choices=["auto", "llama3", "template"])
    f.add_argument("--chat-template", default=None, metavar="FILE")
    f.set_defaults(func=cmd_finetune)

    m = sub.add_parser("merge", help="fold a LoRA adapter into its base, write HF safetensors", parents=[common])
    m.add_argument("model", help="the base MODEL the adapter was trained on ('' or 'embedded' for the embedded model)")
    m.add_argument("adapter", help="PEFT adapter directory")
    m.add_argument("--out", required=True, metavar="DIR")
    m.add_argument("--dtype", default="auto", help="dtype of the written weights (auto: fp32 for fp32 bases, else bf16)")
    m.set_defaults(func=cmd_merge)


class _Bar:
    """One-line progress on stderr: step, loss, lr, tokens/s, ETA."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.tty = sys.stderr.isatty()

    def __call__(self, s) -> None:
        if self.quiet:
            return
        if s.epoch < 0:
            sys.stderr.write(("\n" if self.tty else "") + f"final eval loss {s.eval_loss:.4f}\n")
            return
        width = 24
        done = int(width * s.step / s.total_steps)
        eta = time.strftime("%M:%S", time.gmtime(s.eta_s)) if s.eta_s < 3600 else f"{s.eta_s / 3600:.1f}h"
        ev = f" eval {s.eval_loss:.3f}" if s.eval_loss is not None else ""
        line = (f"[{'#' * done}{'.' * (width - done)}] step {s.step}/{s.total_steps} loss {s.loss:.4f}{ev} "
                f"lr {s.lr:.2e} {s.tokens_per_s:.0f} tok/s ETA {eta}")
        sys.stderr.write(("\r" + line) if self.tty else line + "\n")
        sys.stderr.flush()


def cmd_finetune(a: argparse.Namespace) -> int:
    from inhouse.finetune.recipe import FinetuneConfig, run_finetune

    template = None
    if a.chat_template:
        with open(a.chat_template, encoding="utf-8") as fh:
            template = fh.read()
    config = FinetuneConfig(
        method=a.method, rank=a.rank, alpha=a.alpha, dropout=a.dropout, targets=a.target_modules,
        use_rslora=a.rslora, lr=a.lr, weight_decay=a.weight_decay, warmup_steps=a.warmup_steps, epochs=a.epochs,
        max_steps=a.max_steps, max_seq_len=a.max_seq_len, batch_size=a.batch_size, grad_accum=a.grad_accum,
        max_grad_norm=a.max_grad_norm, seed=a.seed, packing=a.packing, overlong=a.overlong,
        eval_every=a.eval_every, save_every=a.save_every, grad_checkpointing=a.grad_checkpointing,
        precision=a.precision,
    )
    out = a.out or "finetune-out"
    res = run_finetune(a.model or None, a.data, out, config, eval_data=a.eval_data, resume=a.resume,
                       chat_format=a.chat_format, chat_template=template, on_step=_Bar(a.quiet))
    if sys.stderr.isatty() and not a.quiet:
        sys.stderr.write("\n")
    what = "HF checkpoint" if a.method == "full" else "adapter"
    ev = f", eval loss {res.final_eval_loss:.4f}" if res.final_eval_loss is not None else ""
    print(f"wrote {what} to {out} ({res.steps} steps, train loss {res.final_train_loss:.4f}{ev}, "
          f"{res.seconds:.0f} s)")
    return 0


def cmd_merge(a: argparse.Namespace) -> int:
    from inhouse.finetune.merge import merge_adapter

    model = None if a.model in ("", "embedded") else a.model
    out = merge_adapter(model, a.adapter, a.out, dtype=a.dtype)
    print(f"wrote merged model to {out}")
    return 0
