"""Config: precedence, file selection, MILTON_HOME, provenance and every way to get it wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import assert_clean_error

from milton.core.config import load_settings
from milton.core.errors import ConfigError


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# -- precedence --------------------------------------------------------------------------
def test_defaults_when_nothing_is_set(settings, milton_home):
    assert settings.anomaly.window_days == 30.0
    assert settings.store.busy_timeout_ms == 30_000
    assert settings.paths.home == milton_home.resolve()


def test_precedence_init_over_env_over_toml_over_default(milton_home, monkeypatch):
    write(milton_home / "config.toml",
          "[anomaly]\nwindow_days = 3\nmin_records = 7\n[ingest]\nretention_margin_days = 1.5\n")
    loaded = load_settings()
    assert loaded.settings.anomaly.window_days == 3
    assert loaded.config_file == milton_home / "config.toml"

    monkeypatch.setenv("MILTON_ANOMALY__WINDOW_DAYS", "7")
    loaded = load_settings()
    assert loaded.settings.anomaly.window_days == 7  # env beats TOML
    assert loaded.settings.anomaly.min_records == 7  # TOML beats default
    assert loaded.settings.ingest.retention_margin_days == 1.5
    assert loaded.settings.anomaly.min_processes == 10  # default
    assert loaded.sources["anomaly.window_days"] == "env MILTON_ANOMALY__WINDOW_DAYS"
    assert loaded.sources["anomaly.min_records"] == f"{milton_home / 'config.toml'}:3"
    assert loaded.sources["anomaly.min_processes"] == "default"

    loaded = load_settings(anomaly={"window_days": 11})
    assert loaded.settings.anomaly.window_days == 11  # init beats env
    assert loaded.sources["anomaly.window_days"] == "init"


def test_explicit_environ_mapping_is_used_instead_of_os_environ(milton_home):
    loaded = load_settings(environ={"MILTON_HOME": str(milton_home),
                                    "MILTON_SERVE__PORT": "9123"})
    assert loaded.settings.serve.port == 9123


def test_config_option_and_milton_config_env(cli, milton_home, tmp_path):
    other = write(tmp_path / "elsewhere" / "m.toml", "[anomaly]\nwindow_days = 4.5\n")
    write(milton_home / "config.toml", "[anomaly]\nwindow_days = 9\n")

    rc, out, err = cli("config", "show", "--json")
    assert rc == 0, err
    assert json.loads(out)["settings"]["anomaly.window_days"]["value"] == 9

    rc, out, err = cli("--config", str(other), "config", "show", "--json")
    assert rc == 0, err
    shown = json.loads(out)
    assert shown["config_file"] == str(other)
    assert shown["settings"]["anomaly.window_days"] == {"value": 4.5, "source": f"{other}:2"}

    rc, out, err = cli("config", "show", "--json", env={"MILTON_CONFIG": str(other)})
    assert rc == 0, err
    assert json.loads(out)["settings"]["anomaly.window_days"]["value"] == 4.5

    loaded = load_settings(environ={"MILTON_CONFIG": str(other)})
    assert loaded.config_file == other and loaded.settings.anomaly.window_days == 4.5


def test_missing_config_file_is_a_usage_error(cli, tmp_path):
    missing = tmp_path / "nope.toml"
    rc, out, err = cli("--config", str(missing), "config", "show")
    assert rc == 2
    assert_clean_error(err, str(missing), "not found")


def test_milton_home_relocates_data_and_checkpoints(cli, milton_home, tmp_path, monkeypatch):
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    rc, out, err = cli("config", "show", "--json", cwd=elsewhere)
    assert rc == 0, err
    shown = json.loads(out)["settings"]
    assert shown["paths.data_dir"]["value"] == str((milton_home / "data").resolve())
    assert shown["paths.checkpoints_dir"]["value"] == str((milton_home / "checkpoints").resolve())
    assert shown["paths.home"]["source"] == "env MILTON_HOME"

    rc, out, err = cli("ingest", "processes", cwd=elsewhere)
    assert rc == 0, err
    assert (milton_home / "data" / "milton.db").is_file()
    assert (milton_home / "data" / "logs" / "jobs.jsonl").is_file()
    assert not (elsewhere / "data").exists()


def test_relative_paths_in_toml_resolve_against_home(milton_home):
    write(milton_home / "config.toml", '[paths]\ndata_dir = "state/db"\ncheckpoints_dir = "/abs/ck"\n')
    s = load_settings().settings
    assert s.paths.data_dir == (milton_home / "state" / "db").resolve()
    assert s.paths.checkpoints_dir == Path("/abs/ck")
    assert s.db_path == s.paths.data_dir / "milton.db"


def test_config_show_reports_every_source(cli, milton_home):
    write(milton_home / "config.toml", "# comment\n\n[serve]\nport = 8123\n")
    rc, out, err = cli("config", "show", "--json", env={"MILTON_ANOMALY__WINDOW_DAYS": "7"})
    assert rc == 0, err
    payload = json.loads(out)
    shown = payload["settings"]
    assert payload["config_file"] == str(milton_home / "config.toml")
    assert shown["anomaly.window_days"] == {"value": 7.0, "source": "env MILTON_ANOMALY__WINDOW_DAYS"}
    assert shown["serve.port"] == {"value": 8123, "source": f"{milton_home / 'config.toml'}:4"}
    assert shown["serve.host"] == {"value": "127.0.0.1", "source": "default"}
    # every setting is listed, each with a source
    from milton.core.config import describe_settings

    assert set(shown) == {key for key, _, _ in describe_settings()}
    assert all(entry["source"] for entry in shown.values())


def test_config_show_table_mentions_file(cli, milton_home):
    write(milton_home / "config.toml", "[serve]\nport = 8124\n")
    rc, out, err = cli("config", "show")
    assert rc == 0, err
    assert "serve.port" in out and "8124" in out


# -- errors ------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ['"abc"', "-1", "0"])
def test_invalid_value_names_key_file_and_line(cli, milton_home, value):
    cfg = write(milton_home / "config.toml", f"[serve]\nport = 8000\n\n[anomaly]\nwindow_days = {value}\n")
    rc, out, err = cli("config", "show")
    assert rc == 2
    assert_clean_error(err, f"{cfg}:5", "anomaly.window_days")
    with pytest.raises(ConfigError, match=r"config\.toml:5: anomaly\.window_days"):
        load_settings()


def test_invalid_value_fails_any_command_not_only_config_show(cli, milton_home):
    cfg = write(milton_home / "config.toml", "[store]\nbusy_timeout_ms = -5\n")
    rc, out, err = cli("ingest", "processes")
    assert rc == 2
    assert_clean_error(err, f"{cfg}:2", "store.busy_timeout_ms")
    assert not (milton_home / "data" / "milton.db").exists()


def test_unknown_key_is_named(cli, milton_home):
    cfg = write(milton_home / "config.toml", "[anomaly]\nwindw_days = 3\n")
    rc, out, err = cli("config", "show")
    assert rc == 2
    line = assert_clean_error(err, "anomaly.windw_days", str(cfg))
    assert "unknown" in line


def test_unknown_section_is_named(cli, milton_home):
    cfg = write(milton_home / "config.toml", "[anomoly]\nwindow_days = 3\n")
    rc, out, err = cli("config", "show")
    assert rc == 2
    assert_clean_error(err, "anomoly", str(cfg))


def test_invalid_toml_names_file(cli, milton_home):
    cfg = write(milton_home / "config.toml", "[anomaly\nwindow_days = 3\n")
    rc, out, err = cli("config", "show")
    assert rc == 2
    assert_clean_error(err, str(cfg), "invalid TOML")


def test_non_utf8_config_names_file(cli, milton_home):
    cfg = milton_home / "config.toml"
    cfg.write_bytes(b"[anomaly]\nwindow_days = 3 # \xff\n")
    rc, out, err = cli("config", "show")
    assert rc == 2
    assert_clean_error(err, str(cfg), "UTF-8")


def test_bad_env_value_names_env_var(cli):
    rc, out, err = cli("config", "show", env={"MILTON_ANOMALY__WINDOW_DAYS": "abc"})
    assert rc == 2
    assert_clean_error(err, "MILTON_ANOMALY__WINDOW_DAYS", "anomaly.window_days", "'abc'")


def test_bad_env_value_beats_good_toml_value_and_is_blamed(cli, milton_home):
    write(milton_home / "config.toml", "[serve]\nport = 8000\n")
    rc, out, err = cli("config", "show", env={"MILTON_SERVE__PORT": "70000"})
    assert rc == 2
    line = assert_clean_error(err, "MILTON_SERVE__PORT", "serve.port")
    assert "config.toml" not in line


# -- config set --------------------------------------------------------------------------
def _gguf(path: Path) -> Path:
    """A file that passes model.base's check (the GGUF magic; serve would load it later)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"GGUF" + b"\0" * 64)
    return path


