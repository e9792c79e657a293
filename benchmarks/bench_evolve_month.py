"""A user's month on the embedded Gemma 3 270M, 2 cores: does ``milton evolve`` at its default
settings hand serve a smaller or faster model that still answers like the old one?

End to end through the CLI, as a user's machine runs it:

1. the learning benchmark's 16 made-up facts (``bench_learning``) are taught in conversations,
   ingested with ``milton ingest conversations``, and ``milton train-lora`` promotes the
   nightly adapter, so serve runs the packaged base + adapter;
2. a real ``milton serve`` is asked, memory off at temperature 0, the 16 facts in held-out
   wordings and the chat benchmark's 30 simple questions (``before``);
3. ``milton evolve --json`` runs with the default settings (wall time, peak RSS) while a second
   ``milton serve`` is up; that serve must switch to the promoted base by itself, answering
   throughout;
4. the same questions again through a fresh serve (``after``).

Figures: each stage and type's quality, size and speed from ``milton evolve report``, the
winner, the size and decode-speed ratios against what serve ran, and the answers before/after.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks._common import live_server, target
from benchmarks.bench_learning import FACTS, _cli, _serve_recall, _sessions


def _switch_live(home: Path) -> dict[str, Any]:
    """``milton evolve`` beside a running serve; the serve's base watcher picks the promotion up."""
    import httpx

    out: dict[str, Any] = {}
    with live_server(home, timeout=180) as server:
        deadline = time.monotonic() + 300
        while (httpx.get(f"{server.base}/healthz", timeout=10).json().get("chat") == "loading"
               and time.monotonic() < deadline):
            time.sleep(0.5)
        stdout, elapsed, rss = _cli(home, "evolve", "--json")
        out["evolve"] = json.loads(stdout)
        out["evolve_wall_s"], out["evolve_peak_rss_mb"] = round(elapsed, 1), round(rss, 1)
        model = httpx.get(f"{server.base}/v1/models", timeout=10).json()["data"][0]["id"]
        served, failed, watcher = 0, 0, {}
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            r = httpx.post(f"{server.base}/v1/chat/completions", headers={"X-Milton-Memory": "off"},
                           json={"model": model, "temperature": 0, "max_tokens": 16, "seed": 0,
                                 "messages": [{"role": "user", "content": "What is the capital of France?"}]},
                           timeout=120)
            served, failed = served + (r.status_code == 200), failed + (r.status_code != 200)
            watcher = (httpx.get(f"{server.base}/ml/telemetry", timeout=10).json()
                       .get("language_model", {}).get("base_watcher") or {})
            if watcher.get("evolved_version") or out["evolve"].get("status_detail") != "promoted":
                break
            time.sleep(2)
        out.update(requests_served=served, requests_failed=failed, base_watcher=watcher,
                   answer_after_switch=r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else None)
    _cli(home, "sessions", "end")
    return out


def run(quick: bool = False) -> dict[str, Any]:
    load0 = os.getloadavg()
    facts = FACTS[:8] if quick else FACTS[:16]
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="milton-bench-evolve-month-") as tmp:
        home = Path(tmp)
        (home / "config.toml").write_text("[model]\nthreads = 2\n")
        path = home / "facts.jsonl"
        path.write_text("".join(json.dumps(s) + "\n" for s in _sessions(facts)))
        _cli(home, "ingest", "conversations", str(path))
        train = json.loads(_cli(home, "train-lora", "--json")[0])
        figures["train_lora"] = train.get("status_detail")
        before = _serve_recall(home, facts, chat_score=True)
        month = _switch_live(home)
        after = _serve_recall(home, facts, chat_score=True)
        report = json.loads(_cli(home, "evolve", "report", "--json")[0])
    result = month["evolve"]
    figures.update(
        evolve=result.get("status_detail"), winner=result.get("winner"), reason=result.get("reason"),
        evolve_wall_s=month["evolve_wall_s"], evolve_peak_rss_mb=month["evolve_peak_rss_mb"],
        size_ratio=_ratio(result.get("candidate_size_mb"), result.get("serving_size_mb")),
        speedup=_ratio(result.get("candidate_tokens_per_s"), result.get("serving_tokens_per_s")),
        served_during_switch=month["requests_served"], failed_during_switch=month["requests_failed"],
        switched_to=month["base_watcher"].get("evolved_version"),
        recall_before=before["recall"], recall_after=after["recall"],
        chat_before=before.get("chat_correct"), chat_after=after.get("chat_correct"),
        rows=[{k: r.get(k) for k in ("stage", "format", "size_mb", "tokens_per_s", "eval_ppl",
                                     "regression_ppl", "quality", "regression_quality", "recall",
                                     "verdict")}
              for r in report.get("rows", [])],
        answers_before=before["answers"], answers_after=after["answers"],
        chat_answers_before=before.get("chat_answers"), chat_answers_after=after.get("chat_answers"))
    smaller = figures["size_ratio"] is not None and figures["size_ratio"] <= 0.9
    faster = figures["speedup"] is not None and figures["speedup"] >= 1.2
    targets = [
        target("promoted", 1.0 if figures["evolve"] == "promoted" else 0.0, ">=", 1.0),
        target("smaller_or_faster", 1.0 if (smaller or faster) else 0.0, ">=", 1.0),
        target("recall_after", after["recall"], ">=", before["recall"] - 0.1),
        target("chat_after", after.get("chat_correct"), ">=", (before.get("chat_correct") or 0) - 2),
        target("failed_during_switch", month["requests_failed"], "<=", 0),
    ]
    return {
        "params": {"facts": len(facts), "threads": 2, "settings": "evolve defaults",
                   "load_avg_start": [round(x, 2) for x in load0],
                   "load_avg_end": [round(x, 2) for x in os.getloadavg()]},
        "figures": figures, "targets": targets,
        "report_only": [k for k, v in figures.items() if not isinstance(v, (dict, list))],
        "notes": ["size_ratio / speedup: the promoted GGUF against serve's base + adapter, as the "
                  "gate measured them (decode tokens/s, same load)",
                  "recall / chat: milton serve, temperature 0, X-Milton-Memory: off; 16 held-out "
                  "fact wordings and bench_chat's 30 questions"],
    }


def _ratio(a: Any, b: Any) -> float | None:
    return round(a / b, 3) if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None
