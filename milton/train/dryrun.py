"""``milton train-lora --dry-run``: what the next run would train on, and what the secret
filter would keep out of it, without training and without writing to the store.

A user audits the filter on their own data with it: for every flagged item, which rule fired
on which field and what was around it, with the matched span masked (a short format prefix of
a long match, such as ``sk-p`` or ``AKIA``, is kept so a false positive can be recognised; the
rest never leaves the store)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import sqlite_utils

from milton.core.config import Settings
from milton.core.secrets import Finding, secret_filter_for
from milton.train.dataset import preview_export

CONTEXT_CHARS = 30  # shown on each side of a match
PREFIX_MIN_CHARS = 24  # a match this long keeps its first PREFIX_CHARS characters
PREFIX_CHARS = 4


@dataclass(frozen=True)
class Flag:
    """One secret the filter found in an item the next run would read."""

    source: str  # session:<id>:<first>-<last message id> or document:<path>
    item: str  # pair | text
    field: str  # prompt | response
    rule: str  # the detector that fired (a SecretFilter kind)
    action: str  # excluded | redacted
    context: str  # the text around it, every secret in it masked


def mask(span: str) -> str:
    """A masked stand-in for a matched span: its length and at most a format prefix."""
    keep = span[:PREFIX_CHARS] if len(span) >= PREFIX_MIN_CHARS else ""
    return f"{keep}{'*' * 8}({len(span)} chars)"


def masked_context(text: str, findings: list[Finding], index: int) -> str:
    """The text around ``findings[index]``, on one line, with every finding in it masked."""
    target = findings[index]
    lo, hi = max(0, target.start - CONTEXT_CHARS), min(len(text), target.end + CONTEXT_CHARS)
    out, pos = [], lo
    for f in findings:
        if f.end <= lo or f.start >= hi:
            continue
        out += [text[pos:max(pos, f.start)], mask(text[f.start:f.end])]
        pos = max(pos, f.end)
    out.append(text[pos:hi] if pos < hi else "")
    line = " ".join("".join(out).split())
    return ("…" if lo > 0 else "") + line + ("…" if hi < len(text) else "")


def train_dry_run(db: sqlite_utils.Database, settings: Settings) -> dict[str, Any]:
    """The next train-lora run's data, as a JSON-able dict (see the module docstring)."""
    row = db.execute("select id from training_runs where status = 'running' order by id desc limit 1").fetchone()
    report, flagged = preview_export(db, settings)
    filt = secret_filter_for(settings)
    action = "excluded" if settings.train.sensitive_mode == "exclude" else "redacted"
    flags: list[Flag] = []
    for source, kind, prompt, response in flagged:
        for field, text in (("prompt", prompt), ("response", response)):
            found = filt.find(text) if text else []
            flags += [Flag(source, kind, field, f.kind, action, masked_context(text or "", found, i))
                      for i, f in enumerate(found)]
    metrics = report.as_metrics()
    for key in ("new_train", "new_eval"):
        metrics.pop(key, None)  # a preview assigns no splits
    by_rule = metrics.pop("by_kind")
    need = settings.train.min_new_pairs
    return {
        "dry_run": True,
        "sensitive_mode": settings.train.sensitive_mode,
        # an unfinished run is resumed with the data it already has: nothing new is exported
        "resumes_run": int(row[0]) if row else None,
        "would_train": row is not None or report.new_pairs >= need,
        "min_new_pairs": need,
        **metrics,
        "by_rule": by_rule,
        "flagged": [asdict(f) for f in flags],
    }