def test_config_set_changes_one_value_keeps_comments_and_config_show_reports_it(cli, milton_home):
    from milton.cli.docs import render_default_config

    cfg = write(milton_home / "config.toml", render_default_config())
    cfg.chmod(0o600)
    before = cfg.read_text()
    model = _gguf(milton_home / "models" / "some-instruct.gguf")
    rc, out, err = cli("config", "set", "model.base", str(model))
    assert rc == 0, err
    assert "model.base" in out and str(cfg) in out
    rc, out, err = cli("config", "set", "anomaly.window_days", "14")
    assert rc == 0, err
    after = cfg.read_text()
    changed = [(a, b) for a, b in zip(before.splitlines(), after.splitlines()) if a != b]
    assert changed == [("window_days = 30.0", "window_days = 14"),
                       ('base = ""', f'base = "{model}"')]
    assert len(after.splitlines()) == len(before.splitlines())  # every comment and blank line kept
    assert cfg.stat().st_mode & 0o777 == 0o600                   # a token-holding file stays private
    rc, out, err = cli("config", "show", "--json")
    shown = json.loads(out)["settings"]
    assert shown["model.base"]["value"] == str(model)
    assert shown["model.base"]["source"].startswith(f"{cfg}:")
    assert shown["anomaly.window_days"]["value"] == 14.0


