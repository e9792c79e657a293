"""`milton serve` on a real tiny model, hot-swapping real LoRA adapters under chat load, and
what /ml/telemetry and /metrics say about it.

The server is a real ``python -m milton serve`` child process on loopback (the served base is
the session's tiny GGUF; the adapter watcher polls ``checkpoints/adapter/current``), driven by
the official ``openai`` client. Two adapters are trained here with milton's own ``train_lora``
on the tiny base: the same question, a different answer each ("zephyr-07" / "nimbus-42"),
which the bare base knows neither of. Promote and rollback are the artifact store's own
``set_current`` / ``rollback``, exactly what ``milton models promote/rollback`` do.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from adapter_fixture import ANSWERS, QUESTION, publish
from live_server import wait_until
from tiny_lm import train_tiny_adapter

from milton.core.artifacts import ArtifactStore, sha256_file
from milton.core.config import load_settings
from milton.serve.process import ServerProcess, live_server
from milton.train.jobs import adapter_store

ASK = [{"role": "user", "content": QUESTION}]
FACTS = {"a": "zephyr-07", "b": "nimbus-42"}
SWAPS = 20
CLIENTS = 3
MAX_TOKENS = 24


@dataclass
class Adapters:
    gguf: Path           # the tiny base the server runs
    sha: str
    files: dict[str, Path]  # 'a', 'b' -> adapter.gguf


@pytest.fixture(scope="module")
def adapters(tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Adapters:
    """Two one-fact adapters for the session's tiny GGUF (trained once, ~15 s on one thread)."""
    hf = tiny_gguf.parent / "tiny-hf"  # build_tiny_gguf's layout: root/<name>-hf beside the GGUF
    root = tmp_path_factory.mktemp("swap-adapters")
    files = {key: train_tiny_adapter(hf, QUESTION, ANSWERS[key], root / key) for key in ANSWERS}
    return Adapters(tiny_gguf, sha256_file(tiny_gguf), files)


@dataclass
class Serve:
    srv: ServerProcess
    store: ArtifactStore
    client: openai.OpenAI

    @property
    def base(self) -> str:
        return self.srv.base

    def telemetry(self) -> dict[str, Any]:
        return httpx.get(f"{self.base}/ml/telemetry", timeout=10).json()

    def engine(self) -> dict[str, Any]:
        return self.telemetry()["language_model"]["engine"] or {}

    def wait_adapter(self, version: str | None, timeout: float = 10.0) -> float:
        """Seconds until the served adapter is ``version`` (polled every 10 ms)."""
        t0 = time.monotonic()
        wait_until(lambda: self.engine().get("adapter_version") == version, timeout, step=0.01)
        return time.monotonic() - t0


@pytest.fixture
def serve(adapters: Adapters, milton_home: Path) -> Iterator[Serve]:
    env = {"MILTON_MODEL__BASE": str(adapters.gguf), "MILTON_SERVE__N_THREADS": "1",
           "MILTON_SERVE__N_CTX": "256", "MILTON_SERVE__RELOAD_POLL_S": "0.05",
           "MILTON_SERVE__SNAPSHOT_ENABLED": "false"}
    settings = load_settings(environ={**os.environ, **env}).settings
    with live_server(milton_home, env) as srv:
        def loaded() -> bool:
            lm = httpx.get(f"{srv.base}/ml/telemetry", timeout=10).json()["language_model"]
            assert lm["load_error"] is None, lm["load_error"]
            return lm["engine_loaded"]

        wait_until(loaded, timeout=60, step=0.1)
        client = openai.OpenAI(base_url=f"{srv.base}/v1", api_key="none", max_retries=0, timeout=60)
        try:
            yield Serve(srv, adapter_store(settings), client)
        finally:
            client.close()


@dataclass
class Answer:
    text: str
    adapter: str | None  # the response's milton.adapter: which adapter generated it
    finish: str | None
    t_sent: float
    t_done: float


def ask(client: openai.OpenAI, *, stream: bool, user: str = "probe", memory: bool = True) -> Answer:
    """One greedy chat request through the official client (streamed or not)."""
    opts: dict[str, Any] = {"model": "tiny", "messages": ASK, "temperature": 0.0, "seed": 0,
                            "max_tokens": MAX_TOKENS, "user": user}
    if not memory:
        opts["extra_headers"] = {"X-Milton-Memory": "off"}
    t0 = time.monotonic()
    if not stream:
        reply = client.chat.completions.create(**opts)
        extension = (reply.model_extra or {})["milton"]
        return Answer(reply.choices[0].message.content or "", extension["adapter"],
                      reply.choices[0].finish_reason, t0, time.monotonic())
    parts: list[str] = []
    finish = extension = None
    for chunk in client.chat.completions.create(**opts, stream=True,
                                                stream_options={"include_usage": True}):
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
            if chunk.choices[0].finish_reason is not None:
                finish, extension = chunk.choices[0].finish_reason, (chunk.model_extra or {})["milton"]
    return Answer("".join(parts), extension["adapter"] if extension else None, finish, t0,
                  time.monotonic())


