"""Several LoRA adapters in one batch: each row of a forward picks its own adapter (or none).

`MultiLoRALinear` is a drop-in for a frozen bias-free linear (``nn.Linear``, `NF4Linear`,
``Int8Linear``/``Int4Linear``), like `inhouse.model.lora.LoRALinear`, but it holds a stack of
adapters instead of one:

    lora_a   (S, r, in)    S slots; slot 0 is all zeros: the base model
    lora_b   (S, out, r)   r = the largest rank held; smaller ranks are zero-padded
    scaling  (S,)          alpha / r (or alpha / sqrt(r)) of each slot; 0 for slot 0

Which slot each batch row uses is set before the forward in an `AdapterRows` object shared by
every layer of the model (`set_adapter_rows` / `adapter_rows`). For the rows that use an adapter:

    y[i] = base(x)[i] + (scaling[s_i] * x[i] @ A[s_i].T) @ B[s_i].T       s_i = the row's slot

computed for all of them at once with gathered weights and two batched matmuls, in fp32 (as
`LoRALinear` does), the update cast to the output dtype before the add. Rows on slot 0 are not
touched at all: their output is the base layer's, bit for bit; a batch with no adapter row costs
nothing beyond the base layer. Zero padding adds only exact zeros, so an adapter's rows give what
its single-adapter `LoRALinear` gives, up to the summation order of the matmuls.

Filling the slots (reading files, choosing which adapters stay resident) is the caller's job:
see `inhouse.finetune.adapters.AdapterBank`. This module does no I/O.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence, Union

import torch
from torch import nn

from inhouse.model.lora import LORA_TARGETS, LoRALinear, _device_of, _set_module, _target_paths, mark_layers_changed


class AdapterRows:
    """Which adapter slot each row of the next forward uses; shared by all `MultiLoRALinear` layers of a model.

    ``per_row`` is the slot of every row as given; for the layers only the rows with a slot other
    than 0 are kept: ``rows`` (b,) their batch indices and ``slots`` (b,) their slots, or both None
    when every row runs the base model.
    """

    def __init__(self) -> None:
        self.per_row: list[int] = []
        self.n_rows = 0
        self.rows: Optional[torch.Tensor] = None
        self.slots: Optional[torch.Tensor] = None
        self.all_rows = False  # every row uses an adapter: no gather/scatter of rows needed

    def set(self, slots: Union[Sequence[int], torch.Tensor, None], device: Union[torch.device, str, None] = None) -> None:
        """Set the slot of each row (B,), or None: every row on the base model.

        Raises:
            ValueError: a negative slot.
        """
        if slots is None:
            self.clear()
            return
        slots = [int(s) for s in (slots.tolist() if isinstance(slots, torch.Tensor) else slots)]
        if any(s < 0 for s in slots):
            raise ValueError(f"adapter slots must be >= 0 (0 = the base model), got {slots}")
        active = [i for i, s in enumerate(slots) if s > 0]
        self.per_row, self.n_rows = slots, len(slots)
        if not active:
            self.rows = self.slots = None
            self.all_rows = False
            return
        self.rows = torch.tensor(active, dtype=torch.long, device=device)
        self.slots = torch.tensor([slots[i] for i in active], dtype=torch.long, device=device)
        self.all_rows = len(active) == len(slots)

    def clear(self) -> None:
        self.per_row, self.n_rows, self.rows, self.slots, self.all_rows = [], 0, None, None, False


class MultiLoRALinear(nn.Module):
    """``base(x)`` plus, for each row, the LoRA update of that row's adapter slot (see the module docstring).

    Args:
        base: the frozen layer, kept as is (anything with ``in_features``/``out_features``).
        rows: the model's shared `AdapterRows`.
        n_slots: slots to allocate (slot 0 included), at least 1.
        rank: the padded rank r, at least 1.

    The stacks are fp32 buffers (not parameters, not in the state dict): this layer serves, it does
    not train (training uses `LoRALinear`).
    """

    def __init__(self, base: nn.Module, rows: AdapterRows, n_slots: int = 1, rank: int = 1):
        super().__init__()
        if n_slots < 1 or rank < 1:
            raise ValueError(f"MultiLoRALinear needs n_slots >= 1 and rank >= 1, got {n_slots} and {rank}")
        self.base = base
        self.adapter_rows = rows
        self.in_features, self.out_features = base.in_features, base.out_features
        device = _device_of(base)
        f32 = torch.float32
        self.register_buffer("lora_a", torch.zeros(n_slots, rank, self.in_features, dtype=f32, device=device),
                             persistent=False)
        self.register_buffer("lora_b", torch.zeros(n_slots, self.out_features, rank, dtype=f32, device=device),
                             persistent=False)
        self.register_buffer("scaling", torch.zeros(n_slots, dtype=f32, device=device), persistent=False)

    @property
    def n_slots(self) -> int:
        return self.lora_a.shape[0]

    @property
    def rank(self) -> int:
        return self.lora_a.shape[1]

    def reserve(self, n_slots: int, rank: int) -> None:
        """Grow the stacks to at least `n_slots` slots and rank `rank` (zero-filled; contents kept)."""
        n_slots, rank = max(n_slots, self.n_slots), max(rank, self.rank)
        if (n_slots, rank) == (self.n_slots, self.rank):
            return
        a = self.lora_a.new_zeros(n_slots, rank, self.in_features)
        b = self.lora_b.new_zeros(n_slots, self.out_features, rank)
        s = self.scaling.new_zeros(n_slots)
        a[: self.n_slots, : self.rank] = self.lora_a
        b[: self.n_slots, :, : self.rank] = self.lora_b
        s[: self.n_slots] = self.scaling
        self.lora_a, self.lora_b, self.scaling = a, b, s

    @torch.no_grad()
    def set_slot(self, slot: int, a: Optional[torch.Tensor], b: Optional[torch.Tensor], scaling: float) -> None:
        """Write one adapter into `slot` (1..n_slots-1); ``a``/``b`` None: this adapter leaves the layer alone.

        Args:
            a: (r, in) LoRA A; b: (out, r) LoRA B, with r <= the padded rank.

        Raises:
            ValueError: slot 0 (the base model), a slot out of range, or shapes that do not fit.
        """
        if not 1 <= slot < self.n_slots:
            raise ValueError(f"adapter slot {slot} is out of range 1..{self.n_slots - 1} (slot 0 is the base model)")
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        self.scaling[slot] = 0.0
        if a is None or b is None:
            return
        r = a.shape[0]
        if a.shape != (r, self.in_features) or b.shape != (self.out_features, r) or r > self.rank:
            raise ValueError(f"LoRA A {tuple(a.shape)} / B {tuple(b.shape)} do not fit a layer of "
                             f"({self.out_features}, {self.in_features}) with rank <= {self.rank}")
        self.lora_a[slot, :r] = a
        self.lora_b[slot, :, :r] = b
        self.scaling[slot] = float(scaling)

    def clear_slot(self, slot: int) -> None:
        """Zero one slot (its adapter was evicted)."""
        self.set_slot(slot, None, None, 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (B, ..., out)
        ctx = self.adapter_rows
        if ctx.slots is None:
            return y  # every row on the base model
        if x.shape[0] != ctx.n_rows:
            raise ValueError(f"the adapter rows were set for a batch of {ctx.n_rows} rows, the input has {x.shape[0]}")
        xs = x if ctx.all_rows else x.index_select(0, ctx.rows)  # (b, ..., in): rows with an adapter
        b = xs.shape[0]
        xs = xs.reshape(b, -1, self.in_features).to(torch.float32)  # (b, T, in)
        a = self.lora_a.index_select(0, ctx.slots)  # (b, r, in)
        bw = self.lora_b.index_select(0, ctx.slots)  # (b, out, r)
        mid = torch.bmm(xs, a.transpose(1, 2)) * self.scaling.index_select(0, ctx.slots)[:, None, None]  # (b, T, r)
        delta = torch.bmm(mid, bw.transpose(1, 2)).to(y.dtype)  # (b, T, out)
        if ctx.all_rows:
            return y + delta.view(y.shape)
        return y.index_add(0, ctx.rows, delta.view((b,) + tuple(y.shape[1:])))  # slot-0 rows untouched

    def extra_repr(self) -> str:
        return f"slots={self.n_slots}, rank={self.rank}"


def multi_lora_modules(model: nn.Module) -> dict[str, MultiLoRALinear]:
    """The `MultiLoRALinear` layers of `model`, by full name (``layers.N.attention.wq``)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, MultiLoRALinear)}