def test_config_set_creates_the_file_in_milton_home_and_parses_lists_and_booleans(cli, milton_home):
    rc, out, err = cli("config", "set", "train.target_modules", '["q_proj", "up_proj"]')
    assert rc == 0, err
    rc, out, err = cli("config", "set", "train.include_documents", "false")
    assert rc == 0, err
    settings = load_settings(milton_home / "config.toml").settings
    assert settings.train.target_modules == ["q_proj", "up_proj"]
    assert settings.train.include_documents is False


@pytest.mark.parametrize("args, needles", [
    (("model.bsae", "x"), ("model.bsae", "unknown setting")),
    (("model.base", "/nowhere/some-instruct.gguf"), ("model.base", "does not exist")),
])
def test_config_set_rejects_bad_keys_and_values_in_one_line_and_leaves_the_file(cli, milton_home,
                                                                                args, needles):
    cfg = write(milton_home / "config.toml", "# my settings\n[anomaly]\nwindow_days = 7  # a week\n")
    before = cfg.read_bytes()
    rc, out, err = cli("config", "set", *args)
    assert rc == 2
    assert_clean_error(err, *needles)
    assert cfg.read_bytes() == before
    assert [p.name for p in milton_home.iterdir()] == ["config.toml"]  # no temp file left


@pytest.mark.parametrize("key, value, needle", [
    ("modle.base", "x", "unknown setting"),
    ("model", "x", "unknown setting"),
    ("model.base", "NOTGGUF", "not a GGUF file"),
    ("model.base", "DIR", "not a Hugging Face model directory"),
    ("model.chat_format", "chatml", "config.toml:"),
    ("anomaly.window_days", "abc", "config.toml:3: anomaly.window_days"),
])
def test_config_set_function_rejects_bad_values_before_writing(milton_home, key, value, needle):
    from milton.cli.config import check_setting
    from milton.core.config_edit import set_setting

    cfg = write(milton_home / "config.toml", "# my settings\n[anomaly]\nwindow_days = 7  # a week\n")
    before = cfg.read_bytes()
    if value == "NOTGGUF":
        value = str(write(milton_home / "m" / "notes.gguf", "just text\n"))
    elif value == "DIR":
        value = str(write(milton_home / "d" / "readme.txt", "x").parent)
    with pytest.raises(ConfigError, match=needle) as caught:
        set_setting(key, value, check=check_setting(key))
    assert "\n" not in str(caught.value)
    assert cfg.read_bytes() == before