class Load:
    """``n`` client threads chatting continuously (every other request streamed)."""

    def __init__(self, base: str, n: int = CLIENTS) -> None:
        self.base = base
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.answers: list[Answer] = []
        self.failures: list[str] = []
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(n)]

    def _client(self, index: int) -> None:
        client = openai.OpenAI(base_url=f"{self.base}/v1", api_key="none", max_retries=0, timeout=60)
        n = index
        while not self.stop.is_set():
            n += 1
            try:
                answer = ask(client, stream=n % 2 == 0, user=f"client-{index}")
            except Exception as exc:  # noqa: BLE001 - every failure is a finding
                with self.lock:
                    self.failures.append(f"client-{index}: {exc!r}")
                continue
            with self.lock:
                self.answers.append(answer)
        client.close()

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)


def test_twenty_promote_rollback_swaps_under_chat_load(serve: Serve, adapters: Adapters):
    store = serve.store
    bare = ask(serve.client, stream=False)
    assert bare.adapter is None and bare.finish == "stop"
    assert not any(fact in bare.text for fact in FACTS.values()), bare.text  # the base knows neither

    va = publish(store, adapters.files["a"], adapters.sha)
    vb = publish(store, adapters.files["b"], adapters.sha, current=False)
    expected = {va: ANSWERS["a"], vb: ANSWERS["b"]}
    serve.wait_adapter(va)
    assert ask(serve.client, stream=True).text == ANSWERS["a"]
    swaps_before = serve.engine()["swaps"]

    # (flipped at, seen in telemetry at, version): the first entry is the initial promotion.
    swaps: list[tuple[float, float, str]] = [(0.0, time.monotonic(), va)]
    seen_s: list[float] = []
    probes: list[Answer] = []
    with Load(serve.base) as load:
        time.sleep(0.3)
        for i in range(SWAPS):
            t_flip = time.monotonic()
            target = store.set_current(vb).name if i % 2 == 0 else store.rollback().name
            seen_s.append(serve.wait_adapter(target))
            swaps.append((t_flip, time.monotonic(), target))
            probe = ask(serve.client, stream=i % 4 < 2)  # sent after the swap was reported
            probes.append(probe)
            assert (probe.adapter, probe.text) == (target, expected[target]), (i, probe)
            fact, other = (FACTS["b"], FACTS["a"]) if target == vb else (FACTS["a"], FACTS["b"])
            assert fact in probe.text and other not in probe.text
            time.sleep(0.15)  # requests that fall wholly between two swaps
    answers = load.answers

    assert load.failures == [], load.failures[:5]
    assert len(answers) >= 3 * SWAPS, len(answers)
    for a in answers + probes:
        # Exactly its adapter's own answer: nothing mixed, nothing cut off.
        assert a.finish == "stop" and a.adapter in expected and a.text == expected[a.adapter], a
        # Served by the adapter reported last before it was sent, or by one flipped to before
        # it finished: never an older one.
        k = max(i for i, (_, seen, _) in enumerate(swaps) if seen <= a.t_sent)
        allowed = {swaps[j][2] for j in range(k, len(swaps)) if j == k or swaps[j][0] <= a.t_done}
        assert a.adapter in allowed, (a, k)
    served = {v: sum(a.adapter == v for a in answers) for v in expected}
    assert all(n >= SWAPS // 2 for n in served.values()), served

    engine = serve.engine()
    assert engine["adapter_version"] == va and engine["swap_failures"] == 0
    assert engine["swaps"] - swaps_before == SWAPS and engine["swaps"] == SWAPS + 1  # + the first
    assert engine["last_swap_ms"] < 100 and engine["adapter_promoted_at"]
    watcher = serve.telemetry()["language_model"]["adapter_watcher"]
    assert (watcher["reloads"], watcher["failures"]) == (SWAPS + 1, 0)
    assert max(seen_s) < 2.0, seen_s  # the watcher polls every 50 ms
    print(f"\nswaps: {SWAPS} under {CLIENTS} clients, {len(answers)} + {len(probes)} requests ok, "
          f"0 failed; served by {served}; flip -> reported p50 "
          f"{statistics.median(seen_s) * 1e3:.0f} ms, max {max(seen_s) * 1e3:.0f} ms; "
          f"context locked per swap: last {engine['last_swap_ms']:.3f} ms")


# -- observability ------------------------------------------------------------------------------
def scrape(base: str) -> dict[tuple[str, frozenset], float]:
    """/metrics as {(sample name, labels): value}, parsed by prometheus_client itself."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{base}/metrics", timeout=10).text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(metrics: dict[tuple[str, frozenset], float], name: str, **labels: str) -> float | None:
    return metrics.get((name, frozenset(labels.items())))


def test_telemetry_and_metrics_report_adapters_traffic_and_swaps(serve: Serve, adapters: Adapters):
    store = serve.store
    va = publish(store, adapters.files["a"], adapters.sha)
    vb = publish(store, adapters.files["b"], adapters.sha, current=False)
    serve.wait_adapter(va)
    ask(serve.client, stream=False, user="warm-up")  # loads the server's embedder (seconds)
    m0, t0 = scrape(serve.base), serve.telemetry()
    for reason in ("memory", "session", "session_log"):  # exported from the start, at 0
        assert value(m0, "milton_api_fallbacks_total", reason=reason) == 0.0, reason
    assert value(m0, "milton_model_fallbacks_total", kind="adapter") == 0.0

    # Traffic: 3 clients for a while (queue depth sampled meanwhile), plus a memory-off request.
    depths: list[int] = []
    with Load(serve.base) as load:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline or len(load.answers) < 20:
            depths.append(serve.telemetry()["language_model"]["queue"]["depth"])
            time.sleep(0.02)
    assert load.failures == []
    off = ask(serve.client, stream=False, user="no-memory", memory=False)
    assert off.text == ANSWERS["a"]
    requests = len(load.answers) + 1

    # Two swaps, and one adapter that llama.cpp rejects (the old one keeps serving: a fallback).
    store.set_current(vb)
    serve.wait_adapter(vb)
    bad = publish(store, b"GGUF" + os.urandom(4000), adapters.sha)
    wait_until(lambda: serve.telemetry()["language_model"]["adapter_watcher"]["failures"] == 1)
    assert serve.engine()["adapter_version"] == vb
    store.set_current(va, reason="rollback")
    serve.wait_adapter(va)
    t1, m1 = serve.telemetry(), scrape(serve.base)
    lm0, lm1 = t0["language_model"], t1["language_model"]

    # /ml/telemetry ------------------------------------------------------------------------
    engine = lm1["engine"]
    assert engine["adapter_version"] == va and engine["adapter_promoted_at"] >= lm0["engine"]["adapter_promoted_at"]
    history = [e for e in store.history() if e.get("version") == va and "previous" in e]
    assert engine["adapter_promoted_at"] == history[-1]["ts"]  # when `current` last moved to it
    assert engine["swaps"] - lm0["engine"]["swaps"] == 2 and engine["swap_failures"] == 1
    assert 0 <= engine["last_swap_ms"] < 100 and engine["extra"]["last_swap_total_ms"] >= engine["last_swap_ms"]
    latency = lm1["swap_latency_ms"]
    assert latency["count"] == 3 and 0 <= latency["locked_p50"] <= latency["locked_max"] < 100
    assert latency["total_p95"] >= latency["locked_p50"]
    watcher = lm1["adapter_watcher"]
    assert (watcher["reloads"], watcher["failures"], watcher["fallbacks"]) == (3, 1, 1)
    assert bad in watcher["last_error"] and watcher["last_reload"] >= lm0["adapter_watcher"]["last_reload"]
    assert max(depths) >= 1 and lm1["queue"] == {"depth": 0, "generating": 0}, depths
    assert lm0["sessions"]["active"] == 1  # the warm-up's
    wait_until(lambda: serve.telemetry()["language_model"]["sessions"]["active"] == CLIENTS + 2)
    chat = lm1["requests"]["chat"]["200"] - lm0["requests"].get("chat", {}).get("200", 0)
    assert chat == requests
    assert lm1["latency"]["chat"]["count"] >= requests and lm1["latency"]["chat"]["p95_s"] > 0
    assert lm1["tokens"]["completion"] > lm0["tokens"]["completion"] and lm1["tokens"]["tokens_per_s"] > 0
    assert lm1["memory_injection"]["count"] >= requests - 1 and lm1["memory_injection"]["skipped"] >= 1

    # /metrics ------------------------------------------------------------------------------
    def moved(name: str, **labels: str) -> float:
        return (value(m1, name, **labels) or 0.0) - (value(m0, name, **labels) or 0.0)

    assert moved("milton_api_requests_total", endpoint="chat", status="200") == requests
    assert moved("milton_api_request_seconds_count", endpoint="chat") == requests
    assert moved("milton_api_request_seconds_bucket", endpoint="chat", le="+Inf") == requests
    assert moved("milton_api_request_seconds_sum", endpoint="chat") > 0
    assert moved("milton_chat_first_token_seconds_count") == requests
    assert moved("milton_chat_completion_tokens_total") == lm1["tokens"]["completion"] - lm0["tokens"]["completion"]
    assert moved("milton_chat_generation_seconds_total") > 0
    assert (value(m1, "milton_chat_tokens_per_second") or 0) > 0
    assert moved("milton_memory_injection_seconds_count") >= requests - 1
    assert value(m1, "milton_chat_queue_depth") == 0 and value(m1, "milton_chat_active_sessions") >= 1
    assert value(m1, "milton_model_reloads_total", kind="adapter") == engine["swaps"] == 3  # first + 2
    assert moved("milton_model_reloads_total", kind="adapter") == 2
    assert value(m1, "milton_model_reload_failures_total", kind="adapter") == 1
    assert moved("milton_model_fallbacks_total", kind="adapter") == 1
    assert value(m1, "milton_model_last_swap_seconds", kind="adapter") == pytest.approx(
        engine["last_swap_ms"] / 1000, abs=1e-5)
    for reason in ("memory", "session", "session_log"):
        assert value(m1, "milton_api_fallbacks_total", reason=reason) == 0.0  # nothing degraded