def apply_multi_lora(model: nn.Module, targets: Sequence[str], rows: AdapterRows, n_slots: int = 1,
                     rank: int = 1) -> list[str]:
    """Wrap the target layers of every block in `MultiLoRALinear` (layers already wrapped are kept).

    Args:
        model: a `Transformer`.
        targets: short names (``wq``, ..., ``w3``).
        rows: the shared `AdapterRows` (must be the one the model's other wrapped layers use).
        n_slots, rank: the size new layers start at (use `MultiLoRALinear.reserve` to match the others).

    Returns:
        The full names of the newly wrapped modules.

    Raises:
        ValueError: an unknown target, or the model has single-adapter `LoRALinear` layers.
    """
    bad = [t for t in targets if t not in LORA_TARGETS]
    if bad:
        raise ValueError(f"LoRA target {bad[0]!r} is unknown; use some of {', '.join(LORA_TARGETS)}")
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("the model already has LoRA layers applied (apply_lora/load_adapter); remove_lora() or "
                         "merge_lora() before serving several adapters")
    new = []
    for path in _target_paths(model, list(targets)):
        layer = model.get_submodule(path)
        if isinstance(layer, MultiLoRALinear):
            if layer.adapter_rows is not rows:
                raise ValueError(f"{path} is already wrapped for another set of adapter rows")
            continue
        _set_module(model, path, MultiLoRALinear(layer, rows, n_slots, rank))
        new.append(path)
    mark_layers_changed(model)
    return new


def _rows_of(model: nn.Module) -> Optional[AdapterRows]:
    for m in model.modules():
        if isinstance(m, MultiLoRALinear):
            return m.adapter_rows
    return None


def set_adapter_rows(model: nn.Module, slots: Union[Sequence[int], torch.Tensor, None]) -> None:
    """Choose the adapter slot of each row (B,) for the model's next forwards (None or all 0: base model).

    Raises:
        ValueError: the model has no `MultiLoRALinear` layers and a slot other than 0 is asked for.
    """
    rows = _rows_of(model)
    if rows is None:
        if slots is not None and any(int(s) for s in slots):
            raise ValueError("the model has no multi-adapter LoRA layers (apply_multi_lora)")
        return
    device = next(m for m in model.modules() if isinstance(m, MultiLoRALinear)).lora_a.device
    rows.set(slots, device)


@contextlib.contextmanager
def adapter_rows(model: nn.Module, slots: Union[Sequence[int], torch.Tensor, None]) -> Iterator[None]:
    """``with adapter_rows(model, [0, 2, 1]): logits = model(tokens)`` — the rows are cleared afterwards."""
    set_adapter_rows(model, slots)
    try:
        yield
    finally:
        set_adapter_rows(model, None)


__all__ = ["AdapterRows", "MultiLoRALinear", "multi_lora_modules", "apply_multi_lora", "set_adapter_rows",
           "adapter_rows"]
