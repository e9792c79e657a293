"""Who may use the dashboard: with serve.api_key set, a login form and a signed session
cookie (HttpOnly, SameSite=Strict); every state-changing request needs its session's CSRF
token, with or without a key. Checked with httpx directly (what a browser would not send) and
once through the browser's login form. The server runs in-process with the dashboard composed
in exactly as `milton serve` does it (test_ui.py drives the real child process)."""

from __future__ import annotations

import re
import sqlite3

import httpx
import pytest
from live_server import live

KEY = "s3cret-key"


def _seed_alert(settings) -> int:
    from milton.anomaly.alerts import record
    from milton.core.store import open_store

    db = open_store(settings.db_path)
    try:
        record(db, [{"flagged": True, "host": "h", "name": "evil", "username": "u", "exe": "/x",
                     "pid": 1, "ts": 1.7e9, "score": 0.9, "reasons": ["odd"]}],
               snapshot_id=None, model_version=None)
        return db.conn.execute("select id from alerts").fetchone()[0]
    finally:
        db.close()


def _open_alerts(settings) -> int:
    with sqlite3.connect(settings.db_path) as conn:
        return conn.execute("select count(*) from alerts where acked_at is null").fetchone()[0]


def _csrf(html: str) -> str:
    return re.search(r'name="csrf" value="([0-9a-f]{64})"', html).group(1)


@pytest.fixture
def keyed(milton_home):
    from milton.web import dashboard

    with live(milton_home, None, extensions=(dashboard(),), serve__api_key=KEY,
              serve__chat_enabled="false") as server:
        yield server


def test_login_is_required_and_sets_a_strict_httponly_signed_cookie(keyed):
    alert = _seed_alert(keyed.settings)
    with httpx.Client(base_url=keyed.base) as client:
        page = client.get("/ui/anomalies")
        assert page.status_code == 303
        assert page.headers["location"] == "/ui/login?next=/ui/anomalies"
        login = client.get("/ui/login")
        assert login.status_code == 200
        token = _csrf(login.text)
        # a wrong key, a missing CSRF token: refused, no session
        wrong = client.post("/ui/login", data={"key": "nope", "csrf": token})
        assert wrong.status_code == 401 and "wrong key" in wrong.text
        assert client.post("/ui/login", data={"key": KEY}).status_code == 403
        ok = client.post("/ui/login", data={"key": KEY, "csrf": token, "next": "/ui/anomalies"})
        assert ok.status_code == 303 and ok.headers["location"] == "/ui/anomalies"
        cookie = ok.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie and "path=/ui" in cookie
        page = client.get("/ui/anomalies")
        assert page.status_code == 200 and "evil" in page.text
        token = _csrf(page.text)
        # state changes need the session's token
        assert client.post("/ui/alerts/ack", data={"id": alert}).status_code == 403
        assert client.post("/ui/alerts/ack", data={"id": alert, "csrf": "0" * 64}).status_code == 403
        assert client.post("/ui/alerts/ack", data={"id": alert, "csrf": token},
                           headers={"Origin": "http://evil.example"}).status_code == 403
        assert _open_alerts(keyed.settings) == 1
        done = client.post("/ui/alerts/ack", data={"id": alert, "csrf": token})
        assert done.status_code == 303
        assert _open_alerts(keyed.settings) == 0
        # the API itself still wants its bearer key, the login session is not one
        assert client.get("/anomaly/alerts").status_code == 401
        # logging out ends the session in this client
        assert client.post("/ui/logout", data={"csrf": token}).status_code == 303
        assert client.get("/ui/").status_code == 303


def test_forged_or_foreign_sessions_are_refused(keyed):
    alert = _seed_alert(keyed.settings)
    with httpx.Client(base_url=keyed.base) as client:
        token = _csrf(client.get("/ui/login").text)
        client.post("/ui/login", data={"key": KEY, "csrf": token})
        value = client.cookies["milton_ui"]
    nonce, expires, authed, signature = value.split(".")
    forged = [f"{nonce}.{int(expires) + 999}.{authed}.{signature}",  # extended
              f"{nonce}.{expires}.1.{'0' * 64}",  # signed by no one
              f"{nonce}.1.1.{signature}",  # expired
              "garbage"]
    for cookie in forged:
        with httpx.Client(base_url=keyed.base, cookies={"milton_ui": cookie}) as client:
            assert client.get("/ui/").status_code == 303, cookie
    # a logged-out visitor's own session and token do not let them act
    with httpx.Client(base_url=keyed.base) as client:
        token = _csrf(client.get("/ui/login").text)
        assert client.post("/ui/alerts/ack", data={"id": alert, "csrf": token}).status_code == 403
    # scripts may use the bearer key instead of a session
    headers = {"Authorization": f"Bearer {KEY}"}
    assert httpx.get(f"{keyed.base}/ui/jobs", headers=headers).status_code == 200
    assert httpx.get(f"{keyed.base}/ui/jobs", headers={"Authorization": "Bearer wrong"}).status_code == 303
    assert _open_alerts(keyed.settings) == 1
    assert httpx.post(f"{keyed.base}/ui/alerts/ack", data={"id": alert}, headers=headers).status_code == 303
    assert _open_alerts(keyed.settings) == 0


def test_without_a_key_loopback_needs_no_login_but_still_a_csrf_token(milton_home):
    from milton.web import dashboard

    with live(milton_home, None, extensions=(dashboard(),), serve__chat_enabled="false") as server:
        alert = _seed_alert(server.settings)
        with httpx.Client(base_url=server.base) as client:
            page = client.get("/ui/anomalies")
            assert page.status_code == 200
            assert "script-src" not in page.headers["content-security-policy"]  # no script at all
            assert "default-src 'none'" in page.headers["content-security-policy"]
            assert client.post("/ui/alerts/ack", data={"id": alert}).status_code == 403
            # another visitor's token does not fit this session
            other = _csrf(httpx.get(f"{server.base}/ui/anomalies").text)
            assert client.post("/ui/alerts/ack", data={"id": alert, "csrf": other}).status_code == 403
            assert _open_alerts(server.settings) == 1
            token = _csrf(page.text)
            assert client.post("/ui/alerts/ack", data={"id": alert, "csrf": token}).status_code == 303
            assert _open_alerts(server.settings) == 0
            # bad requests are a one-line error page, not a 500
            bad = client.post("/ui/models/Nope/rollback", data={"csrf": token})
            assert bad.status_code == 400 and "no model kind &#39;Nope&#39;" in bad.text
            bad = client.post("/ui/alerts/ack", data={"id": "12345", "csrf": token})
            assert bad.status_code == 400 and "no such alert: 12345" in bad.text
            assert client.get("/ui/memory?since=yesterday-ish").status_code == 400


def test_login_form_in_the_browser(keyed, browser):
    context = browser.new_context()
    try:
        page = context.new_page()
        errors: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.goto(f"{keyed.base}/ui/jobs")
        assert page.url.endswith("/ui/login?next=/ui/jobs")
        page.fill("input[name=key]", "wrong")
        page.click("form.login button[type=submit]")
        assert "wrong key" in page.locator(".error").inner_text()
        page.fill("input[name=key]", KEY)
        page.click("form.login button[type=submit]")
        page.wait_for_url("**/ui/jobs")
        assert page.locator("main h1").inner_text() == "Jobs"
        assert page.locator("form.logout").count() == 1
        cookie = next(c for c in context.cookies() if c["name"] == "milton_ui")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        assert page.evaluate("document.cookie") == ""  # not readable from scripts
        assert [e for e in errors if "401" not in e] == []
    finally:
        context.close()
