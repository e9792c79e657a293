"""Shared fixtures: an isolated MILTON_HOME per test and a real CLI in a subprocess."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO


@pytest.fixture(autouse=True)
def milton_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets a fresh MILTON_HOME and working directory, and no stray MILTON_* vars."""
    for name in list(os.environ):
        if name.upper().startswith("MILTON_"):
            monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("MILTON_HOME", str(home))
    monkeypatch.chdir(home)
    return home


@pytest.fixture
def cli(milton_home: Path):
    """Run ``python -m milton ARGS`` with stdin empty; return (returncode, stdout, stderr)."""

    def run(*args: str, input: bytes | str | None = None, env: dict[str, str] | None = None,
            cwd: Path | None = None, timeout: float = 60) -> tuple[int, str, str]:
        full_env = dict(os.environ)
        full_env["PYTHONPATH"] = str(REPO) + os.pathsep + full_env.get("PYTHONPATH", "")
        full_env["COLUMNS"] = "80"  # a narrow terminal: long error lines must still not wrap
        if env:
            full_env.update(env)
        data = input.encode() if isinstance(input, str) else input
        proc = subprocess.run(
            [sys.executable, "-m", "milton", *args],
            input=data if data is not None else b"",
            capture_output=True,
            env=full_env,
            cwd=cwd or Path.cwd(),
            timeout=timeout,
        )
        return (proc.returncode, proc.stdout.decode("utf-8", "replace"),
                proc.stderr.decode("utf-8", "replace"))

    return run


@pytest.fixture
def settings():
    from milton.core.config import load_settings

    return load_settings().settings


@pytest.fixture
def db_rows(milton_home: Path):
    """Count rows in a table of the default store (0 if the store does not exist yet)."""

    def count(table: str = "processes", where: str = "", args: tuple = ()) -> int:
        path = milton_home / "data" / "milton.db"
        if not path.exists():
            return 0
        conn = sqlite3.connect(path)
        try:
            if not conn.execute("select 1 from sqlite_master where name = ?", (table,)).fetchone():
                return 0
            return conn.execute(f"select count(*) from {table} {where}", args).fetchone()[0]
        finally:
            conn.close()

    return count


@pytest.fixture(scope="session")
def embedder():
    """The packaged all-MiniLM-L6-v2, loaded once for the whole run (it takes seconds)."""
    from milton.memory.embed import get_embedder

    return get_embedder()


@pytest.fixture
def memory_db(milton_home: Path):
    """The default store of this test's MILTON_HOME, opened (and migrated) directly."""
    from milton.core.store import open_store

    store = open_store(milton_home / "data" / "milton.db")
    yield store
    store.close()


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama as GGUF (built once per run) for tests that only need a working model."""
    from tiny_lm import build_tiny_gguf

    _, gguf = build_tiny_gguf(tmp_path_factory.mktemp("tiny-gguf"),
                              ["The build server is called zephyr-07.", "The wiki listens on port 8443."])
    return gguf


@pytest.fixture
def one_torch_thread():
    """torch on one thread for the test (tiny models: more threads only fight over a busy CPU)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def browser():
    """Headless Debian chromium under Playwright, one for the whole run (the dashboard tests).
    Skipped where chromium or playwright is missing, except under CI."""
    from helpers import chromium

    path = chromium()
    if os.environ.get("CI"):
        from playwright.sync_api import sync_playwright
    else:
        sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=path, headless=True,
                                     args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        yield browser
        browser.close()
