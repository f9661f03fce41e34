"""`inhouse bench`: inhouse against llama.cpp and transformers on one model, in one run.

Every configuration runs in its own fresh process (so peak memory and start-up time are its own),
one after the other (never two at once: on a 2-core machine contention ruins timings). Each
worker prints one JSON line with:

  * ``ttft_s``        process start → first generated token of a short prompt (load included);
  * ``prefill_tok_s`` a `prompt_len`-token prompt, computed in one go;
  * ``decode_tok_s``  `decode_len` new tokens at batch 1, greedy, end of text ignored;
  * ``batch_tok_s``   aggregate new tokens/s of `batch` sequences decoded together (inhouse only);
  * ``peak_rss_mb``   the process's peak resident memory.

llama.cpp runs under another interpreter (``--peer-python``, default /work/peers/bin/python, see
benchmarks/README.md), which needs only llama-cpp-python: this file imports nothing but the
standard library at the top so that the peer can run it as a script.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Optional

DEFAULT_PEER_PYTHON = "/work/peers/bin/python"
PARAGRAPH = (
    "The river rose slowly through the spring, and the people of the valley moved their animals to the "
    "high pastures. Old stories said the water had once reached the church steps; nobody living had seen it. "
    "The schoolteacher kept a notebook of the levels, a line for every morning, and the children took turns "
    "reading the gauge by the bridge. "
)
SHORT_PROMPT = "What is the capital of France?"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def prompt_ids(tokenizer_encode, n: int) -> list[int]:
    """`n` token ids of deterministic English text."""
    ids: list[int] = []
    while len(ids) < n:
        ids += tokenizer_encode(PARAGRAPH)
    return ids[:n]


# --------------------------------------------------------------------------- workers
def _worker_inhouse(model: Optional[str], quantize: str, dtype: str, opts: dict, t_start: float) -> dict:
    import torch

    from inhouse import LLM, SamplingParams

    llm = LLM(model, dtype=dtype, quantize=quantize, max_model_len=opts["prompt_len"] + opts["decode_len"] + 8,
              max_num_seqs=max(opts["batch"], 1), compile=opts.get("compile", False))
    tok = llm.get_tokenizer()
    first = None
    for d in llm.stream(tok.encode(SHORT_PROMPT, bos=tok.add_bos), SamplingParams(temperature=0, max_tokens=1)):
        first = first or time.time()
    ttft = first - t_start
    ids = prompt_ids(lambda s: tok.encode(s, bos=False), opts["prompt_len"])
    greedy = SamplingParams(temperature=0, max_tokens=1)
    llm.generate({"prompt_token_ids": ids[:64]}, greedy)  # warm-up
    t = time.perf_counter()
    llm.generate({"prompt_token_ids": ids}, greedy)
    prefill = opts["prompt_len"] / (time.perf_counter() - t)

    def decode(batch: int, n: int = opts["decode_len"]) -> float:
        params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        engine = llm.engine
        reqs = [engine.add_request(ids[i:i + 16], params) for i in range(batch)]
        while any(len(r.seqs[0].output_ids) == 0 for r in reqs):  # prefill + first token
            engine.step()
        t = time.perf_counter()
        n0 = sum(len(r.seqs[0].output_ids) for r in reqs)
        while engine.has_unfinished():
            engine.step()
        return (sum(len(r.seqs[0].output_ids) for r in reqs) - n0) / (time.perf_counter() - t)

    decode(1)  # warm-up (and compile, if asked)
    out = {"ttft_s": ttft, "prefill_tok_s": prefill, "decode_tok_s": decode(1)}
    if opts["batch"] > 1:
        decode(opts["batch"], 8)  # warm-up: a compiled step specializes batch 1 and compiles again for more rows
        out["batch_tok_s"] = decode(opts["batch"])
    out["threads"] = torch.get_num_threads()
    out["batch"] = opts["batch"]
    return out


def _worker_transformers(model_path: str, opts: dict, t_start: float) -> dict:
    import torch
    import transformers

    d, f = os.path.split(model_path)
    tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    with torch.inference_mode():
        ids = tok(SHORT_PROMPT, return_tensors="pt").input_ids
        model.generate(ids, max_new_tokens=1, do_sample=False)
        ttft = time.time() - t_start
        long = torch.tensor([prompt_ids(lambda s: tok(s, add_special_tokens=False).input_ids, opts["prompt_len"])])
        model(long[:, :64])
        t = time.perf_counter()
        model(long)
        prefill = opts["prompt_len"] / (time.perf_counter() - t)
        short = long[:, :16]
        n = opts["decode_len"]
        kw = dict(do_sample=False, eos_token_id=None, pad_token_id=tok.eos_token_id)
        model.generate(short, max_new_tokens=8, min_new_tokens=8, **kw)
        t = time.perf_counter()
        model.generate(short, max_new_tokens=1, min_new_tokens=1, **kw)
        t1 = time.perf_counter() - t
        t = time.perf_counter()
        model.generate(short, max_new_tokens=n, min_new_tokens=n, **kw)
        decode = (n - 1) / (time.perf_counter() - t - t1)
    return {"ttft_s": ttft, "prefill_tok_s": prefill, "decode_tok_s": decode, "threads": torch.get_num_threads()}


def llamacpp_without_extra_buffers() -> None:
    """Load llama.cpp models without its "extra buffer types" (weight repacking).

    On these machines (Intel Xeon with AMX) the only extra buffer type that applies to Q4_1 is
    llama.cpp's AMX path, and it crashes (SIGSEGV in llama_decode on any prompt longer than one
    token, llama-cpp-python 0.3.36). Turning it off keeps llama.cpp's regular AVX-512 kernels.
    """
    import llama_cpp.llama_cpp as lib

    default = lib.llama_model_default_params
    if getattr(default, "_inhouse_patched", False):
        return

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    params._inhouse_patched = True
    lib.llama_model_default_params = params


def _worker_llamacpp(model_path: str, opts: dict, t_start: float) -> dict:
    llamacpp_without_extra_buffers()
    import llama_cpp

    threads = opts["threads"]
    llm = llama_cpp.Llama(model_path=model_path, n_ctx=opts["prompt_len"] + opts["decode_len"] + 64,
                          n_batch=max(512, opts["prompt_len"]), n_ubatch=max(512, opts["prompt_len"]), n_threads=threads, n_threads_batch=threads, verbose=False)
    ids = llm.tokenize(SHORT_PROMPT.encode(), add_bos=True)
    next(iter(llm.generate(ids, temp=0.0)))
    ttft = time.time() - t_start
    long = prompt_ids(lambda s: llm.tokenize(s.encode(), add_bos=False), opts["prompt_len"])
    llm.reset()
    llm.eval(long[:64])
    llm.reset()
    t = time.perf_counter()
    llm.eval(long)
    prefill = opts["prompt_len"] / (time.perf_counter() - t)
    llm.reset()
    n = opts["decode_len"]
    gen = llm.generate(long[:16], temp=0.0, reset=True)
    next(gen)  # prefill + first token
    t = time.perf_counter()
    for _ in range(n - 1):
        next(gen)
    decode = (n - 1) / (time.perf_counter() - t)
    return {"ttft_s": ttft, "prefill_tok_s": prefill, "decode_tok_s": decode, "threads": threads}


def _worker_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--worker", required=True)
    p.add_argument("--model", default=None)
    p.add_argument("--opts", required=True)
    a = p.parse_args(argv)
    opts = json.loads(a.opts)
    t_start = opts.pop("t_launch")  # wall clock when the driver launched this process
    kind, _, variant = a.worker.partition(":")
    if kind == "inhouse":
        from inhouse.util import import_torch_frozen

        import_torch_frozen()  # as the command line does before it loads a model
        variant, plus, _ = variant.partition("+")  # "int4+compile": with the compiled decode step
        opts["compile"] = opts.get("compile", False) or plus == "+"
        quantize, dtype = {"int4": ("int4", "bfloat16"), "int8": ("int8", "bfloat16"), "bf16": ("none", "bfloat16"),
                           "fp32": ("none", "float32")}[variant]
        res = _worker_inhouse(a.model, quantize, dtype, opts, t_start)
    elif kind == "transformers":
        res = _worker_transformers(a.model, opts, t_start)
    elif kind == "llamacpp":
        res = _worker_llamacpp(a.model, opts, t_start)
    else:
        raise SystemExit(f"unknown worker {a.worker}")
    res["peak_rss_mb"] = _peak_rss_mb()
    print("BENCH_RESULT " + json.dumps(res), flush=True)
    return 0


# --------------------------------------------------------------------------- driver
def _run_worker(python: str, worker: str, model: Optional[str], opts: dict, timeout: float = 1800) -> dict:
    cmd = [python, os.path.abspath(__file__), "--worker", worker, "--opts"]
    t0 = time.time()
    # Time to first token counts from here: interpreter start and imports included.
    proc = subprocess.run(cmd + [json.dumps(dict(opts, t_launch=t0))] + (["--model", model] if model else []),
                          capture_output=True, text=True, timeout=timeout)
    wall = time.time() - t0
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            res = json.loads(line[len("BENCH_RESULT "):])
            res["wall_s"] = wall
            return res
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    if proc.returncode < 0:
        return {"error": f"crashed (signal {-proc.returncode}); run the worker by hand to see why: {' '.join(cmd)} ..."}
    return {"error": " / ".join(tail) or f"exit status {proc.returncode}"}


def _peer_has(python: str, module: str) -> Optional[str]:
    """None if `python` can import `module`, else why not."""
    if not os.path.exists(python):
        return f"{python} does not exist"
    r = subprocess.run([python, "-c", f"import {module}"], capture_output=True, text=True)
    return None if r.returncode == 0 else f"{module} is not installed for {python}"


_HIGHER_BETTER = ("prefill_tok_s", "decode_tok_s", "batch_tok_s")
_LOWER_BETTER = ("ttft_s",)


def best_of(results: list[dict]) -> dict:
    """One configuration's runs merged: the best of each speed and time to first token, the highest
    peak RSS (speeds on a shared or throttled machine only ever come out lower than the machine can
    do; memory is what the run needed). An error only if every run failed."""
    ok = [r for r in results if "error" not in r]
    if not ok:
        return results[-1]
    merged = dict(ok[-1], runs=len(ok))
    for key in _HIGHER_BETTER + _LOWER_BETTER:
        values = [r[key] for r in ok if r.get(key) is not None]
        if values:
            merged[key] = max(values) if key in _HIGHER_BETTER else min(values)
    merged["peak_rss_mb"] = max(r["peak_rss_mb"] for r in ok)
    return merged


def run_bench(model: Optional[str], *, precisions: list[str], peers: list[str], peer_python: str,
              prompt_len: int = 512, decode_len: int = 128, batch: int = 8, threads: Optional[int] = None,
              compile: bool = False, repeat: int = 1, out=sys.stdout) -> list[dict]:
    """Run every configuration and print the table; returns the rows (dicts).

    With `repeat` > 1 the whole sequence of configurations runs that many times, one after the
    other (so that a slow spell of the machine hits every engine alike), merged by `best_of`.
    """
    from inhouse.resolve import parse_model_spec

    spec = parse_model_spec(model)
    path = spec.path
    opts = {"prompt_len": prompt_len, "decode_len": decode_len, "batch": batch,
            "threads": threads or os.cpu_count() or 1, "compile": compile}
    configs: list[tuple[str, str, str, Optional[str]]] = []  # (row name, interpreter, worker, model)
    rows: dict[str, list[dict]] = {}  # row name -> its runs, in table order
    for prec in precisions:
        configs.append((f"inhouse {prec}", sys.executable, f"inhouse:{prec}", model))
        rows[f"inhouse {prec}"] = []
    for peer in peers:
        name = {"llamacpp": "llama.cpp", "transformers": "transformers fp32"}[peer]
        if path is None or (peer == "llamacpp" and not path.endswith(".gguf")):
            rows[name] = [{"name": name, "error": "needs a model file (GGUF for llama.cpp)"}]
            continue
        python = peer_python if peer == "llamacpp" else sys.executable
        why = _peer_has(python, "llama_cpp" if peer == "llamacpp" else "transformers")
        if why:
            rows[name] = [{"name": name, "error": f"not installed: {why} (see benchmarks/README.md)"}]
            continue
        configs.append((name, python, peer, path))
        rows[name] = []
    for round_ in range(max(1, repeat)):
        for name, python, worker, target in configs:
            print(f"running {name} ..." + (f" (round {round_ + 1}/{repeat})" if repeat > 1 else ""), file=sys.stderr,
                  flush=True)
            rows[name].append({"name": name, **_run_worker(python, worker, target, opts)})
    merged = [best_of(runs) for runs in rows.values()]
    print_table(merged, out=out, ref="llama.cpp", header=f"model {spec.name}; prompt {prompt_len} tokens, "
                f"decode {decode_len} tokens, batch {batch}" + (f"; best of {repeat} rounds" if repeat > 1 else ""))
    return merged


def print_table(rows: list[dict], *, out=sys.stdout, ref: str = "llama.cpp", header: str = "") -> None:
    """One Markdown table; ratios are against the `ref` row when it ran."""
    base = next((r for r in rows if r["name"] == ref and "error" not in r), None)

    def cell(r, key, fmt, higher_better=True):
        v = r.get(key)
        if v is None:
            return "—"
        s = fmt.format(v)
        if base is not None and r is not base and base.get(key):
            ratio = v / base[key] if higher_better else base[key] / v
            s += f" ({ratio:.2f}×)"
        return s

    if header:
        print(header, file=out)
    batch = next((r.get("batch", "") for r in rows if "batch" in r), "N")
    print(f"| engine | prefill tok/s | decode tok/s | batch-{batch} decode tok/s | time to first token s | peak RSS MB |",
          file=out)
    print("|---|---|---|---|---|---|", file=out)
    for r in rows:
        if "error" in r:
            print(f"| {r['name']} | {r['error']} | | | | |", file=out)
            continue
        print(f"| {r['name']} | {cell(r, 'prefill_tok_s', '{:.0f}')} | {cell(r, 'decode_tok_s', '{:.1f}')} | "
              f"{cell(r, 'batch_tok_s', '{:.1f}')} | {cell(r, 'ttft_s', '{:.2f}', False)} | "
              f"{r['peak_rss_mb']:.0f} |", file=out)
    if base is not None:
        print(f"(ratios against {ref}: higher is better for inhouse; time to first token ratio is {ref}'s ÷ ours)",
              file=out)


if __name__ == "__main__":
    if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
        del sys.path[0]  # run as a script: the package's folder must not shadow top-level modules
    sys.exit(_worker_main(sys.argv[1:]))
