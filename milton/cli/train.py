"""``milton train-lora``: a thin wrapper over :mod:`milton.train.jobs`."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from milton.cli.common import out, print_json, run_as_job


def train_lora_cmd(
    max_steps: Annotated[Optional[int], typer.Option(
        "--max-steps", min=1, help="Stop after this many optimizer steps (default: train.max_steps).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable JSON output.")] = False,
    now: Annotated[Optional[str], typer.Option(
        "--now", help="Pretend it is this time (ISO-8601, epoch, or e.g. -2h).")] = None,
) -> None:
    """Fine-tune a LoRA adapter on new conversations; promote it only if it passes the gate (nightly job)."""
    from milton.train.jobs import train_lora_job

    result = run_as_job("train-lora", train_lora_job(max_steps=max_steps), now, json_output=as_json)
    if as_json:
        print_json(result)
    elif result.get("status") == "ok":
        out.print(f"adapter {result['version']}: {result['status_detail']} ({result['reason']})",
                  markup=False, highlight=False)
    else:
        out.print(f"train-lora: {result['status']}: {result.get('reason', '')}", markup=False,
                  highlight=False)


def register(app: typer.Typer) -> None:
    app.command("train-lora")(train_lora_cmd)
