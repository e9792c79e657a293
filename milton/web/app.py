"""The dashboard's routes: pages (GET) and actions (POST, each with a CSRF token).

Pages are server-rendered Jinja2 (autoescaped: process names, chat text and memory content
come from outside and are shown literally) under a Content-Security-Policy that allows no
script at all; the charts are SVG. Actions redirect back to their page (POST/redirect/GET).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import jinja2
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from milton.core.config import Settings
from milton.core.errors import MiltonError
from milton.core.store import open_store
from milton.core.timeutil import utcnow
from milton.web import PREFIX, pages
from milton.web.auth import COOKIE, SESSION_HOURS, Session, Sessions

HERE = Path(__file__).parent
SECURITY_HEADERS = {
    # No script anywhere; styles and images from the dashboard itself (charts are inline SVG).
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self' data:; "
                               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
NAV = (("overview", "Overview", f"{PREFIX}/"), ("anomalies", "Anomalies", f"{PREFIX}/anomalies"),
       ("learning", "Learning", f"{PREFIX}/learning"), ("memory", "Memory", f"{PREFIX}/memory"),
       ("jobs", "Jobs", f"{PREFIX}/jobs"))


def templates() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    env.globals.update(nav=NAV, prefix=PREFIX, when=pages.when)
    env.filters["num"] = lambda v, spec=".3f": "-" if v is None else (
        format(v, spec) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v))
    env.filters["pct"] = lambda v: (f"{100 * v:.0f}%" if isinstance(v, (int, float))
                                    and not isinstance(v, bool) else "-")
    return env


class Dashboard:
    """The routes, with the settings, the session keys and a lazily loaded embedder."""

    def __init__(self, settings: Settings, app: FastAPI) -> None:
        self.settings = settings
        self.app = app
        self.sessions = Sessions(settings.serve.api_key.get_secret_value())
        self.env = templates()
        self._embedder: Any = None
        self._embedder_lock = threading.Lock()

    # -- resources ------------------------------------------------------------------------
    def embedder(self) -> Any:
        with self._embedder_lock:
            if self._embedder is None:
                from milton.memory.embed import embedder_for

                self._embedder = embedder_for(self.settings.memory)
            return self._embedder

    def with_store(self, fn: Callable[[Any], Any]) -> Any:
        db = open_store(self.settings.db_path, self.settings.store.busy_timeout_ms)
        try:
            return fn(db)
        finally:
            db.close()

    # -- who is asking --------------------------------------------------------------------
    def _bearer(self, request: Request) -> bool:
        return self.sessions.login_required and self.sessions.bearer_ok(
            request.headers.get("authorization"))

    def _session(self, request: Request) -> Session | None:
        return self.sessions.read(request.cookies.get(COOKIE))

    def _set_cookie(self, response: Response, value: str) -> None:
        response.set_cookie(COOKIE, value, max_age=SESSION_HOURS * 3600, path=PREFIX,
                            httponly=True, samesite="strict")

    def _secure(self, response: Response) -> Response:
        response.headers.update(SECURITY_HEADERS)
        return response

    def render(self, request: Request, template: str, context: dict[str, Any], *,
               status: int = 200, session: Session | None = None, cookie: str | None = None) -> Response:
        html = self.env.get_template(template).render(
            request=request, csrf=self.sessions.csrf_token(session) if session else "",
            logged_in=self.sessions.login_required and bool(session and session.authenticated),
            done=request.query_params.get("done", ""), page=template.removesuffix(".html"),
            **context)
        response = HTMLResponse(html, status_code=status)
        if cookie:
            self._set_cookie(response, cookie)
        return self._secure(response)

    async def page(self, request: Request, template: str,
                   build: Callable[[], dict[str, Any]]) -> Response:
        """A GET page: login first when a key is set; a session (for CSRF) made when missing."""
        session, cookie = self._session(request), None
        if self.sessions.login_required and not self._bearer(request) and not (
                session and session.authenticated):
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return self._secure(RedirectResponse(f"{PREFIX}/login?next={quote(target)}", 303))
        if session is None:
            session, cookie = self.sessions.issue(authenticated=not self.sessions.login_required)
        try:
            context = await run_in_threadpool(build)
        except MiltonError as exc:
            return self.render(request, "error.html", {"message": str(exc)}, status=400,
                               session=session, cookie=cookie)
        return self.render(request, template, context, session=session, cookie=cookie)

    async def action(self, request: Request, act: Callable[[dict[str, str]], str],
                     back: Callable[[dict[str, str]], str]) -> Response:
        """A POST: authenticated, same origin, with its session's CSRF token; then ``act``
        (returns what it did) and a redirect to ``back``."""
        form = {k: str(v) for k, v in (await request.form()).items()}
        refusal = self.refuse(request, form)
        if refusal is not None:
            return refusal
        try:
            done = await run_in_threadpool(act, form)
        except MiltonError as exc:
            return self.render(request, "error.html", {"message": str(exc)}, status=400,
                               session=self._session(request))
        target = back(form)
        separator = "&" if "?" in target else "?"
        return self._secure(RedirectResponse(f"{target}{separator}{urlencode({'done': done})}", 303))

    def refuse(self, request: Request, form: dict[str, str]) -> Response | None:
        """403 for a state-changing request that is not the dashboard's own."""
        if self._bearer(request):
            return None
        origin = request.headers.get("origin")
        if origin and origin != "null" and origin.split("://", 1)[-1] != request.headers.get("host"):
            return self._forbidden(request, "cross-origin request refused")
        session = self._session(request)
        if self.sessions.login_required and request.url.path != f"{PREFIX}/login" and not (
                session and session.authenticated):
            return self._forbidden(request, "not logged in")
        if not self.sessions.csrf_ok(session, form.get("csrf")):
            return self._forbidden(request, "missing or wrong CSRF token: reload the page and try again")
        return None

    def _forbidden(self, request: Request, message: str) -> Response:
        return self.render(request, "error.html", {"message": message}, status=403)


