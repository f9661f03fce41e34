"""Engine-level speeds of one inhouse checkout, for A/B comparisons of two checkouts on one machine.

Prints one line per measurement: decode tokens/s at batch 1 and 8 (the decode loop of
`inhouse bench`: 16-token prompts, 128 greedy tokens, best of 3) and the prefill of a 512-token
prompt run as rows of the fused step (best of 3). Run it alternately from two source trees, e.g.

    for i in 1 2 3; do for src in /tmp/A/src src; do PYTHONPATH=$src python benchmarks/engine_steps.py; done; done

(`git worktree add /tmp/A <commit>` gives the other tree); interleaving is what makes the numbers of a
drifting VM comparable. ``--amx-ab N`` compares instead, in one process, batch-8 decode with the
row-tile kernel's AMX passes (4-bit layers, the Q8_0 vocabulary) on and off (`inhouse.kernels.amx_passes`), N rounds alternating. Not part
of the test suite.
"""

from __future__ import annotations

import argparse
import time

import inhouse.engine.engine as engine_module
from inhouse import LLM, SamplingParams
from inhouse.bench import prompt_ids


def decode(llm: LLM, ids: list[int], batch: int, n: int) -> float:
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    e = llm.engine
    reqs = [e.add_request(ids[i:i + 16], params) for i in range(batch)]
    while any(len(r.seqs[0].output_ids) == 0 for r in reqs):
        e.step()
    t = time.perf_counter()
    n0 = sum(len(r.seqs[0].output_ids) for r in reqs)
    while e.has_unfinished():
        e.step()
    return (sum(len(r.seqs[0].output_ids) for r in reqs) - n0) / (time.perf_counter() - t)


def amx_ab(llm: LLM, ids: list[int], rounds: int) -> None:
    from inhouse.kernels import amx_passes

    if not amx_passes():
        raise SystemExit("no AMX passes here (CPU, build or process): nothing to compare")
    decode(llm, ids, 8, 8)  # warm-up
    runs: dict[bool, list[float]] = {True: [], False: []}
    try:
        for _ in range(rounds):
            for on in (True, False):
                amx_passes(on)
                runs[on].append(decode(llm, ids, 8, 128))
    finally:
        amx_passes(True)
    for on, name in ((True, "AMX passes"), (False, "vector kernel")):
        print(f"decode batch 8, {name}: " + ", ".join(f"{x:.0f}" for x in runs[on]) + f" tok/s (best {max(runs[on]):.0f})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="default: the embedded model")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--amx-ab", type=int, default=0, metavar="N", help="batch 8 with AMX passes on/off, N rounds")
    a = p.parse_args()
    engine_module.FUSED_PREFILL_MAX = a.prompt_len  # the whole prompt as fused rows
    llm = LLM(a.model, max_model_len=a.prompt_len + 200, max_num_seqs=8)
    tok = llm.get_tokenizer()
    ids = prompt_ids(lambda s: tok.encode(s, bos=False), a.prompt_len + 8)
    if a.amx_ab:
        amx_ab(llm, ids, a.amx_ab)
        return
    for batch in (1, 8):
        decode(llm, ids, batch, 8)  # warm-up
        best = max(decode(llm, ids, batch, 128) for _ in range(3))
        print(f"decode batch {batch}: {best:.1f} tok/s")
    greedy = SamplingParams(temperature=0, max_tokens=1)
    best = 1e9
    for r in range(3):  # prompts shifted by one token: no prefix of an earlier one to reuse
        t = time.perf_counter()
        llm.generate({"prompt_token_ids": ids[r:r + a.prompt_len]}, greedy)
        best = min(best, time.perf_counter() - t)
    print(f"prefill {a.prompt_len} tokens as fused rows: {a.prompt_len / best:.0f} tok/s")


if __name__ == "__main__":
    main()
