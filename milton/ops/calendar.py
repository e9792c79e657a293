"""systemd calendar expressions (``OnCalendar=``, systemd.time(7)), evaluated without systemd.

``milton schedule`` runs the shipped timers' calendars on machines without systemd, so it has
to agree with systemd about when they elapse; the tests compare :func:`next_elapse` with
``systemd-analyze calendar``. Supported: the shorthands (minutely, hourly, daily, weekly,
monthly, yearly/annually, quarterly, semiannually), ``[WEEKDAYS] [[Y-]M-D] [H:M[:S]]`` with
``*``, numbers, lists ``a,b``, ranges ``a..b``, repetitions ``a/b`` and ``a..b/c``, last-days
of the month ``M~D``, two-digit years, and a trailing ``UTC`` or IANA time zone.
Not supported (a one-line error says so): fractional seconds and ``@EPOCH``. ``*/N`` is
rejected as systemd itself rejects it (write ``0/N``).

Like systemd, the expression is matched against wall-clock time in the machine's local zone
(or the zone it names): a time skipped by a DST change does not elapse that day; a time
repeated by one elapses once.
"""

from __future__ import annotations

import calendar as _cal
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone, tzinfo
from functools import lru_cache

from milton.core.errors import InputError

MIN_YEAR, MAX_YEAR = 1970, 2199

WEEKDAYS = {name: i for i, names in enumerate(
    (("mon", "monday"), ("tue", "tuesday"), ("wed", "wednesday"), ("thu", "thursday"),
     ("fri", "friday"), ("sat", "saturday"), ("sun", "sunday"))) for name in names}

SHORTHANDS = {
    "minutely": "*-*-* *:*:00",
    "hourly": "*-*-* *:00:00",
    "daily": "*-*-* 00:00:00",
    "monthly": "*-*-01 00:00:00",
    "weekly": "Mon *-*-* 00:00:00",
    "yearly": "*-01-01 00:00:00",
    "annually": "*-01-01 00:00:00",
    "quarterly": "*-01,04,07,10-01 00:00:00",
    "semiannually": "*-01,07-01 00:00:00",
    "semi-annually": "*-01,07-01 00:00:00",
    "biannually": "*-01,07-01 00:00:00",
    "bi-annually": "*-01,07-01 00:00:00",
}


class CalendarError(InputError):
    """An OnCalendar= expression this parser does not understand."""


@dataclass(frozen=True)
class Component:
    """``start[..stop][/repeat]``: start, then every ``repeat`` up to ``stop`` (or the field's end)."""

    start: int
    stop: int | None = None
    repeat: int = 0

    def matches(self, value: int) -> bool:
        if value == self.start:
            return True
        if self.repeat <= 0 or value < self.start:
            return False
        if self.stop is not None and value > self.stop:
            return False
        return (value - self.start) % self.repeat == 0


@dataclass(frozen=True)
class Field:
    """A list of components; ``None`` components means ``*`` (anything)."""

    components: tuple[Component, ...] | None = None

    def matches(self, value: int) -> bool:
        return self.components is None or any(c.matches(value) for c in self.components)

    def values(self, lo: int, hi: int) -> list[int]:
        return [v for v in range(lo, hi + 1) if self.matches(v)]


ANY = Field()


