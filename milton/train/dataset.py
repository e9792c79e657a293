"""train-lora's data: what is new since the last finished run, filtered, split and recorded.

``export_new_items`` turns finished conversations and newly ingested document chunks into rows
of ``training_items``; ``build_dataset`` assembles one run's train / eval / regression lists
from them. Decisions worth knowing:

* **Watermark.** New means a message id above the highest ``watermark_message_id`` of a run
  that finished (promoted or rejected). A failed run leaves the watermark where it was, and
  the items it exported are taken over by the next run. Only ended or processed sessions are
  used (an open one is still being written), so the new watermark stops just below the first
  message of a still-open session: those messages are read again once it ends. Re-reading is
  safe because items are deduplicated by content.
* **Pairs.** Consecutive user messages form the prompt; the assistant messages that follow, up
  to the next user message, form the response. An exchange that used tools is dropped: its
  answer depends on tool output the model would not see. System messages are dropped too: in
  a logged session they hold serve's persona and injected-memory boilerplate, identical across
  sessions, which a model trained on it would learn to recite (and ``training_items`` has no
  column for them). Sessions with fewer than ``train.min_session_messages`` user and
  assistant messages are not used.
* **Targets.** An answer is trained on only when nothing marks it bad and
  ``train.assistant_targets`` allows it (:mod:`milton.train.targets`): a correction in the
  user's next message replaces it, a bad rating drops it, degenerate text is never a target
  (``build_dataset`` checks stored items again, so older ones are kept out of replay too).
* **Documents.** Chunks of ingested documents (long-term 'knowledge' memories whose source is a
  ``documents`` path) created at or after the document watermark become ``text`` items.
* **Secrets.** Every item passes :class:`~milton.train.redact.SecretFilter` before it is
  stored; ``train.sensitive_mode`` drops the whole item (exclude) or stores it redacted. Only
  counts by kind are reported, never the text. ``build_dataset`` filters again with the
  current patterns, so a pattern added later also keeps older items out of replay.
* **Split.** An item's split is fixed when it is first stored, from a hash of its content and
  ``train.seed``; with two or more new items at least one goes to eval (and one to train).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any

import sqlite_utils

from milton.core.config import Settings
from milton.core.fsio import atomic_write_bytes
from milton.core.jobs import Skip
from milton.core.secrets import SecretFilter, secret_filter_for
from milton.train.targets import (
    TargetReport,
    degenerate,
    ratings,
    report_metrics,
    request_id,
    resolve_policy,
    select_targets,
)

FINISHED = ("promoted", "rejected")
GENERAL_SOURCE = "builtin:general"
ANCHOR_SOURCE = "builtin:anchors"
DATASET_FILES = ("train.jsonl", "eval.jsonl", "regression.jsonl")


@dataclass(frozen=True)
class TrainingItem:
    """One training example: a question/answer ``pair``, or a ``text`` (prompt None)."""

    id: int | None  # training_items.id; None for the built-in general set
    kind: str
    prompt: str | None
    response: str
    source: str
    system: str | None = None  # always None today: system messages are not exported

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ExportReport:
    """What one export added. Counts only: never the text of an excluded secret."""

    new_pairs: int = 0
    new_texts: int = 0
    duplicates: int = 0
    excluded: int = 0
    redacted: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    sessions: int = 0
    tool_exchanges_skipped: int = 0
    targets: dict[str, Any] = field(default_factory=dict)  # what happened to assistant answers
    watermark_message_id: int = 0
    watermark_document_ts: float = 0.0
    train_ids: list[int] = field(default_factory=list)
    eval_ids: list[int] = field(default_factory=list)

    def as_metrics(self) -> dict[str, Any]:
        """For job_runs metrics and Skip: the counts, not the id lists."""
        out = {k: v for k, v in asdict(self).items() if k not in ("train_ids", "eval_ids")}
        out.update(new_train=len(self.train_ids), new_eval=len(self.eval_ids))
        return out


@dataclass
class Dataset:
    train: list[TrainingItem]
    eval: list[TrainingItem]
    regression: list[TrainingItem]
    replayed: int = 0  # older train items mixed into ``train``
    general: int = 0  # built-in items in ``regression``
    filtered: int = 0  # older items dropped or redacted by the current secret patterns

    def counts(self) -> dict[str, int]:
        return {"train": len(self.train), "eval": len(self.eval), "regression": len(self.regression),
                "replayed": self.replayed, "general": self.general, "filtered": self.filtered}


@dataclass
class _Candidate:
    kind: str
    prompt: str | None
    response: str
    source: str
    redacted: bool = False

    @property
    def digest(self) -> str:
        return content_hash(self.kind, self.prompt, self.response)


# -- helpers -----------------------------------------------------------------------------------
def content_hash(kind: str, prompt: str | None, response: str) -> str:
    """Whitespace-insensitive, like memories: a reformatted copy is the same item."""
    norm = [kind, " ".join((prompt or "").split()), " ".join(response.split())]
    return hashlib.sha256(json.dumps(norm, ensure_ascii=False).encode("utf-8")).hexdigest()


def _unit(seed: int, digest: str) -> float:
    """A stable number in [0, 1) per (seed, item): the split and regression order key."""
    return int(hashlib.sha256(f"{seed}:{digest}".encode()).hexdigest()[:15], 16) / 16**15


def _screen(item: _Candidate, filt: SecretFilter, mode: str, report: ExportReport | None,
            by_kind: Counter[str]) -> _Candidate | None:
    """The item as it may be stored (None: excluded); counts what was found."""
    parts = [p for p in (item.prompt, item.response) if p is not None]
    found = [f for p in parts for f in filt.find(p)]
    if not found:
        return item
    by_kind.update(f.kind for f in found)
    if mode == "exclude":
        if report is not None:
            report.excluded += 1
        return None
    if report is not None:
        report.redacted += 1
    prompt = filt.redact(item.prompt)[0] if item.prompt is not None else None
    return replace(item, prompt=prompt, response=filt.redact(item.response)[0], redacted=True)


# -- reading what is new ---------------------------------------------------------------------
def watermarks(db: sqlite_utils.Database) -> tuple[int, float]:
    """(message id, document ts) covered by the last finished run; (0, 0.0) before any."""
    row = db.execute(
        "select coalesce(max(watermark_message_id), 0), coalesce(max(watermark_document_ts), 0) "
        f"from training_runs where status in ({','.join('?' * len(FINISHED))})", FINISHED).fetchone()
    return int(row[0]), float(row[1])


def _message_watermark(db: sqlite_utils.Database, since: int) -> int:
    """The highest id below which every message is settled: read now, or never to be used."""
    top = db.execute("select coalesce(max(id), 0) from messages").fetchone()[0]
    first_open = db.execute(
        "select min(m.id) from messages m join sessions s on s.id = m.session_id "
        "where s.status = 'open' and m.id > ?", [since]).fetchone()[0]
    return max(since, (first_open - 1) if first_open is not None else top)


Exchange = tuple[str, str, list[int]]  # (prompt, response, message ids)


def exchanges(rows: Iterable[tuple[int, str, str, str | None]]) -> tuple[list[Exchange], int]:
    """(prompt, response, message ids) per exchange from (id, role, content, metadata) rows in
    order, and how many exchanges were dropped: they used tools (the answer depends on output the
    model won't see) or the reply was cut off (serve marks it ``incomplete``)."""
    out: list[Exchange] = []
    users: list[tuple[int, str]] = []
    replies: list[tuple[int, str]] = []
    tools = False
    dropped = 0

    def flush() -> None:
        nonlocal tools, dropped
        if users and (replies or tools):
            if tools:
                dropped += 1
            else:
                out.append(("\n\n".join(c for _, c in users).strip(),
                            "\n\n".join(c for _, c in replies).strip(),
                            [i for i, _ in users + replies]))
        users.clear()
        replies.clear()
        tools = False

    for msg_id, role, content, metadata in rows:
        if role == "user":
            if replies or tools:
                flush()
            users.append((msg_id, content))
        elif role == "assistant" and users:
            meta = json.loads(metadata) if metadata else {}
            if (isinstance(meta, dict) and (meta.get("tool_calls") or meta.get("function_call")
                                            or meta.get("incomplete"))) \
                    or content.startswith("[tool call] "):
                tools = True
            else:
                replies.append((msg_id, content))
        elif role == "tool" and users:
            tools = True
        # system messages, and replies before any user message, are not training material
    flush()
    return out, dropped


def _session_candidates(db: sqlite_utils.Database, settings: Settings, since: int,
                        report: ExportReport) -> list[_Candidate]:
    sessions = db.execute(
        "select s.id from sessions s where s.id in (select session_id from messages where id > ?) "
        "and s.status in ('ended', 'processed') and (select count(*) from messages m "
        "where m.session_id = s.id and m.role in ('user', 'assistant')) >= ? order by s.started, s.id",
        [since, settings.train.min_session_messages]).fetchall()
    out: list[_Candidate] = []
    policy = resolve_policy(settings)
    targets = TargetReport()
    for (session_id,) in sessions:
        rows = db.execute("select id, role, content, metadata from messages where session_id = ? "
                          "order by seq", [session_id]).fetchall()
        pairs, dropped = exchanges(rows)
        report.sessions += 1
        report.tool_exchanges_skipped += dropped
        rated = ratings(db, [rid for r in rows if r[1] == "assistant" and (rid := request_id(r[3]))])
        chosen, counts = select_targets([p for p in pairs if p[0] and p[1]], rows, policy, rated)
        targets.add(counts)
        out += [_Candidate("pair", prompt, response, f"session:{session_id}:{ids[0]}-{ids[-1]}"
                           + (":corrected" if fixed else ""))
                for prompt, response, ids, fixed in chosen]
    report.targets = {"policy": policy, **report_metrics(targets)}
    return out


def _document_candidates(db: sqlite_utils.Database, since: float) -> tuple[list[_Candidate], float]:
    rows = db.execute(
        "select m.content, m.source, m.created from memories m join documents d on d.path = m.source "
        "where m.tier = 'long' and m.category = 'knowledge' and m.created >= ? order by m.created, m.id",
        [since]).fetchall()
    top = max((r[2] for r in rows), default=since)
    return [_Candidate("text", None, content, f"document:{source}") for content, source, _ in rows], top


def _read_candidates(db: sqlite_utils.Database, settings: Settings,
                     report: ExportReport) -> list[_Candidate]:
    """Everything new, read from one snapshot so the watermarks match what was read."""
    own = not db.conn.in_transaction
    if own:
        db.conn.execute("begin")  # a read transaction: one consistent WAL snapshot
    try:
        since_id, since_ts = watermarks(db)
        until = _message_watermark(db, since_id)
        items = _session_candidates(db, settings, since_id, report)
        report.watermark_message_id = until
        report.watermark_document_ts = since_ts
        if settings.train.include_documents:
            docs, report.watermark_document_ts = _document_candidates(db, since_ts)
            items += docs
    finally:
        if own:
            db.conn.execute("commit")
    return items


# -- export ------------------------------------------------------------------------------------
def _assign_splits(items: Sequence[_Candidate], seed: int, eval_fraction: float) -> dict[str, str]:
    """content hash -> 'train' | 'eval'. Per kind, then overall: with 2+ items, both splits
    get at least one (the item with the lowest / highest key moves)."""
    keys = {i.digest: _unit(seed, i.digest) for i in items}
    split = {d: ("eval" if k < eval_fraction else "train") for d, k in keys.items()}

    def balance(digests: list[str]) -> None:
        if len(digests) < 2:
            return
        if not any(split[d] == "eval" for d in digests):
            split[min(digests, key=keys.__getitem__)] = "eval"
        if not any(split[d] == "train" for d in digests):
            split[max(digests, key=keys.__getitem__)] = "train"

    for kind in ("pair", "text"):
        balance(list(dict.fromkeys(i.digest for i in items if i.kind == kind)))
    balance(list(keys))
    return split


def export_new_items(db: sqlite_utils.Database, settings: Settings, run_id: int,
                     now: datetime) -> ExportReport:
    """Store what is new since the last finished run as ``training_items`` of ``run_id``.

    Idempotent: items already stored by a finished run are duplicates and add nothing; items
    of this run (a resumed one) or of a failed run are (re)assigned to this run and counted as
    new. The new watermarks are written to this run's ``training_runs`` row (when it exists)
    in the same transaction as the items.
    """
    report = ExportReport()
    filt = secret_filter_for(settings)
    by_kind: Counter[str] = Counter()
    screened = [c for c in (_screen(i, filt, settings.train.sensitive_mode, report, by_kind)
                            for i in _read_candidates(db, settings, report)) if c is not None]
    report.by_kind = dict(sorted(by_kind.items()))
    unique = list({c.digest: c for c in reversed(screened)}.values())[::-1]  # first wins
    report.duplicates += len(screened) - len(unique)
    with db.atomic():
        existing = _existing(db, [c.digest for c in unique])
        fresh = [c for c in unique if c.digest not in existing]
        split = _assign_splits(fresh, settings.train.seed, settings.train.eval_fraction)
        ts = now.timestamp()
        for item in unique:
            found = existing.get(item.digest)
            if found is None:
                cursor = db.conn.execute(
                    "insert into training_items (kind, source, prompt, response, split, content_hash, "
                    "redacted, run_id, created) values (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (item.kind, item.source, item.prompt, item.response, split[item.digest],
                     item.digest, int(item.redacted), run_id, ts))
                item_id, item_split = int(cursor.lastrowid), split[item.digest]
            else:
                item_id, item_split, owner, owner_status = found
                if owner != run_id and owner_status in FINISHED:
                    report.duplicates += 1
                    continue
                db.conn.execute("update training_items set run_id = ? where id = ?", (run_id, item_id))
            (report.eval_ids if item_split == "eval" else report.train_ids).append(item_id)
            if item.kind == "pair":
                report.new_pairs += 1
            else:
                report.new_texts += 1
        db.conn.execute(
            "update training_runs set watermark_message_id = ?, watermark_document_ts = ? where id = ?",
            (report.watermark_message_id, report.watermark_document_ts, run_id))
    return report


