"""`milton serve` against hostile and broken HTTP clients, on a real server on 127.0.0.1.

Oversized bodies are refused while they stream in (the server's memory does not grow with
them), idle and trickling connections are closed and cannot starve /healthz of file
descriptors, malformed JSON is a 400 in OpenAI's shape, and a schema-driven run (Schemathesis
over serve's own OpenAPI schema, with the API key) finds no 5xx.
"""

from __future__ import annotations

import json
import socket
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import psutil
import pytest
from live_server import MODEL, EchoEngine, live

from milton.serve.process import live_server

CHILD_ENV = {"MILTON_SERVE__CHAT_ENABLED": "false", "MILTON_SERVE__SNAPSHOT_ENABLED": "false"}
BIG = 80 * 1024 * 1024


def _peak_rss(pid: int) -> int:
    """The process's peak resident set (VmHWM), bytes: catches a transient spike too."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def _status_of(sock: socket.socket) -> int:
    head = b""
    while b"\r\n" not in head:
        data = sock.recv(4096)
        assert data, "connection closed without a response"
        head += data
    return int(head.split(b" ", 2)[1])


def _closed_by_server(sock: socket.socket, timeout: float) -> bool:
    sock.settimeout(timeout)
    try:
        while True:
            data = sock.recv(4096)
            if not data:
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


# -- defect 6: every body limited while it streams in -----------------------------------------
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_oversized_bodies_are_refused_while_streaming(tmp_path):
    row = b'{"host": "h", "pid": 1, "name": "a", "ts": 1700000000.5, "cpu": 1.0},'
    payload = b'{"rows": [' + row * (BIG // len(row)) + row[:-1] + b"]}"

    def chunks():
        for start in range(0, len(payload), 1 << 20):
            yield payload[start:start + (1 << 20)]

    with live_server(tmp_path, CHILD_ENV) as srv:
        port = int(srv.base.rsplit(":", 1)[1])
        for path in ("/anomaly/score", "/v1/embeddings"):  # warm both routes up
            assert httpx.post(srv.base + path, content=b"{}").status_code == 400
        before = _peak_rss(srv.proc.pid)
        for path in ("/anomaly/score", "/v1/embeddings", "/ingest/processes", "/healthz"):
            # A declared Content-Length over the limit: 413 before a byte of the body is sent.
            with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
                sock.sendall(f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                             f"Content-Length: {len(payload)}\r\n\r\n".encode())
                assert _status_of(sock) == 413, path
            if path not in ("/anomaly/score", "/v1/embeddings"):
                continue  # (a route that never reads its body leaves it unread: 405 for /healthz)
            # Chunked (no length): counted as it arrives, 413 with the setting named.
            r = httpx.post(srv.base + path, content=chunks(), timeout=60)
            assert r.status_code == 413, (path, r.text[:200])
            assert "serve.max_" in r.json()["error"]["message"]
        # A client that sends its whole body anyway gets the 413, and its connection still serves.
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            sock.sendall(f"POST /anomaly/score HTTP/1.1\r\nHost: t\r\n"
                         f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
            assert _status_of(sock) == 413
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            reply = b""
            while data := sock.recv(65536):
                reply += data
            assert b"HTTP/1.1 200 OK" in reply and b'"status":"ok"' in reply
        grown = _peak_rss(srv.proc.pid) - before
        assert grown < 150 << 20, f"serve's peak RSS grew by {grown >> 20} MB"
        # A body within its limit still works on the same server.
        assert httpx.post(f"{srv.base}/anomaly/score", json={"rows": []}).status_code in (200, 503)


# -- defect 7: idle connections --------------------------------------------------------------
def test_idle_connections_are_closed_and_cannot_starve_healthz(tmp_path):
    env = {**CHILD_ENV, "MILTON_SERVE__HEADER_TIMEOUT_S": "2", "MILTON_SERVE__BODY_TIMEOUT_S": "2"}
    with live_server(tmp_path, env) as srv:
        port = int(srv.base.rsplit(":", 1)[1])
        child = psutil.Process(srv.proc.pid)
        child.rlimit(psutil.RLIMIT_NOFILE, (256, 256))  # as a small ulimit would
        idle = []
        for n in range(300):  # more than the server could hold open at once
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            if n % 2:  # half start a request and never finish its headers
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n")
            idle.append(sock)
        try:
            assert httpx.get(f"{srv.base}/healthz", timeout=10).status_code == 200
            assert child.num_fds() < 256
            # A client trickling its headers a byte at a time is cut off all the same.
            trickle = socket.create_connection(("127.0.0.1", port), timeout=10)
            request = b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Pad: " + b"a" * 100
            deadline = time.monotonic() + 20
            closed = False
            for byte in request:
                try:
                    trickle.sendall(bytes([byte]))
                except (BrokenPipeError, ConnectionResetError):
                    closed = True
                    break
                if _closed_by_server(trickle, 0.2) or time.monotonic() > deadline:
                    closed = True
                    break
            assert closed, "a trickling client kept its connection for good"
            trickle.close()
            # Every idle connection is closed by the server after serve.header_timeout_s.
            still_open = [s for s in idle if not _closed_by_server(s, 15)]
            assert not still_open, f"{len(still_open)} idle connections never closed"
            assert httpx.get(f"{srv.base}/healthz", timeout=10).status_code == 200
        finally:
            for sock in idle:
                sock.close()
        # A body that stops arriving: 408 after serve.body_timeout_s, and the connection closes.
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(b'POST /anomaly/score HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n{"rows"')
            assert _status_of(sock) == 408
            assert _closed_by_server(sock, 15)
        # Headers larger than serve.max_header_bytes: 431, not a growing buffer.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n")
            try:
                for _ in range(40):
                    sock.sendall(b"X-Pad: " + b"a" * 4000 + b"\r\n")
            except (BrokenPipeError, ConnectionResetError):
                pass
            assert _status_of(sock) == 431


# -- defect 10: malformed JSON is a 400 in OpenAI's shape -------------------------------------
BAD_JSON = {
    "deep nesting": b'{"model": "echo-test", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "deep objects": b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
    "5000-digit integer": b'{"model": "echo-test", "max_tokens": ' + b"9" * 5000 + b"}",
    "not UTF-8": b'{"model": "\xff\xfe"}',
    "truncated": b'{"model": "echo-test", "messages": [',
    "empty": b"",
    "NaN": b'{"model": "echo-test", "temperature": NaN, "messages": []}',
}


def test_malformed_json_is_a_400_in_openai_shape(milton_home):
    engine = EchoEngine()
    with live(milton_home, engine, serve__memory_budget_tokens="0") as srv:
        for path in ("/v1/chat/completions", "/v1/embeddings", "/anomaly/score", "/ingest/processes"):
            for name, body in BAD_JSON.items():
                r = httpx.post(srv.base + path, content=body, headers={"Content-Type": "application/json"})
                assert r.status_code == 400, (path, name, r.status_code, r.text[:200])
                error = r.json()["error"]
                assert error["type"] == "invalid_request_error" and error["message"], (path, name)
                if path.startswith("/v1/"):
                    assert set(error) == {"message", "type", "param", "code"}
        # A lone surrogate is not text: 400 naming the field, not context_length_exceeded.
        surrogate = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi \ud800"}]})
        r = httpx.post(f"{srv.base}/v1/chat/completions", content=surrogate.encode())
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert (error["type"], error["code"], error["param"]) == \
            ("invalid_request_error", "invalid_unicode", "messages[0].content")
        r = httpx.post(f"{srv.base}/v1/embeddings", content=json.dumps({"model": "x", "input": ["\udfff"]}))
        assert r.status_code == 400 and r.json()["error"]["param"] == "input[0]"
        row = {"host": "h\ud800", "pid": 1, "name": "a", "ts": 1.7e9}
        for path in ("/anomaly/score", "/ingest/processes"):
            for extra in ({}, {"snapshot_id": "s1"}):
                r = httpx.post(srv.base + path, content=json.dumps({"rows": [{**row, **extra}]}))
                assert r.status_code == 400 and "surrogate" in r.json()["error"]["message"], (path, r.text)
        assert engine.calls == []
        assert srv.db().conn.execute("select count(*) from processes").fetchone()[0] == 0
        # Deep but legal JSON still parses into the usual field errors.
        r = httpx.post(f"{srv.base}/v1/chat/completions", json={"model": MODEL, "messages": [[[[1]]]]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0]"


# -- the schema-driven run: no 5xx for any generated request ----------------------------------
EXAMPLES = 25  # per operation and generation mode: bounded, the whole run stays under a minute


def test_schema_driven_requests_never_get_a_5xx(milton_home, embedder):
    import schemathesis
    from helpers import ingest_simulated
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.generation.modes import GenerationMode

    from milton.anomaly.train import train_anomaly
    from milton.core.config import load_settings
    from milton.core.jobs import run_job

    key = "hostile-test-key"
    t0 = datetime(2026, 3, 2, tzinfo=timezone.utc).timestamp()
    trained = load_settings(environ={"MILTON_HOME": str(milton_home)}).settings
    ingest_simulated(trained, seed=3, days=2, t0=t0)
    now = datetime.fromtimestamp(t0 + 2 * 86400, timezone.utc)
    assert run_job("train-anomaly", train_anomaly, trained, now=now).status == "ok"

    with live(milton_home, EchoEngine(), serve__api_key=key, serve__max_tokens_limit="64") as srv:
        schema = schemathesis.openapi.from_url(f"{srv.base}/openapi.json",
                                               headers={"Authorization": f"Bearer {key}"})
        auth = {"Authorization": f"Bearer {key}"}
        served = {"/v1/chat/completions": MODEL, "/v1/embeddings": srv.api.embeddings.model_id()}
        seen: dict[int, int] = {}
        failures: list[str] = []
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) >= 10
        def exercise(operation, mode) -> None:
            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            def run(case) -> None:
                if mode is GenerationMode.POSITIVE and isinstance(case.body, dict) and "model" in case.body:
                    case.body["model"] = served[case.path]  # past the model check, to the engine
                response = case.call(base_url=srv.base, headers=auth, timeout=30)
                seen[response.status_code] = seen.get(response.status_code, 0) + 1
                if response.status_code >= 500 or '"type":"server_error"' in response.text:
                    failures.append(f"{case.method} {case.formatted_path} {case.body!r:.200} -> "
                                    f"{response.status_code} {response.text[:200]}")

            try:
                run()
            except Unsatisfiable:  # nothing in this operation to get wrong (GET /healthz)
                assert mode is GenerationMode.NEGATIVE

        for operation in operations:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                exercise(operation, mode)
        total = sum(seen.values())
        print(f"schema-driven run: {total} requests, statuses {dict(sorted(seen.items()))}")
        assert not failures, "\n".join(failures[:10])
        assert total >= 200 and any(200 <= status < 300 for status in seen)
        assert seen.get(401, 0) == 0  # every request was authenticated: past auth
