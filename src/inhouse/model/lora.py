"""LoRA as a drop-in for ``nn.Linear`` (by composition), and a 4-bit NF4 frozen linear for QLoRA.

A `LoRALinear` holds the original layer as ``base`` and adds ``scaling * B(A(dropout(x)))``,
A: (r, in), B: (out, r). B starts at zero, so a fresh adapter leaves the model's output unchanged.
Nothing else in the network changes: `apply_lora` swaps modules in place, `merge_lora` folds the
update into plain ``nn.Linear`` weights, `remove_lora` puts the original layers back.

Module names stay Meta's (``layers.3.attention.wq``); the LoRA tensors are
``layers.3.attention.wq.lora_a.weight`` / ``.lora_b.weight`` (see `lora_state_dict`).

`NF4Linear` stores a frozen weight as 4-bit NormalFloat codes (QLoRA, Dettmers et al. 2023):
blocks of 64 values share one fp32 absmax; each value is the index of the nearest of 16 levels
that are quantiles of N(0, 1). It is dequantized block by block on each forward (and again in the
backward, so no full-precision copy of the weight is kept for autograd). The absmax scales are not
double-quantized.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

# Meta module name (last two parts under a block) <-> the short names users give.
LORA_TARGETS: dict[str, str] = {
    "wq": "attention.wq", "wk": "attention.wk", "wv": "attention.wv", "wo": "attention.wo",
    "w1": "feed_forward.w1", "w2": "feed_forward.w2", "w3": "feed_forward.w3",
}
# Hugging Face's names for the same layers (PEFT's target_modules use these).
HF_TARGET_NAMES: dict[str, str] = {
    "wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj",
    "w1": "gate_proj", "w2": "down_proj", "w3": "up_proj",
}
DEFAULT_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


def normalize_targets(targets: Union[str, Iterable[str]]) -> list[str]:
    """Short Meta names (``wq``...) from user input: Meta or HF names, comma-separated or a list, or "all".

    Raises:
        ValueError: an unknown module name.
    """
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    from_hf = {v: k for k, v in HF_TARGET_NAMES.items()}
    out: list[str] = []
    for t in targets:
        if t in ("all", "all-linear"):
            names = list(DEFAULT_TARGETS)
        elif t in LORA_TARGETS:
            names = [t]
        elif t in from_hf:
            names = [from_hf[t]]
        elif t.split(".")[-1] in LORA_TARGETS:
            names = [t.split(".")[-1]]
        else:
            raise ValueError(f"LoRA target module {t!r} is unknown; use some of {', '.join(LORA_TARGETS)} "
                             f"(or {', '.join(HF_TARGET_NAMES.values())}, or all)")
        out += [n for n in names if n not in out]
    if not out:
        raise ValueError("no LoRA target modules given")
    return out


# --------------------------------------------------------------------------- NF4
# bitsandbytes' NF4 levels (quantiles of N(0,1), normalised to [-1, 1], with an exact zero).
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
])
NF4_BLOCK = 64


def nf4_quantize(w: torch.Tensor, block: int = NF4_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a weight to NF4.

    Args:
        w: (out, in) weight; ``out * in`` must be a multiple of ``block`` and of 2.

    Returns:
        ``(codes, absmax)``: (numel/2,) uint8, two 4-bit codes per byte (first value in the low
        nibble), and (numel/block,) fp32 block scales.
    """
    if w.numel() % block:
        raise ValueError(f"NF4 needs a multiple of {block} values, got a weight of shape {tuple(w.shape)}")
    blocks = w.detach().float().reshape(-1, block)  # (N/block, block)
    absmax = blocks.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny)  # (N/block,)
    x = (blocks / absmax[:, None]).reshape(-1)  # (N,) in [-1, 1]
    mids = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2  # nearest level = count of midpoints below
    codes = torch.bucketize(x, mids).to(torch.uint8)  # (N,)
    packed = codes[0::2] | (codes[1::2] << 4)  # (N/2,)
    return packed, absmax


def nf4_dequantize(codes: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, ...],
                   dtype: torch.dtype = torch.float32, block: int = NF4_BLOCK) -> torch.Tensor:
    """Inverse of `nf4_quantize`: a (shape) tensor of `dtype`."""
    idx = torch.stack((codes & 0x0F, codes >> 4), dim=1).reshape(-1).long()  # (N,)
    levels = NF4_LEVELS.to(device=codes.device)[idx].reshape(-1, block)  # (N/block, block)
    return (levels * absmax[:, None]).reshape(shape).to(dtype)


