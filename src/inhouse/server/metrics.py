"""Prometheus metrics in the text exposition format (version 0.0.4), without a client library.

Counters, gauges and histograms are a few lines each; writing them here keeps the server free of
a dependency whose default registry would also export process details we do not want to expose.
"""

from __future__ import annotations

import bisect
import threading
from typing import Callable, Iterable, Optional

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


def _labels(names: tuple[str, ...], values: tuple[str, ...]) -> str:
    if not names:
        return ""
    inner = ",".join(f'{n}="{_escape(v)}"' for n, v in zip(names, values))
    return "{" + inner + "}"


def _escape(v: str) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(x: float) -> str:
    x = float(x)
    if x == float("inf"):
        return "+Inf"
    return str(int(x)) if x.is_integer() and abs(x) < 1e15 else repr(x)


class Counter:
    """A monotonically increasing count, optionally split by labels."""

    kind = "counter"

    def __init__(self, name: str, help: str, labelnames: tuple[str, ...] = ()):
        self.name, self.help, self.labelnames = name, help, labelnames
        self._values: dict[tuple[str, ...], float] = {}
        self._lock = threading.Lock()

    def inc(self, amount: float = 1.0, *labels: str) -> None:
        with self._lock:
            self._values[labels] = self._values.get(labels, 0.0) + amount

    def value(self, *labels: str) -> float:
        return self._values.get(labels, 0.0)

    def render(self) -> Iterable[str]:
        values = self._values or ({(): 0.0} if not self.labelnames else {})
        for labels, v in sorted(values.items()):
            yield f"{self.name}{_labels(self.labelnames, labels)} {_num(v)}"


class Gauge:
    """A value read at scrape time from a callable."""

    kind = "gauge"

    def __init__(self, name: str, help: str, read: Callable[[], float]):
        self.name, self.help, self.read = name, help, read

    def render(self) -> Iterable[str]:
        yield f"{self.name} {_num(self.read())}"


class CounterReading(Gauge):
    """A count kept elsewhere (by the engine), read at scrape time."""

    kind = "counter"


class Histogram:
    """Observations counted into cumulative buckets, with their sum and count."""

    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: tuple[float, ...]):
        self.name, self.help = name, help
        self.buckets = tuple(sorted(buckets))
        self._counts = [0] * (len(self.buckets) + 1)
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self._counts[bisect.bisect_left(self.buckets, value)] += 1
            self._sum += value

    @property
    def count(self) -> int:
        return sum(self._counts)

    def render(self) -> Iterable[str]:
        acc = 0
        for b, c in zip(self.buckets + (float("inf"),), self._counts):
            acc += c
            yield f'{self.name}_bucket{{le="{_num(b)}"}} {acc}'
        yield f"{self.name}_sum {_num(self._sum)}"
        yield f"{self.name}_count {acc}"


class ServerMetrics:
    """Everything /metrics exposes. Engine gauges read an `EngineStats`-like object at scrape time."""

    def __init__(self, stats_source: Optional[Callable[[], object]] = None, max_num_seqs: int = 0,
                 queue_limit: int = 0):
        self._stats = stats_source
        self.requests = Counter("inhouse_requests_total", "HTTP requests answered, by endpoint and status code.",
                                ("endpoint", "status"))
        self.finished = Counter("inhouse_request_finish_total", "Generation requests ended, by finish reason.",
                                ("reason",))
        self.prompt_tokens = Counter("inhouse_prompt_tokens_total", "Prompt tokens of admitted requests.")
        self.generated_tokens = Counter("inhouse_generation_tokens_total", "Tokens generated.")
        self.rejected = Counter("inhouse_rejected_total", "Requests refused because the queue was full (HTTP 429).")
        self.model_requests = Counter("inhouse_model_requests_total",
                                      "Generation requests admitted, by model (the base model's name or a LoRA adapter's).",
                                      ("model",))
        self.ttft = Histogram("inhouse_time_to_first_token_seconds", "Time from arrival to the first generated token.",
                              TTFT_BUCKETS)
        self.tpot = Histogram("inhouse_time_per_output_token_seconds",
                              "Time between consecutive generated tokens of a sequence.", TPOT_BUCKETS)
        self.e2e = Histogram("inhouse_request_latency_seconds", "Time from arrival to the end of the request.",
                             E2E_BUCKETS)

        def stat(name: str) -> Callable[[], float]:
            return lambda: float(getattr(self._stats(), name)) if self._stats else 0.0

        def kv_ratio() -> float:
            s = self._stats() if self._stats else None
            return (s.kv_tokens / s.kv_capacity_tokens) if s and s.kv_capacity_tokens else 0.0

        self.gauges = [
            Gauge("inhouse_num_requests_waiting", "Sequences waiting for a cache row (queue depth).", stat("waiting")),
            Gauge("inhouse_num_requests_running", "Sequences being decoded.", stat("running_seqs")),
            Gauge("inhouse_kv_cache_usage_ratio", "Cache positions holding tokens / positions the budget allows.",
                  kv_ratio),
            Gauge("inhouse_kv_cache_tokens", "Cache positions holding tokens.", stat("kv_tokens")),
            Gauge("inhouse_kv_cache_allocated_bytes", "Bytes allocated for keys and values.", stat("kv_allocated_bytes")),
            Gauge("inhouse_max_num_seqs", "Cache rows (sequences decoded together).", lambda: float(max_num_seqs)),
            Gauge("inhouse_queue_limit", "Sequences allowed to wait beyond the running ones.", lambda: float(queue_limit)),
            CounterReading("inhouse_prompt_tokens_cached_total",
                           "Prompt tokens whose keys/values were taken from a cache row holding the same prefix "
                           "(exact prefix reuse) instead of being computed.", stat("prompt_tokens_reused")),
        ]

    def render(self) -> str:
        """The whole exposition, one metric family after another."""
        out: list[str] = []
        families = [self.requests, self.finished, self.prompt_tokens, self.generated_tokens, self.rejected,
                    self.model_requests,
                    self.ttft, self.tpot, self.e2e, *self.gauges]
        for m in families:
            out.append(f"# HELP {m.name} {m.help}")
            out.append(f"# TYPE {m.name} {m.kind}")
            out.extend(m.render())
        return "\n".join(out) + "\n"
