"""Runs on every machine it installs on: the generation smoke test, doctor, and containment.

The packaged Gemma generates in a child process on *this* machine (never skipped: a build that
crashes this CPU fails here with the child's signal). A child that dies is reported with its
signal, CPU and build; serve whose model crashes keeps scoring, says "degraded" and why, and a
crash in the middle of a request leaves the store and the logged exchanges intact.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import httpx
import openai
import pytest
from helpers import REPO, ingest_simulated
from live_server import wait_until

from milton.anomaly.simulate import Workstation
from milton.anomaly.train import train_anomaly
from milton.core.config import load_settings
from milton.core.jobs import run_job
from milton.doctor import llama_features
from milton.ingest.processes import COLUMNS
from milton.models.smoke import EXPECT, failure_line, run_smoke
from milton.serve.process import live_server

T0 = datetime(2026, 3, 2, tzinfo=timezone.utc).timestamp()

# Loaded by every Python started with this directory on PYTHONPATH: the smoke child (the only
# one started with --child) dies with a real SIGSEGV, as a build executing AMX on a CPU that
# refuses it does.
CRASHING_CHILD = """
import sys
if "--child" in sys.argv:
    import ctypes
    ctypes.string_at(0)
"""


@pytest.fixture
def crash_env(tmp_path: Path) -> dict[str, str]:
    site = tmp_path / "crash-site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(CRASHING_CHILD)
    return {"PYTHONPATH": os.pathsep.join([str(site), str(REPO), os.environ.get("PYTHONPATH", "")])}


def test_the_packaged_model_generates_here_in_a_child_process():
    """Always runs: the install's own check, on this CPU with this build."""
    from milton.models.refs import embedded_gguf

    result = run_smoke(embedded_gguf(), expect=EXPECT)
    assert result.ok, failure_line(result)
    assert EXPECT in result.text.lower()
    assert "AMX" not in [k for k, v in llama_features(result.system_info).items() if v]


def test_a_child_that_crashes_is_reported_with_its_signal_cpu_and_build(tiny_gguf, crash_env):
    result = run_smoke(tiny_gguf, env={**os.environ, **crash_env})
    assert not result.ok and result.signal == "SIGSEGV"
    line = failure_line(result)
    assert "\n" not in line
    assert "died with SIGSEGV" in line and "CPU:" in line and "llama.cpp:" in line
    assert "make install" in line


def test_wrong_output_fails_the_check(tiny_gguf):
    result = run_smoke(tiny_gguf, expect="zanzibar")  # what no model answers here
    assert not result.ok and result.signal is None
    assert "not 'zanzibar'" in result.error


