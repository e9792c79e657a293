"""``milton config show``: the effective settings and where each value came from;
``milton config set``: change one setting in config.toml, keeping its comments."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated, Any

import typer
from rich.table import Table

from milton.cli.common import JsonOpt, State, out, print_json
from milton.core.config import Settings
from milton.core.config_edit import set_setting
from milton.models.refs import check_base_path

config_app = typer.Typer(help="Inspect and change configuration.", no_args_is_help=True)


@config_app.command("show")
def config_show_cmd(as_json: JsonOpt = False) -> None:
    """The effective settings and where each value came from."""
    State.settings()
    loaded = State.loaded
    assert loaded is not None
    flat: dict[str, Any] = {}
    for section, values in loaded.settings.model_dump(mode="json").items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value
    if as_json:
        print_json({"config_file": str(loaded.config_file) if loaded.config_file else None,
                     "settings": {k: {"value": v, "source": loaded.sources.get(k, "default")}
                                  for k, v in flat.items()}})
        return
    table = Table(title=f"config file: {loaded.config_file or '(none)'}")
    table.add_column("setting")
    table.add_column("value", overflow="fold")
    table.add_column("source", overflow="fold")
    for k, v in flat.items():
        table.add_row(k, json.dumps(v), loaded.sources.get(k, "default"))
    out.print(table)


def check_setting(key: str) -> Callable[[Settings], None] | None:
    """What ``config set`` checks beyond the settings model: a ``model.base`` must be a
    readable GGUF file or Hugging Face model directory (empty = the packaged model)."""
    if key != "model.base":
        return None

    def check(settings: Settings) -> None:
        if settings.model.base.strip():
            check_base_path(settings)
    return check


@config_app.command("set")
def config_set_cmd(
    key: Annotated[str, typer.Argument(help="section.key, e.g. model.base")],
    value: Annotated[str, typer.Argument(help="The new value (TOML syntax for numbers, "
                                         "booleans and lists; strings as they are).")],
    as_json: JsonOpt = False,
) -> None:
    """Set one setting in config.toml (comments and layout kept), validated first.

    Switch to an instruct model: milton config set model.base ~/models/some-instruct.gguf
    (a negative number goes after --: milton config set -- train.seed -1).
    """
    result = set_setting(key, value, config_file=State.config_path, check=check_setting(key))
    if as_json:
        print_json({"config_file": str(result.path), "key": result.key, "old": result.old,
                    "new": result.new, "created": result.created})
        return
    verb = "created" if result.created else "updated"
    out.print(f"{result.key} = {json.dumps(result.new)} ({verb} {result.path})")


def register(app: typer.Typer) -> None:
    app.add_typer(config_app, name="config")