def _int(value: str | None, field: str) -> int | None:
    from milton.core.errors import InputError

    if value in (None, ""):
        return None
    try:
        return int(value)  # type: ignore[arg-type]
    except ValueError:
        raise InputError(f"{field}: expected a whole number, got {value!r}") from None


def mount_dashboard(app: FastAPI, settings: Settings) -> None:
    """Add the dashboard's routes and static files under /ui to serve's app."""
    ui = Dashboard(settings, app)
    router = APIRouter(prefix=PREFIX, include_in_schema=False)

    @router.get("")
    def root() -> Response:
        return RedirectResponse(f"{PREFIX}/", 307)

    # -- login --------------------------------------------------------------------------
    @router.get("/login")
    def login_form(request: Request, next: str = f"{PREFIX}/") -> Response:
        session, cookie = ui._session(request), None
        if session is None:
            session, cookie = ui.sessions.issue(authenticated=not ui.sessions.login_required)
        return ui.render(request, "login.html", {"next": next, "error": ""}, session=session,
                         cookie=cookie)

    @router.post("/login")
    async def login(request: Request) -> Response:
        form = {k: str(v) for k, v in (await request.form()).items()}
        refusal = ui.refuse(request, form)
        if refusal is not None:
            return refusal
        target = form.get("next") or f"{PREFIX}/"
        if not target.startswith(f"{PREFIX}/") or target.startswith("//"):
            target = f"{PREFIX}/"
        if not ui.sessions.key_ok(form.get("key")):
            return ui.render(request, "login.html", {"next": target, "error": "wrong key"},
                             status=401, session=ui._session(request))
        _, cookie = ui.sessions.issue(authenticated=True)
        response = RedirectResponse(target, 303)
        ui._set_cookie(response, cookie)
        return ui._secure(response)

    @router.post("/logout")
    async def logout(request: Request) -> Response:
        form = {k: str(v) for k, v in (await request.form()).items()}
        refusal = ui.refuse(request, form)
        if refusal is not None:
            return refusal
        response = RedirectResponse(f"{PREFIX}/login", 303)
        response.delete_cookie(COOKIE, path=PREFIX)
        return ui._secure(response)

    # -- pages --------------------------------------------------------------------------
    @router.get("/")
    async def overview(request: Request) -> Response:
        return await ui.page(request, "overview.html", lambda: pages.overview(settings, utcnow()))

    @router.get("/anomalies")
    async def anomalies(request: Request, q: str = "") -> Response:
        def build() -> dict[str, Any]:
            from milton.serve.anomaly import anomaly_telemetry

            serving = anomaly_telemetry(app.state.hot) if hasattr(app.state, "hot") else None
            return ui.with_store(lambda db: pages.anomalies(
                settings, db.conn, utcnow(), query=q.strip() or None, serving=serving))
        return await ui.page(request, "anomalies.html", build)

    @router.get("/learning")
    async def learning(request: Request, run: str = "", evolve: str = "") -> Response:
        return await ui.page(request, "learning.html", lambda: ui.with_store(lambda db: pages.learning(
            settings, db, run_id=_int(run, "run"), evolve_id=_int(evolve, "evolve"))))

    @router.get("/memory")
    async def memory(request: Request, q: str = "", k: str = "10", tier: str = "", since: str = "",
                     tag: str = "", mode: str = "hybrid") -> Response:
        return await ui.page(request, "memory.html", lambda: ui.with_store(lambda db: pages.memory(
            settings, db, utcnow(), ui.embedder, query=q.strip() or None, k=_int(k, "k") or 10,
            tier=tier or None, since=since or None, tag=tag or None, mode=mode)))

    @router.get("/memory/{memory_id}")
    async def memory_detail(request: Request, memory_id: int) -> Response:
        return await ui.page(request, "memory_detail.html",
                             lambda: ui.with_store(lambda db: pages.memory_detail(db, memory_id)))

    @router.get("/sessions/{session_id}")
    async def session_detail(request: Request, session_id: str) -> Response:
        return await ui.page(request, "session.html",
                             lambda: ui.with_store(lambda db: pages.session_detail(db, session_id)))

    @router.get("/jobs")
    async def jobs(request: Request, job: str = "", days: str = "30") -> Response:
        def build() -> dict[str, Any]:
            from milton.core.errors import InputError

            try:
                window = float(days)
            except ValueError:
                raise InputError(f"days: expected a number, got {days!r}") from None
            return ui.with_store(lambda db: pages.jobs(db.conn, utcnow(), job=job or None, days=window))
        return await ui.page(request, "jobs.html", build)

    @router.get("/jobs/{run_id}")
    async def job_detail(request: Request, run_id: int) -> Response:
        return await ui.page(request, "job.html",
                             lambda: ui.with_store(lambda db: pages.job_detail(db.conn, run_id)))

    # -- actions ------------------------------------------------------------------------
    @router.post("/alerts/ack")
    async def ack(request: Request) -> Response:
        def act(form: dict[str, str]) -> str:
            from milton.anomaly.alerts import acknowledge

            ids = None if form.get("all") else [_int(form.get("id"), "id") or 0]
            n = ui.with_store(lambda db: acknowledge(db, ids, utcnow().timestamp()))
            return f"Acknowledged {n} alert(s)."
        return await ui.action(request, act, lambda f: f"{PREFIX}/anomalies")

    @router.post("/alerts/mute")
    async def mute(request: Request) -> Response:
        def act(form: dict[str, str]) -> str:
            from milton.anomaly.alerts import mute as mute_name
            from milton.core.errors import InputError

            name, host = form.get("name", ""), form.get("host") or None
            if not name:
                raise InputError("mute: a process name is needed")
            added = ui.with_store(lambda db: mute_name(db, name, host, utcnow().timestamp()))
            return f"{'Muted' if added else 'Already muted'}: {name} " + (
                f"on {host}" if host else "on every host")
        return await ui.action(request, act, lambda f: f"{PREFIX}/anomalies")

    @router.post("/alerts/unmute")
    async def unmute(request: Request) -> Response:
        def act(form: dict[str, str]) -> str:
            from milton.anomaly.alerts import unmute as unmute_name
            from milton.core.errors import InputError

            name, host = form.get("name", ""), form.get("host") or None
            if not ui.with_store(lambda db: unmute_name(db, name, host)):
                raise InputError(f"not muted: {name!r}")
            return f"Unmuted: {name}"
        return await ui.action(request, act, lambda f: f"{PREFIX}/anomalies")

    @router.post("/models/{kind}/{verb}")
    async def model_action(request: Request, kind: str, verb: str) -> Response:
        def act(form: dict[str, str]) -> str:
            from milton.core.artifacts import known_kinds
            from milton.core.errors import InputError
            from milton.models.layout import artifact_store

            if kind not in known_kinds(settings.paths.checkpoints_dir):
                raise InputError(f"models: no model kind {kind!r}")
            store = artifact_store(settings, kind)
            version = form.get("version") or None
            if verb == "promote" and version:
                return f"{kind}: current is now {store.set_current(version, reason='promote').name}"
            if verb == "rollback":
                return f"{kind}: current is now {store.rollback(version).name}"
            if verb in ("pin", "unpin") and version:
                store.pin(version, pinned=verb == "pin")
                return f"{kind}/{version}: {verb}ned"
            raise InputError(f"models: cannot {verb} {kind} {version or ''}".strip())
        return await ui.action(request, act, lambda f: f"{PREFIX}/learning")

    @router.post("/memory/{memory_id}/delete")
    async def delete_memory(request: Request, memory_id: int) -> Response:
        def act(form: dict[str, str]) -> str:
            from milton.core.errors import InputError
            from milton.memory.memories import delete_memories

            if not ui.with_store(lambda db: delete_memories(db, [memory_id])):
                raise InputError(f"memory {memory_id}: no such memory")
            return f"Deleted memory {memory_id}."
        return await ui.action(request, act, lambda f: f"{PREFIX}/memory")

    app.include_router(router)
    app.mount(f"{PREFIX}/static", StaticFiles(directory=HERE / "static"), name="ui-static")
