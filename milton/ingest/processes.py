"""Process snapshots: this host's (psutil) or other hosts' (JSONL/CSV files), plus retention.

Rows land in the STRICT ``processes`` table, whose types and CHECKs do the bulk validation in C.
A file is ingested in one transaction: with ``strict`` any bad row rolls the whole file back;
otherwise bad rows are reported (line and reason) and skipped. Snapshot ids are the primary key
of ``snapshots``, so re-ingesting the same file adds nothing.
"""

from __future__ import annotations

import csv
import io
import json
import math
import socket
import sqlite3
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from operator import itemgetter
from pathlib import Path
from typing import Any, BinaryIO

import sqlite_utils

from milton.core.errors import InputError
from milton.core.inputs import lone_surrogate, open_source, read_lines

COLUMNS = ("snapshot_id", "host", "ts", "pid", "ppid", "name", "exe", "username", "cpu", "rss",
           "create_time")
INSERT_SQL = f"insert into processes ({', '.join(COLUMNS)}) values ({', '.join('?' * len(COLUMNS))})"
_ALIASES = {
    "hostname": "host", "timestamp": "ts", "time": "ts", "user": "username",
    "cpu_percent": "cpu", "rss_bytes": "rss", "memory_rss": "rss", "snapshot": "snapshot_id",
}
_KNOWN = set(COLUMNS) | set(_ALIASES)
_REQUIRED = ("host", "pid", "name", "ts")
_NAMESPACE = uuid.UUID("6f1b8a1e-58a4-4c36-9d55-3c1d1b7c2a90")
BATCH = 5000


class RowError(ValueError):
    """One bad row; the message is the reason shown after the line number."""


@dataclass
class IngestReport:
    source: str
    rows: int = 0
    snapshots: int = 0
    duplicate_snapshots: int = 0
    rejected: list[tuple[int, str]] = field(default_factory=list)
    deleted: int = 0

    def as_metrics(self) -> dict[str, Any]:
        return {"rows": self.rows, "snapshots": self.snapshots,
                "duplicate_snapshots": self.duplicate_snapshots,
                "rejected": len(self.rejected), "retention_deleted": self.deleted}


# -- this host -----------------------------------------------------------------------------
def take_snapshot(now: datetime, host: str | None = None) -> list[tuple]:
    """One row per live process. ``cpu`` is the lifetime average CPU % (stable in one shot)."""
    import psutil

    host = host or socket.gethostname()
    ts = now.timestamp()
    wall = time.time()
    snapshot_id = str(uuid.uuid4())
    rows = []
    attrs = ["pid", "ppid", "name", "exe", "username", "cpu_times", "memory_info", "create_time"]
    for proc in psutil.process_iter(attrs=attrs, ad_value=None):
        info = proc.info
        name = info.get("name")
        if not name:
            continue
        created = info.get("create_time")
        cpu = None
        times = info.get("cpu_times")
        if times is not None and created:
            age = max(wall - created, 1.0)
            cpu = round(100.0 * (times.user + times.system) / age, 3)
        mem = info.get("memory_info")
        rows.append((snapshot_id, host, ts, info["pid"], info.get("ppid"), name[:1024],
                     (info.get("exe") or None), info.get("username"), cpu,
                     mem.rss if mem is not None else None, created))
    return rows


def ingest_snapshot(db: sqlite_utils.Database, rows: list[tuple], source: str = "psutil") -> int:
    """Write one already-typed snapshot (all rows share snapshot id, host and ts) atomically."""
    if not rows:
        return 0
    snapshot_id, host, ts = rows[0][0], rows[0][1], rows[0][2]
    with db.atomic():
        db.conn.execute("insert into snapshots (id, host, ts, source, rows) values (?, ?, ?, ?, ?)",
                        (snapshot_id, host, ts, source, len(rows)))
        db.conn.executemany(INSERT_SQL, rows)
    return len(rows)


# -- files ---------------------------------------------------------------------------------
def _as_int(value: Any, name: str, *, required: bool = False) -> int | None:
    if value is None or value == "":
        if required:
            raise RowError(f"missing field '{name}'")
        return None
    if isinstance(value, bool):
        raise RowError(f"field '{name}': expected an integer, got a boolean")
    if isinstance(value, int):
        out = value
    elif isinstance(value, float) and value.is_integer():
        out = int(value)
    elif isinstance(value, str):
        try:
            out = int(value.strip())
        except ValueError:
            raise RowError(f"field '{name}': expected an integer, got {value[:40]!r}") from None
    else:
        raise RowError(f"field '{name}': expected an integer, got {type(value).__name__}")
    if out < 0:
        raise RowError(f"field '{name}': must be >= 0, got {out}")
    if out > 2**63 - 1:
        raise RowError(f"field '{name}': too large")
    return out


