"""The training loop: LoRA, QLoRA (NF4 base) or full fine-tuning of a Llama model on chat data.

AdamW with linear warm-up then cosine decay to zero, gradient accumulation (the loss of a step is the
mean over all its target tokens, however they are split into micro-batches), optional gradient
checkpointing (per transformer block), bf16 autocast where the CPU or GPU has bf16 matrix units.
The logits are computed only at positions that carry loss (assistant tokens), which on chat data is
most of the saving over computing (T, vocab) logits for every token.

Checkpoints (every ``save_every`` steps) hold the trainable weights, the optimizer, the step and the
RNG state; each is written to a temporary directory and renamed into place, so a crash (even
``kill -9``) leaves either the previous or the new checkpoint. ``resume=True`` continues from the
newest one; the data order depends only on (seed, epoch), so the resumed run takes the same steps
and ends at the same loss as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from inhouse.finetune.data import IGNORE, Batch, Dataset, file_sha256, load_dataset, plan_epoch
from inhouse.model.lora import DEFAULT_TARGETS, apply_lora, lora_modules, normalize_targets
from inhouse.model.transformer import rope_rotation

logger = logging.getLogger("inhouse.finetune")

METHODS = ("lora", "qlora", "full")
MANIFEST = "training_manifest.json"
CHECKPOINTS = "checkpoints"


class FinetuneError(ValueError):
    """A fine-tuning setting or state that cannot be used (the message names it)."""


@dataclass
class FinetuneConfig:
    """Hyperparameters (the CLI's flags). ``lr`` None: 2e-4 for LoRA/QLoRA, 2e-5 for full."""

    method: str = "lora"
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    use_rslora: bool = False
    lr: Optional[float] = None
    weight_decay: float = 0.0
    warmup_steps: Optional[int] = None  # None: 5% of the steps (at least 1)
    epochs: int = 3
    max_steps: Optional[int] = None
    max_seq_len: int = 1024
    batch_size: int = 4
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    seed: int = 0
    packing: bool = False
    overlong: str = "error"
    eval_every: Optional[int] = None
    save_every: Optional[int] = None
    keep_checkpoints: int = 2
    grad_checkpointing: bool = False
    precision: str = "auto"  # auto | bf16 | fp32

    def check(self) -> None:
        if self.method not in METHODS:
            raise FinetuneError(f"method={self.method!r}; expected one of {', '.join(METHODS)}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise FinetuneError(f"precision={self.precision!r}; expected auto, bf16 or fp32")
        for name in ("rank", "epochs", "max_seq_len", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise FinetuneError(f"{name}={getattr(self, name)} must be at least 1")
        for name in ("max_steps", "eval_every", "save_every"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise FinetuneError(f"{name}={v} must be at least 1 (or not given)")
        if self.lr is not None and not self.lr > 0:
            raise FinetuneError(f"lr={self.lr} must be positive")
        self.targets = normalize_targets(self.targets)

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (2e-5 if self.method == "full" else 2e-4)

    def fingerprint(self) -> str:
        """What a resumed run must share with the interrupted one."""
        d = dataclasses.asdict(self)
        for k in ("eval_every", "save_every", "keep_checkpoints"):
            d.pop(k)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class StepInfo:
    """What the progress callback gets after each optimizer step (and each evaluation)."""

    step: int
    total_steps: int
    epoch: int
    loss: float
    lr: float
    tokens_per_s: float
    eta_s: float
    eval_loss: Optional[float] = None


@dataclass
class FinetuneResult:
    out_dir: str
    steps: int
    final_train_loss: float
    final_eval_loss: Optional[float]
    train_tokens: int
    seconds: float
    peak_rss_bytes: int
    manifest: dict


# --------------------------------------------------------------------------- hardware
def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 matrix math is native here (CUDA bf16, or CPU AVX512-BF16 / AMX)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        from inhouse.kernels import cpu_has_fast_bf16

        return cpu_has_fast_bf16()
    return False


def _peak_rss() -> int:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    except (ImportError, OSError):
        return 0


# --------------------------------------------------------------------------- model pieces
def prepare_model(model, config: FinetuneConfig) -> list[torch.nn.Parameter]:
    """Freeze/wrap the model for the method; returns the trainable parameters.

    LoRA/QLoRA: `apply_lora` on the target modules (QLoRA with NF4 block linears), A seeded by
    ``config.seed``. Full: every parameter is trained (kept in fp32).
    """
    if config.method == "full":
        if model.tok_embeddings.weight.dtype != torch.float32:
            model.float()
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        apply_lora(model, config.targets, rank=config.rank, alpha=config.alpha, dropout=config.dropout,
                   use_rslora=config.use_rslora, quantize_base=config.method == "qlora", seed=config.seed)
    return [p for p in model.parameters() if p.requires_grad]


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def batch_loss(model, batch: Batch, denominator: int, *, grad_checkpointing: bool = False) -> torch.Tensor:
    """Summed cross-entropy over the batch's target tokens, divided by `denominator`.

    Runs the model's own blocks with a (B, T, T) attention mask when rows pack several examples,
    and computes logits only at target positions.
    """
    tokens, positions = batch.tokens, batch.positions.clamp_min(0)
    B, T = tokens.shape
    mask = None
    if batch.doc_ids is not None:
        d = batch.doc_ids
        causal = torch.ones(T, T, dtype=torch.bool, device=tokens.device).tril()  # (T, S)
        mask = causal[None] & (d[:, :, None] == d[:, None, :])  # (B, T, S): same example, not ahead
    rot = rope_rotation(positions, model.inv_freq)  # (B, T, 1, hd/2) complex
    h = model.tok_embeddings(tokens)  # (B, T, D)
    for layer in model.layers:
        if grad_checkpointing and torch.is_grad_enabled():
            h = activation_checkpoint(layer, h, rot, None, None, mask, use_reentrant=False)
        else:
            h = layer(h, rot, None, None, mask)
    sel = batch.targets != IGNORE  # (B, T)
    hs = model.norm(h[sel])  # (N, D)
    logits = model.output(hs).float()  # (N, V)
    return F.cross_entropy(logits, batch.targets[sel], reduction="sum") / max(denominator, 1)


@torch.no_grad()
def evaluate(model, batches: list[Batch], autocast: bool) -> float:
    """Mean cross-entropy per target token."""
    was = model.training
    model.eval()
    total, n = 0.0, 0
    for b in batches:
        with torch.autocast(model.tok_embeddings.weight.device.type, dtype=torch.bfloat16, enabled=autocast):
            total += float(batch_loss(model, b, 1))
        n += b.n_targets
    model.train(was)
    return total / max(n, 1)


def lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return f


# --------------------------------------------------------------------------- checkpoints
def _checkpoint_dirs(out_dir: str) -> list[tuple[int, str]]:
    root = os.path.join(out_dir, CHECKPOINTS)
    if not os.path.isdir(root):
        return []
    found = []
    for n in os.listdir(root):
        if n.startswith("step-") and os.path.isfile(os.path.join(root, n, "state.json")):
            found.append((int(n[5:]), os.path.join(root, n)))
    return sorted(found)


def save_checkpoint(out_dir: str, step: int, model, optimizer, extra: dict, keep: int) -> str:
    """Write checkpoint ``step`` atomically (temporary directory, fsync, rename)."""
    root = os.path.join(out_dir, CHECKPOINTS)
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"step-{step:06d}")
    tmp = os.path.join(root, f".tmp-step-{step:06d}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file({k: v.detach().contiguous() for k, v in trainable_state(model).items()},
              os.path.join(tmp, "trainable.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state()},
               os.path.join(tmp, "optimizer.pt"))
    with open(os.path.join(tmp, "state.json"), "w") as f:
        json.dump({"step": step, **extra}, f, indent=2)
    for n in os.listdir(tmp):
        with open(os.path.join(tmp, n), "rb") as f:
            os.fsync(f.fileno())
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    dfd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    for _, old in _checkpoint_dirs(out_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str, model, optimizer) -> dict:
    with open(os.path.join(path, "state.json")) as f:
        state = json.load(f)
    weights = load_file(os.path.join(path, "trainable.safetensors"))
    params = trainable_state(model)
    if set(weights) != set(params):
        raise FinetuneError(f"{path}: checkpoint holds other parameters than this run trains")
    with torch.no_grad():
        for k, v in weights.items():
            params[k].copy_(v)
    blob = torch.load(os.path.join(path, "optimizer.pt"), weights_only=False)
    optimizer.load_state_dict(blob["optimizer"])
    torch.set_rng_state(blob["torch_rng"])
    return state


# --------------------------------------------------------------------------- the loop
def train(model, tokenizer, renderer, train_data: str, out_dir: str, config: FinetuneConfig, *,
          eval_data: Optional[str] = None, resume: bool = False, base_info: Optional[dict] = None,
          on_step: Optional[Callable[[StepInfo], None]] = None, stop_after_steps: Optional[int] = None,
          write_outputs: bool = True) -> FinetuneResult:
    """Fine-tune `model` in place on `train_data` and write the result to `out_dir`.

    Args:
        model: a `Transformer` (weights in the dtype to train from).
        tokenizer, renderer: the model's tokenizer and `ChatRenderer` (the one serving will use).
        train_data, eval_data: JSONL files (see `inhouse.finetune.data`).
        out_dir: output directory: adapter (LoRA/QLoRA) or HF checkpoint (full), the manifest, checkpoints.
        config: hyperparameters.
        resume: continue from the newest checkpoint in ``out_dir/checkpoints``.
        base_info: what to record about the base model in the manifest.
        on_step: progress callback.
        stop_after_steps: stop (as if interrupted) after this many steps of the schedule, without
            writing outputs (tests of resume; the schedule still spans the full run).
        write_outputs: write the adapter/checkpoint and manifest at the end.

    Returns:
        A `FinetuneResult`.

    Raises:
        DataError: bad records (all listed). FinetuneError: bad settings, or a checkpoint from
            another configuration.
    """
    config.check()
    t_start = time.perf_counter()
    device = model.tok_embeddings.weight.device
    autocast = config.precision == "bf16" or (config.precision == "auto" and bf16_supported(device))
    train_ds = load_dataset(train_data, renderer, config.max_seq_len, config.overlong)
    eval_ds = load_dataset(eval_data, renderer, config.max_seq_len, config.overlong) if eval_data else None
    pad_id = tokenizer.eos_id if tokenizer.eos_id is not None else 0

    def epoch_plan(epoch: int) -> list[Batch]:
        return plan_epoch(train_ds.examples, batch_size=config.batch_size, max_seq_len=config.max_seq_len,
                          packing=config.packing, seed=config.seed, epoch=epoch, pad_id=pad_id)

    first = epoch_plan(0)
    steps_per_epoch = math.ceil(len(first) / config.grad_accum)
    total_steps = config.max_steps or steps_per_epoch * config.epochs
    warmup = config.warmup_steps if config.warmup_steps is not None else max(1, round(0.05 * total_steps))
    eval_batches = plan_epoch(eval_ds.examples, batch_size=config.batch_size, max_seq_len=config.max_seq_len,
                              packing=config.packing, seed=config.seed, epoch=0, pad_id=pad_id) if eval_ds else []

    torch.manual_seed(config.seed)
    params = prepare_model(model, config)
    model.train()
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay,
                                  betas=(0.9, 0.999), eps=1e-8)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(warmup, total_steps))
    n_trainable = sum(p.numel() for p in params)
    logger.info("fine-tuning (%s): %d trainable parameters, %d examples (%d tokens), %d steps of %d x %d, "
                "lr %g, warm-up %d, %s", config.method, n_trainable, len(train_ds.examples), train_ds.n_tokens,
                total_steps, config.grad_accum, config.batch_size, config.learning_rate, warmup,
                "bf16 autocast" if autocast else "fp32")

    step = 0
    fingerprint = config.fingerprint()
    if resume:
        ckpts = _checkpoint_dirs(out_dir)
        if not ckpts:
            raise FinetuneError(f"--resume: no checkpoint in {os.path.join(out_dir, CHECKPOINTS)}")
        path = ckpts[-1][1]
        with open(os.path.join(path, "state.json")) as f:
            saved = json.load(f)
        if saved.get("fingerprint") != fingerprint or saved.get("data_sha256") != train_ds.sha256:
            raise FinetuneError(f"--resume: {path} was written by a run with other settings or data; "
                                "use the same flags and data, or a new --out")
        state = load_checkpoint(path, model, optimizer)
        step = state["step"]
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(warmup, total_steps), last_epoch=step - 1)
        logger.info("resumed from %s (step %d of %d)", path, step, total_steps)

    def micro_batches_from(start_step: int):
        """Yield (step, epoch, [micro-batches]) from `start_step` on; epochs continue until total_steps."""
        s = 0
        epoch = 0
        plan = first
        while s < total_steps:
            for i in range(0, len(plan), config.grad_accum):
                if s >= total_steps:
                    return
                if s >= start_step:
                    yield s, epoch, plan[i:i + config.grad_accum]
                s += 1
            epoch += 1
            plan = epoch_plan(epoch)

    last_loss = float("nan")
    eval_loss: Optional[float] = None
    tokens_done = 0
    t_loop = time.perf_counter()
    steps_this_run = 0
    for s, epoch, micro in micro_batches_from(step):
        denom = sum(b.n_targets for b in micro)
        loss_sum = 0.0
        for b in micro:
            b = Batch(b.tokens.to(device), b.targets.to(device), b.positions.to(device),
                      None if b.doc_ids is None else b.doc_ids.to(device))
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                loss = batch_loss(model, b, denom, grad_checkpointing=config.grad_checkpointing)
            loss.backward()
            loss_sum += float(loss.detach())
            tokens_done += b.n_tokens
        if config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lr = schedule.get_last_lr()[0]
        schedule.step()
        step = s + 1
        steps_this_run += 1
        last_loss = loss_sum
        elapsed = time.perf_counter() - t_loop
        if eval_batches and config.eval_every and step % config.eval_every == 0 and step < total_steps:
            eval_loss = evaluate(model, eval_batches, autocast)
            logger.info("step %d: eval loss %.4f", step, eval_loss)
        if on_step:
            on_step(StepInfo(step, total_steps, epoch, last_loss, lr, tokens_done / max(elapsed, 1e-9),
                             elapsed / steps_this_run * (total_steps - step), eval_loss))
        if config.save_every and step % config.save_every == 0 and step < total_steps:
            save_checkpoint(out_dir, step, model, optimizer,
                            {"fingerprint": fingerprint, "data_sha256": train_ds.sha256, "loss": last_loss},
                            config.keep_checkpoints)
        if stop_after_steps is not None and step >= stop_after_steps and step < total_steps:
            logger.info("stopping after step %d (stop_after_steps)", step)
            break
    if step >= total_steps and eval_batches:
        eval_loss = evaluate(model, eval_batches, autocast)
        if on_step:
            on_step(StepInfo(step, total_steps, -1, last_loss, 0.0, 0.0, 0.0, eval_loss))
    model.eval()
    seconds = time.perf_counter() - t_start
    manifest = {
        "inhouse_version": _version(),
        "method": config.method,
        "base_model": base_info or {},
        "data": {"train": _data_info(train_ds), "eval": _data_info(eval_ds) if eval_ds else None},
        "hyperparameters": {**dataclasses.asdict(config), "learning_rate": config.learning_rate,
                            "warmup_steps": warmup, "total_steps": total_steps, "precision":
                            "bf16-autocast" if autocast else "fp32"},
        "trainable_parameters": n_trainable,
        "steps": step,
        "final_train_loss": last_loss,
        "final_eval_loss": eval_loss,
        "train_tokens_this_run": tokens_done,
        "seconds_this_run": round(seconds, 1),
        "torch_version": torch.__version__,
    }
    if write_outputs and step >= total_steps:
        write_result(model, tokenizer, out_dir, config, manifest, base_info)
    return FinetuneResult(out_dir, step, last_loss, eval_loss, tokens_done, seconds, _peak_rss(), manifest)


def write_result(model, tokenizer, out_dir: str, config: FinetuneConfig, manifest: dict,
                 base_info: Optional[dict]) -> None:
    """Adapter (LoRA/QLoRA) or HF checkpoint (full), then the manifest, in `out_dir`."""
    os.makedirs(out_dir, exist_ok=True)
    if config.method == "full":
        from inhouse.finetune.merge import export_hf

        export_hf(model, tokenizer, out_dir, dtype=torch.float32,
                  source_dir=(base_info or {}).get("tokenizer_dir"))
        manifest["output"] = {"format": "huggingface-safetensors", "dtype": "float32"}
    else:
        from inhouse.finetune.adapters import save_adapter

        save_adapter(model, out_dir, base_model_name_or_path=(base_info or {}).get("path"),
                     extra_config={})
        manifest["output"] = {"format": "peft-lora", "modules": len(lora_modules(model))}
    tmp = os.path.join(out_dir, f".{MANIFEST}.tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=2, default=str)
    os.replace(tmp, os.path.join(out_dir, MANIFEST))


def _data_info(ds: Dataset) -> dict:
    return {"path": os.path.abspath(ds.path), "sha256": ds.sha256, "records": ds.n_records,
            "examples": len(ds.examples), "tokens": ds.n_tokens, "dropped": ds.dropped, "truncated": ds.truncated}


def _version() -> str:
    from inhouse import __version__

    return __version__


def base_model_info(loaded) -> dict:
    """Manifest entry for the base: name, format, path, sha256 of its weight files."""
    info = {"name": loaded.name, "format": loaded.source, "path": loaded.path}
    if loaded.path:
        info["sha256"] = file_sha256(loaded.path)
        if loaded.source != "gguf":
            info["tokenizer_dir"] = loaded.path if os.path.isdir(loaded.path) else os.path.dirname(loaded.path)
    return info


def run_finetune(model: Optional[str], data: str, out_dir: str, config: FinetuneConfig, *,
                 eval_data: Optional[str] = None, resume: bool = False, chat_format: str = "auto",
                 chat_template: Optional[str] = None, tokenizer: Optional[str] = None,
                 on_step: Optional[Callable[[StepInfo], None]] = None,
                 stop_after_steps: Optional[int] = None) -> FinetuneResult:
    """``inhouse finetune``: load MODEL for training (a GGUF base is dequantized), train, write outputs.

    LoRA keeps the frozen base in bf16 when bf16 autocast is used (else fp32); QLoRA holds the block
    linears in NF4; full fine-tuning trains fp32 weights.
    """
    from inhouse.resolve import open_model
    from inhouse.tokenizer.chat import ChatRenderer

    config.check()
    device_bf16 = bf16_supported(torch.device("cpu"))
    autocast = config.precision == "bf16" or (config.precision == "auto" and device_bf16)
    dtype = torch.float32 if config.method == "full" or not autocast else torch.bfloat16
    loaded = open_model(model, dtype=dtype, tokenizer=tokenizer, quantize="none")
    renderer = ChatRenderer(loaded.tokenizer, mode=chat_format, template=chat_template)
    return train(loaded.model, loaded.tokenizer, renderer, data, out_dir, config, eval_data=eval_data,
                 resume=resume, base_info=base_model_info(loaded), on_step=on_step,
                 stop_after_steps=stop_after_steps)


__all__ = ["METHODS", "FinetuneConfig", "FinetuneError", "StepInfo", "FinetuneResult", "bf16_supported",
           "prepare_model", "batch_loss", "evaluate", "train", "run_finetune", "save_checkpoint", "load_checkpoint",
           "base_model_info"]
