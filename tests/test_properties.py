"""Generated bad input (Hypothesis) for the parsers and the config loader (issue 19).

For any input each one gives a valid result or a one-line :class:`MiltonError`: never another
exception (a traceback for the user), never a partial write (the row counts of a real SQLite
store move by exactly what the result reports, or not at all). Example counts are bounded so
the file takes seconds; ``derandomize`` makes a run repeatable.
"""

from __future__ import annotations

import io
import json
import re
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from milton.core.config import describe_settings, load_settings
from milton.core.errors import ConfigError, MiltonError
from milton.core.store import open_store
from milton.ingest.processes import ingest_file, parse_records
from milton.memory.conversations import ingest_conversation_file, parse_record, read_records
from milton.memory.documents import _decode, _hard_split, chunk_text, split_paragraph

NOW = datetime(2026, 3, 2, tzinfo=timezone.utc)
FAST = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])
STORE = settings(max_examples=60, deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.too_slow])

# Text with the characters that broke things: lone surrogates, NUL, bidi overrides, Rich
# markup, CR/LF mixes, a BOM, very long runs.
NASTY = st.sampled_from(["\ud800", "\udfff", "\x00", "\u202e", "[red]x[/red]", "\r\n", "\r",
                         "\ufeff", "\\", '"', "\t", " ", "\u2028", "9" * 5000, "x" * 3000])
TEXT = st.lists(st.one_of(st.text(max_size=30), NASTY), max_size=8).map("".join)
SCALAR = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), TEXT,
                   st.just(10**40), st.just(-1))
JSON = st.recursive(SCALAR, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                    st.dictionaries(TEXT, inner, max_size=4)),
                    max_leaves=12)


def one_line(exc: BaseException) -> None:
    assert isinstance(exc, MiltonError), f"{type(exc).__name__}: {exc}"
    assert "\n" not in str(exc) and str(exc).strip(), repr(str(exc))


def dump(value) -> str:
    """JSON as an agent or exporter would write it (surrogates escaped, so they survive)."""
    return json.dumps(value, ensure_ascii=True, allow_nan=True)


@pytest.fixture(scope="module")
def store():
    with tempfile.TemporaryDirectory(prefix="milton-props-") as tmp:
        db = open_store(Path(tmp) / "milton.db")
        yield db, Path(tmp)
        db.close()


def counts(db, *tables: str) -> tuple[int, ...]:
    return tuple(db.execute(f"select count(*) from {t}").fetchone()[0] for t in tables)


# -- processes ---------------------------------------------------------------------------------
PROCESS_FIELDS = ["ts", "timestamp", "host", "pid", "ppid", "name", "exe", "cmdline", "user",
                  "cpu_percent", "rss_bytes", "status", "create_time", "num_threads"]
ANY_FIELDS = st.dictionaries(st.sampled_from(PROCESS_FIELDS),
                             st.one_of(SCALAR, st.integers(0, 2**31), st.floats(0, 2e9),
                                       st.just(1772409600)), max_size=9)
# Mostly valid rows with a few odd fields, so the success path is exercised too.
NEAR_VALID = st.fixed_dictionaries(
    {"ts": st.sampled_from([1772409600, 1772410200, "2026-03-02T00:00:00Z"]),
     "host": st.sampled_from(["h", "ws1"]), "pid": st.integers(1, 5000),
     "name": st.one_of(st.sampled_from(["sshd", "bash", "python3"]), TEXT)},
    optional={k: st.one_of(SCALAR, st.floats(0, 100)) for k in
              ("cpu_percent", "rss_bytes", "cmdline", "user", "ppid", "status")})
PROCESS_ROW = st.one_of(NEAR_VALID, NEAR_VALID, ANY_FIELDS)


@given(lines=st.lists(st.one_of(PROCESS_ROW.map(dump), JSON.map(dump), TEXT), max_size=6),
       suffix=st.sampled_from([".jsonl", ".csv", ".txt"]))
@FAST
def test_process_parser_never_raises_on_any_line(lines, suffix):
    data = "\n".join(lines).encode("utf-8", "surrogatepass")
    try:
        for number, row, error in parse_records(io.BytesIO(data), source=f"x{suffix}", fmt=None,
                                                max_line_bytes=4096):
            assert (row is None) != (error is None) and number >= 1
            if error is not None:
                assert "\n" not in error
    except MiltonError as exc:  # a CSV header that cannot be used: the whole file
        one_line(exc)


@given(lines=st.lists(st.one_of(PROCESS_ROW.map(dump), TEXT), min_size=1, max_size=6),
       strict=st.booleans())
@STORE
@example(lines=['{"ts": 1772409600, "host": "h", "pid": 1, "name": "sshd"}', '{"pid": "x"}'],
         strict=False)
