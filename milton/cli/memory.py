"""``milton memory ...`` and ``milton compress-memory``: thin wrappers over milton.memory."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Optional

import typer
from rich.table import Table

from milton.cli.common import (
    State,
    err,
    open_cli_store,
    out,
    parse_now,
    print_json,
    run_as_job,
)
from milton.core.text import literal

memory_app = typer.Typer(help="Search and manage memories (short-term, working, long-term).",
                         no_args_is_help=True)
tasks_app = typer.Typer(help="Working memory: tasks with status and dependencies.", no_args_is_help=True)
memory_app.add_typer(tasks_app, name="tasks")

TierOpt = Annotated[Optional[str], typer.Option("--tier", help="short, working or long.")]
SinceOpt = Annotated[Optional[str], typer.Option("--since", help="Only memories created since (ISO-8601, epoch, or e.g. -7d).")]
TagOpt = Annotated[Optional[str], typer.Option("--tag", help="Only memories with this tag.")]


def _embedder():
    from milton.memory.embed import embedder_for

    return embedder_for(State.settings().memory)


def _since(value: Optional[str]) -> Optional[float]:
    from milton.core.timeutil import parse_timestamp

    return None if value is None else parse_timestamp(value, field="--since").timestamp()


def _age(ts: float, now: datetime) -> str:
    from milton.memory.context import humanize_age

    return humanize_age(now.timestamp() - ts)


@memory_app.command("search")
def search_cmd(
    query: Annotated[str, typer.Argument(help="What to look for (natural language or keywords).")],
    k: Annotated[int, typer.Option("-k", "--top", min=1, max=1000, help="How many results.")] = 5,
    tier: TierOpt = None,
    since: SinceOpt = None,
    tag: TagOpt = None,
    mode: Annotated[str, typer.Option("--mode", help="hybrid, vector or keyword.")] = "hybrid",
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable JSON output.")] = False,
    now: Annotated[Optional[str], typer.Option("--now", help="Pretend it is this time.")] = None,
) -> None:
    """Hybrid search (vectors + keywords), ranked by relevance, recency and importance."""
    from milton.core.errors import InputError
    from milton.memory.search import MODES, search

    if mode not in MODES:
        raise InputError(f"--mode: expected one of {', '.join(MODES)}, got {mode!r}")
    when = parse_now(now)
    with open_cli_store() as db:
        hits = search(db, _embedder(), query, State.settings().memory, when, k=k, tier=tier,
                      since=_since(since), tag=tag, mode=mode)
    if as_json:
        print_json([h.as_dict() for h in hits])
        return
    if not hits:
        out.print("No matching memories.")
        return
    table = Table()
    for col in ("id", "tier", "age", "score", "tags", "content"):
        table.add_column(col, overflow="fold")
    for h in hits:
        m = h.memory
        table.add_row(str(m.id), m.tier, _age(m.created, when), f"{h.score:.3f}",
                      literal(",".join(m.tags[:4])), literal(m.content[:300]))
    out.print(table)


@memory_app.command("add")
def add_cmd(
    text: Annotated[str, typer.Argument(help="The memory's text.")],
    tier: Annotated[str, typer.Option("--tier", help="long or short.")] = "long",
    category: Annotated[str, typer.Option("--category", help="fact, note, preference, ...")] = "note",
    importance: Annotated[float, typer.Option("--importance", min=0.0, max=1.0, help="0..1; below 0.5 may be pruned after 90 days.")] = 0.7,
    tag: Annotated[Optional[list[str]], typer.Option("--tag", help="A tag (repeatable).")] = None,
    now: Annotated[Optional[str], typer.Option("--now", help="Pretend it is this time.")] = None,
) -> None:
    """Remember something explicitly."""
    from milton.core.errors import InputError
    from milton.memory.memories import NewMemory, add_memory

    if tier not in ("long", "short"):
        raise InputError("--tier: use long or short (working memories are tasks: milton memory tasks add)")
    with open_cli_store() as db:
        memory_id = add_memory(db, _embedder(), NewMemory(content=text, tier=tier, category=category,
                                                          importance=importance, tags=tag or [],
                                                          source="cli"), parse_now(now))
    if memory_id is None:
        out.print("Already remembered (same text); nothing added.")
    else:
        out.print(f"Added memory {memory_id}.")


@memory_app.command("list")
def list_cmd(
    tier: TierOpt = None,
    since: SinceOpt = None,
    tag: TagOpt = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="At most this many, newest first.")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable JSON output.")] = False,
) -> None:
    """Memories, newest first."""
    from milton.memory.memories import list_memories
    with open_cli_store() as db:
        rows = list_memories(db, tier=tier, since=_since(since), tag=tag, limit=limit)
    if as_json:
        print_json([m.as_dict() for m in rows])
        return
    table = Table()
    for col in ("id", "tier", "category", "age", "imp.", "content"):
        table.add_column(col, overflow="fold")
    when = parse_now(None)
    for m in rows:
        table.add_row(str(m.id), m.tier, literal(m.category), _age(m.created, when), f"{m.importance:.2f}",
                      literal(m.content[:200]))
    out.print(table)


@memory_app.command("show")
def show_cmd(memory_id: Annotated[int, typer.Argument(help="Memory id.")]) -> None:
    """One memory, whole, as JSON (with the ids of the messages it came from)."""
    from milton.memory.memories import get_memory

    with open_cli_store() as db:
        print_json(get_memory(db, memory_id).as_dict())


@memory_app.command("delete")
def delete_cmd(ids: Annotated[list[int], typer.Argument(help="Memory id(s).")]) -> None:
    """Forget memories (their vectors and keyword index entries go too)."""
    from milton.core.errors import InputError
    from milton.memory.memories import delete_memories

    with open_cli_store() as db:
        missing = [i for i in ids if not db.execute("select 1 from memories where id = ?", [i]).fetchone()]
        if missing:
            raise InputError("no such memory: " + ", ".join(map(str, missing)) + " (nothing deleted)")
        n = delete_memories(db, ids)
    out.print(f"Deleted {n} memor{'y' if n == 1 else 'ies'}.")


@memory_app.command("stats")
def stats_cmd(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable JSON output.")] = False) -> None:
    """Counts per tier, sessions, messages, vectors per model, cumulative totals."""
    from milton.memory.embed import resolve_model
    from milton.memory.memories import memory_stats
    model, _ = resolve_model(State.settings().memory.embedding_model)
    with open_cli_store() as db:
        stats = memory_stats(db, model)
    if as_json:
        print_json(stats)
        return
    table = Table(show_header=False)
    for key, value in stats.items():
        table.add_row(key, str(value))
    out.print(table)
    if stats.get("missing_vectors"):
        err.print(f"{stats['missing_vectors']} memories have no vector from {model}: "
                  "run `milton memory reembed`")


@memory_app.command("reembed")
def reembed_cmd() -> None:
    """Give every memory a vector from the configured model (after changing memory.embedding_model)."""
    from milton.memory.memories import reembed

    embedder = _embedder()
    with open_cli_store() as db:
        n = reembed(db, embedder, progress=err.is_terminal)
    out.print(f"Re-embedded {n} memories with {embedder.name} ({embedder.dim}-d).")


@memory_app.command("context")
def context_cmd(
    query: Annotated[str, typer.Argument(help="The user's message.")],
    budget: Annotated[Optional[int], typer.Option("--budget", min=0, help="Token budget (default memory.context_budget_tokens).")] = None,
    now: Annotated[Optional[str], typer.Option("--now", help="Pretend it is this time.")] = None,
) -> None:
    """Print the memory block serve would inject into the system prompt for QUERY."""
    from milton.core.secrets import secret_filter_for
    from milton.memory.context import build_context

    with open_cli_store() as db:
        block = build_context(db, _embedder(), query, State.settings().memory, parse_now(now),
                              budget_tokens=budget, mark_used=False,
                              secrets=secret_filter_for(State.settings()))
    import sys

    sys.stdout.write((block or "(no relevant memories)") + "\n")  # verbatim: never re-wrapped


@memory_app.command("preferences")
def preferences_cmd(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable JSON output.")] = False) -> None:
    """Preferences detected in sessions (style, code examples, languages, tools) with evidence."""
    with open_cli_store() as db:
        rows = [dict(r) for r in db.query(
            "select key, value, evidence, sessions, first_seen, last_seen from preferences "
            "order by evidence desc, key, value")]
    if as_json:
        print_json(rows)
        return
    table = Table()
    for col in ("preference", "value", "evidence", "sessions", "last seen"):
        table.add_column(col)
    when = parse_now(None)
    for r in rows:
        table.add_row(literal(r["key"]), literal(r["value"]), str(r["evidence"]), str(r["sessions"]), _age(r["last_seen"], when))
    out.print(table)


@tasks_app.command("add")
def task_add_cmd(
    title: Annotated[str, typer.Argument(help="What needs doing.")],
    type_: Annotated[str, typer.Option("--type", help="task, bug, research, ...")] = "task",
    depends_on: Annotated[Optional[list[int]], typer.Option("--depends-on", help="Task id this waits on (repeatable).")] = None,
) -> None:
    """Add a task to working memory."""
    from milton.memory.memories import add_task

    with open_cli_store() as db:
        task_id = add_task(db, _embedder(), title, parse_now(None), type=type_, depends_on=depends_on or [])
    out.print(f"Added task {task_id}.")


@tasks_app.command("update")
def task_update_cmd(
    task_id: Annotated[int, typer.Argument(help="Task id.")],
    status: Annotated[Optional[str], typer.Option("--status", help="pending, active, blocked, done, cancelled.")] = None,
    depends_on: Annotated[Optional[list[int]], typer.Option("--depends-on", help="Replace dependencies (repeatable).")] = None,
) -> None:
    """Change a task's status or dependencies (a task can't start or finish before its dependencies)."""
    from milton.memory.memories import update_task

    with open_cli_store() as db:
        task = update_task(db, task_id, parse_now(None), status=status, depends_on=depends_on)
    out.print(f"Task {task['id']}: {task['status']}")


@tasks_app.command("list")
def task_list_cmd(
    include_all: Annotated[bool, typer.Option("--all", help="Include done and cancelled tasks.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable JSON output.")] = False,
) -> None:
    """Open tasks (or all of them)."""
    from milton.memory.memories import list_tasks
    with open_cli_store() as db:
        tasks = list_tasks(db, include_completed=include_all)
    if as_json:
        print_json(tasks)
        return
    table = Table()
    for col in ("id", "type", "status", "depends on", "title"):
        table.add_column(col, overflow="fold")
    for t in tasks:
        table.add_row(str(t["id"]), t["type"], t["status"], ",".join(map(str, t["depends_on"])), literal(t["title"]))
    out.print(table)


def compress_memory_cmd(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show the plan; change nothing.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
    now: Annotated[Optional[str], typer.Option("--now", help="Pretend it is this time.")] = None,
) -> None:
    """Summarise old short-term memory into long-term, prune, clear finished tasks (weekly job)."""
    from milton.memory.compress import Plan, compress_memory_job
    seen: list[Plan] = []
    metrics = run_as_job("compress-memory", compress_memory_job(dry_run, on_plan=seen.append), now,
                       json_output=as_json)
    if as_json:
        print_json({"metrics": metrics, "plan": seen[0].as_dict() if seen else None})
        return
    if dry_run and seen:
        plan = seen[0]
        table = Table(title=f"Plan ({plan.summarizer}): nothing is written with --dry-run")
        for col in ("session", "exchanges", "topic", "importance", "summary"):
            table.add_column(col, overflow="fold")
        for g in plan.groups:
            table.add_row(g.session_id or "-", str(len(g.memory_ids)), g.label,
                          f"{g.importance:.2f}", (g.summary or "(dropped: would be pruned)")[:200])
        out.print(table)
        out.print(f"prune {len(plan.prune_ids)} long-term memories; clear {len(plan.task_ids)} "
                  "completed tasks")


def register(app: typer.Typer) -> None:
    app.add_typer(memory_app, name="memory")
    app.command("compress-memory")(compress_memory_cmd)
