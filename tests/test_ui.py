"""The dashboard (/ui) in a real browser: Debian's headless Chromium driven by Playwright
against a real `milton serve` child process on a seeded store. Every page loads with no
console error and its charts have as many points as the store holds; ack, mute, rollback and
memory delete change the store; markup from outside is shown, never run. Screenshots of each
page go to tests/artifacts/ui/. The login and CSRF checks are in test_ui_auth.py."""

from __future__ import annotations

import sqlite3

import pytest
from helpers import REPO
from ui_store import XSS, seed

ARTIFACTS = REPO / "tests" / "artifacts" / "ui"


@pytest.fixture(scope="module")
def ui_server(tmp_path_factory, embedder):
    from milton.core.config import load_settings
    from milton.core.timeutil import utcnow
    from milton.serve.process import live_server

    home = tmp_path_factory.mktemp("ui") / "home"
    home.mkdir()
    settings = load_settings(environ={"MILTON_HOME": str(home)}).settings
    expected = seed(settings, embedder, utcnow())
    env = {"MILTON_SERVE__CHAT_ENABLED": "false", "MILTON_SERVE__SNAPSHOT_ENABLED": "false"}
    with live_server(home, env, timeout=120) as server:
        yield server, settings, expected


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(60_000)
    problems: list[str] = []
    page.on("console", lambda msg: problems.append(f"console {msg.type}: {msg.text}")
            if msg.type in ("error", "warning") else None)
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    page.on("dialog", lambda dialog: problems.append(f"dialog: {dialog.message}"))
    page.problems = problems
    yield page
    context.close()


def _db(settings) -> sqlite3.Connection:
    return sqlite3.connect(settings.db_path)


def _shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def test_every_page_loads_clean_and_charts_hold_the_store(ui_server, page):
    server, settings, expected = ui_server
    pages = {
        "overview": ("/ui/", {}),
        "anomalies": ("/ui/anomalies?q=script", {"alerts-chart": expected["alert_points"]}),
        "learning": ("/ui/learning", {"loss-chart": expected["loss_points"],
                                      "adapter-chart": expected["adapter_points"],
                                      "quality-chart": expected["quality_points"]}),
        "memory": ("/ui/memory?q=sourdough+bread&k=5&mode=hybrid", {}),
        "session": ("/ui/sessions/s-1", {}),
        "jobs": ("/ui/jobs", {"jobs-chart": expected["job_runs"]}),
        "job": ("/ui/jobs/3", {}),
    }
    for name, (path, charts) in pages.items():
        response = page.goto(server.base + path)
        assert response.status == 200, (name, response.status)
        assert page.locator("main h1").count() == 1, name
        for chart, points in charts.items():
            figure = page.locator(f"#{chart}")
            assert figure.get_attribute("data-points") == str(points), (name, chart)
            assert figure.locator(".pt").count() == points, (name, chart)
        _shot(page, name)
    assert page.problems == []

    # What the store holds is what the pages say.
    page.goto(server.base + "/ui/")
    assert page.locator("#memory-tiers").inner_text().split() == [
        "short", "1", "working", "1", "long", "2", "messages", "2", "active", "sessions", "0",
        "documents", "0"]
    assert "4 open alert(s)" in page.locator("#attention").inner_text()
    assert "promoted" in page.locator("#models").inner_text()
    page.goto(server.base + "/ui/memory?q=sourdough+bread&k=5&mode=hybrid")
    first = page.locator("#hits tbody tr").first.inner_text()
    assert "sourdough" in first
    assert "Buy rye flour" in page.locator("#tasks").inner_text()
    page.goto(server.base + "/ui/anomalies")
    assert "0.0123" in page.locator("#anomaly-model").inner_text()
    # serve's own view: the seeded model is no real one, so it says it could not load it
    assert "anomaly/v000001: cannot load model" in page.locator("#anomaly-serving").inner_text()
    page.goto(server.base + "/ui/learning")
    recall = [row.split("\t") for row in page.locator("#recall tbody tr").all_inner_texts()]
    assert recall == [["new", "0%", "25%", "88%"], ["retention", "0%", "12%", "44%"]], recall
    assert "88%" in page.locator("#train-runs").inner_text()
    page.goto(server.base + "/ui/jobs/3")
    assert page.locator("#run-error").inner_text() == "disk <full>"
    assert page.problems == []


