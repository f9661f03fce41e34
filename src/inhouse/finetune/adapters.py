"""LoRA adapters on disk in Hugging Face PEFT's format, and applying them to a loaded model.

An adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` with PEFT's
tensor names (``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``), so HF PEFT loads
it onto ``LlamaForCausalLM`` and inhouse loads adapters trained with PEFT.

Layout: Hugging Face stores q/k projection rows permuted (rotate-half RoPE; see
`inhouse.weights.names.unpermute_hf_qk`). The LoRA update of q/k is ``B @ A``, whose rows are
B's rows, so B of q/k is permuted on export and un-permuted on import; A is unchanged.

Not supported (refused with a message): DoRA, biases, ``modules_to_save``, per-module rank/alpha
patterns, ``fan_in_fan_out``, and targets other than the seven block projections.

Two ways to run an adapter unmerged: `load_adapter` wraps the model's layers in single-adapter
`LoRALinear` (what fine-tuning and ``inhouse merge`` use); `AdapterBank` holds several named
adapters in `MultiLoRALinear` slots so that one batch mixes rows of different adapters and of
the base model (what `inhouse.LLM` and ``inhouse serve --adapter NAME=DIR`` use).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from inhouse.model.lora import HF_TARGET_NAMES, LORA_TARGETS, apply_lora, lora_modules
from inhouse.model.multi_lora import AdapterRows, apply_multi_lora, multi_lora_modules
from inhouse.model.transformer import model_device
from inhouse.weights.names import unpermute_hf_qk

logger = logging.getLogger("inhouse.finetune")

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_HF_PREFIX = "base_model.model.model.layers."
_HF_MODULE = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj",
              "wo": "self_attn.o_proj", "w1": "mlp.gate_proj", "w2": "mlp.down_proj", "w3": "mlp.up_proj"}
_META_MODULE = {v: k for k, v in _HF_MODULE.items()}
_PERMUTED = {"wq": "n_heads", "wk": "n_kv_heads"}
_HF_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.[\w-]+)?\.weight$")


class AdapterError(ValueError):
    """An adapter directory that cannot be read or does not fit the model."""


@dataclass(frozen=True)
class LoRARequest:
    """vLLM's ``LoRARequest(lora_name, lora_int_id, lora_path)``: which adapter a request uses."""

    lora_name: str
    lora_int_id: int
    lora_path: str

    @property
    def name(self) -> str:
        return self.lora_name

    @property
    def path(self) -> str:
        return self.lora_path


def hf_permute_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's interleaved q/k row layout -> Hugging Face's rotate-half layout (inverse of `unpermute_hf_qk`)."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)  # (H, 2, hd/2, C)


def _short(module_path: str) -> tuple[int, str]:
    parts = module_path.split(".")  # layers.N.attention.wq
    return int(parts[1]), parts[3]


def save_adapter(model: torch.nn.Module, out_dir: str, *, base_model_name_or_path: Optional[str] = None,
                 extra_config: Optional[dict[str, Any]] = None) -> str:
    """Write the model's LoRA layers as a PEFT adapter (fp32 tensors).

    Args:
        model: a `Transformer` with `LoRALinear` layers (all of one rank/alpha).
        out_dir: directory to create or fill.
        base_model_name_or_path: recorded in the config (PEFT uses it only to find the base).

    Returns:
        `out_dir`.

    Raises:
        AdapterError: the model has no LoRA layers, or layers of differing rank/alpha.
    """
    mods = lora_modules(model)
    if not mods:
        raise AdapterError("the model has no LoRA layers to save")
    shapes = {(m.rank, m.alpha, m.use_rslora) for m in mods.values()}
    if len(shapes) != 1:
        raise AdapterError(f"LoRA layers with differing rank/alpha {sorted(shapes)} cannot share one PEFT config")
    rank, alpha, rslora = shapes.pop()
    args = model.args
    tensors: dict[str, torch.Tensor] = {}
    targets: set[str] = set()
    for path, m in mods.items():
        layer, short = _short(path)
        targets.add(short)
        b = m.lora_b.weight.detach().float()
        if short in _PERMUTED:
            b = hf_permute_rows(b, getattr(args, _PERMUTED[short]))
        key = f"{_HF_PREFIX}{layer}.{_HF_MODULE[short]}"
        tensors[f"{key}.lora_A.weight"] = m.lora_a.weight.detach().float().contiguous().cpu()
        tensors[f"{key}.lora_B.weight"] = b.contiguous().cpu()
    dropout = next(iter(mods.values())).dropout
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": float(getattr(dropout, "p", 0.0)),
        "target_modules": sorted(HF_TARGET_NAMES[t] for t in targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": rslora,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }
    config.update(extra_config or {})
    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, f".{ADAPTER_WEIGHTS}.tmp")
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(out_dir, ADAPTER_WEIGHTS))
    tmp = os.path.join(out_dir, f".{ADAPTER_CONFIG}.tmp")
    with open(tmp, "w") as f:
        json.dump(config, f, indent=2)
    os.replace(tmp, os.path.join(out_dir, ADAPTER_CONFIG))
    return out_dir


