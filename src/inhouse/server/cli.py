"""`inhouse serve`: load the model, build the app, run it (the CLI only parses arguments)."""

from __future__ import annotations

import argparse
import logging
import os
import re
from typing import Optional

import torch

logger = logging.getLogger("inhouse.server")

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
          "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "t": 1000**4, "tb": 1000**4, "tib": 1024**4}


def parse_size(text: str) -> int:
    """'2GiB', '512MB', '1e9' -> bytes. Raises ValueError naming the text."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"--kv-cache-memory {text!r}: expected a size like 2GiB, 512MB or 1000000000")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def seqs_for_budget(args, max_model_len: int, element_size: int, budget: int) -> int:
    """How many full-context cache rows fit in `budget` bytes (keys and values, all layers)."""
    per_row = args.kv_cache_bytes(max_model_len, element_size)
    n = budget // per_row
    if n < 1:
        raise ValueError(f"--kv-cache-memory of {budget} bytes does not hold one sequence of {max_model_len} tokens "
                         f"({per_row} bytes); raise it or lower --max-model-len")
    return int(n)


def parse_adapter_specs(specs: Optional[list[str]]) -> list[tuple[str, str]]:
    """``--adapter NAME=DIR`` values -> [(name, dir)], checked before the model loads.

    Raises:
        ValueError: naming the offending value (no ``=``, an empty or repeated name, a missing directory).
    """
    out: list[tuple[str, str]] = []
    for spec in specs or []:
        name, eq, path = spec.partition("=")
        name, path = name.strip(), path.strip()
        if not eq or not name or not path:
            raise ValueError(f"--adapter {spec!r}: expected NAME=DIR (the name clients put in 'model', and a PEFT "
                             "adapter directory)")
        if any(name == n for n, _ in out):
            raise ValueError(f"--adapter {spec!r}: the name {name!r} is given twice")
        if not os.path.isdir(path):
            raise ValueError(f"--adapter {spec!r}: {path} is not a directory")
        out.append((name, path))
    return out


def serve_threads(requested: Optional[int]) -> int:
    """Threads for the model's CPU work: `requested`, else every core this process may use.

    Measured on 2 cores (benchmarks/serve_bench.py, embedded model, with every step one native call):
    2 model threads gave 167-173 / 199-211 tok/s at 4 / 16 clients against 130-141 / 123-134 with 1,
    and the same at 1 client (78-84). (When each step was hundreds of small operations, one thread
    was better: the event loop displaced a thread that every barrier then waited for.)
    """
    if requested is not None:
        if requested < 1:
            raise ValueError(f"--threads={requested} must be at least 1")
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores)


def run_serve(a: argparse.Namespace) -> int:
    """Implements `inhouse serve` (see `inhouse serve --help`)."""
    from inhouse import LLM
    from inhouse.server.app import create_app, serve
    from inhouse.server.auth import ApiKeys
    from inhouse.model.transformer import model_dtype

    keys: Optional[ApiKeys] = ApiKeys.from_file(a.api_key_file) if a.api_key_file else None
    if a.max_num_seqs < 1:
        raise ValueError(f"--max-num-seqs={a.max_num_seqs} must be at least 1")
    if a.max_queue < 0:
        raise ValueError(f"--max-queue={a.max_queue} must be at least 0")
    template = None
    if a.chat_template:
        with open(a.chat_template, encoding="utf-8") as f:
            template = f.read()
    max_num_seqs = a.max_num_seqs
    budget = parse_size(a.kv_cache_memory) if a.kv_cache_memory else None
    adapters = parse_adapter_specs(getattr(a, "adapter", None))
    threads = serve_threads(getattr(a, "threads", None))
    torch.set_num_threads(threads)
    logger.info("model threads: %d", threads)
    max_loras = getattr(a, "max_loras", 8)
    if max_loras < 1:
        raise ValueError(f"--max-loras={max_loras} must be at least 1")
    llm = LLM(a.model, dtype=a.dtype, max_model_len=a.max_model_len, seed=a.seed or 0, max_num_seqs=max_num_seqs,
              chat_format=a.chat_format, chat_template=template, max_loras=max_loras,
              quantize=getattr(a, "quantize", "auto"), compile=getattr(a, "compile", False))
    if budget is not None:
        elsize = model_dtype(llm.model).itemsize
        fit = seqs_for_budget(llm.loaded.args, llm.max_model_len, elsize, budget)
        if fit < max_num_seqs:
            logger.info("KV cache budget %s holds %d sequences of %d tokens; --max-num-seqs lowered from %d",
                        a.kv_cache_memory, fit, llm.max_model_len, max_num_seqs)
            llm = LLM.from_model(llm.model, llm.tokenizer, name=llm.loaded.name, max_model_len=llm.max_model_len,
                                 seed=a.seed or 0, max_num_seqs=fit, chat_format=a.chat_format,
                                 chat_template=template, max_loras=max_loras, compile=getattr(a, "compile", False))
    for name, path in adapters:
        llm.add_lora(path, name=name)  # AdapterError (a ValueError) names the directory and the problem
    llm.engine.warm_up()  # with --compile: every kind of decode step compiled before the first client
    timeout = a.request_timeout if a.request_timeout and a.request_timeout > 0 else None
    app = create_app(llm, api_keys=keys, served_model_names=a.served_model_name, max_queue=a.max_queue,
                     request_timeout=timeout)
    level = "debug" if a.verbose else ("warning" if a.quiet else "info")
    serve(app, host=a.host, port=a.port, log_level=level)
    return 0
