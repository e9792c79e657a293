"""``milton models list|show|rollback|promote|pin``: every kind of versioned model, over
:mod:`milton.core.artifacts` (each kind with its retention from :mod:`milton.models.layout`)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.table import Table

from milton.cli.common import JsonOpt, State, out, print_json

models_app = typer.Typer(help="List, inspect and switch model versions.", no_args_is_help=True)


def _artifacts(kind: str):
    from milton.models.layout import artifact_store

    return artifact_store(State.settings(), kind)


@models_app.command("list")
def models_list_cmd(
    kind: Annotated[Optional[str], typer.Argument(help="Only this kind (anomaly, adapter, ...).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Every version of every model kind, newest last; * marks current."""
    from milton.core.artifacts import known_kinds

    settings = State.settings()
    kinds = [kind] if kind else known_kinds(settings.paths.checkpoints_dir)
    rows = []
    for k in kinds:
        store = _artifacts(k)
        current, pins = store.current_name(), store.pins()
        for v in store.versions():
            rows.append({"kind": k, "version": v.name, "created": v.created,
                         "current": v.name == current, "pinned": v.name in pins,
                         "metrics": v.metrics})
    if as_json:
        print_json(rows)
        return
    if not rows:
        out.print("No model versions yet. Run `milton train-anomaly` after some `milton ingest processes`.")
        return
    table = Table()
    for col in ("kind", "version", "created", "", "key metrics"):
        table.add_column(col)
    for r in rows:
        mark = ("*" if r["current"] else "") + ("P" if r["pinned"] else "")
        m = r["metrics"]
        key = ", ".join(f"{k}={m[k]:.3f}" if isinstance(m[k], float) else f"{k}={m[k]}"
                        for k in ("records", "train_rows", "contamination", "decision", "eval_ppl",
                                  "regression_ppl", "rouge_l") if m.get(k) is not None)
        table.add_row(r["kind"], r["version"], r["created"], mark, key)
    out.print(table)


@models_app.command("show")
def models_show_cmd(
    kind: Annotated[str, typer.Argument(help="Model kind, e.g. anomaly.")],
    version: Annotated[str, typer.Argument(help="Version, 'current' or 'latest'.")] = "current",
) -> None:
    """A version's manifest (files, checksums, metrics, data window, libraries)."""
    store = _artifacts(kind)
    v = store.get(version)
    print_json({**v.manifest, "current": v.name == store.current_name(),
                 "pinned": v.name in store.pins()})


@models_app.command("rollback")
def models_rollback_cmd(
    kind: Annotated[str, typer.Argument(help="Model kind, e.g. anomaly.")],
    to: Annotated[Optional[str], typer.Option("--to", help="Version to switch to (default: the previous one).")] = None,
    none: Annotated[bool, typer.Option(
        "--none", help="Use no version of this kind at all: the bare base for 'adapter', "
        "model.base for 'base' (serve follows within serve.reload_poll_s).")] = False,
) -> None:
    """Point `current` back at an earlier version (checksums verified first)."""
    if none:
        previous = _artifacts(kind).clear_current(reason="rollback")
        out.print(f"{kind}: no current version (was {previous or 'none'})")
        return
    v = _artifacts(kind).rollback(to)
    out.print(f"{kind}: current is now {v.name}")


@models_app.command("promote")
def models_promote_cmd(
    kind: Annotated[str, typer.Argument(help="Model kind.")],
    version: Annotated[str, typer.Argument(help="Version to make current.")],
) -> None:
    """Make a specific version current (checksums verified first)."""
    v = _artifacts(kind).set_current(version, reason="promote")
    out.print(f"{kind}: current is now {v.name}")


@models_app.command("pin")
def models_pin_cmd(
    kind: Annotated[str, typer.Argument(help="Model kind.")],
    version: Annotated[str, typer.Argument(help="Version to keep forever.")],
    unpin: Annotated[bool, typer.Option("--unpin", help="Remove the pin instead.")] = False,
) -> None:
    """Protect a version from retention (or --unpin it)."""
    _artifacts(kind).pin(version, pinned=not unpin)
    out.print(f"{kind}/{version}: {'unpinned' if unpin else 'pinned'}")


def register(app: typer.Typer) -> None:
    app.add_typer(models_app, name="models")