@dataclass
class AdapterSpec:
    """An adapter read from disk: its config numbers and LoRA tensors in Meta names and layout."""

    path: str
    rank: int
    alpha: float
    use_rslora: bool
    targets: list[str]  # short Meta names (wq, ...)
    tensors: dict[str, torch.Tensor]  # "layers.N.attention.wq.lora_a.weight" -> tensor


def read_adapter(adapter_dir: str, args) -> AdapterSpec:
    """Read and check a PEFT LoRA adapter directory for a model of `args` (`ModelArgs`).

    Raises:
        AdapterError: missing files, an unsupported PEFT feature, unknown tensor names, or shapes
            that do not fit the model.
    """
    cfg_path = os.path.join(adapter_dir, ADAPTER_CONFIG)
    w_path = os.path.join(adapter_dir, ADAPTER_WEIGHTS)
    if not os.path.isdir(adapter_dir):
        raise AdapterError(f"adapter {adapter_dir}: not a directory")
    for p in (cfg_path, w_path):
        if not os.path.isfile(p):
            raise AdapterError(f"adapter {adapter_dir}: {os.path.basename(p)} is missing (not a PEFT LoRA adapter)")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise AdapterError(f"{cfg_path}: cannot read: {e}") from e
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{cfg_path}: peft_type={cfg.get('peft_type')!r}; only LORA adapters are supported")
    for key, ok in (("use_dora", False), ("fan_in_fan_out", False)):
        if bool(cfg.get(key)) != ok:
            raise AdapterError(f"{cfg_path}: {key}={cfg.get(key)!r} is not supported")
    if cfg.get("bias", "none") != "none":
        raise AdapterError(f"{cfg_path}: bias={cfg.get('bias')!r} is not supported (only 'none')")
    for key in ("modules_to_save", "rank_pattern", "alpha_pattern", "layers_to_transform"):
        if cfg.get(key):
            raise AdapterError(f"{cfg_path}: {key}={cfg[key]!r} is not supported")
    try:
        rank, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    except (KeyError, TypeError, ValueError):
        raise AdapterError(f"{cfg_path}: needs integer 'r' and numeric 'lora_alpha'") from None
    tensors: dict[str, torch.Tensor] = {}
    targets: set[str] = set()
    with safe_open(w_path, framework="pt", device="cpu") as f:
        for key in f.keys():
            m = _HF_KEY.match(key)
            if not m or f"{m.group(2)}.{m.group(3)}" not in _META_MODULE:
                raise AdapterError(f"{w_path}: unexpected tensor {key!r} (only LoRA A/B of the block projections "
                                   "q/k/v/o_proj, gate/up/down_proj are supported)")
            layer, short, ab = int(m.group(1)), _META_MODULE[f"{m.group(2)}.{m.group(3)}"], m.group(4)
            if layer >= args.n_layers:
                raise AdapterError(f"{w_path}: {key} is for layer {layer}, the model has {args.n_layers}")
            t = f.get_tensor(key).float()
            if ab == "B" and short in _PERMUTED:
                n = getattr(args, _PERMUTED[short])
                if t.ndim != 2 or t.shape[0] % (2 * n):
                    raise AdapterError(f"{w_path}: {key} has shape {tuple(t.shape)}, not fitting {n} heads")
                t = unpermute_hf_qk(t, n)
            targets.add(short)
            tensors[f"layers.{layer}.{LORA_TARGETS[short]}.lora_{ab.lower()}.weight"] = t
    if not tensors:
        raise AdapterError(f"{w_path}: holds no LoRA tensors")
    return AdapterSpec(adapter_dir, rank, alpha, bool(cfg.get("use_rslora")), sorted(targets), tensors)


