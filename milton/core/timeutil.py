"""Time handling. Every time-dependent command takes ``--now`` so history can be replayed."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

from milton.core.errors import InputError

_RELATIVE = re.compile(r"^([+-]?\d+(?:\.\d+)?)\s*([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def parse_timestamp(value: str | float | int | datetime | None, *, field: str = "--now") -> datetime:
    """Accept ISO-8601 (naive means UTC), epoch seconds, or an offset from now like ``-3d``."""
    if value is None:
        return utcnow()
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    if isinstance(value, (int, float)):
        return datetime.fromtimestamp(float(value), timezone.utc)
    text = value.strip()
    match = _RELATIVE.match(text)
    if match:
        amount, unit = match.groups()
        return utcnow() + timedelta(**{_UNITS[unit]: float(amount)})
    try:
        return datetime.fromtimestamp(float(text), timezone.utc)
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise InputError(
            f"{field}: not a timestamp: {value!r} (use ISO-8601, epoch seconds, or e.g. -3d)"
        ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def to_epoch(value: datetime) -> float:
    return value.timestamp()


def iso(value: datetime | float | None) -> str | None:
    """Compact UTC ISO-8601 with a Z, the one format Milton writes."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        value = datetime.fromtimestamp(float(value), timezone.utc)
    return value.astimezone(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
