"""The `inhouse` command: verbs mapped to plain functions.

    inhouse generate [MODEL] PROMPT     stream one answer (chat format applied unless --raw)
    inhouse chat [MODEL]                talk interactively
    inhouse info MODEL                  what a model is and what it needs
    inhouse bench [MODEL]               speed against llama.cpp and transformers, one table
    inhouse serve [MODEL]               OpenAI-compatible server and web chat page
    inhouse finetune [MODEL] --data F   fine-tune (LoRA, QLoRA, full) on chat JSONL
    inhouse merge MODEL ADAPTER --out D fold a LoRA adapter in, write HF safetensors

MODEL: a model directory (Meta or HF layout), a .gguf file, a preset, or random:PRESET;
omitted, the embedded SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Optional, Sequence

from inhouse.util import import_torch_frozen

EXIT_USER_ERROR = 2
DEFAULT_MAX_TOKENS = 512


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16 (default: auto)")
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's, at most 8192)")
    p.add_argument("--chat-format", default="auto", choices=["auto", "llama3", "template"],
                   help="Llama 3.1 native format or the model's jinja template (default: auto)")
    p.add_argument("--chat-template", default=None, metavar="FILE", help="a jinja chat template file to use instead")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (reproducible output)")
    p.add_argument("--quantize", default="auto", choices=["auto", "none", "int8", "int4"],
                   help="weight-only quantization: auto = int4/int8 for quantized GGUF files (default: auto)")
    p.add_argument("--compile", action="store_true", help="compile the decode step (slow first start, cached)")


def _add_sampling_args(p: argparse.ArgumentParser, temperature: float) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=None,
                   help=f"most new tokens (default: {DEFAULT_MAX_TOKENS}, or what is left of the context)")
    g.add_argument("--temperature", type=float, default=temperature, help=f"0 = greedy (default: {temperature})")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress messages")
    parser = argparse.ArgumentParser(prog="inhouse", description="Run Llama models on your own machine, offline.",
                                     parents=[common])
    sub = parser.add_subparsers(dest="verb", required=True)

    g = sub.add_parser("generate", help="answer one prompt, streaming to the terminal", parents=[common])
    g.add_argument("words", nargs="+", metavar="[MODEL] PROMPT", help="optional model, then the prompt ('-' reads stdin)")
    g.add_argument("--model", "-m", default=None, help="model (instead of the first positional argument)")
    g.add_argument("--raw", action="store_true", help="complete the text as is, without the chat format")
    g.add_argument("--system", default=None, help="system prompt (chat format only)")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    _add_model_args(g)
    _add_sampling_args(g, temperature=0.0)
    g.add_argument("--adapter", default=None, metavar="DIR", help="apply a LoRA adapter (PEFT format), unmerged")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="talk to a model interactively", parents=[common])
    c.add_argument("model", nargs="?", default=None)
    c.add_argument("--system", default=None, help="system prompt")
    _add_model_args(c)
    _add_sampling_args(c, temperature=0.0)
    c.add_argument("--adapter", default=None, metavar="DIR", help="apply a LoRA adapter (PEFT format), unmerged")
    c.set_defaults(func=cmd_chat)

    i = sub.add_parser("info", help="describe a model: format, architecture, size, memory needed", parents=[common])
    i.add_argument("model", nargs="?", default=None)
    i.add_argument("--json", action="store_true")
    i.add_argument("--dtype", default="auto")
    i.add_argument("--max-model-len", type=int, default=None)
    i.set_defaults(func=cmd_info)

    b = sub.add_parser("bench", help="speed against llama.cpp and transformers on one model", parents=[common])
    b.add_argument("model", nargs="?", default=None)
    b.add_argument("--precisions", default="int4,int4+compile,int8,bf16,fp32",
                   help="inhouse runs, comma-separated: int4, int8, bf16, fp32; +compile runs the compiled decode "
                        "step (default: int4,int4+compile,int8,bf16,fp32)")
    b.add_argument("--peers", default="llamacpp,transformers", help="peers, comma-separated, or none")
    b.add_argument("--peer-python", default=None, help="interpreter with llama-cpp-python (default: /work/peers/bin/python)")
    b.add_argument("--prompt-len", type=int, default=512)
    b.add_argument("--decode-len", type=int, default=128)
    b.add_argument("--batch", type=int, default=8, help="sequences in the batched decode run (1 to skip)")
    b.add_argument("--compile", action="store_true", help="inhouse runs with the compiled decode step")
    b.add_argument("--repeat", type=int, default=1,
                   help="run every configuration this many rounds and keep each one's best speeds (noisy machines)")
    b.set_defaults(func=cmd_bench)

    s = sub.add_parser("serve", help="OpenAI-compatible server with a web chat page", parents=[common])
    s.add_argument("model", nargs="?", default=None)
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key-file", default=None, metavar="FILE", help="accepted keys, one per line ('KEY' or 'NAME KEY')")
    s.add_argument("--max-num-seqs", type=int, default=16, help="sequences decoded together (default: 16)")
    s.add_argument("--max-queue", type=int, default=64, help="sequences that may wait beyond those; more get HTTP 429")
    s.add_argument("--kv-cache-memory", default=None, metavar="SIZE",
                   help="KV cache budget, e.g. 2GiB: caps --max-num-seqs so that every row fits its full context")
    s.add_argument("--request-timeout", type=float, default=600.0, help="seconds a request may take (0: no limit)")
    s.add_argument("--served-model-name", action="append", default=None, help="name clients use (repeatable)")
    s.add_argument("--adapter", action="append", default=None, metavar="NAME=DIR",
                   help="serve a LoRA adapter (PEFT format), unmerged, as model NAME (repeatable); requests for "
                        "different adapters and the base model share batches")
    s.add_argument("--max-loras", type=int, default=8, help="adapters resident at once (default: 8)")
    s.add_argument("--threads", type=int, default=None,
                   help="CPU threads for the model (default: all cores)")
    _add_model_args(s)
    s.set_defaults(func=cmd_serve)

    from inhouse.finetune.cli import add_parsers as add_finetune_parsers  # finetune, merge

    add_finetune_parsers(sub, common)
    return parser


def _sampling_params(a: argparse.Namespace):
    from inhouse import SamplingParams

    return SamplingParams(
        temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, min_p=a.min_p,
        repetition_penalty=a.repetition_penalty, presence_penalty=a.presence_penalty,
        frequency_penalty=a.frequency_penalty, seed=a.seed, max_tokens=a.max_tokens, stop=a.stop,
    )


def _open_llm(model: Optional[str], a: argparse.Namespace):
    from inhouse import LLM

    template = None
    if a.chat_template:
        try:
            with open(a.chat_template, encoding="utf-8") as f:
                template = f.read()
        except OSError as e:
            raise ValueError(f"--chat-template {a.chat_template}: {e.strerror}") from None
    return LLM(model, dtype=a.dtype, max_model_len=a.max_model_len, seed=a.seed or 0,
               quantize=a.quantize, compile=a.compile,
               chat_format=a.chat_format, chat_template=template, adapter=getattr(a, "adapter", None))


def cmd_generate(a: argparse.Namespace) -> int:
    words = list(a.words)
    model = a.model
    if model is None and len(words) >= 2:
        model, words = words[0], words[1:]
    prompt = " ".join(words)
    if prompt == "-":
        prompt = sys.stdin.read()
    t0 = time.perf_counter()
    llm = _open_llm(model, a)
    params = _sampling_params(a)
    if a.raw:
        if a.system:
            raise ValueError("--system needs the chat format; drop --raw")
        target = prompt
    else:
        target = ([{"role": "system", "content": a.system}] if a.system else []) + [{"role": "user", "content": prompt}]
    n_prompt = len(llm.encode_chat(target)) if not a.raw else len(llm.get_tokenizer().encode(prompt, bos=llm.tokenizer.add_bos))
    if a.max_tokens is None:
        # The default cap adapts to what the context leaves; an explicit --max-tokens is checked strictly.
        params.max_tokens = max(1, min(DEFAULT_MAX_TOKENS, llm.max_model_len - n_prompt))
    first = None
    text, ids, finish = [], [], None
    try:
        for d in llm.stream(target, params):
            if first is None:
                first = time.perf_counter()
            text.append(d.text)
            ids += d.token_ids
            if not a.json:
                sys.stdout.write(d.text)
                sys.stdout.flush()
            if d.finish_reason:
                finish = d.finish_reason
    except KeyboardInterrupt:
        finish = "interrupted"
    end = time.perf_counter()
    if a.json:
        out = {
            "model": llm.loaded.name, "prompt": prompt, "text": "".join(text), "token_ids": ids,
            "finish_reason": finish,
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": len(ids)},
            "timings": {"total_s": round(end - t0, 3),
                        "time_to_first_token_s": None if first is None else round(first - t0, 3)},
        }
        print(json.dumps(out, ensure_ascii=False))
    else:
        sys.stdout.write("\n")
    return 0


CHAT_HELP = """Commands:
  /reset           forget the conversation
  /system TEXT     set the system prompt (and reset)
  /history         show the conversation so far
  /exit, /bye      leave (Ctrl-D too)