def _copy_into(model, spec: AdapterSpec) -> None:
    mods = lora_modules(model)
    params = {}
    for path, m in mods.items():
        params[f"{path}.lora_a.weight"] = m.lora_a.weight
        params[f"{path}.lora_b.weight"] = m.lora_b.weight
    for name, t in spec.tensors.items():
        if name not in params:
            raise AdapterError(f"{spec.path}: tensor for {name} has no LoRA layer in the model")
        if tuple(t.shape) != tuple(params[name].shape):
            raise AdapterError(f"{spec.path}: {name} has shape {tuple(t.shape)}, the model needs "
                               f"{tuple(params[name].shape)} (an adapter for another model?)")
    with torch.no_grad():
        for name, p in params.items():
            if name in spec.tensors:
                p.copy_(spec.tensors[name])
            else:
                p.zero_()  # a layer this adapter leaves alone


def load_adapter(model, adapter: Union[str, AdapterSpec]) -> AdapterSpec:
    """Apply a PEFT LoRA adapter to `model` unmerged (wrapping its layers in `LoRALinear`).

    If the model already has LoRA layers of the same rank, alpha and targets, their weights are
    replaced (switching adapters costs a copy, no rebuild).

    Raises:
        AdapterError: see `read_adapter`; or existing LoRA layers of another shape.
    """
    spec = adapter if isinstance(adapter, AdapterSpec) else read_adapter(adapter, model.args)
    mods = lora_modules(model)
    if mods:
        shape = {(m.rank, m.alpha, m.use_rslora) for m in mods.values()}
        have = sorted({p.split(".")[3] for p in mods})
        if shape != {(spec.rank, spec.alpha, spec.use_rslora)} or have != spec.targets:
            raise AdapterError(f"{spec.path}: rank {spec.rank}/alpha {spec.alpha:g}/targets {spec.targets} differ "
                               f"from the LoRA layers already applied ({sorted(shape)}, {have})")
    else:
        apply_lora(model, spec.targets, rank=spec.rank, alpha=spec.alpha, use_rslora=spec.use_rslora)
        dev = model_device(model)
        for m in lora_modules(model).values():
            m.to(dev)
    _copy_into(model, spec)
    for m in lora_modules(model).values():
        m.enabled = True
        m.eval()
    logger.info("adapter %s applied (rank %d, alpha %g, %s)", spec.path, spec.rank, spec.alpha, ", ".join(spec.targets))
    return spec


def check_adapter(spec: AdapterSpec, model) -> None:
    """Check that an adapter fits `model`: each layer it targets exists, with A (r, in) and B (out, r).

    Raises:
        AdapterError: naming the adapter directory and the first problem.
    """
    if spec.rank < 1:
        raise AdapterError(f"adapter {spec.path}: rank r={spec.rank} must be at least 1")
    modules: dict[str, set[str]] = {}
    for name in spec.tensors:
        path, _, ab = name.rpartition(".lora_")  # "layers.N.attention.wq", "a.weight"
        modules.setdefault(path, set()).add(ab[0])
    for path, have in sorted(modules.items()):
        if have != {"a", "b"}:
            missing = "B" if "a" in have else "A"
            raise AdapterError(f"adapter {spec.path}: {path} has LoRA {'A' if missing == 'B' else 'B'} but no {missing}")
        try:
            layer = model.get_submodule(path)
        except AttributeError:
            raise AdapterError(f"adapter {spec.path}: the model has no layer {path}") from None
        a, b = spec.tensors[f"{path}.lora_a.weight"], spec.tensors[f"{path}.lora_b.weight"]
        want_a, want_b = (spec.rank, layer.in_features), (layer.out_features, spec.rank)
        if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
            raise AdapterError(f"adapter {spec.path}: {path} has A {tuple(a.shape)} and B {tuple(b.shape)}; "
                               f"rank {spec.rank} on this model needs A {want_a} and B {want_b} "
                               "(an adapter for another model?)")


