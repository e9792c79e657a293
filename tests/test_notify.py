"""Notifications: ntfy's publish API against a real HTTP server on loopback, config, CLI."""

from __future__ import annotations

import logging
import socket
import time

import pytest
from ntfy_server import NtfyServer

from milton.core.config import load_settings
from milton.core.errors import ConfigError
from milton.core.jobs import run_job
from milton.core.notify import MAX_BODY_BYTES, notify, unit_failure_report


@pytest.fixture
def ntfy():
    server = NtfyServer()
    yield server
    server.close()


def _settings(**notify_cfg):
    return load_settings(notify=notify_cfg).settings


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- notify() ---------------------------------------------------------------------------------
def test_publishes_message_with_ntfy_headers(ntfy):
    settings = _settings(url=ntfy.url + "/", topic="milton-box", token="tk_secret", priority="high")
    assert notify(settings, "failure", "milton: ingest failed", "disk full\nsecond line",
                  tags=("warning",)) is True
    (got,) = ntfy.wait_for(1)
    assert got.path == "/milton-box"  # the trailing slash of the URL is not doubled
    assert got.text == "disk full\nsecond line"
    assert got.title == "milton: ingest failed"
    assert got.headers["Priority"] == "high"
    assert got.headers["Authorization"] == "Bearer tk_secret"
    assert got.headers["Tags"].split(",") == ["warning", "rotating_light"]


def test_priority_argument_overrides_config_and_no_token_no_auth(ntfy):
    settings = _settings(url=ntfy.url, topic="t")
    assert notify(settings, "stale_backup", "milton: critical", "old", priority="urgent")
    (got,) = ntfy.wait_for(1)
    assert got.headers["Priority"] == "urgent"
    assert "Authorization" not in got.headers


def test_non_ascii_title_travels_rfc2047_encoded(ntfy):
    settings = _settings(url=ntfy.url)
    title = "milton: Müller’s model — promoted ✅"
    assert notify(settings, "promotion", title, "naïve body ✅")
    (got,) = ntfy.wait_for(1)
    assert got.headers["Title"].startswith("=?utf-8?")
    assert got.title == title
    assert got.text == "naïve body ✅"


def test_header_injection_is_flattened(ntfy):
    settings = _settings(url=ntfy.url)
    assert notify(settings, "failure", "bad\r\nX-Injected: 1", "body")
    (got,) = ntfy.wait_for(1)
    assert "X-Injected" not in got.headers
    assert got.title == "bad X-Injected: 1"


def test_long_message_is_truncated_below_ntfy_limit(ntfy):
    settings = _settings(url=ntfy.url)
    assert notify(settings, "failure", "t", "é" * 10_000)
    (got,) = ntfy.wait_for(1)
    assert len(got.body) <= MAX_BODY_BYTES
    assert got.text.endswith("(truncated)")


def test_disabled_sends_nothing(ntfy):
    assert notify(_settings(), "failure", "t", "m") is False  # no url: off by default
    assert notify(_settings(url=ntfy.url, on_promotion=False), "promotion", "t", "m") is False
    assert notify(_settings(url=ntfy.url, on_rejection=False), "rejection", "t", "m") is False
    time.sleep(0.1)
    assert ntfy.received == []
    assert notify(_settings(url=ntfy.url, on_promotion=False), "rejection", "t", "m") is True


@pytest.mark.parametrize("status", [403, 500])
def test_server_error_returns_false_and_warns(ntfy, status, caplog):
    ntfy.status = status
    logging.getLogger("milton").propagate = True  # let caplog see it
    try:
        with caplog.at_level(logging.WARNING, logger="milton"):
            assert notify(_settings(url=ntfy.url), "failure", "t", "m") is False
    finally:
        logging.getLogger("milton").propagate = False
    assert len(ntfy.received) == 1
    assert any(f"HTTP {status}" in r.getMessage() for r in caplog.records)


def test_server_down_or_slow_never_raises(ntfy):
    assert notify(_settings(url=f"http://127.0.0.1:{_free_port()}"), "failure", "t", "m") is False
    ntfy.delay_s = 3
    t0 = time.monotonic()
    assert notify(_settings(url=ntfy.url, timeout_s=0.5), "failure", "t", "m") is False
    assert time.monotonic() - t0 < 2.5


def test_a_failing_job_is_not_failed_by_its_notification(settings):
    """A job that notifies a dead server still ends ok."""
    dead = _settings(url=f"http://127.0.0.1:{_free_port()}")
    result = run_job("train-anomaly", lambda ctx: {"sent": notify(dead, "promotion", "t", "m")}, settings)
    assert result.status == "ok" and result.metrics["sent"] is False


