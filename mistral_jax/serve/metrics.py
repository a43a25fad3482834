"""The server's Prometheus metrics (``GET /metrics``), through ``prometheus_client`` on a registry of its own.

Names (prefix ``mistral_jax_``): ``requests_waiting`` / ``requests_running`` (gauges, read at scrape time),
``requests_total{finish_reason}`` (stop, length, cancelled, error), ``requests_rejected_total`` (429s),
``prompt_tokens_total`` (tokens of the prompts admitted), ``prefill_tokens_total`` (prompt tokens actually run
through the model: a prefix-cache hit or an ``n > 1`` sibling runs none), ``prefix_cache_hit_tokens_total``,
``prefix_cache_bytes`` / ``prefix_cache_entries``, ``generation_tokens_total``, ``generation_tokens_per_second``
(over the last 10 s), and histograms ``time_to_first_token_seconds`` (from submission, queueing included) and
``inter_token_latency_seconds`` (per token; the tokens of one multi-step decode share its time).
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE  # noqa: F401 -- re-exported for the app
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
RATE_WINDOW = 10.0  # seconds over which generation_tokens_per_second is measured


class ServeMetrics:
    """The counters, gauges and histograms of one engine (a registry per engine: several may share a process)."""

    def __init__(self, waiting: Callable[[], int], running: Callable[[], int],
                 prefix_bytes: Callable[[], int], prefix_entries: Callable[[], int]):
        self.registry = r = CollectorRegistry()
        p = "mistral_jax_"
        Gauge(p + "requests_waiting", "Requests waiting for a decode slot", registry=r).set_function(waiting)
        Gauge(p + "requests_running", "Requests holding a decode slot", registry=r).set_function(running)
        Gauge(p + "prefix_cache_bytes", "Bytes held by prefix-cache snapshots", registry=r).set_function(prefix_bytes)
        Gauge(p + "prefix_cache_entries", "Prefix-cache snapshots", registry=r).set_function(prefix_entries)
        Gauge(p + "generation_tokens_per_second", f"Tokens generated per second over the last {RATE_WINDOW:g} s",
              registry=r).set_function(self.tokens_per_second)
        self.requests = Counter(p + "requests", "Finished requests", ["finish_reason"], registry=r)
        self.rejected = Counter(p + "requests_rejected", "Requests answered 429 (queue full)", registry=r)
        self.prompt_tokens = Counter(p + "prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.prefill_tokens = Counter(p + "prefill_tokens", "Prompt tokens run through the model", registry=r)
        self.prefix_hit_tokens = Counter(p + "prefix_cache_hit_tokens", "Prompt tokens restored from the prefix "
                                         "cache instead of prefilled", registry=r)
        self.generation_tokens = Counter(p + "generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram(p + "time_to_first_token_seconds", "Submission to first token", registry=r,
                              buckets=_LATENCY_BUCKETS)
        self.itl = Histogram(p + "inter_token_latency_seconds", "Time between a request's tokens", registry=r,
                             buckets=_LATENCY_BUCKETS)
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self._lock = threading.Lock()

    def generated(self, n: int) -> None:
        """Count ``n`` new tokens (for the total and the recent rate)."""
        self.generation_tokens.inc(n)
        now = time.monotonic()
        with self._lock:
            self._recent.append((now, n))
            while self._recent and self._recent[0][0] < now - RATE_WINDOW:
                self._recent.popleft()

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._recent and self._recent[0][0] < now - RATE_WINDOW:
                self._recent.popleft()
            if not self._recent:
                return 0.0
            return sum(n for _, n in self._recent) / RATE_WINDOW

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
