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
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Show what the next run would train on and what the secret filter would "
        "exclude or redact (by rule, matches masked); train nothing, write nothing.")] = False,
) -> None:
    """Fine-tune a LoRA adapter on new conversations; promote it only if it passes the gate (nightly job)."""
    if dry_run:
        _dry_run(as_json)
        return
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


def _dry_run(as_json: bool) -> None:
    from milton.cli.common import State, open_cli_store
    from milton.train.dryrun import train_dry_run

    with open_cli_store() as db:
        result = train_dry_run(db, State.settings())
    if as_json:
        print_json(result)
        return
    lines = [
        f"dry run: nothing trained, nothing written (train.sensitive_mode = {result['sensitive_mode']})",
        f"new question/answer pairs: {result['new_pairs']}, document texts: {result['new_texts']}, "
        f"from {result['sessions']} sessions; duplicates: {result['duplicates']}; "
        f"tool exchanges skipped: {result['tool_exchanges_skipped']}",
        f"secret filter: {result['excluded']} items excluded, {result['redacted']} redacted"
        + (" (" + ", ".join(f"{k}: {v}" for k, v in result["by_rule"].items()) + ")" if result["by_rule"] else ""),
    ]
    if result["resumes_run"] is not None:
        lines.append(f"the next run resumes unfinished run {result['resumes_run']} with the data it has")
    else:
        verdict = "would train" if result["would_train"] else "would skip"
        lines.append(f"{verdict} (train.min_new_pairs = {result['min_new_pairs']})")
    for flag in result["flagged"]:
        lines.append(f"  {flag['action']} {flag['source']} {flag['field']} [{flag['rule']}]: {flag['context']}")
    for line in lines:
        out.print(line, markup=False, highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("train-lora")(train_lora_cmd)
