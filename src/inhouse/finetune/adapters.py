"""LoRA adapters on disk in Hugging Face PEFT's format, and applying them to a loaded model.

An adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` with PEFT's
tensor names (``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``), so HF PEFT loads
it onto ``LlamaForCausalLM`` and inhouse loads adapters trained with PEFT.

Layout: Hugging Face stores q/k projection rows permuted (rotate-half RoPE; see
`inhouse.weights.names.unpermute_hf_qk`). The LoRA update of q/k is ``B @ A``, whose rows are
B's rows, so B of q/k is permuted on export and un-permuted on import; A is unchanged.

Not supported (refused with a message): DoRA, biases, ``modules_to_save``, per-module rank/alpha
patterns, ``fan_in_fan_out``, and targets other than the seven block projections.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from inhouse.model.lora import HF_TARGET_NAMES, LORA_TARGETS, LoRALinear, apply_lora, lora_modules
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
        dev = model.tok_embeddings.weight.device
        for m in lora_modules(model).values():
            m.to(dev)
    _copy_into(model, spec)
    for m in lora_modules(model).values():
        m.enabled = True
        m.eval()
    logger.info("adapter %s applied (rank %d, alpha %g, %s)", spec.path, spec.rank, spec.alpha, ", ".join(spec.targets))
    return spec


class AdapterSwitch:
    """Keeps one adapter active on a model for `inhouse.LLM`: the default, another, or none (base).

    The engine runs one set of weights per batch, so a switch is only allowed while no request is
    running; requests for different adapters in one batch need per-row LoRA in the engine.
    """

    def __init__(self, model, default: Optional[str] = None):
        self.model = model
        self.default = default
        self.active: Optional[str] = None
        self._specs: dict[str, AdapterSpec] = {}
        if default:
            self.use(default)

    def _spec(self, path: str) -> AdapterSpec:
        key = os.path.abspath(path)
        if key not in self._specs:
            self._specs[key] = read_adapter(path, self.model.args)
        return self._specs[key]

    def use(self, path: Optional[str], busy: bool = False) -> None:
        """Make `path` the active adapter (None: the base model).

        Raises:
            AdapterError: `busy` (requests are running) and `path` is not the active adapter.
        """
        same = (path is None and self.active is None) or (
            path is not None and self.active is not None and os.path.abspath(path) == os.path.abspath(self.active))
        if same and (path is not None or not any(m.enabled for m in lora_modules(self.model).values())):
            return
        if busy:
            raise AdapterError("cannot switch LoRA adapters while requests are running: the engine runs one "
                               "adapter per batch")
        if path is None:
            for m in lora_modules(self.model).values():
                m.enabled = False
            self.active = None
            return
        spec = self._spec(path)
        if lora_modules(self.model):
            mods = lora_modules(self.model)
            shape = {(m.rank, m.alpha, m.use_rslora) for m in mods.values()}
            have = sorted({p.split(".")[3] for p in mods})
            if shape != {(spec.rank, spec.alpha, spec.use_rslora)} or have != spec.targets:
                from inhouse.model.lora import remove_lora

                remove_lora(self.model)
        load_adapter(self.model, spec)
        self.active = path

    def for_requests(self, lora_request, busy: bool = False) -> None:
        """Select the adapter for one `generate`/`chat` call's `lora_request` (one, or one per prompt)."""
        if isinstance(lora_request, (list, tuple)):
            paths = {None if r is None else _path_of(r) for r in lora_request}
            if len(paths) > 1:
                raise AdapterError("requests for different adapters in one call are not supported yet: "
                                   "the engine runs one adapter per batch; make one call per adapter")
            lora_request = next(iter(lora_request), None)
        self.use(self.default if lora_request is None else _path_of(lora_request), busy=busy)


def _path_of(r: Union[LoRARequest, str]) -> str:
    return r if isinstance(r, str) else r.lora_path


__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "AdapterError", "LoRARequest", "AdapterSpec", "hf_permute_rows",
           "save_adapter", "read_adapter", "load_adapter", "AdapterSwitch"]