@dataclass(frozen=True)
class CalendarSpec:
    """A parsed expression. ``tz`` is the zone the expression names (None: the local zone)."""

    expression: str
    weekdays: frozenset[int] | None = None  # 0 = Monday; None = any
    year: Field = ANY
    month: Field = ANY
    day: Field = ANY
    end_of_month: bool = False  # day counts back from the month's end (M~D)
    hour: Field = ANY
    minute: Field = ANY
    second: Field = ANY
    tz: tzinfo | None = None
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    # -- evaluation ------------------------------------------------------------------------
    def _sorted(self, name: str, lo: int, hi: int) -> list[int]:
        key = (name, lo, hi)
        if key not in self._cache:
            self._cache[key] = getattr(self, name).values(lo, hi)
        return self._cache[key]

    def _days(self, year: int, month: int) -> list[int]:
        last = _cal.monthrange(year, month)[1]
        if not self.end_of_month or self.day.components is None:
            return [d for d in self._sorted("day", 1, 31) if d <= last]
        days = set()
        for c in self.day.components or ():
            # As systemd does: ~N is the N-th last day (~1 = the last; -1 when the month is too
            # short), and a range ~a..b is turned around so that it runs forwards.
            start = last + 1 - c.start if c.start <= last else -1
            stop = last + 1 - c.stop if c.stop is not None and c.stop <= last else -1
            if stop > 0:
                start, stop = stop, start
            comp = Component(start, stop if stop >= 0 else None, c.repeat)
            days.update(d for d in range(1, last + 1) if comp.matches(d))
        return sorted(days)

    def walls_from(self, start: datetime) -> Iterator[datetime]:
        """Every matching naive wall-clock time >= ``start`` (naive), in order."""
        hours = self._sorted("hour", 0, 23)
        minutes = self._sorted("minute", 0, 59)
        seconds = self._sorted("second", 0, 59)
        for y in range(max(start.year, MIN_YEAR), MAX_YEAR + 1):
            if not self.year.matches(y):
                continue
            in_y = y == start.year
            for m in self._sorted("month", 1, 12):
                if in_y and m < start.month:
                    continue
                in_m = in_y and m == start.month
                for d in self._days(y, m):
                    if in_m and d < start.day:
                        continue
                    if self.weekdays is not None and _cal.weekday(y, m, d) not in self.weekdays:
                        continue
                    in_d = in_m and d == start.day
                    for h in hours:
                        if in_d and h < start.hour:
                            continue
                        in_h = in_d and h == start.hour
                        for mi in minutes:
                            if in_h and mi < start.minute:
                                continue
                            in_mi = in_h and mi == start.minute
                            for s in seconds:
                                if in_mi and s < start.second:
                                    continue
                                yield datetime(y, m, d, h, mi, s)

    def next_elapse(self, after: datetime, tz: tzinfo | None = None) -> datetime | None:
        """The first time strictly after ``after`` this expression elapses; None if never.

        ``after`` may be aware (any zone) or naive (taken as local time). The expression is
        evaluated in its own zone if it names one, else in ``tz``, else the machine's local
        zone; the result is aware, in that zone.
        """
        zone = self.tz or tz
        after_ts = after.timestamp()  # naive -> local, like the rest of Python
        start_ts = math.floor(after_ts) + 1  # systemd: strictly later, whole seconds
        for wall in self.walls_from(_wall(start_ts, zone)):
            for ts in _instants(wall, zone):
                if ts >= start_ts:
                    return _aware(ts, zone)
        return None


# -- wall clock <-> instants ----------------------------------------------------------------
def _wall(ts: float, zone: tzinfo | None) -> datetime:
    if zone is None:
        return datetime.fromtimestamp(ts)
    return datetime.fromtimestamp(ts, zone).replace(tzinfo=None)


def _instants(wall: datetime, zone: tzinfo | None) -> list[float]:
    """The instants showing ``wall`` on the clock: none in a DST gap, two in a DST overlap."""
    found: list[float] = []
    for fold in (0, 1):
        if zone is None:
            ts = wall.replace(fold=fold).timestamp()
        else:
            ts = wall.replace(tzinfo=zone, fold=fold).timestamp()
        if _wall(ts, zone) == wall and ts not in found:
            found.append(ts)
    return sorted(found)


def _aware(ts: float, zone: tzinfo | None) -> datetime:
    if zone is None:
        return datetime.fromtimestamp(ts, timezone.utc).astimezone()
    return datetime.fromtimestamp(ts, zone)


# -- parsing ---------------------------------------------------------------------------------


def _fail(expr: str, why: str) -> CalendarError:
    return CalendarError(f"calendar expression {expr!r}: {why}")


def _parse_field(text: str, lo: int, hi: int, what: str, expr: str, *, year: bool = False) -> Field:
    if text == "*":
        return ANY
    if text.startswith("*"):
        raise _fail(expr, f"{what} {text!r}: systemd does not accept */N; write 0/N "
                          "(or 1/N for months and days)")
    comps = []
    for part in text.split(","):
        m = re.fullmatch(r"(\d+)(?:\.\.(\d+))?(?:/(\d+))?", part)
        if not m:
            if "." in part and not re.search(r"\.\.", part):
                raise _fail(expr, f"{what} {part!r}: fractional values are not supported")
            raise _fail(expr, f"{what} {part!r}: expected a number, a..b, a/b or a..b/c")
        start = int(m.group(1))
        stop = int(m.group(2)) if m.group(2) is not None else None
        repeat = int(m.group(3)) if m.group(3) is not None else (1 if stop is not None else 0)
        if year:  # systemd: two-digit years are 19xx (70-99) or 20xx (0-69)
            start = _full_year(start, m.group(1))
            stop = _full_year(stop, m.group(2)) if stop is not None else None
        if m.group(3) is not None and repeat == 0:
            raise _fail(expr, f"{what} {part!r}: a repetition of 0 never advances")
        if not lo <= start <= hi or (stop is not None and not lo <= stop <= hi):
            raise _fail(expr, f"{what} {part!r}: out of range {lo}..{hi}")
        if stop is not None and stop < start:
            raise _fail(expr, f"{what} {part!r}: a range must run forwards")
        comps.append(Component(start, stop, repeat))
    return Field(tuple(comps))


def _full_year(value: int, text: str) -> int:
    if len(text) <= 2:
        return value + (2000 if value < 70 else 1900)
    return value