def test_process_ingest_is_all_reported_or_nothing(store, lines, strict):
    db, tmp = store
    path = tmp / "p.jsonl"
    path.write_bytes("\n".join(lines).encode("utf-8", "surrogatepass"))
    before = counts(db, "processes", "snapshots")
    try:
        report = ingest_file(db, path, strict=strict, max_line_bytes=4096)
    except Exception as exc:  # noqa: BLE001 - the property: only one-line Milton errors
        one_line(exc)
        assert counts(db, "processes", "snapshots") == before
        return
    after = counts(db, "processes", "snapshots")
    assert after == (before[0] + report.rows, before[1] + report.snapshots)


# -- conversations -----------------------------------------------------------------------------
ROLE = st.one_of(st.sampled_from(["user", "assistant", "system", "tool", "human", "gpt", "USER "]),
                 SCALAR)
ODD_MESSAGE = st.fixed_dictionaries({"role": ROLE}, optional={
    "content": st.one_of(TEXT, JSON), "from": ROLE, "value": TEXT, "ts": SCALAR,
    "tool_calls": JSON, "name": SCALAR})
GOOD_MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant"]),
     "content": st.one_of(st.text(min_size=1, max_size=40).filter(str.strip), TEXT)},
    optional={"ts": st.one_of(st.just(1772409600), SCALAR)})
MESSAGE = st.one_of(GOOD_MESSAGE, GOOD_MESSAGE, GOOD_MESSAGE, ODD_MESSAGE)
CONVERSATION = st.one_of(
    st.fixed_dictionaries({"messages": st.lists(GOOD_MESSAGE, min_size=1, max_size=3)}),
    st.fixed_dictionaries({"messages": st.lists(MESSAGE, max_size=4)},
                          optional={"user": JSON, "id": SCALAR, "created": SCALAR}),
    st.fixed_dictionaries({"conversations": st.lists(MESSAGE, max_size=4)}),
    st.fixed_dictionaries({"milton_session": st.just(1), "messages": st.lists(MESSAGE, max_size=3),
                           "id": SCALAR, "ended": SCALAR, "metadata": JSON}),
    JSON)


@given(record=CONVERSATION)
@FAST
def test_conversation_record_parser_never_raises(record):
    from milton.memory.conversations import RecordError

    try:
        conv = parse_record(record, max_chars=2000, now=NOW.timestamp())
    except RecordError as exc:
        assert "\n" not in str(exc)
        return
    for message in conv.messages:
        message.content.encode("utf-8")  # storable: no lone surrogate got through


@given(records=st.lists(CONVERSATION, max_size=4), suffix=st.sampled_from([".jsonl", ".json", ".txt"]),
       as_list=st.booleans(), garbage=st.one_of(st.none(), TEXT))
@FAST
def test_conversation_reader_never_raises(records, suffix, as_list, garbage):
    text = dump(records) if as_list else "\n".join(dump(r) for r in records)
    if garbage is not None:
        text += "\n" + garbage
    for line, record, error in read_records(io.BytesIO(text.encode("utf-8", "surrogatepass")),
                                            f"x{suffix}"):
        assert line >= 1 and (error is None or "\n" not in error)
        if error is None:
            dump(record)