_Stored = tuple[int, str, int | None, str | None]  # (id, split, run_id, status of that run)


def _existing(db: sqlite_utils.Database, digests: Sequence[str]) -> dict[str, _Stored]:
    """content hash -> what is stored under it already."""
    out: dict[str, _Stored] = {}
    for start in range(0, len(digests), 500):
        part = list(digests[start:start + 500])
        for digest, *rest in db.execute(
                "select i.content_hash, i.id, i.split, i.run_id, r.status from training_items i "
                "left join training_runs r on r.id = i.run_id "
                f"where i.content_hash in ({','.join('?' * len(part))})", part):
            out[digest] = tuple(rest)  # type: ignore[assignment]
    return out


def require_enough(report: ExportReport, settings: Settings) -> None:
    """Raise :class:`Skip` (exit 0, recorded as skipped) below ``train.min_new_pairs``."""
    need = settings.train.min_new_pairs
    if report.new_pairs < need:
        raise Skip(f"too little new data: {report.new_pairs} new question/answer pairs "
                   f"(need train.min_new_pairs={need})", **report.as_metrics())


# -- one run's dataset -------------------------------------------------------------------------
def _fetch(db: sqlite_utils.Database, ids: Sequence[int]) -> list[TrainingItem]:
    """Items by id, in the order given."""
    rows: dict[int, TrainingItem] = {}
    for start in range(0, len(ids), 500):
        part = list(ids[start:start + 500])
        for r in db.execute("select id, kind, prompt, response, source from training_items "
                            f"where id in ({','.join('?' * len(part))})", part):
            rows[r[0]] = TrainingItem(id=r[0], kind=r[1], prompt=r[2], response=r[3], source=r[4])
    return [rows[i] for i in ids if i in rows]