def test_install_check_passes_on_the_packaged_model():
    proc = subprocess.run([sys.executable, "-m", "milton.models.smoke", "--install"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "smoke test: the packaged model completed" in proc.stdout


def test_install_check_fails_in_one_line_when_the_child_crashes(crash_env):
    proc = subprocess.run([sys.executable, "-m", "milton.models.smoke", "--install"],
                          capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**os.environ, **crash_env})
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("milton: error: generation smoke test failed")
    assert "SIGSEGV" in lines[0]


def test_doctor_reports_every_check_and_exits_0(cli, milton_home):
    code, out, err = cli("doctor", "--json", timeout=300)
    assert code == 0, out + err
    report = json.loads(out)
    names = [c["name"] for c in report["checks"]]
    assert names == ["python", "libraries", "llama.cpp build", "model.base", "generation",
                     "embedding model", "llama.cpp converters", "systemd-analyze", "store",
                     "disk and memory", "GPU", "serve"]
    by_name = {c["name"]: c for c in report["checks"]}
    assert by_name["generation"]["status"] == "ok" and "Paris" in by_name["generation"]["detail"]
    assert "AMX off" in by_name["llama.cpp build"]["detail"]
    assert report["ok"] is True

    code, out, _ = cli("doctor", timeout=300)  # the table
    assert code == 0 and "generation" in out and "No failures." in out


def test_doctor_fails_on_a_corrupt_store_and_a_crashing_model(cli, milton_home, crash_env):
    data = milton_home / "data"
    data.mkdir()
    (data / "milton.db").write_bytes(b"SQLite format 3\x00" + b"\x07" * 8192)
    code, out, _ = cli("doctor", "--json", env=crash_env, timeout=300)
    assert code == 1
    by_name = {c["name"]: c for c in json.loads(out)["checks"]}
    assert by_name["store"]["status"] == "failed" and by_name["store"]["fix"]
    assert by_name["generation"]["status"] == "failed"
    assert "SIGSEGV" in by_name["generation"]["detail"]


# -- containment in serve -------------------------------------------------------------------------
def _trained_home(home: Path, tiny_gguf: Path) -> None:
    settings = load_settings(environ={"MILTON_HOME": str(home)}).settings
    ingest_simulated(settings, seed=3, days=2, t0=T0)
    now = datetime.fromtimestamp(T0 + 2 * 86400, timezone.utc)
    assert run_job("train-anomaly", train_anomaly, settings, now=now).status == "ok"
    (home / "config.toml").write_text(
        f'[model]\nbase = "{tiny_gguf}"\n\n[serve]\nn_ctx = 256\nn_threads = 1\n'
        'snapshot_interval_s = 0.5\n')


def _wait_settled(base: str, timeout: float = 120.0) -> dict:
    """/healthz once the language model has loaded, failed or been disabled."""
    def settled() -> dict | None:
        health = httpx.get(f"{base}/healthz", timeout=5).json()
        return health if health["chat"] != "loading" else None

    return wait_until(settled, timeout=timeout, step=0.1)


def test_serve_keeps_scoring_when_the_model_crashes_its_smoke_test(tmp_path, tiny_gguf, crash_env, cli):
    home = tmp_path / "serve-home"
    home.mkdir()
    _trained_home(home, tiny_gguf)
    rows = [dict(zip(COLUMNS, r)) for r in Workstation(seed=3).snapshot(T0 + 3 * 86400)]
    with live_server(home, crash_env) as srv:
        health = _wait_settled(srv.base)
        assert health["status"] == "degraded" and health["chat"] == "degraded"
        assert "SIGSEGV" in health["reasons"][0]

        client = openai.OpenAI(base_url=f"{srv.base}/v1", api_key="none", max_retries=0, timeout=30)
        with pytest.raises(openai.InternalServerError) as caught:
            client.chat.completions.create(model=client.models.list().data[0].id,
                                           messages=[{"role": "user", "content": "hi"}])
        assert caught.value.status_code == 503
        assert "SIGSEGV" in caught.value.message and "chat disabled" in caught.value.message

        scored = httpx.post(f"{srv.base}/anomaly/score", json={"rows": rows}, timeout=30)
        assert scored.status_code == 200 and len(scored.json()["results"]) == len(rows)
        telemetry = httpx.get(f"{srv.base}/ml/telemetry", timeout=10).json()
        assert telemetry["status"] == "degraded"
        assert telemetry["language_model"]["smoke_check"]["signal"] == "SIGSEGV"
        wait_until(lambda: httpx.get(f"{srv.base}/ml/telemetry", timeout=10).json()
                   ["live_snapshots"]["runs"] >= 1, timeout=30, step=0.2)  # snapshots keep running
        assert srv.proc.poll() is None

        code, out, err = cli("status", "--json", env={"MILTON_HOME": str(home)})
        assert code == 0, err
        report = json.loads(out)
        assert report["serve"]["running"] and report["serve"]["chat"] == "degraded"
        assert any("serve runs degraded" in a["message"] and "SIGSEGV" in a["message"]
                   for a in report["attention"])
    assert json.loads((home / "data" / "serve.json").read_text())["status"] == "stopped"


def test_a_crash_mid_request_leaves_store_and_logged_exchanges_intact(tmp_path, tiny_gguf):
    home = tmp_path / "serve-home"
    home.mkdir()
    _trained_home(home, tiny_gguf)
    with live_server(home) as srv:
        assert _wait_settled(srv.base)["status"] == "ok"
        client = openai.OpenAI(base_url=f"{srv.base}/v1", api_key="none", max_retries=0, timeout=60)
        model = client.models.list().data[0].id
        for k in range(3):
            reply = client.chat.completions.create(
                model=model, max_tokens=8, temperature=0, user="alice",
                messages=[{"role": "user", "content": f"Question number {k}?"}])
            assert reply.choices[0].finish_reason in ("stop", "length")
        db_path = home / "data" / "milton.db"
        # the session log is written off the request path
        wait_until(lambda: _count(db_path, "messages") >= 6, timeout=30, step=0.1)
        logged = _rows(db_path)
        assert len(logged) == 6
        # A native crash while a long answer streams: serve dies with SIGSEGV, as it would.
        stream = client.chat.completions.create(
            model=model, max_tokens=200, temperature=0, stream=True, user="alice",
            messages=[{"role": "user", "content": "Tell me a long story."}])
        next(iter(stream))
        os.kill(srv.proc.pid, signal.SIGSEGV)
        srv.proc.wait(30)
        assert srv.proc.returncode == -signal.SIGSEGV
    conn = sqlite3.connect(db_path)
    try:
        assert conn.execute("pragma integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()
    after = _rows(db_path)
    assert after[:6] == logged  # what was logged before the crash is there, unchanged
    assert all("long story" in text or role == "assistant" for role, text in after[6:])
    with live_server(home) as srv:  # restarted (systemd's Restart=), it serves again
        assert _wait_settled(srv.base)["status"] == "ok"
        client = openai.OpenAI(base_url=f"{srv.base}/v1", api_key="none", max_retries=0, timeout=60)
        reply = client.chat.completions.create(model=client.models.list().data[0].id, max_tokens=4,
                                               messages=[{"role": "user", "content": "again"}])
        assert reply.choices[0].message.content is not None


def _count(db_path: Path, table: str) -> int:
    conn = sqlite3.connect(db_path)
    try:
        return conn.execute(f"select count(*) from {table}").fetchone()[0]
    except sqlite3.OperationalError:
        return 0
    finally:
        conn.close()


def _rows(db_path: Path) -> list[tuple[str, str]]:
    conn = sqlite3.connect(db_path)
    try:
        return conn.execute("select role, content from messages order by id").fetchall()
    finally:
        conn.close()


# -- the build itself -------------------------------------------------------------------------------
def _llama_wheel():
    import importlib.util

    spec = importlib.util.spec_from_file_location("llama_wheel", REPO / "scripts" / "llama_wheel.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SAPPHIRE_RAPIDS = {"avx", "avx2", "fma", "f16c", "bmi2", "avx512f", "avx512bw", "avx512dq",
                   "avx512vl", "avx512_vnni", "avx512_bf16", "avx512vbmi", "amx_tile", "amx_int8",
                   "amx_bf16"}


def test_every_tier_is_portable_and_never_builds_amx():
    lw = _llama_wheel()
    assert lw.resolve_tier("auto", SAPPHIRE_RAPIDS, "x86_64") == "avx512"
    assert lw.resolve_tier("auto", {"avx", "avx2", "fma", "f16c", "bmi2"}, "x86_64") == "avx2"
    assert lw.resolve_tier("auto", {"sse4_2"}, "x86_64") == "sse42"
    assert lw.resolve_tier("auto", set(), "aarch64") == "generic"
    for tier in lw.TIERS[1:]:
        args = lw.cmake_args(tier, SAPPHIRE_RAPIDS)
        assert {"-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"} <= set(args)
        assert not [a for a in args if a.startswith("-DGGML_AMX") and a.endswith("=ON")]
        if tier != "native":
            assert "-DGGML_NATIVE=OFF" in args
    # AVX-512 extensions only where the CPU has them
    assert "-DGGML_AVX512_BF16=ON" not in lw.cmake_args("avx512", SAPPHIRE_RAPIDS - {"avx512_bf16"})


def test_a_wheel_built_with_other_flags_is_never_reused():
    lw = _llama_wheel()
    avx2 = lw.cmake_args("avx2", SAPPHIRE_RAPIDS)
    avx512 = lw.cmake_args("avx512", SAPPHIRE_RAPIDS)
    native = lw.cmake_args("native", SAPPHIRE_RAPIDS)
    keys = {lw.build_key("0.3.36", args, "cp311-linux-x86_64") for args in (avx2, avx512, native)}
    assert len(keys) == 3
    assert lw.build_key("0.3.36", avx2, "cp311-linux-x86_64") != lw.build_key("0.3.37", avx2, "cp311-linux-x86_64")


def test_the_installed_llama_cpp_is_the_portable_build():
    """`make install` built it (record in the venv) without -march=native and without AMX."""
    from milton.models.smoke import build_record, system_info

    record = build_record()
    assert record, "llama-cpp-python was not installed by `make install` (scripts/llama_wheel.py)"
    assert "-DGGML_NATIVE=OFF" in record["cmake_args"]
    from importlib.metadata import version

    assert record["version"] == version("llama-cpp-python")
    features = llama_features(system_info())
    assert not [name for name, on in features.items() if name.startswith("AMX") and on]
