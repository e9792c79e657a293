"""Checked-in generated docs must match the code."""

from pathlib import Path

from milton.cli.docs import render_cli_reference, render_default_config

ROOT = Path(__file__).resolve().parents[1]


def test_cli_reference_is_current():
    assert (ROOT / "docs" / "cli.md").read_text() == render_cli_reference(), "run `make docs`"


def test_cli_reference_covers_every_subcommand():
    """Every command and sub-command has its own page (nested groups included)."""
    text = render_cli_reference()
    for page in ("milton ingest processes", "milton ingest conversations", "milton memory search",
                 "milton memory tasks add", "milton sessions export", "milton systemd install",
                 "milton models rollback", "milton compress-memory"):
        assert f"\n## {page}\n" in text, page


def test_config_toml_documents_every_setting_with_its_default():
    text = (ROOT / "config.toml").read_text()
    assert text == render_default_config(), "run `make docs`"
    from milton.core.config import load_settings

    loaded = load_settings(ROOT / "config.toml", environ={})
    defaults = load_settings(environ={"MILTON_HOME": str(ROOT / "nonexistent")})
    assert defaults.config_file is None
    home_relative = {"paths": True, "backup": {"dir"}}  # resolved against paths.home
    assert loaded.settings.model_dump(exclude=home_relative) == \
        defaults.settings.model_dump(exclude=home_relative)
    assert loaded.settings.paths.home == ROOT  # a relative home is relative to the config file
    assert loaded.settings.backup.dir == ROOT / "backups"
    assert all(src.startswith(str(ROOT / "config.toml")) for key, src in loaded.sources.items()
               if not key.startswith("paths."))