def _ids(db: sqlite_utils.Database, where: str, params: Sequence[Any]) -> list[tuple[int, str]]:
    return db.execute(f"select id, content_hash from training_items where {where} order by id",
                      list(params)).fetchall()


def general_items() -> list[TrainingItem]:
    """The built-in general set: plain knowledge and language a user's data must not erase
    (measured in the regression set, never trained on)."""
    return _builtin_items("general.jsonl", GENERAL_SOURCE)


def anchor_items() -> list[TrainingItem]:
    """The built-in anchor prompts (disjoint from the general set): general questions on which
    training holds the adapter at the base model's answers (``train.anchor_weight``)."""
    return _builtin_items("anchors.jsonl", ANCHOR_SOURCE)


def _builtin_items(name: str, source: str) -> list[TrainingItem]:
    text = resources.files("milton.train").joinpath("data", name).read_text("utf-8")
    out = []
    for line in text.splitlines():
        if line.strip():
            row = json.loads(line)
            out.append(TrainingItem(id=None, kind=row["kind"], prompt=row.get("prompt"),
                                    response=row.get("response") or row["text"], source=source))
    return out


class _Refilter:
    """Today's secret patterns applied to stored items (kept, redacted or dropped per mode):
    an item stored before a pattern was added never reaches training either."""

    def __init__(self, settings: Settings) -> None:
        self.filter = secret_filter_for(settings)
        self.mode = settings.train.sensitive_mode
        self.changed = 0

    def take(self, db: sqlite_utils.Database, ids: Sequence[int],
             limit: int | None = None) -> list[TrainingItem]:
        """Up to ``limit`` clean items from ``ids`` in order (fetched in pages, not all at once)."""
        limit = len(ids) if limit is None else limit
        kept: list[TrainingItem] = []
        for start in range(0, len(ids), 256):
            if len(kept) >= limit:
                break
            for item in _fetch(db, ids[start:start + 256]):
                if item.kind == "pair" and item.source.startswith("session:") \
                        and degenerate(item.response) is not None:
                    self.changed += 1  # stored before targets were checked: never trained on
                    continue
                cand = _Candidate(item.kind, item.prompt, item.response, item.source)
                screened = _screen(cand, self.filter, self.mode, None, Counter())
                self.changed += int(screened is not cand)
                if screened is not None and len(kept) < limit:
                    kept.append(replace(item, prompt=screened.prompt, response=screened.response))
        return kept