def _as_float(value: Any, name: str) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise RowError(f"field '{name}': expected a number, got a boolean")
    try:
        out = float(value)
    except OverflowError:
        raise RowError(f"field '{name}': number too large") from None
    except (TypeError, ValueError):
        shown = value[:40] if isinstance(value, str) else type(value).__name__
        raise RowError(f"field '{name}': expected a number, got {shown!r}") from None
    if not math.isfinite(out) or out < 0:
        raise RowError(f"field '{name}': must be a finite number >= 0, got {str(value)[:40]!r}")
    return out


def _as_text(value: Any, name: str, limit: int, *, required: bool = False) -> str | None:
    if value is None or value == "":
        if required:
            raise RowError(f"missing field '{name}'")
        return None
    if not isinstance(value, str):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        else:
            raise RowError(f"field '{name}': expected text, got {type(value).__name__}")
    if len(value) > limit:
        raise RowError(f"field '{name}': longer than {limit} characters")
    if "\x00" in value:
        raise RowError(f"field '{name}': contains a NUL byte")
    return value


_ts_cache: dict[Any, float] = {}


def _as_ts(value: Any, name: str = "timestamp") -> float:
    if value is None or value == "":
        raise RowError(f"missing field '{name}'")
    # bool before the cache: True == 1 would otherwise hit a cached 1; only scalars are hashable.
    if isinstance(value, bool):
        raise RowError(f"field '{name}': expected a timestamp, got a boolean")
    cacheable = isinstance(value, (str, int, float))
    cached = _ts_cache.get(value) if cacheable else None
    if cached is not None:
        return cached
    if isinstance(value, (int, float)):
        try:
            out = float(value)
        except OverflowError:
            raise RowError(f"field '{name}': timestamp out of range") from None
    elif isinstance(value, str):
        text = value.strip()
        try:
            out = float(text)
        except ValueError:
            try:
                parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
            except ValueError:
                raise RowError(f"field '{name}': not a timestamp: {text[:40]!r}") from None
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=timezone.utc)  # naive means UTC
            out = parsed.timestamp()
    else:
        raise RowError(f"field '{name}': expected a timestamp, got {type(value).__name__}")
    if not math.isfinite(out) or out <= 0 or out > 32503680000:  # year 3000
        raise RowError(f"field '{name}': timestamp out of range: {str(value)[:40]!r}")
    if len(_ts_cache) > 4096:
        _ts_cache.clear()
    _ts_cache[value] = out
    return out


def _as_time(value: Any, name: str) -> float | None:
    """An optional time field: accepts whatever ``timestamp`` accepts (epoch or ISO-8601),
    plus 0 (some agents report boot-time processes as created at the epoch)."""
    if value is None or value == "":
        return None
    if (type(value) is int or type(value) is float) and value == 0:
        return 0.0
    if isinstance(value, str) and value.strip() in ("0", "0.0"):
        return 0.0
    return _as_ts(value, name)


_snapshot_ids: dict[tuple[str, float], str] = {}
_INF = float("inf")


def _derived_snapshot_id(host: str, ts: float) -> str:
    """Rows without a snapshot id form one snapshot per (host, ts); stable across re-ingests."""
    key = (host, ts)
    sid = _snapshot_ids.get(key)
    if sid is None:
        if len(_snapshot_ids) > 4096:
            _snapshot_ids.clear()
        sid = _snapshot_ids[key] = str(uuid.uuid5(_NAMESPACE, f"{host}\x00{ts!r}"))
    return sid


def _opt_text(value: Any, limit: int) -> bool:
    return value is None or (type(value) is str and 0 < len(value) <= limit and "\x00" not in value)


def _opt_number(value: Any) -> bool:
    return value is None or ((type(value) is float or type(value) is int) and 0 <= value < _INF)


def _fast_record(record: dict) -> tuple | None:
    """The common case (canonical keys, already the right types), checked inline.

    Returns None for anything else, which then takes the slow path that explains the problem.
    """
    get = record.get
    host, name, pid, ts = get("host"), get("name"), get("pid"), get("ts")
    if not (type(host) is str and type(name) is str and type(pid) is int
            and (type(ts) is float or type(ts) is int)):
        return None
    if not (0 < len(host) <= 255 and 0 < len(name) <= 1024 and 0 <= pid < 2**63
            and 0 < ts <= 32503680000) or "\x00" in host or "\x00" in name:
        return None
    ppid, exe, user, sid = get("ppid"), get("exe"), get("username"), get("snapshot_id")
    cpu, rss, created = get("cpu"), get("rss"), get("create_time")
    if not (_opt_text(exe, 4096) and _opt_text(user, 256) and _opt_text(sid, 128)
            and _opt_number(cpu) and _opt_number(created)
            and (ppid is None or (type(ppid) is int and 0 <= ppid < 2**63))
            and (rss is None or (type(rss) is int and 0 <= rss < 2**63))):
        return None
    ts = float(ts)
    return (sid or _derived_snapshot_id(host, ts), host, ts, pid, ppid, name, exe, user,
            None if cpu is None else float(cpu), rss,
            None if created is None else float(created))