class AdapterBank:
    """Named LoRA adapters served together on one model, each batch row with its own (see `inhouse.model.multi_lora`).

    Adapters are read and checked once, when added, and kept in host memory. At most `max_loras`
    are resident in the model's `MultiLoRALinear` slots at a time; a request needing another one
    takes a free slot, or the slot of the least recently used adapter that no running request
    holds; when every slot is held, the request waits (`acquire` returns None). Adapters of
    different ranks and targets share the slots (smaller ranks zero-padded; a layer an adapter
    does not target stays zero for it).

    Args:
        model: the `Transformer` to serve (no single-adapter `LoRALinear` layers on it).
        max_loras: adapters resident at once (``--max-loras``).

    Raises:
        ValueError: max_loras < 1.
    """

    def __init__(self, model, max_loras: int = 8):
        if max_loras < 1:
            raise ValueError(f"max_loras={max_loras} must be at least 1")
        self.model, self.max_loras = model, max_loras
        self.rows = AdapterRows()
        self.specs: dict[str, AdapterSpec] = {}
        self.slot_of: "OrderedDict[str, int]" = OrderedDict()  # resident adapters, least recently used first
        self.refs: dict[str, int] = {}  # running requests holding each resident adapter
        self.n_slots = 1  # slots allocated in the layers, slot 0 (base) included
        self.rank = 1  # padded rank of the layers
        self.loads = 0
        self.evictions = 0
        self.device = model_device(model)

    # ------------------------------------------------------------------ names
    def add(self, name: str, path: str) -> AdapterSpec:
        """Register adapter `name` from a PEFT directory (read and checked now; loaded into a slot when used).

        Adding the same name and directory again does nothing.

        Raises:
            AdapterError: unreadable or unfitting adapter, or `name` already given to another directory.
        """
        if not name:
            raise AdapterError(f"adapter {path}: its name must not be empty")
        old = self.specs.get(name)
        if old is not None:
            if os.path.abspath(old.path) == os.path.abspath(path):
                return old
            raise AdapterError(f"adapter name {name!r} is already used for {old.path}; cannot also give it to {path}")
        spec = read_adapter(path, self.model.args)
        check_adapter(spec, self.model)
        self.specs[name] = spec
        logger.info("adapter %s: %s (rank %d, alpha %g, %s)", name, path, spec.rank, spec.alpha, ", ".join(spec.targets))
        return spec

    def __contains__(self, name: object) -> bool:
        return name in self.specs

    def names(self) -> list[str]:
        """Registered adapter names, in the order they were added."""
        return list(self.specs)

    def resident(self) -> list[str]:
        """Adapters now in slots, least recently used first."""
        return list(self.slot_of)

    # ------------------------------------------------------------------ slots
    def acquire(self, name: str) -> Optional[int]:
        """Hold adapter `name` for one running request; returns its slot (>= 1), or None if every slot is held.

        Raises:
            KeyError: `name` was never added.
        """
        if name not in self.specs:
            raise KeyError(f"unknown adapter {name!r}")
        slot = self.slot_of.get(name)
        if slot is None:
            slot = self._free_slot()
            if slot is None:
                return None
            self._load(name, slot)
        self.slot_of.move_to_end(name)
        self.refs[name] = self.refs.get(name, 0) + 1
        return slot

    def release(self, name: str) -> None:
        """A request holding `name` ended (its slot may now be reused)."""
        n = self.refs.get(name, 0) - 1
        assert n >= 0, f"adapter {name} released more often than acquired"
        self.refs[name] = n

    def _free_slot(self) -> Optional[int]:
        used = set(self.slot_of.values())
        for s in range(1, self.n_slots):
            if s not in used:
                return s
        if self.n_slots - 1 < self.max_loras:
            self.n_slots += 1
            return self.n_slots - 1
        for name, slot in self.slot_of.items():  # least recently used first
            if not self.refs.get(name):
                del self.slot_of[name]
                self.refs.pop(name, None)
                self.evictions += 1
                logger.info("adapter %s evicted from slot %d (more than %d adapters in use)", name, slot, self.max_loras)
                return slot
        return None

    def _load(self, name: str, slot: int) -> None:
        spec = self.specs[name]
        self.rank = max(self.rank, spec.rank)
        apply_multi_lora(self.model, spec.targets, self.rows, self.n_slots, self.rank)
        scaling = spec.alpha / (math.sqrt(spec.rank) if spec.use_rslora else spec.rank)
        for path, layer in multi_lora_modules(self.model).items():
            layer.reserve(self.n_slots, self.rank)
            a, b = spec.tensors.get(f"{path}.lora_a.weight"), spec.tensors.get(f"{path}.lora_b.weight")
            layer.set_slot(slot, a, b, scaling)
        self.slot_of[name] = slot
        self.loads += 1
        logger.debug("adapter %s loaded into slot %d", name, slot)

    # ------------------------------------------------------------------ rows
    def set_rows(self, slots: list[int]) -> None:
        """The slot of each row of the next forward (0: the base model)."""
        self.rows.set(slots, self.device)

    def clear_rows(self) -> None:
        self.rows.clear()


__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "AdapterError", "LoRARequest", "AdapterSpec", "hf_permute_rows",
           "save_adapter", "read_adapter", "load_adapter", "check_adapter", "AdapterBank"]
