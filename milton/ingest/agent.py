"""`milton agent`: snapshot this host and push it to a hub (``POST /ingest/processes``).

Every snapshot is first appended to a local spool (``data/agent/spool.jsonl``, fsynced), then
the spool is sent oldest first. The hub being down only grows the spool; when it is back the
backlog goes out in order, ``agent.batch_snapshots`` per request. The spool's read position
lives in ``spool.offset`` and moves only after the hub accepted a batch, so a crash or kill at
any moment loses nothing: at worst a batch is sent twice, and the hub ignores snapshot ids it
already has. A torn last line (killed mid-append) is cut off when the spool is next opened.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from milton.core.errors import MiltonError
from milton.core.fsio import fsync_dir
from milton.ingest.processes import COLUMNS

SPOOL, OFFSET, REJECTED = "spool.jsonl", "spool.offset", "rejected.jsonl"


class HubUnreachable(MiltonError):
    """The hub did not answer or answered 5xx: keep the spool, try again next run."""


class HubRefused(MiltonError):
    """The hub refused the agent itself (401/403, 404: wrong URL or key): a config problem."""


class Spool:
    """An append-only JSONL file of snapshots (one JSON array of records per line) plus the
    byte offset of the first one the hub has not acknowledged."""

    def __init__(self, directory: Path, max_snapshots: int = 20_000) -> None:
        self.dir = directory
        self.path = directory / SPOOL
        self.offset_path = directory / OFFSET
        self.max_snapshots = max_snapshots
        self.dropped = 0
        directory.mkdir(parents=True, exist_ok=True)
        self._repair()

    # -- state ----------------------------------------------------------------------------
    def _repair(self) -> None:
        """Cut a torn last line; an offset past the end (crash mid-compaction) means 0."""
        size = self.path.stat().st_size if self.path.exists() else 0
        if size:
            with open(self.path, "rb+") as f:
                f.seek(max(0, size - 1))
                if f.read(1) != b"\n":
                    f.seek(0)
                    data = f.read()
                    keep = data.rfind(b"\n") + 1
                    f.truncate(keep)
                    f.flush()
                    os.fsync(f.fileno())
                    size = keep
        if self.offset() > size:
            self.set_offset(0)

    def offset(self) -> int:
        try:
            return int(self.offset_path.read_text().strip() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    def set_offset(self, value: int) -> None:
        """Durably record where the unsent part of the spool starts."""
        tmp = self.offset_path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            f.write(str(value))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.offset_path)
        fsync_dir(self.dir)

    def pending(self) -> int:
        """Snapshots spooled and not yet acknowledged by the hub."""
        if not self.path.exists():
            return 0
        with open(self.path, "rb") as f:
            f.seek(self.offset())
            return sum(1 for _ in f)

    # -- writing ----------------------------------------------------------------------------
    def append(self, rows: list[tuple]) -> None:
        """Spool one snapshot (rows in ``COLUMNS`` order), durably."""
        records = [dict(zip(COLUMNS, row)) for row in rows]  # the canonical keys the hub reads
        line = json.dumps(records, separators=(",", ":"), ensure_ascii=False) + "\n"
        with open(self.path, "ab") as f:
            f.write(line.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        over = self.pending() - self.max_snapshots
        if over > 0:
            self._advance(over)
            self.dropped += over

    def _advance(self, count: int) -> None:
        with open(self.path, "rb") as f:
            f.seek(self.offset())
            for _ in range(count):
                if not f.readline():
                    break
            self.set_offset(f.tell())

    # -- reading ------------------------------------------------------------------------------
    def batches(self, snapshots: int, max_bytes: int) -> Iterator[tuple[list[bytes], int]]:
        """(lines, end offset) of the pending snapshots, oldest first, ``snapshots`` at a time."""
        if not self.path.exists():
            return
        with open(self.path, "rb") as f:
            f.seek(self.offset())
            lines: list[bytes] = []
            size = 0
            while True:
                line = f.readline()
                if line and lines and (len(lines) >= snapshots or size + len(line) > max_bytes):
                    yield lines, f.tell() - len(line)
                    lines, size = [], 0
                if not line:
                    break
                lines.append(line)
                size += len(line)
            if lines:
                yield lines, f.tell()

    def ack(self, end_offset: int) -> None:
        """The hub stored everything before ``end_offset``; compact when all is sent."""
        size = self.path.stat().st_size
        if end_offset >= size:
            with open(self.path, "rb+") as f:  # truncate first: a stale offset past the end is 0
                f.truncate(0)
                f.flush()
                os.fsync(f.fileno())
            self.set_offset(0)
        else:
            self.set_offset(end_offset)

    def reject(self, lines: list[bytes], end_offset: int, reason: str) -> None:
        """Set aside snapshots the hub called invalid (they would block the queue forever)."""
        with open(self.dir / REJECTED, "ab") as f:
            for line in lines:
                f.write(json.dumps({"reason": reason, "rows": json.loads(line)}).encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())
        self.ack(end_offset)


# -- the hub connection -------------------------------------------------------------------------
class HubClient:
    """One keep-alive HTTP connection to the hub's serve."""

    def __init__(self, url: str, api_key: str = "", timeout_s: float = 30.0) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise MiltonError(f"agent: not an http(s) URL: {url!r}")
        self.url = url.rstrip("/")
        self.path = (parts.path.rstrip("/") or "") + "/ingest/processes"
        cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        self.conn = cls(parts.hostname, parts.port, timeout=timeout_s)
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"

    def post(self, body: bytes) -> tuple[int, dict[str, Any]]:
        try:
            self.conn.request("POST", self.path, body=body, headers=self.headers)
            response = self.conn.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException) as exc:
            self.conn.close()
            raise HubUnreachable(f"{self.url}: cannot reach the hub: {exc or type(exc).__name__}") from None
        try:
            payload = json.loads(data) if data else {}
        except ValueError:
            payload = {"raw": data[:200].decode("utf-8", "replace")}
        return response.status, payload

    def close(self) -> None:
        self.conn.close()