def build_dataset(db: sqlite_utils.Database, settings: Settings, run_id: int) -> Dataset:
    """Train (this run's new train items plus replayed older ones), eval (this run's new eval
    items) and regression (older eval items plus the general set). Deterministic per db + seed."""
    cfg = settings.train
    refilter = _Refilter(settings)
    new_train = refilter.take(db, [i for i, _ in _ids(db, "run_id = ? and split = 'train'", [run_id])])
    new_eval = refilter.take(db, [i for i, _ in _ids(db, "run_id = ? and split = 'eval'", [run_id])])

    # Replay: a seeded shuffle of all older train items, the first clean ones taken. The run id
    # is in the seed, so each run replays a different sample (and a resumed run the same one).
    older_train = [i for i, _ in _ids(db, "(run_id is null or run_id != ?) and split = 'train'", [run_id])]
    random.Random(f"{cfg.seed}:{run_id}").shuffle(older_train)
    want = math.ceil(cfg.replay_fraction * len(new_train)) if new_train else 0
    replay = sorted(refilter.take(db, older_train, want), key=lambda i: i.id or 0)

    # Regression: older eval items ordered by a per-item key that depends only on the seed, so
    # the set changes little from run to run (comparable results) while it samples all of
    # history evenly instead of only its oldest or newest part.
    older_eval = _ids(db, "(run_id is null or run_id != ?) and split = 'eval'", [run_id])
    older_eval.sort(key=lambda row: (_unit(cfg.seed, row[1]), row[0]))
    regression = refilter.take(db, [i for i, _ in older_eval], cfg.regression_items)
    general = general_items()
    return Dataset(train=new_train + replay, eval=new_eval, regression=regression + general,
                   replayed=len(replay), general=len(general), filtered=refilter.changed)


