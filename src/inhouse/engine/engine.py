"""The generation engine: requests in, tokens out, many sequences sharing forward passes.

The engine sees token ids and plain Python types only; chat templates and JSON stay at the
edges (LLM API, CLI, server).

One scheduling rule (as in vLLM v1): every step, each sequence's computed-token count catches
up with its token count, running sequences first, then waiting ones, under a token budget.
There are no separate prefill and decode phases: a fresh prompt is simply a sequence that is
far behind (and may catch up over several steps: chunked prefill); a decoding sequence is one
token behind. Rows that are one token behind run together in one batched forward; longer
catch-ups run as their own forward so that no row is padded. With the fused native step
(quantized models on x86-64 CPUs) every row of a step runs in one native call instead: the decode
rows and the chunks of prompts up to `FUSED_PREFILL_MAX` tokens, each token computed exactly as a
decode step would compute it, so that a prompt that starts like one a cache row holds starts from
that row's keys/values (`inhouse.engine.prefix`; outputs unchanged, bit for bit).

LoRA adapters do not change the rule: each request names an adapter (or none, the base model)
and each forward tells the model, row by row, which adapter slot to apply (an `AdapterBank`,
see `inhouse.finetune.adapters`), so rows of different adapters share every batch. The only
adapter constraint is at admission: a request enters the running set once its adapter holds a
slot (at most ``max_loras`` adapters are resident); one that must wait for a slot lets the
requests behind it in.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Optional

import torch

from inhouse.engine import sampling
from inhouse.engine.outputs import CompletionOutput, Logprob, RequestOutput
from inhouse.engine.params import SamplingParams
from inhouse.engine.prefix import PrefixIndex
from inhouse.model.arena import move_to_huge_pages
from inhouse.model.fused_decode import FusedDecode, fused_decode_unsupported
from inhouse.model.kv_cache import lazy_zeros_possible
from inhouse.model.transformer import Transformer, model_device, model_dtype
from inhouse.tokenizer.base import Tokenizer
from inhouse.tokenizer.detokenizer import IncrementalDetokenizer
from inhouse.weights.memory import available_bytes

if TYPE_CHECKING:
    from inhouse.finetune.adapters import AdapterBank

logger = logging.getLogger("inhouse.engine")


class EngineError(ValueError):
    """A request the engine cannot run (bad prompt, bad parameters)."""


class ContextLengthError(EngineError):
    """A prompt, or prompt + max_tokens, does not fit in the model's context."""


@dataclass
class Sequence:
    """One of a request's `n` samples: prompt + generated ids and where it stands."""

    request: "Request"
    index: int
    token_ids: list[int]
    max_tokens: int
    generator: Optional[torch.Generator]
    detok: IncrementalDetokenizer
    slot: int = -1
    num_computed: int = 0
    text: str = ""
    emitted: int = 0  # characters of `text` already handed out by `step`
    logprobs: Optional[list[dict[int, Logprob]]] = None
    cumulative_logprob: Optional[float] = None
    finish_reason: Optional[str] = None
    stop_reason: object = None

    @property
    def n_prompt(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.n_prompt:]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Request:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence] = field(default_factory=list)
    prompt_logprobs: Optional[list] = None
    prompt_logits: list[torch.Tensor] = field(default_factory=list)  # chunks kept only for prompt_logprobs
    arrival: float = field(default_factory=time.monotonic)
    first_token_time: Optional[float] = None
    forked: bool = False
    adapter: Optional[str] = None  # LoRA adapter name (None: the base model)
    adapter_slot: int = 0  # its slot in the model's adapter layers while running (0: base)

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)


@dataclass
class SeqUpdate:
    """What one step did to one sequence: new ids, new text (safe to show), whether it ended."""

    seq: Sequence
    new_token_ids: list[int]
    new_text: str
    finished: bool