Multi-line input: start and end with \"\"\" on their own, or end a line with a backslash.
Ctrl-C stops an answer."""


def _read_user_message(prompt: str = ">>> ") -> Optional[str]:
    """One message from the terminal; None at end of input."""
    try:
        line = input(prompt)
    except EOFError:
        return None
    if line.strip() == '"""' or line.startswith('"""'):
        first = line.strip()[3:]
        lines = [first] if first else []
        while True:
            try:
                nxt = input("... ")
            except EOFError:
                break
            if nxt.rstrip().endswith('"""'):
                last = nxt.rstrip()[:-3]
                if last:
                    lines.append(last)
                break
            lines.append(nxt)
        return "\n".join(lines)
    parts = []
    while line.endswith("\\"):
        parts.append(line[:-1])
        try:
            line = input("... ")
        except EOFError:
            line = ""
            break
    parts.append(line)
    return "\n".join(parts)


def cmd_chat(a: argparse.Namespace) -> int:
    try:
        import readline  # noqa: F401  (line editing and in-session history for input())
    except ImportError:
        pass
    llm = _open_llm(a.model, a)
    params = _sampling_params(a)
    system = a.system
    history: list[dict] = []
    print(f"inhouse chat with {llm.loaded.name} (context {llm.max_model_len} tokens). /help for commands.")
    while True:
        msg = _read_user_message()
        if msg is None:
            print()
            return 0
        cmd = msg.strip()
        if not cmd:
            continue
        if cmd in ("/exit", "/bye", "/quit"):
            return 0
        if cmd in ("/help", "/?"):
            print(CHAT_HELP)
            continue
        if cmd == "/reset":
            history.clear()
            print("(conversation reset)")
            continue
        if cmd.startswith("/system"):
            system = cmd[len("/system"):].strip() or None
            history.clear()
            print(f"(system prompt {'set' if system else 'cleared'}; conversation reset)")
            continue
        if cmd == "/history":
            for m in history:
                print(f"[{m['role']}] {m['content']}")
            continue
        if cmd.startswith("/") and " " not in cmd:
            print(f"unknown command {cmd}; /help lists the commands")
            continue
        convo = ([{"role": "system", "content": system}] if system else []) + history + [{"role": "user", "content": msg}]
        n_prompt = len(llm.encode_chat(convo))
        room = llm.max_model_len - n_prompt
        if room <= 0:
            print(f"error: the conversation is {n_prompt} tokens, the context is {llm.max_model_len}; "
                  "/reset to start over", file=sys.stderr)
            continue
        params.max_tokens = min(a.max_tokens or DEFAULT_MAX_TOKENS, room)
        reply = []
        try:
            for d in llm.stream(convo, params):
                reply.append(d.text)
                sys.stdout.write(d.text)
                sys.stdout.flush()
        except KeyboardInterrupt:
            sys.stdout.write(" [stopped]")
        sys.stdout.write("\n")
        history += [{"role": "user", "content": msg}, {"role": "assistant", "content": "".join(reply)}]


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def cmd_info(a: argparse.Namespace) -> int:
    import torch

    from inhouse.resolve import parse_model_spec, resolve_dtype
    from inhouse.weights.memory import estimate_bytes

    spec = parse_model_spec(a.model)
    if spec.kind == "path":
        from inhouse.weights import inspect_checkpoint

        info = inspect_checkpoint(spec.path)
        args, fmt, stored, size = info.args, info.format, info.stored_dtype, info.file_bytes
    else:
        from inhouse.config import ModelArgs

        args, fmt, stored, size = ModelArgs.from_preset(spec.preset), spec.kind, "float32" if spec.kind == "random" else "-", 0
    dtype = resolve_dtype(a.dtype, stored)
    ctx = a.max_model_len or min(args.max_seq_len, 8192)
    need = estimate_bytes(args, dtype, ctx, dtype)
    kv = args.kv_cache_bytes(ctx, torch.tensor([], dtype=dtype).element_size())
    rope = "none" if args.rope_scaling is None else (
        f"llama3 (factor {args.rope_scaling.factor:g}, low {args.rope_scaling.low_freq_factor:g}, "
        f"high {args.rope_scaling.high_freq_factor:g}, original {args.rope_scaling.original_max_position_embeddings})")
    data = {
        "model": spec.name, "format": fmt, "path": spec.path,
        "architecture": {
            "dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads,
            "head_dim": args.head_dim, "hidden_dim": args.hidden_dim, "vocab_size": args.vocab_size,
            "rope_theta": args.rope_theta, "rope_scaling": rope, "tie_embeddings": args.tie_embeddings,
            "norm_eps": args.norm_eps,
        },
        "parameters": args.num_parameters(),
        "stored_dtype": stored, "file_bytes": size,
        "context_length": args.max_seq_len,
        "run_dtype": str(dtype).replace("torch.", ""),
        "memory_needed_bytes": need, "kv_cache_bytes": kv, "memory_context_tokens": ctx,
    }
    if a.json:
        print(json.dumps(data, indent=2))
        return 0
    ar = data["architecture"]
    print(f"model           {spec.name}")
    print(f"format          {fmt}" + (f"  ({spec.path})" if spec.path else ""))
    print(f"architecture    Llama: {ar['n_layers']} layers, dim {ar['dim']}, {ar['n_heads']} heads "
          f"({ar['n_kv_heads']} KV heads, head dim {ar['head_dim']}), FFN {ar['hidden_dim']}, vocab {ar['vocab_size']}"
          + (", tied embeddings" if ar["tie_embeddings"] else ""))
    print(f"rope            theta {ar['rope_theta']:g}, scaling {rope}")
    print(f"parameters      {args.num_parameters():,} ({args.num_parameters() / 1e9:.2f} B)")
    print(f"stored as       {stored}" + (f", {_fmt_bytes(size)} on disk" if size else ""))
    print(f"context length  {args.max_seq_len:,} tokens")
    print(f"memory needed   {_fmt_bytes(need)} to run in {data['run_dtype']} with a {ctx:,}-token context "
          f"(KV cache {_fmt_bytes(kv)})")
    return 0