def _parse_weekdays(text: str, expr: str) -> frozenset[int]:
    days: set[int] = set()
    for part in text.split(","):
        ends = part.split("..")
        try:
            idx = [WEEKDAYS[e.lower()] for e in ends]
        except KeyError:
            raise _fail(expr, f"unknown weekday in {part!r} (use Mon..Sun)") from None
        if len(idx) == 1:
            days.add(idx[0])
        elif len(idx) == 2 and idx[0] <= idx[1]:
            days.update(range(idx[0], idx[1] + 1))
        else:
            raise _fail(expr, f"weekday range {part!r} must run forwards, e.g. Mon..Fri")
    return frozenset(days)


def _zone(name: str) -> tzinfo | None:
    """``UTC`` or an IANA zone name; None if unknown."""
    if name.upper() == "UTC":
        return timezone.utc
    try:
        from zoneinfo import ZoneInfo

        return ZoneInfo(name)
    except Exception:  # noqa: BLE001 - ZoneInfoNotFoundError (a KeyError), ValueError for odd names
        return None


@lru_cache(maxsize=256)
def parse_calendar(expression: str) -> CalendarSpec:
    """Parse an OnCalendar= value; :class:`CalendarError` (one line) if it cannot be used."""
    expr = expression.strip()
    if not expr:
        raise _fail(expression, "empty")
    if expr.startswith("@"):
        raise _fail(expr, "@EPOCH timestamps are not supported")
    text, tz = expr, None
    head, _, last = expr.rpartition(" ")
    if head and ("/" in last and ":" not in last or last.isalpha() and last.lower() not in WEEKDAYS):
        tz = _zone(last)
        if tz is None:
            raise _fail(expr, f"unknown time zone {last!r}")
        text = head.strip()
    text = SHORTHANDS.get(text.lower(), text)

    tokens = text.split()
    weekdays = None
    if tokens and tokens[0][0].isalpha():
        weekdays = _parse_weekdays(tokens.pop(0), expr)
    date_token = time_token = None
    if tokens and "-" in tokens[0] or tokens and "~" in tokens[0]:
        date_token = tokens.pop(0)
    if tokens:
        time_token = tokens.pop(0)
    if tokens:
        raise _fail(expr, f"unexpected {' '.join(tokens)!r} (expected [WEEKDAY] [Y-M-D] [H:M[:S]] [ZONE])")

    spec: dict = {"expression": expr, "weekdays": weekdays, "tz": tz}
    if date_token is not None:
        eom = "~" in date_token
        if eom and date_token.count("~") > 1:
            raise _fail(expr, f"date {date_token!r}: only one ~")
        parts = re.split(r"[-~]", date_token)
        if eom and not re.search(r"~[^-~]*$", date_token):
            raise _fail(expr, f"date {date_token!r}: ~ must come before the day")
        if len(parts) == 2:
            month, day = parts
            spec["year"] = ANY
        elif len(parts) == 3:
            spec["year"] = _parse_field(parts[0], MIN_YEAR, MAX_YEAR, "year", expr, year=True)
            month, day = parts[1], parts[2]
        else:
            raise _fail(expr, f"date {date_token!r}: expected Y-M-D or M-D")
        spec["month"] = _parse_field(month, 1, 12, "month", expr)
        spec["day"] = _parse_field(day, 1, 31, "day", expr)
        spec["end_of_month"] = eom
    if time_token is None:
        spec.update(hour=Field((Component(0),)), minute=Field((Component(0),)),
                    second=Field((Component(0),)))
    else:
        parts = time_token.split(":")
        if len(parts) not in (2, 3):
            raise _fail(expr, f"time {time_token!r}: expected H:M or H:M:S")
        spec["hour"] = _parse_field(parts[0], 0, 23, "hour", expr)
        spec["minute"] = _parse_field(parts[1], 0, 59, "minute", expr)
        spec["second"] = (_parse_field(parts[2], 0, 59, "second", expr) if len(parts) == 3
                          else Field((Component(0),)))
    return CalendarSpec(**spec)


def next_elapse(expression: str, after: datetime, tz: tzinfo | None = None) -> datetime | None:
    """When ``expression`` next elapses strictly after ``after`` (aware result; None if never).

    Evaluated in the machine's local zone like systemd timers, unless the expression names a
    zone or ``tz`` is given (tests pin it).
    """
    return parse_calendar(expression).next_elapse(after, tz)


def iterate(expression: str, after: datetime, count: int, tz: tzinfo | None = None) -> list[datetime]:
    """The next ``count`` elapses (like ``systemd-analyze calendar --iterations``)."""
    out: list[datetime] = []
    current: datetime | None = after
    while current is not None and len(out) < count:
        current = next_elapse(expression, current, tz)
        if current is not None:
            out.append(current)
    return out


__all__ = ["CalendarError", "CalendarSpec", "iterate", "next_elapse", "parse_calendar"]