def full_dataset(db: sqlite_utils.Database, settings: Settings, *, max_eval: int) -> Dataset:
    """Everything learned so far, for evolve: all train items, the newest ``max_eval`` held-out
    items (the general set when there are none yet) and the general set as regression."""
    refilter = _Refilter(settings)
    train = refilter.take(db, [i for i, _ in _ids(db, "split = 'train'", [])])
    newest_eval = [i for i, _ in _ids(db, "split = 'eval'", [])][::-1]
    held_out = sorted(refilter.take(db, newest_eval, max_eval), key=lambda i: i.id or 0)
    general = general_items()
    return Dataset(train=train, eval=held_out or general, regression=general,
                   general=len(general), filtered=refilter.changed)


def write_dataset_files(dataset: Dataset, directory: Path) -> list[Path]:
    """train.jsonl, eval.jsonl and regression.jsonl (atomically), the audit trail kept beside
    an adapter: exactly what it was trained and judged on."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, items in zip(DATASET_FILES, (dataset.train, dataset.eval, dataset.regression)):
        data = "".join(json.dumps(i.as_dict(), ensure_ascii=False) + "\n" for i in items).encode("utf-8")
        atomic_write_bytes(directory / name, data)
        paths.append(directory / name)
    return paths


def preview_export(db: sqlite_utils.Database, settings: Settings
                   ) -> tuple[ExportReport, list[tuple[str, str, str | None, str]]]:
    """What :func:`export_new_items` would store if a run started now, without writing: its
    report (counts only; ids stay empty) and the items the secret filter flagged, as (source,
    kind, prompt, response). For ``train-lora --dry-run``."""
    report = ExportReport()
    filt = secret_filter_for(settings)
    by_kind: Counter[str] = Counter()
    flagged: list[tuple[str, str, str | None, str]] = []
    screened: list[_Candidate] = []
    for cand in _read_candidates(db, settings, report):
        kept = _screen(cand, filt, settings.train.sensitive_mode, report, by_kind)
        if kept is not cand:
            flagged.append((cand.source, cand.kind, cand.prompt, cand.response))
        if kept is not None:
            screened.append(kept)
    report.by_kind = dict(sorted(by_kind.items()))
    unique = list({c.digest: c for c in reversed(screened)}.values())[::-1]
    report.duplicates += len(screened) - len(unique)
    existing = _existing(db, [c.digest for c in unique])
    for item in unique:
        found = existing.get(item.digest)
        if found is not None and found[3] in FINISHED:  # learned by a finished run already
            report.duplicates += 1
        elif item.kind == "pair":
            report.new_pairs += 1
        else:
            report.new_texts += 1
    return report, flagged