# -- config -------------------------------------------------------------------------------------
@pytest.mark.parametrize("key,value,fragment", [
    ("url", "ftp://example.com", "http:// or https://"),
    ("url", "example.com", "http:// or https://"),
    ("priority", "loud", "min, low, default, high, urgent or 1-5"),
    ("topic", "a/b", "pattern"),
    ("timeout_s", 0, "greater than 0"),
])
def test_bad_notify_settings_name_the_field(key, value, fragment):
    with pytest.raises(ConfigError) as info:
        load_settings(notify={key: value})
    message = str(info.value)
    assert f"notify.{key}" in message and fragment in message
    assert "\n" not in message


def test_bad_url_from_config_file_names_file_and_line(cli, milton_home):
    (milton_home / "config.toml").write_text('[notify]\ntopic = "x"\nurl = "smtp://mail"\n')
    code, out, err = cli("notify", "test")
    assert code == 2
    assert err.strip().count("\n") == 0
    assert "config.toml:3: notify.url" in err


def test_token_is_not_shown_by_config_show(cli):
    code, out, _ = cli("config", "show", "--json", env={"MILTON_NOTIFY__TOKEN": "tk_very_secret"})
    assert code == 0
    assert "tk_very_secret" not in out
    assert "notify.token" in out


# -- CLI ------------------------------------------------------------------------------------------
def test_cli_notify_test(cli, ntfy):
    code, out, err = cli("notify", "test", env={"MILTON_NOTIFY__URL": ntfy.url,
                                                "MILTON_NOTIFY__TOPIC": "check-me"})
    assert code == 0, err
    (got,) = ntfy.wait_for(1)
    assert got.path == "/check-me" and got.title == "milton: test notification"
    assert f"sent to {ntfy.url}/check-me" in out


def test_cli_notify_test_fails_loudly(cli, ntfy):
    code, _, err = cli("notify", "test")
    assert code == 1 and "notifications are off" in err
    code, _, err = cli("notify", "test", env={"MILTON_NOTIFY__URL": f"http://127.0.0.1:{_free_port()}"})
    assert code == 1 and "cannot reach the ntfy server" in err
    assert err.strip().count("\n") == 0
    ntfy.status = 401
    code, _, err = cli("notify", "test", env={"MILTON_NOTIFY__URL": ntfy.url})
    assert code == 1 and "HTTP 401" in err


def test_unit_failed_reports_the_newest_failure(cli, ntfy, settings):
    def boom(ctx):
        raise RuntimeError("disk on fire")

    run_job("ingest", lambda ctx: {}, settings)
    with pytest.raises(RuntimeError):
        run_job("ingest", boom, settings)
    env = {"MILTON_NOTIFY__URL": ntfy.url, "MONITOR_SERVICE_RESULT": "exit-code",
           "MONITOR_EXIT_CODE": "exited", "MONITOR_EXIT_STATUS": "1"}
    code, _, err = cli("notify", "unit-failed", "milton-ingest.service", env=env)
    assert code == 0, err
    (got,) = ntfy.wait_for(1)
    assert got.title == "milton: ingest failed"
    assert "RuntimeError: disk on fire" in got.text
    assert "--unit milton-ingest.service" in got.text and "journalctl" in got.text
    assert "systemd: result exit-code, exit status 1" in got.text


def test_unit_failed_without_a_readable_store(cli, ntfy, milton_home):
    db = milton_home / "data" / "milton.db"
    db.parent.mkdir(parents=True)
    db.write_bytes(b"this is not a database" * 100)
    code, _, err = cli("notify", "unit-failed", "milton-train-anomaly.service",
                       env={"MILTON_NOTIFY__URL": ntfy.url})
    assert code == 0, err
    (got,) = ntfy.wait_for(1)
    assert got.title == "milton: train-anomaly failed"
    assert "job history unavailable" in got.text and "cannot be read" in got.text
    assert db.read_bytes() == b"this is not a database" * 100  # untouched


def test_unit_failed_when_the_failure_left_no_record(settings):
    run_job("ingest", lambda ctx: {}, settings)
    title, text = unit_failure_report(settings, "milton-ingest.service", environ={})
    assert title == "milton: ingest failed"
    assert "left no job_runs record" in text and "newest run is ok" in text
    title, text = unit_failure_report(settings, "milton-check.service", environ={})
    assert "no run of 'check' recorded" in text


def test_unit_failed_is_quiet_when_notifications_are_off(cli, ntfy):
    code, out, err = cli("notify", "unit-failed", "milton-ingest.service")
    assert code == 0
    assert "notifications are off" in out
    code, out, _ = cli("notify", "unit-failed", "milton-ingest.service",
                       env={"MILTON_NOTIFY__URL": ntfy.url, "MILTON_NOTIFY__ON_FAILURE": "false"})
    assert code == 0 and "notifications are off" in out
    time.sleep(0.1)
    assert ntfy.received == []