# Prompts of up to this many tokens run through the fused step's rows (`FusedDecode.rows`), which
# beats the eager model's chunks up to about this length on a 2-core CPU (SmolLM2-135M, AVX2: 2.4x
# at 8 tokens, 1.6x at 64, even at ~250) and makes their cached keys/values reusable exactly
# (`inhouse.engine.prefix`). Longer prompts run as the eager model's chunks (large matmuls).
FUSED_PREFILL_MAX = 256


class Engine:
    """Runs requests on a `Transformer` with a shared, slot-per-sequence KV cache.

    Args:
        model: the network (eval mode).
        tokenizer: for stop ids, detokenization and stop strings.
        max_model_len: context length enforced on every request.
        max_num_seqs: sequences decoded together (cache rows).
        max_num_batched_tokens: token budget of one step (bounds prefill chunk size).
        seed: seeds the generators of requests that bring no seed of their own.
        compile: run decode steps through `inhouse.engine.compile.compile_decode` (opt-in).
        fused: run decode steps of a natively quantized model as one native call
            (`inhouse.model.fused_decode`) where it applies (the compiled or eager model after its
            layers are swapped for LoRA ones). False: always the model (or its compiled step).
        adapters: the LoRA adapters requests may name (an `AdapterBank` on `model`); settable later.
    """

    def __init__(self, model: Transformer, tokenizer: Tokenizer, *, max_model_len: int,
                 max_num_seqs: int = 8, max_num_batched_tokens: int = 2048, seed: int = 0,
                 compile: bool = False, adapters: Optional["AdapterBank"] = None, fused: bool = True):
        if max_model_len < 2:
            raise EngineError(f"max_model_len={max_model_len} must be at least 2")
        self.model = model
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max(1, max_num_batched_tokens)
        self.vocab_size = model.args.vocab_size
        self.stop_ids = frozenset(tokenizer.stop_ids)
        self.eos_id = tokenizer.eos_id
        self._seed_rng = torch.Generator().manual_seed(seed)
        self._ids = itertools.count()
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._free_slots = list(range(max_num_seqs))
        self._last_sampling: Optional[tuple[list[SamplingParams], sampling.SamplingTensors]] = None
        self.device = model_device(model)
        if self.device.type == "cpu":  # decode steps stream every weight: fewer TLB misses (see arena.py)
            move_to_huge_pages(model)
        self.caches = model.new_caches(max_num_seqs, self._initial_cache_len(model, max_num_seqs, max_model_len))
        self.adapters = adapters
        self._compiled = None
        if compile:
            from inhouse.engine.compile import compile_decode

            self._compiled = compile_decode(model)
        self._decode_model = self._compiled or model
        why = fused_decode_unsupported(model) if fused else "fused=False"
        self._fused: Optional[FusedDecode] = None
        if why is None:  # a quantized model's decode step as one native call; the above after a LoRA swap
            self._fused = self._decode_model = FusedDecode(model, fallback=self._decode_model)
        self._prefix = PrefixIndex(max_num_seqs)
        self.prompt_tokens_reused = 0  # prompt tokens whose keys/values came from another cache row
        logger.info("decode steps: %s", "one native call" if why is None else
                    f"{'compiled' if compile else 'eager'} model ({why})")

    def warm_up(self) -> int:
        """Run the compiled decode step once per kind of step it will meet, before any request.

        A compiled step is specialized to a few kinds of batch: one row or several, starting at
        cache row 0 or elsewhere, contiguous rows or scattered ones. Each kind compiles the first
        time it is met (about a minute each on 2 cores, less from Inductor's on-disk cache), which a
        server would otherwise do while clients wait. Writes a key/value at position 1 of a few cache
        rows, which every request overwrites before reading. Returns the number of steps run
        (0 for an eager engine or with requests in flight).
        """
        if self._compiled is None or self.has_unfinished():
            return 0
        n = self.caches[0].k.shape[0]
        kinds = [[0], [1], [0, 1], [1, 2], [0, 2]]
        kinds = [rows for rows in kinds if max(rows) < n]
        logger.info("warming up the compiled decode step (%d kinds of batch)", len(kinds))
        with torch.inference_mode():
            for rows in kinds:
                B = len(rows)
                tokens = torch.zeros(B, 1, dtype=torch.long, device=self.device)
                pos = torch.ones(B, 1, dtype=torch.long, device=self.device)
                if self.adapters is not None:
                    self.adapters.set_rows([0] * B)  # the base model's rows, as a step without adapters
                try:
                    self._compiled(tokens, input_pos=pos, caches=self.caches, last_only=True,
                                       cache_rows=torch.tensor(rows, device=self.device))
                finally:
                    if self.adapters is not None:
                        self.adapters.clear_rows()
        self._prefix.clear()  # those rows were written
        return len(kinds)

    # ------------------------------------------------------------------ requests
    def add_request(self, prompt_token_ids: list[int], params: SamplingParams, *,
                    prompt: Optional[str] = None, request_id: Optional[str] = None,
                    adapter: Optional[str] = None) -> Request:
        """Queue a request.

        Args:
            adapter: name of a LoRA adapter of `adapters` to run it with (None: the base model).

        Raises:
            ContextLengthError, EngineError: before anything runs (an unknown adapter too).
        """
        if adapter is not None and (self.adapters is None or adapter not in self.adapters):
            known = ", ".join(self.adapters.names()) if self.adapters is not None else ""
            raise EngineError(f"unknown LoRA adapter {adapter!r}; " + (f"known: {known}" if known else "none is loaded"))
        ids = [int(t) for t in prompt_token_ids]
        if not ids:
            raise EngineError("the prompt is empty: give at least one token")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise EngineError(f"prompt token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        if params.n > self.max_num_seqs:
            raise EngineError(f"n={params.n} is more than max_num_seqs={self.max_num_seqs}")
        n_prompt = len(ids)
        if n_prompt >= self.max_model_len:
            raise ContextLengthError(
                f"the prompt has {n_prompt} tokens but the context (max_model_len) is {self.max_model_len}: "
                f"it leaves no room for a single new token; shorten the prompt by at least {n_prompt - self.max_model_len + 1} tokens"
            )
        room = self.max_model_len - n_prompt
        if params.max_tokens is None:
            max_tokens = room
        elif params.max_tokens > room:
            raise ContextLengthError(
                f"the prompt has {n_prompt} tokens and max_tokens is {params.max_tokens}: {n_prompt + params.max_tokens} "
                f"tokens in all, more than the context (max_model_len) of {self.max_model_len}; "
                f"at most {room} new tokens fit"
            )
        else:
            max_tokens = params.max_tokens
        rid = request_id if request_id is not None else str(next(self._ids))
        if rid in self.requests:
            raise EngineError(f"request id {rid!r} is already in use")
        req = Request(rid, prompt, ids, params, adapter=adapter)
        for i in range(params.n):
            if params.seed is not None:
                gen = torch.Generator().manual_seed(params.seed + i * 1_000_003)
            else:
                gen = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=self._seed_rng)))
            detok = IncrementalDetokenizer(self.tokenizer, skip_special=params.skip_special_tokens)
            seq = Sequence(req, i, list(ids), max_tokens, gen, detok)
            if params.logprobs is not None:
                seq.logprobs, seq.cumulative_logprob = [], 0.0
            req.seqs.append(seq)
        self.requests[rid] = req
        self.waiting.append(req)
        return req

    def abort(self, request_id: str) -> None:
        """Cancel a request and free its cache rows (no effect if it already ended)."""
        req = self.requests.get(request_id)
        if req is None:
            return
        for s in req.seqs:
            if not s.finished:
                s.finish_reason = "abort"
        self._retire(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------ one step
    @torch.inference_mode()
    def step(self) -> list[SeqUpdate]:
        """Schedule, run the forward passes, sample, detokenize; return what changed."""
        self._admit()
        budget = self.max_num_batched_tokens
        work: list[tuple[Sequence, int]] = []  # (sequence, tokens to compute now)
        for req in self.running:
            for seq in self._active_seqs(req):
                behind = len(seq.token_ids) - seq.num_computed
                k = min(behind, budget)
                if k <= 0:
                    continue
                work.append((seq, k))
                budget -= k
            if budget <= 0:
                break
        if not work:
            return []
        self._ensure_cache_len(max(s.num_computed + k for s, k in work))

        updates: list[SeqUpdate] = []
        fused: list[tuple[Sequence, int]] = []
        singles: list[tuple[Sequence, int]] = []
        chunks: list[tuple[Sequence, int]] = []
        for s, k in work:
            (fused if self._runs_fused(s, k) else singles if k == 1 else chunks).append((s, k))
        for seq, k in chunks:
            logits = self._forward([seq], k, want_all=seq.request.params.prompt_logprobs is not None)
            updates += self._after_forward([seq], logits)
        if singles:
            seqs = [s for s, _ in singles]
            logits = self._forward(seqs, 1, want_all=False)
            updates += self._after_forward(seqs, logits)
        if fused:  # decode rows and short prompts' chunks, all in one native call
            updates += self._after_forward([s for s, _ in fused], self._forward_rows(fused))
        for req in [r for r in self.running if r.finished]:
            self._retire(req)
        return updates

    # ------------------------------------------------------------------ internals
    def _active_seqs(self, req: Request) -> list[Sequence]:
        if not req.forked:
            return [req.seqs[0]]  # siblings share the prompt: only the first computes it
        return [s for s in req.seqs if not s.finished]

    def _admit(self) -> None:
        held_back: list[Request] = []  # their adapter waits for a slot: they keep their place in line
        while self.waiting and len(self._free_slots) >= self.waiting[0].params.n:
            req = self.waiting.popleft()
            if req.adapter is not None:
                slot = self.adapters.acquire(req.adapter)
                if slot is None:
                    held_back.append(req)
                    continue
                req.adapter_slot = slot
            first = req.seqs[0]
            reuse_row, reuse = -1, 0
            if self._prefills_fused(req):  # the cache row holding most of its prompt, exactly
                reuse_row, reuse = self._prefix.longest(req.prompt_token_ids, len(req.prompt_token_ids) - 1)
            if reuse and reuse_row in self._free_slots:  # a finished sequence's row: taken as it is
                self._free_slots.remove(reuse_row)
                first.slot = reuse_row
            else:
                first.slot = self._free_slots.pop(0)
                if reuse:
                    for c in self.caches:
                        c.k[first.slot, :, :reuse] = c.k[reuse_row, :, :reuse]
                        c.v[first.slot, :, :reuse] = c.v[reuse_row, :, :reuse]
            first.num_computed = reuse
            self.prompt_tokens_reused += reuse
            self._prefix.record(first.slot, first.token_ids, reuse)
            for seq in req.seqs[1:]:
                seq.slot = self._free_slots.pop(0)
                self._prefix.forget(seq.slot)
            self._free_slots.sort()
            self.running.append(req)
        self.waiting.extendleft(reversed(held_back))

    def _retire(self, req: Request) -> None:
        if req in self.running:
            self.running.remove(req)
            for seq in req.seqs:
                self._free_slots.append(seq.slot)
            self._free_slots.sort()
            if req.adapter is not None:
                self.adapters.release(req.adapter)
                req.adapter_slot = 0
        elif req in self.waiting:
            self.waiting.remove(req)
        self.requests.pop(req.request_id, None)

    def _initial_cache_len(self, model, max_num_seqs: int, max_model_len: int) -> int:
        """The whole context at once where cache memory becomes resident only as it is written
        (`kv_cache.zeros`) and fits in memory even if every slot fills; otherwise 256 positions,
        doubled as sequences grow (each growth writes the whole new cache)."""
        nbytes = max_num_seqs * model.args.kv_cache_bytes(max_model_len, model_dtype(model).itemsize)
        if lazy_zeros_possible(self.device) and nbytes <= available_bytes():
            return max_model_len
        return min(max_model_len, 256)

    def _ensure_cache_len(self, needed: int) -> None:
        cur = self.caches[0].max_len
        if needed <= cur:
            return
        new = cur
        while new < needed:
            new *= 2
        new = min(new, self.max_model_len)
        logger.debug("growing KV cache from %d to %d positions", cur, new)
        for c in self.caches:
            c.grow(new)

    def _forward(self, seqs: list[Sequence], k: int, want_all: bool) -> torch.Tensor:
        """Compute the next `k` tokens of each sequence; logits (B, k or 1, V)."""
        tokens = torch.tensor([s.token_ids[s.num_computed:s.num_computed + k] for s in seqs], device=self.device)
        start = torch.tensor([s.num_computed for s in seqs], device=self.device)
        pos = start[:, None] + torch.arange(k, device=self.device)  # (B, k)
        rows = torch.tensor([s.slot for s in seqs], device=self.device)
        model = self._decode_model if k == 1 and not want_all else self.model
        if self.adapters is not None:
            self.adapters.set_rows([s.request.adapter_slot for s in seqs])  # (B,) LoRA slot per row
        try:
            logits = model(tokens, input_pos=pos, caches=self.caches, last_only=not want_all, cache_rows=rows)
        finally:
            if self.adapters is not None:
                self.adapters.clear_rows()
        for s in seqs:
            s.num_computed += k
            self._prefix.forget(s.slot)  # the eager model's rounding: not what the fused rows compute
        return logits

    def _fused_ok(self) -> bool:
        return self._fused is not None and not self.model.__dict__.get("layers_changed")

    def _fused_for(self, req: Request) -> bool:
        """Whether `req`'s rows can run on the fused step (the base model, no prompt logprobs)."""
        return self._fused_ok() and req.adapter is None and req.params.prompt_logprobs is None

    def _prefills_fused(self, req: Request) -> bool:
        """Whether `req`'s prompt runs through the fused step's rows (decided once per request, from
        the request alone: a prompt's arithmetic never depends on what else is running)."""
        return self._fused_for(req) and len(req.prompt_token_ids) <= FUSED_PREFILL_MAX

    def _runs_fused(self, seq: Sequence, k: int) -> bool:
        if k == 1:  # decode rows (and a long prompt's last token, as before)
            return self._fused_for(seq.request)
        return seq.num_computed < seq.n_prompt and self._prefills_fused(seq.request)

    def _forward_rows(self, work: list[tuple[Sequence, int]]) -> torch.Tensor:
        """Compute `k` tokens of each sequence as rows of one fused call; logits (B, 1, V) of each
        sequence's last row."""
        tokens: list[int] = []
        positions: list[int] = []
        rows: list[int] = []
        last: list[int] = []
        for seq, k in work:
            n0 = seq.num_computed
            tokens += seq.token_ids[n0:n0 + k]
            positions += range(n0, n0 + k)
            rows += [seq.slot] * k
            last.append(len(tokens) - 1)
        logits = self._fused.rows(torch.tensor(tokens), torch.tensor(positions), torch.tensor(rows), self.caches,
                                  torch.tensor(last))
        for seq, k in work:
            exact = self._prefix.holds(seq.slot, seq.token_ids, seq.num_computed)
            seq.num_computed += k
            if exact:  # every position of the row so far came from fused rows
                self._prefix.record(seq.slot, seq.token_ids, seq.num_computed)
            else:
                self._prefix.forget(seq.slot)
        return logits

    def _after_forward(self, seqs: list[Sequence], logits: torch.Tensor) -> list[SeqUpdate]:
        updates = []
        ready: list[Sequence] = []
        rows: list[torch.Tensor] = []
        for i, seq in enumerate(seqs):
            req = seq.request
            if req.params.prompt_logprobs is not None and not req.forked:
                req.prompt_logits.append(logits[i])
            if seq.num_computed < len(seq.token_ids):
                continue  # still catching up on its prompt (chunked prefill)
            last = logits[i, -1]
            if not req.forked:
                self._fork(req)
                if req.params.prompt_logprobs is not None:
                    self._compute_prompt_logprobs(req)
                for sib in req.seqs:
                    ready.append(sib)
                    rows.append(last)
            else:
                ready.append(seq)
                rows.append(last)
        if ready:
            # every row's last logits, in order (most decode steps): a view, not a (B, V) copy
            whole = len(ready) == logits.shape[0] and all(r is s for r, s in zip(ready, seqs))
            tokens, lp = self._sample(ready, logits[:, -1] if whole else torch.stack(rows))
            for j, seq in enumerate(ready):
                updates.append(self._append(seq, tokens[j], None if lp is None else tuple(x[j] for x in lp)))
        return updates

    def _fork(self, req: Request) -> None:
        """The first sequence finished the prompt: give its cache rows to its siblings."""
        parent = req.seqs[0]
        n = parent.num_computed
        exact = self._prefix.holds(parent.slot, parent.token_ids, n)
        for sib in req.seqs[1:]:
            for c in self.caches:
                c.k[sib.slot, :, :n] = c.k[parent.slot, :, :n]
                c.v[sib.slot, :, :n] = c.v[parent.slot, :, :n]
            sib.num_computed = n
            if exact:
                self._prefix.record(sib.slot, sib.token_ids, n)
        req.forked = True

    def _compute_prompt_logprobs(self, req: Request) -> None:
        logits = torch.cat(req.prompt_logits)  # (n_prompt, V)
        req.prompt_logits = []
        ids = req.prompt_token_ids
        k = req.params.prompt_logprobs
        target = torch.tensor(ids[1:], device=logits.device)
        chosen, top_ids, top_lp = sampling.compute_logprobs(logits[:-1], target, k)
        ranks = self._ranks(logits[:-1], target)
        out: list = [None]
        for p in range(len(ids) - 1):
            out.append(self._logprob_dict(int(target[p]), float(chosen[p]), int(ranks[p]), top_ids[p], top_lp[p]))
        req.prompt_logprobs = out

    @staticmethod
    def _ranks(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        chosen = logits.gather(-1, target[:, None])
        return (logits > chosen).sum(-1) + 1

    def _logprob_dict(self, tok: int, lp: float, rank: int, top_ids, top_lp) -> dict[int, Logprob]:
        d = {tok: Logprob(lp, rank, self.tokenizer.decode([tok]))}
        for r, (t, v) in enumerate(zip(top_ids.tolist(), top_lp.tolist()), start=1):
            if t not in d:
                d[t] = Logprob(float(v), r, self.tokenizer.decode([t]))
        return d

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor):
        """min_tokens → penalties → temperature → min_p/top_k/top_p → draw; logprobs from the raw logits."""
        params = [s.request.params for s in seqs]
        stops = [set(p.stop_token_ids or ()) | (set() if p.ignore_eos else set(self.stop_ids)) for p in params]
        biased = sampling.apply_min_tokens(logits, [len(s.output_ids) for s in seqs], [p.min_tokens for p in params], stops)
        tensors = self._sampling_tensors(params, logits.device)
        counts = prompt_mask = None
        if not tensors.no_penalties:
            V = logits.shape[-1]
            counts = sampling.token_counts([s.output_ids for s in seqs], V, logits.device)
            prompt_mask = sampling.token_counts([s.request.prompt_token_ids for s in seqs], V, logits.device) > 0
        tokens = sampling.sample_tokens(biased, tensors, [s.generator for s in seqs], counts, prompt_mask)
        lp = None
        if any(p.logprobs is not None for p in params):
            k = max(p.logprobs or 0 for p in params)
            chosen, top_ids, top_lp = sampling.compute_logprobs(logits, tokens, k)
            lp = (chosen, top_ids, top_lp, self._ranks(logits, tokens))
        return tokens.tolist(), lp

    def _sampling_tensors(self, params: list[SamplingParams], device) -> sampling.SamplingTensors:
        """The batch's `SamplingTensors`, reused while the same requests decode together (most steps)."""
        last = self._last_sampling
        if last is None or len(last[0]) != len(params) or any(a is not b for a, b in zip(last[0], params)):
            last = self._last_sampling = (params, sampling.SamplingTensors.from_params(params, device))
        return last[1]

    def _append(self, seq: Sequence, tok: int, lp) -> SeqUpdate:
        req = seq.request
        p = req.params
        if req.first_token_time is None:
            req.first_token_time = time.monotonic()
        seq.token_ids.append(tok)
        if lp is not None and seq.logprobs is not None:
            chosen, top_ids, top_lp, rank = lp
            k = p.logprobs or 0
            seq.logprobs.append(self._logprob_dict(tok, float(chosen), int(rank), top_ids[:k], top_lp[:k]))
            seq.cumulative_logprob += float(chosen)
        n_out = len(seq.output_ids)

        # Stop tokens: the model's own end tokens (unless ignore_eos) and the request's. Their text
        # is not part of the output unless include_stop_str_in_output (as vLLM does).
        stop_ids = p.stop_token_ids or ()
        if (tok in self.stop_ids and not p.ignore_eos) or tok in stop_ids:
            seq.finish_reason = "stop"
            seq.stop_reason = None if (tok == self.eos_id and tok not in stop_ids) else tok
            if p.include_stop_str_in_output:
                seq.text += seq.detok.push(tok)
            seq.text += seq.detok.flush()
        else:
            seq.text += seq.detok.push(tok)
            if n_out >= seq.max_tokens:
                seq.finish_reason = "length"
                seq.text += seq.detok.flush()
            if p.stop:
                self._check_stop_strings(seq)
        # Hand out text, holding back a tail that might still grow into a stop string.
        hold = 0 if seq.finished or not p.stop else max(len(s) for s in p.stop) - 1
        upto = max(seq.emitted, len(seq.text) - hold)
        new_text = seq.text[seq.emitted:upto]
        seq.emitted = upto
        return SeqUpdate(seq, [tok], new_text, seq.finished)

    @staticmethod
    def _check_stop_strings(seq: Sequence) -> None:
        """End the sequence at the earliest stop string in the text not yet handed out."""
        p = seq.request.params
        start = max(0, seq.emitted - max(len(s) for s in p.stop) + 1)
        hit = None
        for s in p.stop:
            i = seq.text.find(s, start)
            if i != -1 and (hit is None or i < hit[0]):
                hit = (i, s)
        if hit is not None:
            i, s = hit
            seq.text = seq.text[: i + len(s)] if p.include_stop_str_in_output else seq.text[:i]
            seq.finish_reason, seq.stop_reason = "stop", s

    # ------------------------------------------------------------------ results
    @staticmethod
    def request_output(req: Request) -> RequestOutput:
        outs = [
            CompletionOutput(
                index=s.index, text=s.text, token_ids=list(s.output_ids),
                cumulative_logprob=s.cumulative_logprob, logprobs=s.logprobs,
                finish_reason=s.finish_reason, stop_reason=s.stop_reason,
            )
            for s in req.seqs
        ]
        metrics = {"arrival_time": req.arrival, "first_token_time": req.first_token_time}
        return RequestOutput(req.request_id, req.prompt, list(req.prompt_token_ids), req.prompt_logprobs,
                             outs, finished=req.finished, metrics=metrics)

    def run_to_completion(self, reqs: Iterable[Request]) -> list[RequestOutput]:
        reqs = list(reqs)
        while self.has_unfinished():
            self.step()
        return [self.request_output(r) for r in reqs]