class _NF4Matmul(torch.autograd.Function):
    """y = x @ W.T with W dequantized in forward and again in backward (no saved copy of W)."""

    @staticmethod
    def forward(ctx, x, module):  # noqa: D401
        ctx.module = module
        return F.linear(x, module.dequantize(x.dtype))

    @staticmethod
    def backward(ctx, grad_y):
        w = ctx.module.dequantize(grad_y.dtype)  # (out, in)
        return grad_y @ w, None


class NF4Linear(nn.Module):
    """A frozen, bias-free linear layer whose weight is held in 4-bit NF4 (see module docstring).

    Args:
        weight: (out_features, in_features) weight to quantize.
    """

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        codes, absmax = nf4_quantize(weight)
        self.register_buffer("codes", codes)
        self.register_buffer("absmax", absmax)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "NF4Linear":
        if linear.bias is not None:
            raise ValueError("NF4Linear does not support a bias")
        return cls(linear.weight)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight, (out, in), in `dtype`."""
        return nf4_dequantize(self.codes, self.absmax, (self.out_features, self.in_features), dtype)

    @property
    def weight(self) -> torch.Tensor:
        return self.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        return _NF4Matmul.apply(x, self)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4 block={NF4_BLOCK}"


# --------------------------------------------------------------------------- LoRA
class LoRALinear(nn.Module):
    """``base(x) + scaling * lora_b(lora_a(dropout(x)))``, a drop-in for a bias-free ``nn.Linear``.

    Args:
        base: the frozen layer (``nn.Linear`` or `NF4Linear`), kept as is.
        rank: r, the inner dimension.
        alpha: scaling numerator: ``scaling = alpha / r`` (``alpha / sqrt(r)`` with `use_rslora`).
        dropout: dropout on the LoRA branch's input (training only).
        use_rslora: rank-stabilised scaling.

    A is initialised like PEFT's default (Kaiming-uniform with a=sqrt(5), i.e. ``nn.Linear``'s init),
    B at zero. The LoRA weights are fp32 whatever the base dtype.
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False):
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha, self.use_rslora = rank, float(alpha), use_rslora
        self.scaling = self.alpha / (math.sqrt(rank) if use_rslora else rank)
        device = _device_of(base)
        self.lora_a = nn.Linear(self.in_features, rank, bias=False, device=device, dtype=torch.float32)
        self.lora_b = nn.Linear(rank, self.out_features, bias=False, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True
        for p in self.base.parameters():
            p.requires_grad_(False)

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (unmerged)."""
        return self.base.weight

    def delta_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """scaling * B @ A, (out, in)."""
        return (self.lora_b.weight.float() @ self.lora_a.weight.float() * self.scaling).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (..., out)
        if not self.enabled:
            return y
        dx = self.dropout(x)
        if not torch.is_autocast_enabled(x.device.type):
            dx = dx.to(self.lora_a.weight.dtype)
        return y + self.lora_b(self.lora_a(dx) * self.scaling).to(y.dtype)  # scale the (..., r) middle: cheaper

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}, scaling={self.scaling:g}"


def _device_of(module: nn.Module) -> torch.device:
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return torch.device("cpu")


def _target_paths(model: nn.Module, targets: list[str]) -> list[str]:
    """Full module names under ``layers.N.`` for the short target names."""
    suffixes = {LORA_TARGETS[t] for t in targets}
    paths = []
    for name, _ in model.named_modules():
        parts = name.split(".")
        if len(parts) >= 4 and parts[0] == "layers" and ".".join(parts[2:4]) in suffixes and len(parts) == 4:
            paths.append(name)
    return paths


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent), leaf, module)


def apply_lora(model: nn.Module, targets: Union[str, Iterable[str]] = DEFAULT_TARGETS, *, rank: int = 8,
               alpha: float = 16.0, dropout: float = 0.0, use_rslora: bool = False,
               quantize_base: bool = False, seed: Optional[int] = None) -> list[str]:
    """Wrap the target linear layers of every block in `LoRALinear`, freezing everything else.

    Args:
        model: a `Transformer` (or any module with ``layers.N.attention.wq``-style names).
        targets: short names (``wq``, ``wk``, ``wv``, ``wo``, ``w1``, ``w2``, ``w3``), HF names, or "all".
        rank, alpha, dropout, use_rslora: see `LoRALinear`.
        quantize_base: QLoRA: hold every block linear (targets and the rest) as `NF4Linear`.
        seed: seed for the A initialisation (None: the global generator).

    Returns:
        The full names of the wrapped modules.

    Raises:
        ValueError: unknown target, or the model already has LoRA layers.
    """
    names = normalize_targets(targets)
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("the model already has LoRA layers; remove_lora() or merge_lora() first")
    for p in model.parameters():
        p.requires_grad_(False)
    if quantize_base:
        for path in _target_paths(model, list(DEFAULT_TARGETS)):
            lin = model.get_submodule(path)
            if isinstance(lin, nn.Linear):
                _set_module(model, path, NF4Linear.from_linear(lin))
    gen_state = None
    if seed is not None:
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
    try:
        paths = _target_paths(model, names)
        for path in paths:
            base = model.get_submodule(path)
            _set_module(model, path, LoRALinear(base, rank, alpha, dropout, use_rslora))
    finally:
        if gen_state is not None:
            torch.random.set_rng_state(gen_state)
    mark_layers_changed(model)
    return paths


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """The `LoRALinear` layers of `model`, by full name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA weights only: ``{"layers.0.attention.wq.lora_a.weight": (r, in), ...lora_b.weight: (out, r)}``."""
    out = {}
    for name, m in lora_modules(model).items():
        out[f"{name}.lora_a.weight"] = m.lora_a.weight
        out[f"{name}.lora_b.weight"] = m.lora_b.weight
    return out


def set_lora_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every LoRA branch on or off (off: exactly the base model)."""
    for m in lora_modules(model).values():
        m.enabled = enabled


def _plain_linear(base: nn.Module, weight: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(base.in_features, base.out_features, bias=False, device=weight.device, dtype=weight.dtype)
    lin.weight = nn.Parameter(weight, requires_grad=False)
    return lin


def merge_lora(model: nn.Module, dtype: Optional[torch.dtype] = None) -> int:
    """Fold each LoRA update into its base weight and replace the wrapper by a plain ``nn.Linear``.

    The sum is done in fp32 and stored in `dtype` (default: the base weight's dtype; an `NF4Linear`
    base is dequantized, to fp32 unless `dtype` says otherwise).

    Returns:
        The number of layers merged.
    """
    mods = lora_modules(model)
    for name, m in mods.items():
        base = m.base
        if isinstance(base, NF4Linear):
            w, out_dtype = base.dequantize(torch.float32), dtype or torch.float32
        else:
            w, out_dtype = base.weight.detach().float(), dtype or base.weight.dtype
        merged = (w + m.delta_weight(torch.float32).to(w.device)).to(out_dtype)
        _set_module(model, name, _plain_linear(base, merged))
    return len(mods)


def remove_lora(model: nn.Module) -> int:
    """Put the original layers back (unmerged), dropping the LoRA weights. Returns how many."""
    mods = lora_modules(model)
    for name, m in mods.items():
        _set_module(model, name, m.base)
    return len(mods)


def dequantize_nf4(model: nn.Module, dtype: torch.dtype = torch.float32) -> int:
    """Replace every `NF4Linear` (outside LoRA wrappers too) by a plain ``nn.Linear``. Returns how many."""
    done = 0
    for name, m in list(model.named_modules()):
        if isinstance(m, NF4Linear):
            _set_module(model, name, _plain_linear(m, m.dequantize(dtype)))
            done += 1
    return done


def mark_layers_changed(model: nn.Module) -> None:
    """Record on `model` that layers were swapped after it was built (LoRA wrappers).

    A compiled decode step skips re-checking the model's modules on every call only while this
    mark is absent (`inhouse.engine.compile.compile_decode`).
    """
    model.__dict__["layers_changed"] = True


__all__ = [
    "LORA_TARGETS", "HF_TARGET_NAMES", "DEFAULT_TARGETS", "normalize_targets", "NF4Linear", "nf4_quantize",
    "nf4_dequantize", "LoRALinear", "apply_lora", "lora_modules", "lora_state_dict", "set_lora_enabled",
    "merge_lora", "remove_lora", "dequantize_nf4", "mark_layers_changed",
]

