"""``milton config set``: change one setting in config.toml, in place, validated first.

The file is edited with tomlkit, so its comments, order and layout stay as they were; only the
value of ``section.key`` changes (a missing key is appended to its section, a missing section
to the file). The whole edited file is validated as Milton would load it (pydantic settings,
then the caller's ``check``, e.g. that ``model.base`` is a readable GGUF or Hugging Face
model) before it replaces the old one atomically: a bad key or value is a one-line
:class:`ConfigError` and the file is left untouched.
"""

from __future__ import annotations

import os
import stat
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomlkit
from tomlkit.exceptions import TOMLKitError

from milton.core.config import ENV_PREFIX, Settings, default_config_path, load_settings
from milton.core.errors import ConfigError
from milton.core.fsio import atomic_write_bytes

NEW_FILE_HEADER = ("# Milton configuration, written by `milton config set`. The repository's "
                   "config.toml\n# documents every setting with its default.\n")


@dataclass(frozen=True)
class SetResult:
    path: Path          # the config file written
    key: str            # section.key
    old: Any            # the value in the file before (None: not set there)
    new: Any            # the value written
    created: bool       # the file did not exist before


def config_target(config_file: Path | str | None,
                  environ: Mapping[str, str] | None = None) -> Path:
    """The file ``config set`` writes: ``--config``, else $MILTON_CONFIG, else
    ``config.toml`` in $MILTON_HOME (or the working directory), existing or not."""
    if config_file:
        return Path(config_file).expanduser()
    env = os.environ if environ is None else environ
    found = default_config_path(env)
    if found is not None:
        return found
    return Path(env.get("MILTON_HOME") or ".").expanduser() / "config.toml"


def setting_field(key: str) -> tuple[str, str, Any]:
    """(section, name, pydantic field) of ``section.key``; ConfigError for an unknown one."""
    section, _, name = key.partition(".")
    section_field = Settings.model_fields.get(section)
    if not name or "." in name or section_field is None:
        raise ConfigError(f"{key}: unknown setting (expected section.key, e.g. model.base; "
                          "see `milton config show`)")
    fields = section_field.annotation.model_fields  # type: ignore[union-attr]
    if name not in fields:
        raise ConfigError(f"{key}: unknown setting (typo?); {section} has "
                          f"{', '.join(sorted(fields))}")
    return section, name, fields[name]


def parse_value(field: Any, raw: str) -> Any:
    """The command-line text as a TOML value for ``field``: verbatim for a string setting,
    else read as a TOML literal (``14``, ``true``, ``["q_proj", "v_proj"]``), falling back to
    the text itself so that validation names what is wrong with it."""
    if field.annotation is str:
        return raw
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def set_setting(key: str, raw: str, *, config_file: Path | str | None = None,
                environ: Mapping[str, str] | None = None,
                check: Callable[[Settings], None] | None = None) -> SetResult:
    """Set ``key`` (``section.key``) to ``raw`` in the config file, keeping its comments and
    layout; ConfigError (file untouched) for an unknown key, an invalid value, or one that
    ``check`` rejects on the settings the edited file gives."""
    env = dict(os.environ if environ is None else environ)
    section, name, field = setting_field(key)
    value = parse_value(field, raw)
    path = config_target(config_file, env)
    created = not path.exists()
    try:
        text = "" if created else path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc}") from None
    try:
        doc = tomlkit.parse(text)
    except TOMLKitError as exc:
        raise ConfigError(f"{path}: invalid TOML, not changed: {exc}") from None
    table = doc.get(section)
    if table is None:
        table = tomlkit.table()
        doc.add(section, table)
    elif not isinstance(table, dict):
        raise ConfigError(f"{path}: {section} is not a [section] table; edit it by hand")
    item: Any = table.get(name)
    old = item.unwrap() if hasattr(item, "unwrap") else item
    table[name] = value
    new_text = tomlkit.dumps(doc)
    if created:
        new_text = NEW_FILE_HEADER + "\n" + new_text.lstrip("\n")
    _validate(path, new_text, key, env, check)
    mode = None if created else stat.S_IMODE(path.stat().st_mode)
    target = path.resolve() if path.is_symlink() else path
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(target, new_text.encode("utf-8"), mode=mode)
    return SetResult(path=path, key=key, old=old, new=value, created=created)


def _validate(path: Path, text: str, key: str, environ: dict[str, str],
              check: Callable[[Settings], None] | None) -> None:
    """Load the edited text as Milton would (the file alone: no MILTON_* overrides but the
    home), from a temporary sibling so relative paths resolve the same; ConfigError naming
    ``path`` and the key if it would not load."""
    env = {k: v for k, v in environ.items()
           if not k.upper().startswith(ENV_PREFIX) or k.upper() == "MILTON_HOME"}
    path.parent.mkdir(parents=True, exist_ok=True)
    probe = path.with_name(f".{path.name}.check.toml")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # may hold a token
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        try:
            settings = load_settings(probe, environ=env).settings
        except ConfigError as exc:
            message = str(exc).replace(str(probe), str(path))
            raise ConfigError(f"{message}; not changed") from None
    finally:
        probe.unlink(missing_ok=True)
    if check is not None:
        try:
            check(settings)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}; not changed") from None