def cmd_bench(a: argparse.Namespace) -> int:
    from inhouse.bench import DEFAULT_PEER_PYTHON, run_bench

    precisions = [p for p in a.precisions.split(",") if p]
    bad = [p for p in precisions if p.removesuffix("+compile") not in ("int4", "int8", "bf16", "fp32")]
    if bad:
        raise ValueError(f"--precisions: unknown {bad[0]!r}; use int4, int8, bf16, fp32 (each also as e.g. int4+compile)")
    peers = [] if a.peers == "none" else [p for p in a.peers.split(",") if p]
    bad = [p for p in peers if p not in ("llamacpp", "transformers")]
    if bad:
        raise ValueError(f"--peers: unknown {bad[0]!r}; use llamacpp, transformers or none")
    run_bench(a.model, precisions=precisions, peers=peers, peer_python=a.peer_python or DEFAULT_PEER_PYTHON,
              prompt_len=a.prompt_len, decode_len=a.decode_len, batch=a.batch, compile=a.compile, repeat=a.repeat)
    return 0


def cmd_serve(a: argparse.Namespace) -> int:
    from inhouse.server.cli import run_serve

    return run_serve(a)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    level = logging.DEBUG if a.verbose else (logging.WARNING if a.quiet else logging.INFO)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    logging.getLogger("inhouse").setLevel(level)
    if a.verb == "generate" and a.json and not a.verbose:
        logging.getLogger("inhouse").setLevel(logging.WARNING)  # machine output: keep stderr quiet too
    try:
        if a.verb not in ("info", "bench"):  # the verbs that load a model (bench's workers do it themselves)
            t = time.perf_counter()
            frozen = import_torch_frozen()
            logging.getLogger("inhouse").debug("imported torch and the engine in %.2f s (%d objects frozen)",
                                               time.perf_counter() - t, frozen)
        return a.func(a)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except (ValueError, OSError) as e:
        # User mistakes (bad model path, bad file, bad parameter, prompt too long) get one clear line.
        if a.verbose:
            raise
        print(f"inhouse: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