def normalize_record(record: Any) -> tuple:
    """Validate one decoded record (dict) into a row tuple in ``COLUMNS`` order."""
    if type(record) is dict:
        row = _fast_record(record)
        if row is not None:
            return row
    if not isinstance(record, dict):
        raise RowError(f"expected an object, got {type(record).__name__}")
    data: dict[str, Any] = {}
    for key, value in record.items():
        canonical = _ALIASES.get(key, key)
        if key not in _KNOWN:
            continue  # extra fields from agents are ignored, not fatal
        data[canonical] = value
    missing = [f for f in _REQUIRED if data.get(f) in (None, "")]
    if missing:
        raise RowError("missing field " + ", ".join(f"'{m}'" for m in missing))
    host = _as_text(data.get("host"), "host", 255, required=True)
    ts = _as_ts(data.get("ts"))
    snapshot_id = _as_text(data.get("snapshot_id"), "snapshot_id", 128)
    if snapshot_id is None:
        snapshot_id = _derived_snapshot_id(host, ts)
    return (
        snapshot_id, host, ts,
        _as_int(data.get("pid"), "pid", required=True),
        _as_int(data.get("ppid"), "ppid"),
        _as_text(data.get("name"), "name", 1024, required=True),
        _as_text(data.get("exe"), "exe", 4096),
        _as_text(data.get("username"), "username", 256),
        _as_float(data.get("cpu"), "cpu"),
        _as_int(data.get("rss"), "rss"),
        _as_time(data.get("create_time"), "create_time"),
    )


def _detect_format(path: str, first: str | None, explicit: str | None) -> str:
    if explicit:
        return explicit
    lower = path.lower()
    if lower.endswith(".csv"):
        return "csv"
    if lower.endswith((".jsonl", ".ndjson", ".json")):
        return "jsonl"
    return "jsonl" if (first or "").lstrip().startswith("{") else "csv"


def parse_records(
    handle: BinaryIO, *, source: str, fmt: str | None, max_line_bytes: int
) -> Iterator[tuple[int, tuple | None, str | None]]:
    """Yield (line, row, error) for every data line of a JSONL or CSV stream."""
    lines = read_lines(handle, max_line_bytes)
    pending: list[tuple[int, str | None, str | None]] = []
    first_text = None
    for item in lines:  # peek at the first non-blank line for format detection
        pending.append(item)
        if item[1] is None or item[1].strip():
            first_text = item[1]
            break
    kind = _detect_format(source, first_text, fmt)

    def all_lines() -> Iterator[tuple[int, str | None, str | None]]:
        yield from pending
        yield from lines

    if kind == "jsonl":
        for number, text, error in all_lines():
            if error:
                yield number, None, error
                continue
            assert text is not None
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                yield number, None, f"invalid JSON: {exc.msg} (column {exc.colno})"
                continue
            except (ValueError, RecursionError) as exc:  # e.g. an integer with > 4300 digits
                yield number, None, f"invalid JSON: {str(exc)[:80]}"
                continue
            where = lone_surrogate(text, record)
            if where is not None:
                yield number, None, (f"field '{where}': a lone surrogate escape (e.g. \\ud800) "
                                     "is not valid Unicode")
                continue
            try:
                yield number, normalize_record(record), None
            except RowError as exc:
                yield number, None, str(exc)
        return

    header: list[str] | None = None
    for number, text, error in all_lines():
        if error:
            if header is None:
                raise InputError(f"{source}:{number}: {error} (in the CSV header)")
            yield number, None, error
            continue
        assert text is not None
        if not text.strip():
            continue
        try:
            cells = next(csv.reader(io.StringIO(text)))
        except (csv.Error, StopIteration) as exc:
            yield number, None, f"invalid CSV: {exc}"
            continue
        if header is None:
            header = [c.strip() for c in cells]
            unknown = [h for h in header if h not in _KNOWN]
            missing = [r for r in _REQUIRED
                       if r not in {_ALIASES.get(h, h) for h in header}]
            if missing:
                raise InputError(
                    f"{source}:{number}: CSV header lacks required column(s) "
                    + ", ".join(missing)
                    + (f" (unknown: {', '.join(unknown)})" if unknown else "")
                )
            continue
        if len(cells) != len(header):
            yield number, None, f"expected {len(header)} CSV fields, got {len(cells)}"
            continue
        try:
            yield number, normalize_record(dict(zip(header, cells))), None
        except RowError as exc:
            yield number, None, str(exc)


