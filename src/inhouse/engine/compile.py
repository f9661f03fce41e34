"""The one opt-in compile boundary: `torch.compile` of the decode step.

Only the model's forward for decode steps (every row one token behind) is compiled; prompt
chunks run eagerly (they are dominated by large matmuls, where compiling gains little). Shapes
are dynamic (batch size and attended cache length change every step), so one compiled graph
serves every step instead of one per length.

Compiled kernels are kept on disk by Inductor's caches (FX graph and AOT autograd caches), in
``$INHOUSE_COMPILE_CACHE`` or ``~/.cache/inhouse/compile``, so a second start skips code
generation and C++ compilation (tracing still runs).
"""

from __future__ import annotations

import logging
import os
from typing import Callable

import torch

logger = logging.getLogger("inhouse.engine")


def compile_cache_dir() -> str:
    """Where compiled artifacts are kept between runs."""
    return os.environ.get("INHOUSE_COMPILE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "inhouse", "compile")


def compile_decode(model: torch.nn.Module) -> Callable[..., torch.Tensor]:
    """A compiled callable with the model's forward signature, for one-token decode steps.

    The model itself is not changed (eager calls stay eager). Inductor's on-disk cache directory
    is set only if the process has not chosen one (``TORCHINDUCTOR_CACHE_DIR``).
    """
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = compile_cache_dir()
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    logger.info("compiling the decode step (first start is slow; artifacts cached in %s)",
                os.environ["TORCHINDUCTOR_CACHE_DIR"])
    # While no layer has been swapped (LoRA wrappers: `inhouse.model.lora.mark_layers_changed`,
    # also when an adapter is first used), the model's modules are fixed, and Dynamo need not
    # re-check them before every step: on SmolLM2-135M those guards cost ~1.4 ms per token.
    # Afterwards, a fully guarded variant.
    fixed = torch.compile(model, dynamic=True,
                          options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})
    guarded = torch.compile(model, dynamic=True)
    state = {"guarded": bool(model.__dict__.get("layers_changed"))}

    def decode(tokens: torch.Tensor, input_pos: torch.Tensor, caches, last_only: bool = False,
               cache_rows=None) -> torch.Tensor:
        # The two host reads of a step (attended length, contiguous cache rows) happen here,
        # eagerly, so that the compiled graph has no break.
        n_slots = int(input_pos.max()) + 1
        rows = caches[0].rows_index(tokens.shape[0], cache_rows)
        if not state["guarded"] and model.__dict__.get("layers_changed"):
            # Dynamo keeps compiled code per function, shared by both variants: the graphs
            # compiled without module guards would still match. Drop them (process-wide).
            torch._dynamo.reset()
            state["guarded"] = True
        compiled = guarded if state["guarded"] else fixed
        return compiled(tokens, input_pos=input_pos, caches=caches, last_only=last_only, cache_rows=rows,
                        n_slots=n_slots)

    return decode
