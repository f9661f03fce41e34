"""One thread owns one `Engine`; asyncio request handlers talk to it through queues.

The engine is not thread-safe and its `step()` blocks for a whole forward pass, so it runs on a
dedicated thread. Between two steps that thread drains what the event loop sent it (new
requests, aborts), then runs one step and hands each request's `SeqUpdate`s to that request's
`asyncio.Queue` (via ``loop.call_soon_threadsafe``). New requests therefore join the running
batch at the next step and finished ones leave at once: continuous batching is the engine's own
scheduling rule, this module only feeds it.

Admission control lives here, on the event-loop side: at most ``max_num_seqs`` sequences run
(the engine's cache rows, whose memory is bounded by ``max_num_seqs * max_model_len`` positions)
and at most ``max_queue`` more wait; past that, `submit` raises `QueueFullError` (HTTP 429)
instead of letting memory grow. A request past its time limit is aborted by the engine thread.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from inhouse.engine.engine import Engine, Request
from inhouse.engine.outputs import Logprob, RequestOutput
from inhouse.engine.params import SamplingParams

logger = logging.getLogger("inhouse.server")


class QueueFullError(Exception):
    """Too many requests in flight: the caller should retry later (HTTP 429)."""

    def __init__(self, in_flight: int, limit: int, retry_after: int = 1):
        self.retry_after = retry_after
        super().__init__(f"the server is busy: {in_flight} sequences are running or queued and the limit is {limit}; "
                         f"retry after {retry_after} s")


class RequestTimeoutError(Exception):
    """A request ran past the server's per-request time limit."""


class EngineFailure(Exception):
    """The engine raised while running a step; the request could not complete."""


@dataclass
class Delta:
    """New output of one sequence, produced by one engine step."""

    index: int
    token_ids: list[int]
    text: str
    logprobs: Optional[list[dict[int, Logprob]]]
    finish_reason: Optional[str] = None
    stop_reason: Any = None


@dataclass
class Final:
    """The request ended (normally, aborted, timed out or failed)."""

    output: Optional[RequestOutput]
    error: Optional[BaseException] = None


@dataclass
class _Pending:
    rid: str
    ids: list[int]
    params: SamplingParams
    prompt: Optional[str]
    sink: asyncio.Queue
    accepted: asyncio.Future
    deadline: Optional[float]
    n_seqs: int
    adapter: Optional[str] = None


@dataclass
class EngineStats:
    """A snapshot for /metrics and /health."""

    waiting: int = 0
    running_seqs: int = 0
    kv_tokens: int = 0
    kv_capacity_tokens: int = 0
    kv_allocated_bytes: int = 0
    prompt_tokens_reused: int = 0
    steps: int = 0
    alive: bool = True


