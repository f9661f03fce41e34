"""Serving throughput and latency: inhouse's server against llama.cpp's two servers, same model file,
same machine, one run.

For 1, 4 and 16 concurrent clients, each client sends `--rounds` streaming chat requests one after
the other (greedy, `--max-tokens` new tokens). Reported per server and concurrency:
aggregate generated tokens/s (all tokens / wall time of the round) and time to first token p50/p99.

    python benchmarks/serve_bench.py                       # embedded SmolLM2-135M-Instruct Q4_1 GGUF
    python benchmarks/serve_bench.py --skip-llamacpp       # inhouse alone
    python benchmarks/serve_bench.py --skip-llamacpp --inhouse-compile   # inhouse, compiled decode step
    python benchmarks/serve_bench.py --model path/to/model.gguf --clients 1,4,16 --max-tokens 64

Peers (see benchmarks/README.md for how they are built):
  * llama-cpp-python's server (`llama_cpp.server`, from its own virtualenv, default /work/peers):
        PEER/bin/python -c LLAMACPP_SERVER --model M --n_threads N --interrupt_requests False ...
    (LLAMACPP_SERVER runs `llama_cpp.server` with llama.cpp's extra buffer types off: see below.)
    It has no parallel slots: it serves one request at a time (a lock around the model), queueing
    the others; `--interrupt_requests False` makes it queue instead of cutting a running stream off.
  * llama.cpp's own C++ server, `llama-server -np <max clients> -c <1024 per slot>` (parallel slots,
    continuous batching), `--llama-server PATH`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import httpx

# llama_cpp.server, with llama.cpp's extra buffer types off: on these AMX machines they select the
# AMX path, which crashes (see inhouse.bench.llamacpp_without_extra_buffers and benchmarks/README.md).
LLAMACPP_SERVER = """
import runpy, llama_cpp.llama_cpp as lib
default = lib.llama_model_default_params
def params():
    p = default()
    p.use_extra_bufts = False
    return p