def test_markup_from_outside_is_shown_not_run(ui_server, page):
    server, _, _ = ui_server
    page.goto(server.base + "/ui/anomalies?q=script")
    assert page.locator("#processes td.name").all_inner_texts() == [XSS]
    assert XSS in page.locator("#open-alerts").inner_text()
    assert "unusual nc <b>bold</b>" in page.locator("#open-alerts").inner_text()
    page.goto(server.base + "/ui/sessions/s-1")
    assert f"how do I bake bread? {XSS}" in page.locator("#messages").inner_text()
    assert page.locator("main script, main b, main i").count() == 0
    assert page.problems == []  # no alert() dialog, no CSP violation


def test_ack_and_mute_change_the_store(ui_server, page):
    server, settings, _ = ui_server
    with _db(settings) as conn:
        target = conn.execute("select id from alerts where name = 'cryptominer'").fetchone()[0]
    page.goto(server.base + "/ui/anomalies")
    page.locator(f"tr[data-alert='{target}'] button.ack").click()
    page.wait_for_url("**/ui/anomalies?done=*")
    assert "Acknowledged 1 alert(s)." in page.locator(".done").inner_text()
    assert page.locator(f"tr[data-alert='{target}']").count() == 0
    with _db(settings) as conn:
        assert conn.execute("select acked_at is not null from alerts where id = ?", [target]).fetchone()[0] == 1
        assert conn.execute("select count(*) from alerts where acked_at is null").fetchone()[0] == 3

    with _db(settings) as conn:
        xss_alert = conn.execute("select id from alerts where name = ?", [XSS]).fetchone()[0]
    page.locator(f"tr[data-alert='{xss_alert}'] button.mute").click()
    page.wait_for_url("**/ui/anomalies?done=*")
    assert page.locator("#mutes").inner_text().count(XSS) == 1
    with _db(settings) as conn:
        assert conn.execute("select name, host from alert_mutes").fetchall() == [(XSS, "alpha")]
    _shot(page, "anomalies-after-ack-mute")
    assert page.problems == []


def test_rollback_and_pin_change_the_model_store(ui_server, page):
    from milton.models.layout import ADAPTER_KIND, artifact_store

    server, settings, _ = ui_server
    adapters = artifact_store(settings, ADAPTER_KIND)
    assert adapters.current_name() == "v000002"
    page.goto(server.base + "/ui/learning")
    page.locator("#rollback-adapter").click()
    page.wait_for_url("**/ui/learning?done=*")
    assert adapters.current_name() == "v000001"
    assert "adapter: current is now v000001" in page.locator(".done").inner_text()
    assert "current" in page.locator("#adapter-versions tr[data-version='v000001']").inner_text()

    page.locator("#adapter-versions tr[data-version='v000003'] button.pin-button").click()
    page.wait_for_url("**/ui/learning?done=*")
    assert adapters.pins() == {"v000003"}
    page.locator("#adapter-versions tr[data-version='v000003'] button.promote").click()
    page.wait_for_url("**/ui/learning?done=*")
    assert adapters.current_name() == "v000003"
    assert page.problems == []


def test_memory_delete_removes_it_from_the_store(ui_server, page):
    server, settings, expected = ui_server
    victim = expected["memories"][1]
    page.goto(f"{server.base}/ui/memory/{victim}")
    assert page.locator("#memory-content").inner_text() == f"A note with markup {XSS}"
    page.locator("#delete-memory").click()
    page.wait_for_url("**/ui/memory?done=*")
    assert f"Deleted memory {victim}." in page.locator(".done").inner_text()
    with _db(settings) as conn:
        assert conn.execute("select count(*) from memories where id = ?", [victim]).fetchone()[0] == 0
        assert conn.execute("select count(*) from memories").fetchone()[0] == 3
    response = page.goto(f"{server.base}/ui/memory/{victim}")
    assert response.status == 400
    assert f"memory {victim}: no such memory" in page.locator(".error").inner_text()
    assert [p for p in page.problems if "400" not in p] == []