def ingest_file(
    db: sqlite_utils.Database,
    path: str | Path,
    *,
    strict: bool = False,
    fmt: str | None = None,
    max_line_bytes: int = 1_000_000,
) -> IngestReport:
    """Ingest a JSONL/CSV file in one transaction. Raises InputError when nothing may be kept."""
    handle, source, close = open_source(path)
    report = IngestReport(source=source)
    known: set[str] = set()  # snapshot ids seen in this file
    skipped: set[str] = set()  # snapshot ids already in the store (re-ingest)
    snapshot_meta: dict[str, list] = {}
    batch: list[tuple] = []
    conn = db.conn

    def flush() -> None:
        if batch:
            try:
                conn.executemany(INSERT_SQL, batch)
            except sqlite3.IntegrityError:  # the Python checks missed something: explain per row
                for row in batch:
                    try:
                        conn.execute(INSERT_SQL, row)
                    except sqlite3.IntegrityError as exc:
                        raise InputError(f"{source}: row rejected by the store: {exc}") from None
            batch.clear()

    try:
        with db.atomic():
            for number, row, error in parse_records(handle, source=source, fmt=fmt,
                                                    max_line_bytes=max_line_bytes):
                if error is not None:
                    report.rejected.append((number, error))
                    if strict:
                        raise InputError(f"{source}:{number}: {error} (--strict: nothing ingested)")
                    continue
                assert row is not None
                sid = row[0]
                if sid not in known:
                    known.add(sid)
                    exists = conn.execute("select 1 from snapshots where id = ?", (sid,)).fetchone()
                    if exists:
                        skipped.add(sid)
                        report.duplicate_snapshots += 1
                    else:
                        snapshot_meta[sid] = [row[1], row[2], 0]
                if sid in skipped:
                    continue
                meta = snapshot_meta[sid]
                if meta[0] != row[1]:
                    report.rejected.append((number, f"snapshot {sid} mixes hosts"))
                    if strict:
                        raise InputError(f"{source}:{number}: snapshot {sid} mixes hosts")
                    continue
                meta[2] += 1
                batch.append(row)
                report.rows += 1
                if len(batch) >= BATCH:
                    flush()
            flush()
            if report.rows == 0 and not report.duplicate_snapshots:
                if report.rejected:
                    first_line, first_error = report.rejected[0]
                    raise InputError(
                        f"{source}:{first_line}: {first_error} "
                        f"(all {len(report.rejected)} row(s) rejected, nothing ingested)"
                    )
                raise InputError(f"{source}: empty, no rows to ingest")
            conn.executemany(
                "insert into snapshots (id, host, ts, source, rows) values (?, ?, ?, ?, ?)",
                [(sid, host, ts, f"file:{source}", n) for sid, (host, ts, n) in snapshot_meta.items()
                 if n > 0],
            )
            report.snapshots = sum(1 for meta in snapshot_meta.values() if meta[2] > 0)
    finally:
        if close:
            handle.close()
    return report


def ingest_records(db: sqlite_utils.Database, records: Iterable[dict[str, Any]],
                   source: str = "api") -> IngestReport:
    """Validate and store decoded records (the API/benchmark path); all or nothing."""
    records = records if isinstance(records, list) else list(records)
    try:
        rows = list(map(normalize_record, records))  # per-row work stays in C where it can
    except RowError:
        for index, record in enumerate(records, start=1):  # rare: find and name the bad one
            try:
                normalize_record(record)
            except RowError as exc:
                raise InputError(f"{source}: record {index}: {exc}") from None
        raise
    sids = list(map(itemgetter(0), rows))
    counts = Counter(sids)
    where = dict(zip(sids, map(itemgetter(1, 2), rows)))
    with db.atomic():
        db.conn.executemany(
            "insert or ignore into snapshots (id, host, ts, source, rows) values (?, ?, ?, ?, ?)",
            [(sid, *where[sid], source, n) for sid, n in counts.items()],
        )
        db.conn.executemany(INSERT_SQL, rows)
    return IngestReport(source=source, rows=len(rows), snapshots=len(counts))


def apply_retention(db: sqlite_utils.Database, now: datetime, keep_days: float,
                    batch: int = 50_000) -> int:
    """Delete snapshots older than ``keep_days`` in bounded transactions (short write locks)."""
    cutoff = (now - timedelta(days=keep_days)).timestamp()
    deleted = 0
    while True:
        with db.atomic():
            cursor = db.conn.execute(
                "delete from processes where rowid in "
                "(select rowid from processes where ts < ? limit ?)", (cutoff, batch))
            count = cursor.rowcount
            if count < batch:
                db.conn.execute("delete from snapshots where ts < ?", (cutoff,))
                db.conn.execute("delete from alerts where ts < ?", (cutoff,))
        deleted += count
        if count < batch:
            return deleted
