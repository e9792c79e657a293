"""Text from outside is printed literally: markup in a process name, memory or session title is
shown as typed (never parsed: no MarkupError, no spoofed link or colour), and terminal control
sequences are shown as visible escapes, through ingest, detect, memory and sessions output."""

from __future__ import annotations

import json
import sqlite3
from datetime import datetime, timezone

from milton.anomaly.simulate import Workstation
from milton.core.text import literal, safe

T0 = datetime(2026, 3, 2, tzinfo=timezone.utc).timestamp()
EVIL = ["[/bold]", "[link=https://evil.example]firefox[/link]", "[red]systemd[/red]",
        "\x1b[2Jwipe", "bell\x07\x9b31m", "rtl\u202eexe.sh"]


def _rows_to_jsonl(rows, iso_create: bool) -> str:
    lines = []
    for sid, host, ts, pid, ppid, name, exe, user, cpu, rss, created in rows:
        ct = datetime.fromtimestamp(created, timezone.utc).isoformat() if iso_create else created
        lines.append(json.dumps({"snapshot_id": sid, "host": host, "timestamp": ts, "pid": pid,
                                 "ppid": ppid, "name": name, "exe": exe, "user": user,
                                 "cpu": cpu, "rss": rss, "create_time": ct}))
    return "\n".join(lines) + "\n"


def test_safe_escapes_controls_and_keeps_markup_text():
    assert safe("[/bold]") == "[/bold]"
    assert safe("\x1b[2J") == "\\x1b[2J"
    assert safe("a\nb") == "a\\x0ab" and safe("a\nb", keep_newlines=True) == "a\nb"
    assert safe("x\u202ey") == "x\\u202ey"
    assert literal("[red]x[/red]").plain == "[red]x[/red]"


def test_iso_create_time_is_accepted(cli, milton_home):
    ws = Workstation(seed=1)
    path = milton_home / "agent.jsonl"
    path.write_text(_rows_to_jsonl(ws.snapshot(T0), iso_create=True))
    rc, out, err = cli("ingest", "processes", "--from", str(path), "--now", str(T0))
    assert rc == 0, err
    db = sqlite3.connect(milton_home / "data" / "milton.db")
    created = db.execute("select min(create_time), count(*) from processes").fetchone()
    assert created[1] > 10 and abs(created[0] - (T0 - 3600)) < 1e-3
    # A bad one still names the line and the field.
    path.write_text(json.dumps({"host": "h", "pid": 1, "name": "x", "ts": T0,
                                "create_time": "yesterday"}) + "\n")
    rc, out, err = cli("ingest", "processes", "--from", str(path), "--strict")
    assert rc != 0 and "agent.jsonl:1" in err and "create_time" in err and len(err.strip().splitlines()) == 1


def _assert_literal(text: str, *needles: str) -> None:
    assert "\x1b" not in text and "\x07" not in text and "\x9b" not in text and "\u202e" not in text
    for needle in needles:
        assert needle in text, (needle, text)


def test_markup_and_escapes_through_ingest_and_detect(cli, milton_home):
    ws = Workstation(seed=2)
    history = []
    for i in range(60):
        history += ws.snapshot(T0 + i * 1800.0)
    (milton_home / "history.jsonl").write_text(_rows_to_jsonl(history, iso_create=False))
    rc, out, err = cli("ingest", "processes", "--from", str(milton_home / "history.jsonl"),
                        "--now", str(T0 + 60 * 1800.0))
    assert rc == 0, err
    rc, out, err = cli("train-anomaly", "--now", str(T0 + 60 * 1800.0))
    assert rc == 0, err
    snap = ws.snapshot(T0 + 61 * 1800.0)
    sid = snap[0][0]
    evil = [(sid, "ws1", T0 + 61 * 1800.0, 9000 + i, 1, name, f"/tmp/{name}", f"u{name}", 1.0,
             1000, T0) for i, name in enumerate(EVIL)]
    (milton_home / "evil.jsonl").write_text(_rows_to_jsonl(snap + evil, iso_create=True))
    rc, out, err = cli("ingest", "processes", "--from", str(milton_home / "evil.jsonl"),
                        "--now", str(T0 + 61 * 1800.0))
    assert rc == 0, err
    rc, out, err = cli("detect", "--now", str(T0 + 61 * 1800.0), env={"COLUMNS": "400"})
    assert rc == 0, err
    _assert_literal(out, "[/bold]", "[link=https://evil.example]firefox[/link]",
                    "[red]systemd[/red]", "\\x1b[2Jwipe", "bell\\x07\\x9b31m", "rtl\\u202eexe.sh")
    rc, out, err = cli("detect", "--from", str(milton_home / "evil.jsonl"), env={"COLUMNS": "400"})
    assert rc == 0, err
    _assert_literal(out, "[/bold]", "\\x1b[2Jwipe")
    # A file name with an escape in it is printed escaped in errors too.
    bad = milton_home / "bad\x1b[31m.jsonl"
    bad.write_text("{not json\n")
    rc, out, err = cli("ingest", "processes", "--from", str(bad))
    assert rc != 0
    _assert_literal(err, "bad\\x1b[31m.jsonl")


def test_markup_and_escapes_through_memory_and_sessions(cli, milton_home):
    text = "remember [/bold] and [link=https://evil.example]this[/link] \x1b[2J now"
    rc, out, err = cli("memory", "add", text, "--tag", "[red]x[/red]")
    assert rc == 0, err
    rc, out, err = cli("memory", "list", env={"COLUMNS": "400"})
    assert rc == 0, err
    _assert_literal(out, "[/bold]", "[link=https://evil.example]this[/link]", "\\x1b[2J")
    rc, out, err = cli("memory", "search", "remember this", env={"COLUMNS": "400"})
    assert rc == 0, err
    _assert_literal(out, "[/bold]", "[red]x[/red]")
    db = sqlite3.connect(milton_home / "data" / "milton.db")
    with db:
        db.execute("insert into sessions (id, user, source, started, last_activity, status, topics) "
                   "values (?, ?, 'api', ?, ?, 'open', ?)",
                   ("s[/bold]1", "[blink]eve\x1b[5m", T0, T0, json.dumps(["[/i]topic"])))
        db.execute("insert into messages (session_id, seq, role, content, ts) values (?, 0, 'user', ?, ?)",
                   ("s[/bold]1", "hi [/bold] \x1b]8;;https://evil\x07link", T0))
    rc, out, err = cli("sessions", "list", env={"COLUMNS": "400"})
    assert rc == 0, err
    _assert_literal(out, "s[/bold]1", "[blink]eve\\x1b[5m", "[/i]topic")
    rc, out, err = cli("sessions", "show", "s[/bold]1")
    assert rc == 0, err
    _assert_literal(out, "[blink]eve", "hi [/bold] \\x1b]8;;https://evil\\x07link")
