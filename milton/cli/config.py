"""``milton config show``: the effective settings and where each value came from."""

from __future__ import annotations

import json
from typing import Any

import typer
from rich.table import Table

from milton.cli.common import JsonOpt, State, out, print_json

config_app = typer.Typer(help="Inspect configuration.", no_args_is_help=True)


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


def register(app: typer.Typer) -> None:
    app.add_typer(config_app, name="config")
