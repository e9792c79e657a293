"""Counters of the OpenAI-compatible API: Prometheus series (on the app's registry, so /metrics
shows them) and a JSON snapshot for /ml/telemetry with p50/p95 from recent samples."""

from __future__ import annotations

import threading
from collections import Counter as Tally
from collections import deque
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

SAMPLES = 1000  # recent observations kept per series for percentiles
LATENCY_BUCKETS = (.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120, 300)
MEMORY_BUCKETS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5)
#: Why a request was served degraded (see OpenAIService): exported at 0 from the start, so a
#: dashboard or alert on them sees a series before the first fallback.
FALLBACK_REASONS = ("memory", "session", "session_log")


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


class ApiMetrics:
    """Thread-safe: observed from the event loop and from worker threads."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry if registry is not None else CollectorRegistry()
        self.requests = Counter("milton_api_requests_total", "OpenAI API requests by endpoint and HTTP status",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("milton_api_request_seconds", "OpenAI API request latency (streams: to the end)",
                                 ["endpoint"], registry=r, buckets=LATENCY_BUCKETS)
        self.first_token = Histogram("milton_chat_first_token_seconds", "Time from request to first token",
                                     registry=r, buckets=LATENCY_BUCKETS)
        self.prompt_tokens = Counter("milton_chat_prompt_tokens_total", "Prompt tokens processed", registry=r)
        self.completion_tokens = Counter("milton_chat_completion_tokens_total", "Tokens generated", registry=r)
        self.generation_seconds = Counter("milton_chat_generation_seconds_total",
                                          "Time spent generating", registry=r)
        self.tokens_per_second = Gauge("milton_chat_tokens_per_second", "Generation speed of the last request",
                                       registry=r)
        self.queue_depth = Gauge("milton_chat_queue_depth", "Chat requests waiting for the model", registry=r)
        self.generating = Gauge("milton_chat_generating", "Chat requests generating now", registry=r)
        self.active_sessions = Gauge("milton_chat_active_sessions", "Sessions with a message within the idle "
                                     "timeout", registry=r)
        self.memory_seconds = Histogram("milton_memory_injection_seconds", "Memory lookup and injection time",
                                        registry=r, buckets=MEMORY_BUCKETS)
        self.memory_items = Counter("milton_memory_injected_items_total", "Memories put into system prompts",
                                    registry=r)
        self.fallbacks = Counter("milton_api_fallbacks_total", "Requests served degraded (memory or session "
                                 "logging unavailable)", ["reason"], registry=r)
        for reason in FALLBACK_REASONS:
            self.fallbacks.labels(reason)
        self.cancelled = Counter("milton_chat_cancelled_total", "Generations cancelled", ["reason"], registry=r)
        self.sessions_ended = Counter("milton_chat_sessions_ended_total", "Sessions ended on idle and processed",
                                      registry=r)
        self._lock = threading.Lock()
        self._status: Tally[tuple[str, int]] = Tally()
        self._latency: dict[str, deque[float]] = {}
        self._memory: deque[float] = deque(maxlen=SAMPLES)
        self._fallbacks: Tally[str] = Tally()
        self._cancelled: Tally[str] = Tally()
        self._tokens = [0, 0]  # prompt, completion
        self._gen_s = 0.0
        self._last_tps: float | None = None
        self._memory_items = 0
        self._memory_skipped = 0
        self._sessions_ended = 0

    def bind(self, queue_depth: Callable[[], float], generating: Callable[[], float],
             active_sessions: Callable[[], float]) -> None:
        self.queue_depth.set_function(queue_depth)
        self.generating.set_function(generating)
        self.active_sessions.set_function(active_sessions)
        self._gauges = (queue_depth, generating, active_sessions)

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)
        with self._lock:
            self._status[(endpoint, status)] += 1
            self._latency.setdefault(endpoint, deque(maxlen=SAMPLES)).append(seconds)

    def generation(self, prompt_tokens: int, completion_tokens: int, seconds: float,
                   first_token_s: float | None) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.completion_tokens.inc(completion_tokens)
        self.generation_seconds.inc(seconds)
        if first_token_s is not None:
            self.first_token.observe(first_token_s)
        tps = completion_tokens / seconds if seconds > 0 and completion_tokens else None
        if tps is not None:
            self.tokens_per_second.set(tps)
        with self._lock:
            self._tokens[0] += prompt_tokens
            self._tokens[1] += completion_tokens
            self._gen_s += seconds
            if tps is not None:
                self._last_tps = tps

    def memory(self, seconds: float, items: int) -> None:
        self.memory_seconds.observe(seconds)
        self.memory_items.inc(items)
        with self._lock:
            self._memory.append(seconds)
            self._memory_items += items

    def memory_skipped(self) -> None:
        with self._lock:
            self._memory_skipped += 1

    def fallback(self, reason: str) -> None:
        self.fallbacks.labels(reason).inc()
        with self._lock:
            self._fallbacks[reason] += 1

    def cancel(self, reason: str) -> None:
        self.cancelled.labels(reason).inc()
        with self._lock:
            self._cancelled[reason] += 1

    def ended(self, n: int) -> None:
        if n:
            self.sessions_ended.inc(n)
            with self._lock:
                self._sessions_ended += n

    def snapshot(self) -> dict[str, Any]:
        """For /ml/telemetry: plain JSON."""
        depth, generating, sessions = (f() for f in getattr(self, "_gauges", (lambda: 0,) * 3))
        with self._lock:
            requests: dict[str, dict[str, int]] = {}
            for (endpoint, status), n in sorted(self._status.items()):
                requests.setdefault(endpoint, {})[str(status)] = n
            latency = {endpoint: {"count": len(v), "p50_s": percentile(list(v), .5),
                                  "p95_s": percentile(list(v), .95)}
                       for endpoint, v in sorted(self._latency.items())}
            memory = list(self._memory)
            p50, p95 = percentile(memory, .5), percentile(memory, .95)
            return {
                "requests": requests,
                "latency": latency,
                "tokens": {"prompt": self._tokens[0], "completion": self._tokens[1],
                           "generation_s": round(self._gen_s, 4),
                           "tokens_per_s": (round(self._tokens[1] / self._gen_s, 2) if self._gen_s else None),
                           "last_tokens_per_s": (round(self._last_tps, 2) if self._last_tps else None)},
                "queue": {"depth": int(depth), "generating": int(generating)},
                "sessions": {"active": int(sessions), "ended_on_idle": self._sessions_ended},
                "memory_injection": {"count": len(memory), "items": self._memory_items,
                                     "skipped": self._memory_skipped,
                                     "p50_ms": round(p50 * 1000, 3) if p50 is not None else None,
                                     "p95_ms": round(p95 * 1000, 3) if p95 is not None else None},
                "fallbacks": dict(self._fallbacks),
                "cancelled": dict(self._cancelled),
            }