lib.llama_model_default_params = params
runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
"""

DEFAULT_LLAMA_SERVER = "/work/peers/llama-server-build/bin/llama-server"

TOPICS = ["the sea", "a lighthouse", "bread", "a city at night", "bees", "a library", "winter", "a train",
          "chess", "rivers", "coffee", "the moon", "a garden", "glass", "music", "mountains"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not come up in {timeout} s")


async def one_request(client: httpx.AsyncClient, base: str, model: str, topic: str, max_tokens: int):
    body = {"model": model, "messages": [{"role": "user", "content": f"Write a short story about {topic}."}],
            "temperature": 0, "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft = None
    chunks = 0
    usage = None
    async with client.stream("POST", base + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if obj.get("usage"):
                usage = obj["usage"].get("completion_tokens")
            for ch in obj.get("choices") or []:
                if (ch.get("delta") or {}).get("content"):
                    chunks += 1
                    if ttft is None:
                        ttft = time.perf_counter() - t0
    return ttft if ttft is not None else time.perf_counter() - t0, usage if usage is not None else chunks


async def run_load(base: str, model: str, clients: int, rounds: int, max_tokens: int) -> dict:
    async with httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=clients + 4)) as client:
        async def worker(i: int):
            out = []
            for r in range(rounds):
                out.append(await one_request(client, base, model, TOPICS[(i + r * clients) % len(TOPICS)], max_tokens))
            return out

        t0 = time.perf_counter()
        results = [x for w in await asyncio.gather(*[worker(i) for i in range(clients)]) for x in w]
        wall = time.perf_counter() - t0
    ttfts = sorted(t for t, _ in results)
    tokens = sum(n for _, n in results)
    p99 = ttfts[min(len(ttfts) - 1, max(0, round(0.99 * len(ttfts)) - 1))]
    return {"clients": clients, "requests": len(results), "tokens": tokens, "wall_s": wall,
            "tok_per_s": tokens / wall, "ttft_p50_s": statistics.median(ttfts), "ttft_p99_s": p99}


def bench_server(name: str, cmd: list[str], health: str, base: str, model: str, args, env=None) -> list[dict]:
    print(f"# starting {name}: {' '.join(cmd)}", file=sys.stderr)
    log = open(f"/tmp/serve_bench_{name}.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_up(health, proc, timeout=1200 if name.endswith("+compile") else 300)  # compiling: minutes on 2 cores
        asyncio.run(run_load(base, model, 1, 1, 8))  # warm-up
        asyncio.run(run_load(base, model, 4, 1, 8))  # (a compiled decode step specializes batch 1: batched too)
        rows = []
        for c in args.clients:
            row = asyncio.run(run_load(base, model, c, args.rounds, args.max_tokens))
            row["server"] = name
            print(f"# {name} c={c}: {row['tok_per_s']:.1f} tok/s, TTFT p50 {row['ttft_p50_s']:.3f} s", file=sys.stderr)
            rows.append(row)
        return rows
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF file both servers load (default: the embedded model)")
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--rounds", type=int, default=2, help="requests per client, one after the other")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="CPU threads for llama.cpp's server")
    ap.add_argument("--inhouse-threads", type=int, default=None,
                    help="model threads of inhouse serve (default: its own, all cores)")
    ap.add_argument("--inhouse-dtype", default="auto", help="auto: the default path (4-bit weights for a Q4 file)")
    ap.add_argument("--inhouse-compile", action="store_true", help="serve with the compiled decode step (--compile)")
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--peer-python", default="/work/peers/bin/python")
    ap.add_argument("--skip-llamacpp", action="store_true", help="skip both llama.cpp servers")
    ap.add_argument("--llama-server", default=DEFAULT_LLAMA_SERVER,
                    help="llama.cpp's C++ server binary, run with one parallel slot per client (see benchmarks/README.md)")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    args = ap.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    if args.model is None:
        from inhouse.resolve import embedded_model_path

        args.model = embedded_model_path()
    rows = []

    def run(name: str, exe: str, make_cmd, health: str, env=None) -> None:
        """Start `make_cmd(port)` (a server of `exe`) on a free port and load it, if `exe` exists."""
        if not os.path.exists(exe):
            print(f"# {exe} missing: {name} skipped", file=sys.stderr)
            return
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        rows.extend(bench_server(name, make_cmd(port), base + health, base, "m", args, env=env))

    run("inhouse+compile" if args.inhouse_compile else "inhouse", sys.executable, lambda port: [
        sys.executable, "-m", "inhouse.cli", "-q", "serve", args.model, "--port", str(port), "--dtype",
        args.inhouse_dtype, "--max-num-seqs", str(args.max_num_seqs), "--max-model-len", "2048",
        "--served-model-name", "m"] + (["--threads", str(args.inhouse_threads)] if args.inhouse_threads else [])
        + (["--compile"] if args.inhouse_compile else []),
        "/health", env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)))
    if not args.skip_llamacpp:
        run("llama.cpp", args.peer_python, lambda port: [
            args.peer_python, "-c", LLAMACPP_SERVER, "--model", args.model, "--n_threads", str(args.threads),
            "--n_ctx", "2048", "--port", str(port), "--host", "127.0.0.1", "--interrupt_requests", "False",
            "--model_alias", "m", "--verbose", "False"], "/v1/models")
        # -c is shared by the slots: 1024 positions each. Built without AMX (benchmarks/README.md), so
        # weight repacking stays on.
        slots = max(args.clients)
        run("llama-server", args.llama_server, lambda port: [
            args.llama_server, "-m", args.model, "-t", str(args.threads), "-np", str(slots), "-c", str(1024 * slots),
            "--port", str(port), "--host", "127.0.0.1", "-a", "m"], "/health")
    print(f"model: {os.path.basename(args.model)}; {args.rounds} requests per client, {args.max_tokens} new tokens "
          f"each, greedy; llama.cpp {args.threads} threads, inhouse "
          f"{args.inhouse_threads or 'default (all cores)'} threads; inhouse dtype {args.inhouse_dtype}")
    print("| server | clients | aggregate tok/s | TTFT p50 (s) | TTFT p99 (s) | requests | tokens |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['server']} | {r['clients']} | {r['tok_per_s']:.1f} | {r['ttft_p50_s']:.3f} | {r['ttft_p99_s']:.3f} "
              f"| {r['requests']} | {r['tokens']} |")
    by = {(r["server"], r["clients"]): r["tok_per_s"] for r in rows}
    for peer in ("llama.cpp", "llama-server"):
        for c in args.clients:
            if (peer, c) in by:
                print(f"inhouse / {peer} aggregate at {c} clients: {by[('inhouse', c)] / by[(peer, c)]:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