@given(records=st.lists(CONVERSATION, min_size=1, max_size=3), strict=st.booleans())
@STORE
@example(records=[{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
                  {"messages": [{"role": "user", "content": "x\ud800"}]}], strict=False)
def test_conversation_ingest_is_all_reported_or_nothing(store, records, strict):
    db, tmp = store
    path = tmp / "c.jsonl"
    path.write_text("\n".join(dump(r) for r in records) + "\n")
    before = counts(db, "sessions", "messages")
    try:
        report = ingest_conversation_file(db, path, max_message_chars=2000, now=NOW, strict=strict)
    except Exception as exc:  # noqa: BLE001 - the property: only one-line Milton errors
        one_line(exc)
        assert counts(db, "sessions", "messages") == before
        return
    assert counts(db, "sessions", "messages") == (before[0] + len(report.sessions),
                                                  before[1] + report.messages)


# -- documents ---------------------------------------------------------------------------------
MARKDOWN = st.lists(st.one_of(TEXT, st.sampled_from(["# A", "## B c", "Title", "=====", "-----",
                                                     "```", "~~~", "", "", "Done. Next! Why?"])),
                    max_size=20).map("\n".join)


@given(data=st.one_of(st.binary(max_size=300), MARKDOWN.map(lambda t: t.encode("utf-8", "surrogatepass"))),
       chunk_chars=st.integers(20, 400))
@FAST
def test_document_decode_and_chunk_never_raise(data, chunk_chars):
    text, why = _decode(data)
    if text is None:
        assert why and "\n" not in why
        return
    chunks = chunk_text(text, chunk_chars)
    assert all(isinstance(c, str) and c.strip() for c in chunks)
    # without headings (a title with no body makes no chunk) no letter is lost
    if not re.search(r"#|([=\-~^])\1\1", text):
        assert set(re.findall(r"[A-Za-z]", text)) <= set("".join(chunks))


def old_hard_split(text: str, limit: int) -> list[str]:
    """The implementation before issue 19 (quadratic), kept as the reference."""
    parts = []
    while len(text) > limit:
        cut = text.rfind(" ", limit // 2, limit)
        cut = cut if cut > 0 else limit
        parts.append(text[:cut].rstrip())
        text = text[cut:].lstrip()
    return parts + ([text] if text else [])


@given(text=st.text(alphabet=st.sampled_from("ab \t\n\u3000.x"), max_size=400),
       limit=st.integers(1, 60))
@settings(max_examples=300, deadline=None, derandomize=True)
def test_hard_split_matches_the_old_one(text, limit):
    assert _hard_split(text, limit) == old_hard_split(text, limit)
    assert split_paragraph(text, limit) is not None


class CountingStr(str):
    """A str that counts the characters its slices and strips copy (and keeps counting in
    what they return), so the test measures the algorithm's work, not the clock."""

    copied = 0

    def _wrap(self, value: str) -> CountingStr:
        CountingStr.copied += len(value)
        return CountingStr(value)

    def __getitem__(self, key):  # type: ignore[override]
        return self._wrap(super().__getitem__(key))

    def lstrip(self, chars=None):  # type: ignore[override]
        return self._wrap(super().lstrip(chars))

    def rstrip(self, chars=None):  # type: ignore[override]
        return self._wrap(super().rstrip(chars))


@pytest.mark.parametrize("n", [50_000, 200_000])
def test_splitting_one_long_sentence_copies_each_character_a_bounded_number_of_times(n):
    text = CountingStr(("lorem ipsum " * (n // 12 + 1))[:n])
    CountingStr.copied = 0
    parts = _hard_split(text, 120)
    assert "".join(parts).replace(" ", "") == str(text).replace(" ", "")
    assert CountingStr.copied <= 3 * n  # linear; re-slicing the rest made it ~n^2 / 240


# -- config ------------------------------------------------------------------------------------
KEYS = [key for key, _, _ in describe_settings()]
TOML_VALUE = st.one_of(st.integers(-10, 10**12).map(str), st.floats(allow_nan=True).map(repr),
                       st.booleans().map(lambda b: str(b).lower()), TEXT.map(json.dumps),
                       st.lists(st.integers(), max_size=3).map(str), st.just('"[1,'),
                       st.just("{a = 1}"), st.just("1979-05-27T07:32:00Z"), TEXT)
ENV_VALUE = st.one_of(TEXT, st.just("notjson"), st.just("[1,"), st.just('["a"]'), st.just("{}"),
                      st.integers().map(str), st.just("true"), st.just("-1"))


@given(entries=st.lists(st.tuples(st.one_of(st.sampled_from(KEYS), TEXT), TOML_VALUE), max_size=4),
       env=st.dictionaries(st.sampled_from(KEYS).map(lambda k: "MILTON_" + k.replace(".", "__").upper()),
                           ENV_VALUE, max_size=3),
       raw=st.one_of(st.none(), st.binary(max_size=60)))
@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@example(entries=[("backup.keep_last", "3")], env={"MILTON_TRAIN__SENSITIVE_PATTERNS": '["a"]'},
         raw=None)
@example(entries=[], env={"MILTON_TRAIN__SENSITIVE_PATTERNS": "notjson"}, raw=None)
def test_config_loader_gives_settings_or_one_line(entries, env, raw):
    with tempfile.TemporaryDirectory(prefix="milton-props-cfg-") as tmp:
        path = Path(tmp) / "config.toml"
        if raw is not None:
            path.write_bytes(raw)
        else:
            sections: dict[str, list[str]] = {}
            for key, value in entries:
                section, _, name = key.partition(".")
                sections.setdefault(section, []).append(f"{json.dumps(name or 'x')} = {value}")
            path.write_text("\n".join(f"[{json.dumps(s)}]\n" + "\n".join(lines)
                                      for s, lines in sections.items()),
                            encoding="utf-8", errors="surrogatepass")
        try:
            loaded = load_settings(path, environ={"MILTON_HOME": tmp, **env})
        except Exception as exc:  # noqa: BLE001 - the property: only one-line config errors
            one_line(exc)
            assert isinstance(exc, ConfigError)
            return
        assert loaded.settings.paths.home == Path(tmp).resolve()