def _message(payload: dict[str, Any]) -> str:
    error = payload.get("error")
    if isinstance(error, dict):
        return str(error.get("message", error))[:300]
    return str(payload.get("detail") or payload.get("raw") or payload)[:300]


@dataclass
class FlushResult:
    sent: int = 0
    duplicates: int = 0
    rejected: int = 0
    requests: int = 0
    rows: int = 0


def flush(spool: Spool, client: HubClient, *, batch_snapshots: int, max_bytes: int) -> FlushResult:
    """Send the backlog in order. Raises HubUnreachable (the rest stays spooled) or HubRefused."""
    result = FlushResult()
    pending = list(spool.batches(batch_snapshots, max_bytes))
    for lines, end in pending:
        body = b'{"rows":[' + b",".join(line.strip()[1:-1] for line in lines if line.strip() != b"[]") + b"]}"
        status, payload = client.post(body)
        result.requests += 1
        if status == 413 and len(lines) > 1:  # the hub's limits are lower: one at a time
            start = end - sum(len(line) for line in lines)
            for line in lines:
                start += len(line)
                one = b'{"rows":[' + line.strip()[1:-1] + b"]}"
                status, payload = client.post(one)
                result.requests += 1
                _settle(spool, [line], start, status, payload, result)
            continue
        _settle(spool, lines, end, status, payload, result)
    return result


def _settle(spool: Spool, lines: list[bytes], end: int, status: int, payload: dict[str, Any],
            result: FlushResult) -> None:
    if 200 <= status < 300:
        spool.ack(end)
        result.sent += int(payload.get("snapshots", 0))
        result.duplicates += int(payload.get("duplicate_snapshots", 0))
        result.rows += int(payload.get("rows", 0))
        return
    if status in (400, 413, 422):
        spool.reject(lines, end, f"HTTP {status}: {_message(payload)}")
        result.rejected += len(lines)
        return
    if status in (401, 403, 404, 405):
        raise HubRefused(f"{status} from the hub: {_message(payload)} "
                         "(check agent.push_url and agent.api_key)")
    raise HubUnreachable(f"HTTP {status} from the hub: {_message(payload)}")


# -- one run ----------------------------------------------------------------------------------
def spool_for(settings: Any) -> Spool:
    return Spool(settings.paths.data_dir / "agent", settings.agent.max_spool_snapshots)


def agent_host(settings: Any) -> str:
    return settings.agent.host or socket.gethostname()


def run_once(settings: Any, url: str, now: datetime, *, snapshot: bool = True) -> dict[str, Any]:
    """Snapshot this host into the spool, then send the spool. Metrics for the job record;
    raises HubUnreachable (spooled, nothing lost) or HubRefused."""
    from milton.ingest.processes import take_snapshot

    spool = spool_for(settings)
    rows = take_snapshot(now, agent_host(settings)) if snapshot else []
    if rows:
        spool.append(rows)
    client = HubClient(url, settings.agent.api_key.get_secret_value(), settings.agent.timeout_s)
    t0 = time.perf_counter()
    try:
        result = flush(spool, client, batch_snapshots=settings.agent.batch_snapshots,
                       max_bytes=max(1024, settings.serve.max_push_bytes - 1024))
    finally:
        client.close()
    return {"snapshot_rows": len(rows), "sent": result.sent, "duplicates": result.duplicates,
            "rejected": result.rejected, "requests": result.requests, "rows_sent": result.rows,
            "dropped": spool.dropped, "pending": spool.pending(),
            "send_s": round(time.perf_counter() - t0, 4)}


def agent_job(url: str | None, *, snapshot: bool = True):
    """The job function for run_job("agent", ...): skipped without a hub URL, or while the hub
    is unreachable (the snapshot is spooled and goes out with the backlog later)."""
    from milton.core.jobs import JobContext, Skip

    def job(ctx: JobContext) -> dict[str, Any]:
        target = url or ctx.settings.agent.push_url
        if not target:
            raise Skip("no hub: set agent.push_url (or run `milton agent --push URL`)")
        try:
            metrics = run_once(ctx.settings, target, ctx.now, snapshot=snapshot)
        except HubUnreachable as exc:
            spool = spool_for(ctx.settings)
            raise Skip(f"{exc}; {spool.pending()} snapshot(s) spooled",
                       pending=spool.pending(), dropped=spool.dropped) from None
        if metrics["rejected"]:
            ctx.log(f"the hub rejected {metrics['rejected']} snapshot(s); kept in "
                    f"{spool_for(ctx.settings).dir / REJECTED}", level=30)
        return metrics

    return job
