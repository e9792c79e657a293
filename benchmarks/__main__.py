"""``python -m benchmarks [--quick] [NAME ...]``: run, print a table, write results/*.json.

Exit codes: 0 when every benchmark ran (missed targets are reported, not fatal), 1 when a
benchmark crashed, 2 for usage errors.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from benchmarks import NAMES

RESULTS = Path(__file__).resolve().parent / "results"


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        info["load_avg"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    try:
        import sqlite3

        import numpy
        import sklearn

        from milton import __version__

        info["versions"] = {"milton": __version__, "sqlite": sqlite3.sqlite_version,
                            "numpy": numpy.__version__, "sklearn": sklearn.__version__}
    except Exception:  # noqa: BLE001 - informational only
        pass
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5, cwd=RESULTS.parent.parent)
        if rev.returncode == 0:
            info["git_rev"] = rev.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        text = f"{value:.3g}" if abs(value) < 0.01 else f"{value:,.3f}".rstrip("0").rstrip(".")
    elif isinstance(value, int):
        text = f"{value:,}"
    else:
        text = str(value)
    return f"{text} {unit}".strip()


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Milton benchmarks (anomaly and memory pillars). Results go to benchmarks/results/.",
    )
    parser.add_argument("--quick", action="store_true",
                        help="smaller sizes (smoke test; well under a minute in total)")
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"benchmarks to run (default: all): {', '.join(NAMES)}")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in NAMES]
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)} (choose from {', '.join(NAMES)})")
    seen: list[str] = []
    for name in args.names or NAMES:
        if name not in seen:
            seen.append(name)
    args.names = seen
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    console = Console(width=None if sys.stdout.isatty() else 120)
    machine = machine_info()
    RESULTS.mkdir(parents=True, exist_ok=True)
    mode = "quick" if args.quick else "full"
    console.print(f"[bold]milton benchmarks[/] ({mode}): {', '.join(args.names)} "
                  f"on {machine['cpu_count']} CPU(s), Python {machine['python']}")
    results: dict[str, dict[str, Any]] = {}
    crashed = False
    for name in args.names:
        console.print(f"running [cyan]{name}[/] ...")
        t0 = time.perf_counter()
        entry: dict[str, Any] = {"name": name, "quick": args.quick,
                                 "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        try:
            module = importlib.import_module(f"benchmarks.bench_{name}")
            entry.update(module.run(quick=args.quick))
            entry["status"] = "ok"
        except Exception as exc:  # noqa: BLE001 - report, keep going with the others
            crashed = True
            entry.update(status="error", error=f"{type(exc).__name__}: {exc}",
                         traceback=traceback.format_exc(), figures={}, targets=[])
            console.print(f"[red]{name} crashed:[/] {type(exc).__name__}: {exc}")
        entry["duration_s"] = round(time.perf_counter() - t0, 2)
        entry["passed"] = entry["status"] == "ok" and all(t["pass"] for t in entry["targets"])
        entry["machine"] = machine
        results[name] = entry
        (RESULTS / f"{name}.json").write_text(json.dumps(entry, indent=2, default=str) + "\n")
        console.print(f"  done in {entry['duration_s']} s")

    table = Table(title=f"milton benchmarks ({mode})")
    for col in ("benchmark", "figure", "value", "target", "result"):
        table.add_column(col, justify="right" if col in ("value", "target") else "left")
    for name, entry in results.items():
        if entry["status"] != "ok":
            table.add_row(name, "-", "-", "-", "[red]ERROR[/]")
            continue
        for t in entry["targets"]:
            table.add_row(name, t["figure"], fmt(t["value"], t["unit"]),
                          f"{t['op']} {fmt(t['target'], t['unit'])}",
                          "[green]PASS[/]" if t["pass"] else "[bold red]FAIL[/]")
        for key in entry.get("report_only", []):
            if key in entry["figures"]:
                table.add_row(name, key, fmt(entry["figures"][key]), "report only", "[dim]-[/]")
    console.print(table)

    summary = {
        "mode": mode,
        "machine": machine,
        "benchmarks": {
            name: {
                "status": e["status"],
                "passed": e["passed"],
                "duration_s": e["duration_s"],
                "figures": {k: v for k, v in e.get("figures", {}).items()
                            if not isinstance(v, (dict, list))},
                "targets": e["targets"],
                **({"error": e["error"]} if e["status"] != "ok" else {}),
            }
            for name, e in results.items()
        },
        "all_passed": all(e["passed"] for e in results.values()),
        "missed": [f"{name}.{t['figure']}" for name, e in results.items()
                   for t in e["targets"] if not t["pass"]],
    }
    (RESULTS / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    if summary["missed"]:
        console.print(f"[bold red]missed targets:[/] {', '.join(summary['missed'])} "
                      "(reported; exit code stays 0)")
    else:
        console.print("[green]all targets met[/]" if not crashed else "")
    console.print(f"results: {RESULTS}/")
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
