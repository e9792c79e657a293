"""Helpers shared by the test files (fixtures live in conftest.py)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def ingest_simulated(settings, *, seed: int, days: int, t0: float) -> None:
    """``days`` of a simulated workstation's snapshots, every 30 minutes from ``t0``, in the store."""
    from milton.anomaly.simulate import Workstation
    from milton.core.store import open_store
    from milton.ingest.processes import ingest_snapshot

    ws = Workstation(seed=seed)
    db = open_store(settings.db_path)
    try:
        for k in range(days * 48):
            ingest_snapshot(db, ws.snapshot(t0 + k * 1800.0))
    finally:
        db.close()


def systemd_analyze() -> str:
    """Path of systemd's own checker; required under CI, a skip elsewhere."""
    found = shutil.which("systemd-analyze")
    if found:
        return found
    if os.environ.get("CI"):
        pytest.fail("systemd-analyze is required in CI (install the systemd package)")
    pytest.skip("systemd-analyze not installed")


def assert_clean_error(stderr: str, *needles: str) -> str:
    """The error is one ``milton: error:`` line containing every needle, and no traceback."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("milton: error:")]
    assert len(errors) == 1, stderr
    assert stderr.strip().splitlines()[-1] == errors[0], f"error must be one unwrapped line:\n{stderr}"
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def chromium() -> str:
    """Debian's chromium for the dashboard's browser tests; required under CI, a skip elsewhere
    (`make test` installs it when run as root)."""
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    if os.environ.get("CI"):
        pytest.fail("chromium is required in CI (install Debian's chromium package)")
    pytest.skip("chromium not installed")