class AsyncEngine:
    """Runs an `Engine` on its own thread and serves many asyncio callers.

    Args:
        engine: the engine to own (nothing else may touch it afterwards).
        max_queue: sequences allowed to wait for a cache row beyond the ``max_num_seqs`` running.
        request_timeout: seconds a request may take in all (queued + running); None: no limit.
        on_finish: called on the event loop with (request_id, RequestOutput or None, error or None)
            when a request ends; used for metrics.
    """

    def __init__(self, engine: Engine, *, max_queue: int = 64, request_timeout: Optional[float] = 600.0,
                 on_finish: Optional[Callable[[str, Optional[RequestOutput], Optional[BaseException]], None]] = None):
        self.engine = engine
        self.max_queue = max_queue
        self.request_timeout = request_timeout
        self.on_finish = on_finish
        self.capacity = engine.max_num_seqs + max_queue
        self.in_flight = 0  # sequences admitted and not finished; touched on the event loop only
        self._inbox: "queue.Queue[tuple[str, Any]]" = queue.Queue()
        self._live: dict[str, _Pending] = {}  # engine-thread side
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self.stats = EngineStats(kv_capacity_tokens=engine.max_num_seqs * engine.max_model_len)
        self._ids = 0

    # ------------------------------------------------------------------ lifecycle
    def start(self, loop: Optional[asyncio.AbstractEventLoop] = None) -> None:
        """Start the engine thread; results are delivered on `loop` (default: the running loop)."""
        self._loop = loop or asyncio.get_running_loop()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="inhouse-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the thread after the current step; unfinished requests are aborted."""
        self._stop.set()
        self._inbox.put(("wake", None))
        if self._thread is not None:
            self._thread.join(timeout)
        self._thread = None

    # ------------------------------------------------------------------ event-loop side
    def new_request_id(self, prefix: str = "req") -> str:
        self._ids += 1
        return f"{prefix}-{self._ids}"

    async def submit(self, prompt_token_ids: list[int], params: SamplingParams, *, request_id: str,
                     prompt: Optional[str] = None, adapter: Optional[str] = None) -> asyncio.Queue:
        """Queue a request (`adapter`: a LoRA adapter name, None: the base model); returns the queue
        its `Delta`s and final `Final` arrive on.

        Raises:
            QueueFullError: admitting it would exceed ``max_num_seqs + max_queue`` sequences.
            ContextLengthError / EngineError: the engine refused it (prompt too long, bad params).
        """
        n = params.n
        if self.in_flight + n > self.capacity:
            raise QueueFullError(self.in_flight, self.capacity)
        loop = asyncio.get_running_loop()
        sink: asyncio.Queue = asyncio.Queue()
        accepted = loop.create_future()
        deadline = None if self.request_timeout is None else time.monotonic() + self.request_timeout
        self.in_flight += n
        pending = _Pending(request_id, list(prompt_token_ids), params, prompt, sink, accepted, deadline, n, adapter)
        self._inbox.put(("add", pending))
        try:
            await accepted  # raises the engine's validation error, if any
        except asyncio.CancelledError:
            self.abort(request_id)  # the engine thread frees it (and the in-flight count) either way
            raise
        return sink

    def abort(self, request_id: str) -> None:
        """Cancel a request (client gone); its cache rows are freed at the next step boundary."""
        self._inbox.put(("abort", request_id))

    # ------------------------------------------------------------------ engine thread
    def _post(self, fn: Callable, *args: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: the server is going down
            pass

    def _finish(self, p: _Pending, output: Optional[RequestOutput], error: Optional[BaseException]) -> None:
        self._live.pop(p.rid, None)

        def done() -> None:
            self.in_flight -= p.n_seqs
            p.sink.put_nowait(Final(output, error))
            if self.on_finish is not None:
                self.on_finish(p.rid, output, error)

        self._post(done)

    def _drain_inbox(self, block: bool) -> None:
        while True:
            try:
                kind, item = self._inbox.get(block=block, timeout=0.05 if block else None)
            except queue.Empty:
                return
            block = False
            if kind == "add":
                p: _Pending = item
                try:
                    self.engine.add_request(p.ids, p.params, prompt=p.prompt, request_id=p.rid, adapter=p.adapter)
                except Exception as e:  # validation errors go back to the caller
                    self._post(self._rejected, p, e)
                    continue
                self._live[p.rid] = p
                self._post(_set_result, p.accepted, None)
            elif kind == "abort":
                p = self._live.get(item)
                if p is not None:
                    req = self.engine.requests.get(item)
                    self.engine.abort(item)
                    self._finish(p, self.engine.request_output(req) if req is not None else None, None)

    def _rejected(self, p: _Pending, exc: BaseException) -> None:
        self.in_flight -= p.n_seqs
        _set_exception(p.accepted, exc)

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        for rid, p in list(self._live.items()):
            if p.deadline is not None and now > p.deadline:
                req = self.engine.requests.get(rid)
                self.engine.abort(rid)
                logger.warning("request %s ran past the %.0f s time limit; aborted", rid, self.request_timeout)
                self._finish(p, self.engine.request_output(req) if req is not None else None,
                             RequestTimeoutError(f"the request took longer than the server's limit of "
                                                 f"{self.request_timeout:g} s"))

    def _update_stats(self) -> None:
        e = self.engine
        s = self.stats
        s.waiting = sum(len(r.seqs) for r in e.waiting) + self._inbox.qsize()
        s.running_seqs = sum(len(r.seqs) for r in e.running)
        s.kv_tokens = sum(seq.num_computed for r in e.running for seq in r.seqs)
        s.kv_allocated_bytes = sum(c.k.numel() * c.k.element_size() * 2 for c in e.caches)
        s.prompt_tokens_reused = getattr(e, "prompt_tokens_reused", 0)

    def _run(self) -> None:
        logger.debug("engine thread started")
        while not self._stop.is_set():
            self._drain_inbox(block=not self.engine.has_unfinished())
            self._check_deadlines()
            if not self.engine.has_unfinished():
                self._update_stats()
                continue
            try:
                updates = self.engine.step()
            except Exception as e:  # never let one bad step take the server down
                logger.exception("engine step failed; failing the %d running requests", len(self._live))
                for rid, p in list(self._live.items()):
                    self.engine.abort(rid)
                    self._finish(p, None, EngineFailure(f"the engine failed: {type(e).__name__}"))
                continue
            self.stats.steps += 1
            self._dispatch(updates)
            self._update_stats()
        # Shutting down: end everything still open.
        for rid, p in list(self._live.items()):
            self.engine.abort(rid)
            self._finish(p, None, EngineFailure("the server is shutting down"))
        self.stats.alive = False
        logger.debug("engine thread stopped")

    def _dispatch(self, updates) -> None:
        by_req: dict[str, list[Delta]] = {}
        ended: dict[str, Request] = {}
        for u in updates:
            seq = u.seq
            rid = seq.request.request_id
            if rid not in self._live:
                continue
            k = len(u.new_token_ids)
            lps = seq.logprobs[-k:] if (seq.logprobs is not None and k) else None
            by_req.setdefault(rid, []).append(Delta(
                seq.index, list(u.new_token_ids), u.new_text, lps,
                seq.finish_reason if u.finished else None, seq.stop_reason if u.finished else None))
            if seq.request.finished:
                ended[rid] = seq.request
        for rid, deltas in by_req.items():
            p = self._live[rid]
            self._post(_put_many, p.sink, deltas)
        for rid, req in ended.items():
            self._finish(self._live[rid], self.engine.request_output(req), None)


def _set_result(fut: asyncio.Future, value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)


def _put_many(q: asyncio.Queue, items: list) -> None:
    for it in items:
        q.put_nowait(it)
