"""Chart geometry for the dashboard's server-rendered SVG (drawn by the macros in
``templates/charts.html``): no JavaScript, nothing fetched, and every data point is one SVG
element with class ``pt`` (so a test counts them against the store)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import Any

WIDTH, HEIGHT = 960, 240
LEFT, RIGHT, TOP, BOTTOM = 56, 12, 12, 28
SERIES_CLASSES = 6


def _nice_ticks(lo: float, hi: float, n: int = 4) -> list[float]:
    if hi <= lo:
        return [lo]
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    for mult in (1, 2, 5, 10):
        if (hi - lo) / (step * mult) <= n:
            step *= mult
            break
    start = math.ceil(lo / step) * step
    ticks, value = [], start
    while value <= hi + step * 1e-9:
        ticks.append(round(value, 10))
        value += step
    return ticks


def _fmt(value: float) -> str:
    if abs(value) >= 1e6:
        return f"{value / 1e6:.1f}M"
    if abs(value) >= 1e3:
        return f"{value / 1e3:.1f}k"
    if value == int(value):
        return str(int(value))
    return f"{value:.3g}"


def day_label(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%m-%d")


def _day_ticks(lo: float, hi: float, n: int = 6) -> list[float]:
    """Midnights (UTC) every few days across [lo, hi]."""
    step = max(1, math.ceil((hi - lo) / 86400 / n)) * 86400
    start = math.ceil(lo / 86400) * 86400
    return [float(t) for t in range(int(start), int(hi) + 1, int(step))]


def _range(values: Sequence[float], zero: bool, pad: float = 0.0) -> tuple[float, float]:
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    if zero:
        lo = min(lo, 0.0)
    if hi == lo:
        hi, lo = hi + 1, lo - (0 if zero and lo == 0 else 1)
    margin = (hi - lo) * pad
    return (lo if zero and lo == 0 else lo - margin), hi + margin


def xy_chart(series: dict[str, Sequence[tuple[float, float, str]]], *, connect: bool = True,
             zero: bool = False, x_format: Callable[[float], str] = _fmt, days: bool = False,
             hline: float | None = None, labels: bool = False, width: int = WIDTH,
             height: int = HEIGHT) -> dict[str, Any]:
    """Lines (or, ``connect=False``, a scatter): ``series`` maps a name to (x, y, title)
    points; ``days``: x is epoch seconds, ticked at UTC midnights; ``labels``: each point's
    title is written next to it. Returns what the ``xy`` macro draws."""
    points = [p for pts in series.values() for p in pts]
    pad = 0.05 if not connect else 0.0
    xlo, xhi = _range([p[0] for p in points], zero=False, pad=pad)
    if days and xhi - xlo < 86400:
        xlo, xhi = xlo - 43200, xhi + 43200
    ys = [p[1] for p in points] + ([hline] if hline is not None else [])
    ylo, yhi = _range(ys, zero=zero, pad=0.05)
    plot_w, plot_h = width - LEFT - RIGHT, height - TOP - BOTTOM

    def sx(x: float) -> float:
        return round(LEFT + (x - xlo) / (xhi - xlo) * plot_w, 1)

    def sy(y: float) -> float:
        return round(TOP + plot_h - (y - ylo) / (yhi - ylo) * plot_h, 1)

    drawn = []
    for i, (name, pts) in enumerate(series.items()):
        pts = sorted(pts, key=lambda p: p[0]) if connect else list(pts)
        coords = [{"cx": sx(x), "cy": sy(y), "title": title, "label": title if labels else "",
                   "anchor": "end" if sx(x) > LEFT + plot_w / 2 else "start"} for x, y, title in pts]
        path = " ".join(f"{'M' if j == 0 else 'L'}{c['cx']},{c['cy']}" for j, c in enumerate(coords))
        drawn.append({"name": name, "cls": f"s{i % SERIES_CLASSES}", "points": coords,
                      "path": path if connect and len(coords) > 1 else ""})
    return {
        "width": width, "height": height, "left": LEFT, "top": TOP, "bottom": height - BOTTOM,
        "right": width - RIGHT, "series": drawn, "count": len(points),
        "yticks": [{"y": sy(v), "label": _fmt(v)} for v in _nice_ticks(ylo, yhi)],
        "xticks": [{"x": sx(v), "label": day_label(v) if days else x_format(v)}
                   for v in (_day_ticks(xlo, xhi) if days else _nice_ticks(xlo, xhi, 5))] if points else [],
        "hline": None if hline is None else {"y": sy(hline), "label": _fmt(hline)},
    }


def bar_chart(bars: Sequence[tuple[str, float, str, str]], *, width: int = WIDTH,
              height: int = HEIGHT) -> dict[str, Any]:
    """One bar per (label, value, css class, title), in order; a few labels under the axis."""
    values = [b[1] for b in bars]
    _, yhi = _range(values, zero=True)
    plot_w, plot_h = width - LEFT - RIGHT, height - TOP - BOTTOM
    slot = plot_w / max(1, len(bars))
    drawn = []
    for i, (label, value, cls, title) in enumerate(bars):
        h = max(1.0, value / yhi * plot_h) if value > 0 else 1.0
        drawn.append({"x": round(LEFT + i * slot + slot * 0.1, 1), "w": round(max(1.0, slot * 0.8), 1),
                      "y": round(TOP + plot_h - h, 1), "h": round(h, 1), "cls": cls, "title": title,
                      "label": label})
    every = max(1, math.ceil(len(bars) / 6))
    return {
        "width": width, "height": height, "left": LEFT, "top": TOP, "bottom": height - BOTTOM,
        "right": width - RIGHT, "bars": drawn, "count": len(bars),
        "yticks": [{"y": round(TOP + plot_h - v / yhi * plot_h, 1), "label": _fmt(v)}
                   for v in _nice_ticks(0, yhi)],
        "xlabels": [{"x": round(b["x"] + b["w"] / 2, 1), "label": b["label"]}
                    for i, b in enumerate(drawn) if i % every == 0],
    }
