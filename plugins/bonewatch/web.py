"""`bonewatch serve`: the small web app behind the acknowledgement links in the emails.

`create_app(settings)` returns a FastAPI app (FastAPI and uvicorn ship with Airflow 3); importing
this module starts nothing and touches no database.

    GET  /alerts/{alert_id}?t=TOKEN       the alert, the ack form (your name) and the silence form
    POST /alerts/{alert_id}/ack           t=TOKEN&by=NAME: acknowledge it
    POST /alerts/{alert_id}/silence       t=TOKEN&by=NAME&reason=TEXT&for=14d: silence it (no ack)
    GET  /healthz                         "ok" when the store answers (503 when it does not)
    GET  /dashboard/...                   the data-quality dashboard, behind HTTP Basic (see below)
    GET  /cds-services, POST /cds-services/{id}   the CDS Hooks service for the EHR (`bonewatch.cds`)

The token (see `bonewatch.notify.tokens`) is signed with BONEWATCH_ACK_SECRET, expires, and names
one alert occurrence: it acknowledges (or silences) that alert and nothing else. The GET never
changes anything, because mail security scanners open every link in an email; the click on the
form's button is what acknowledges. Refusals (a tampered, expired or foreign token, an alert
already acknowledged) get a clear page and a 4xx status; pages carry `no-store` and
`no-referrer` so the token does not leak into caches or other sites.

The dashboard (built by `bonewatch dashboard`) is served only when BONEWATCH_DASHBOARD_PASSWORD
is set, to the user `[quality] dashboard_user` with that password (HTTP Basic, compared in
constant time); without it /dashboard answers 404 with a one-line hint. The ack links need no
login: their signed token is the credential.

Every response carries the security headers (`_HEADERS` and a Content-Security-Policy); a request
body over `MAX_BODY_BYTES` is refused with 413 before it is read (declared Content-Length or
counted while a chunked body arrives); an unexpected error is a generic page whose reference
points at one log line with the exception type and code locations, never its message (which can
quote patient data) and never a traceback in the response.
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures at runtime,
# and `Request` is imported inside create_app (importing this module stays cheap).
import base64
import hmac
import logging
import secrets
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote

from bonewatch.config import Settings
from bonewatch.errors import ConfigError

log = logging.getLogger(__name__)

#: The largest request body read (bytes): the ack form is a token and a name, the silence form adds
#: a reason (at most 1000 characters) and a length; a few KiB at most.
MAX_BODY_BYTES = 8 * 1024
DASHBOARD = "/dashboard"

_HEADERS = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY",
            "X-Content-Type-Options": "nosniff"}
# The app's own pages: inline styles only, nothing else loads, the form posts back here.
_CSP_PAGES = ("default-src 'none'; style-src 'unsafe-inline'; img-src data:; form-action 'self'; "
              "base-uri 'none'; frame-ancestors 'none'")
# The dashboard is offline pages: inline <style> and <script> (Plotly's chart calls), scripts
# and styles beside them (plotly.min.js), data: icons and fonts; nothing from another origin.
_CSP_DASHBOARD = ("default-src 'self'; script-src 'self' 'unsafe-inline'; "
                  "style-src 'self' 'unsafe-inline'; img-src 'self' data:; font-src 'self' data:; "
                  "connect-src 'self'; object-src 'none'; base-uri 'self'; form-action 'none'; "
                  "frame-ancestors 'none'")
# GX's Data Docs beside it draw their charts with vega, which compiles expressions with eval.
_CSP_DATADOCS = _CSP_DASHBOARD.replace("'unsafe-inline';", "'unsafe-inline' 'unsafe-eval';", 1)


class _BodyTooLarge(Exception):
    """A chunked request body grew past MAX_BODY_BYTES while it was read."""


class _Guard:
    """ASGI middleware around the whole app: security headers on every response, the body size
    limit, and a generic page (detail in the log, without the message) for any unexpected error.

    In: the app, the body limit, and `page(status, title, message)` returning a Starlette Response.
    """

    def __init__(self, app, *, max_body: int, page, limits: dict[str, int] | None = None):
        self.app, self.max_body, self.page = app, max_body, page
        self.limits = limits or {}      # path prefix -> its own body limit (the CDS Hooks calls)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from starlette.datastructures import Headers, MutableHeaders

        path = scope.get("path", "")
        max_body = next((n for prefix, n in self.limits.items() if path == prefix or path.startswith(prefix + "/")),
                        self.max_body)
        csp = (_CSP_DATADOCS if path.startswith(f"{DASHBOARD}/datadocs/") else
               _CSP_DASHBOARD if path.startswith(f"{DASHBOARD}/") else _CSP_PAGES)
        started = False

        async def send_secured(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = MutableHeaders(scope=message)
                for name, value in _HEADERS.items():
                    headers[name] = value
                headers["Content-Security-Policy"] = csp
            await send(message)

        declared = Headers(scope=scope).get("content-length")
        if declared is not None and not declared.strip().isdigit():
            return await self.page(400, "Bad request", "The request's Content-Length is not a number.")(
                scope, receive, send_secured)
        if declared is not None and int(declared) > max_body:
            return await self._too_large(scope, receive, send_secured, max_body)
        received = 0

        async def receive_limited():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > max_body:
                    raise _BodyTooLarge
            return message

        try:
            await self.app(scope, receive_limited, send_secured)
        except _BodyTooLarge:
            if not started:
                await self._too_large(scope, receive, send_secured, max_body)
        except Exception as exc:  # noqa: BLE001 - the last line before the client: one page, one log line
            from sqlalchemy.exc import OperationalError

            reference = secrets.token_hex(4)
            # Type and code locations only: an exception's message can quote patient data (a
            # database error quotes its parameters), so it stays out of the log too.
            frames = traceback.extract_tb(exc.__traceback__)
            ours = [f for f in frames[:-1] if "bonewatch" in Path(f.filename).parts] + frames[-1:]
            where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(ours))
            log.error("bonewatch serve: %s %s failed with %s (reference %s) at %s",
                      scope.get("method"), path, type(exc).__name__, reference, where)
            if started:
                return   # the response is under way: the server ends the connection
            if isinstance(exc, OperationalError):
                response = self.page(503, "Store unavailable", "The alert store cannot be reached right now. "
                                     f"Try again in a few minutes (reference {reference}).")
            else:
                response = self.page(500, "Something went wrong", "The server could not answer this request; "
                                     f"the detail is in its log (reference {reference}).")
            await response(scope, receive, send_secured)

    async def _too_large(self, scope, receive, send, max_body: int):
        response = self.page(413, "Request too large", f"A request body may be at most {max_body} bytes.")
        response.headers["Connection"] = "close"
        await response(scope, receive, send)


class _Dashboard:
    """ASGI app mounted at /dashboard: the built folder, to the configured user only.

    In: the folder, the user and password (empty password: not served), `page` as for `_Guard`.
    """

    def __init__(self, folder: Path, user: str, password: str, page):
        from fastapi.staticfiles import StaticFiles

        self.folder, self.page = folder, page
        self.user, self.password = user.encode("utf-8"), password.encode("utf-8")
        self.static = StaticFiles(directory=folder, html=True, check_dir=False)

    def authorised(self, header: str | None) -> bool:
        scheme, _, encoded = (header or "").partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, sep, password = base64.b64decode(encoded.strip(), validate=True).partition(b":")
        except ValueError:
            return False
        # both compared, in constant time, whatever the first says
        user_ok = hmac.compare_digest(user, self.user)
        password_ok = hmac.compare_digest(password, self.password)
        return bool(sep) and user_ok and password_ok

    async def __call__(self, scope, receive, send):
        from starlette.datastructures import Headers

        if not self.password:
            response = self.page(404, "Dashboard not served", "The dashboard is off: set "
                                 "BONEWATCH_DASHBOARD_PASSWORD (login user [quality] dashboard_user) and "
                                 "restart bonewatch serve to serve it.")
        elif not self.authorised(Headers(scope=scope).get("authorization")):
            response = self.page(401, "Login required", "The data-quality dashboard needs its login.")
            response.headers["WWW-Authenticate"] = 'Basic realm="bonewatch dashboard", charset="UTF-8"'
        elif not self.folder.is_dir():
            response = self.page(404, "No dashboard yet", "No dashboard has been built yet: run "
                                 "`bonewatch dashboard` (or wait for the nightly run).")
        else:
            return await self.static(scope, receive, send)
        await response(scope, receive, send)


def require_secret(settings: Settings) -> str:
    """The signing key, or a one-line ConfigError saying how to set it."""
    if not settings.notify.ack_secret:
        raise ConfigError("BONEWATCH_ACK_SECRET is not set: the acknowledgement links cannot be checked "
                          "without it (set it to the key the emails were signed with)")
    return settings.notify.ack_secret


def _utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def create_app(settings: Settings, *, engine=None, clock=_utcnow):
    """The FastAPI app. In: settings (with the ack secret), optionally an engine (default: the
    configured store, which must be migrated) and a clock returning naive UTC (tests pin it)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, PlainTextResponse
    from sqlalchemy.exc import OperationalError
    from starlette.exceptions import HTTPException

    from bonewatch import pipeline
    from bonewatch.errors import SilenceError
    from bonewatch.notify import render
    from bonewatch.notify.tokens import TokenExpired, TokenInvalid, ack_link, read_token
    from bonewatch.store import alerts as store_alerts
    from bonewatch.store import silences
    from bonewatch.store.tables import alerts as alerts_table

    secret = require_secret(settings)
    engine = engine or pipeline.engine_for(settings)
    max_age = settings.notify.ack_link_ttl_hours * 3600
    template = render._environment().get_template("ack_page.html.j2")
    app = FastAPI(title="bonewatch acknowledgements", docs_url=None, redoc_url=None, openapi_url=None)

    def page(status: int, title: str, message: str = "", alert: dict | None = None,
             form: dict | None = None) -> HTMLResponse:
        body = template.render(title=title, message=message, alert=alert, form=form, site=settings.site.name,
                               disclaimer=render.DISCLAIMER)
        return HTMLResponse(body, status_code=status, headers=_HEADERS)

    def notice(status: int, title: str, message: str = "") -> HTMLResponse:
        return page(status, title, message)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Any:
        # an unknown path, a method a route does not take, ...: a short page, never JSON internals
        titles = {404: "Not found", 405: "Method not allowed"}
        response = notice(exc.status_code, titles.get(exc.status_code, "Request refused"),
                          "There is nothing here for this request." if exc.status_code == 404 else "")
        for name, value in (exc.headers or {}).items():
            response.headers[name] = value
        return response

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> Any:
        return notice(400, "Bad request", "The request's parameters are not valid.")

    def load(alert_id: str) -> dict | None:
        from sqlalchemy import select

        with engine.connect() as conn:
            row = conn.execute(select(alerts_table).where(alerts_table.c.alert_id == alert_id)).mappings().first()
        if row is None:
            return None
        view = dict(row)
        evidence = render._evidence_dict(view.get("evidence"))
        view["summary"] = render._fmt(evidence.get("summary")) if evidence.get("summary") else ""
        return view

    def check(alert_id: str, token: str | None) -> tuple[dict | None, HTMLResponse | None]:
        """The alert the token opens, or the refusal page."""
        if not token:
            return None, page(403, "Link incomplete", "This link carries no acknowledgement token. Open the "
                                  "link from the email as it is, or acknowledge with "
                                  f"`bonewatch ack {alert_id} --by <your name>`.")
        try:
            token_alert, raised_on = read_token(secret, token, max_age_s=max_age, now=clock())
        except TokenExpired:
            return None, page(403, "Link expired", "This acknowledgement link has expired. Use the link in a "
                                  f"newer email, or acknowledge with `bonewatch ack {alert_id} --by <your name>`.")
        except TokenInvalid:
            return None, page(403, "Link not valid", "This acknowledgement link is not valid: it was altered "
                                  "or is incomplete. Nothing was acknowledged.")
        if token_alert != alert_id:
            return None, page(403, "Link not valid for this alert", "This link belongs to another alert and "
                                  "cannot acknowledge this one. Nothing was acknowledged.")
        alert = load(alert_id)
        if alert is None:
            return None, page(404, "No such alert", "The store holds no alert with this id.")
        if alert["raised_on"] != raised_on:
            return None, page(403, "Link for an earlier occurrence", "This link was sent for an earlier "
                                  "occurrence of this alert, which has since been resolved and found again. "
                                  "Use the link in the newest email.", alert)
        if alert["status"] == "acknowledged":
            when = alert["acknowledged_at"].strftime("%Y-%m-%d %H:%M UTC") if alert["acknowledged_at"] else ""
            return None, page(409, "Already acknowledged", f"This alert was already acknowledged by "
                                  f"{alert['acknowledged_by']} ({when}). A link acknowledges once.", alert)
        if alert["status"] == "resolved":
            return None, page(409, "Already resolved", f"The condition cleared on {alert['resolved_on']}: "
                                  "there is nothing left to acknowledge.", alert)
        return alert, None

    @app.api_route("/healthz", methods=["GET", "HEAD"], response_class=PlainTextResponse)
    def healthz() -> Any:
        from sqlalchemy import text

        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except OperationalError:
            return PlainTextResponse("store unavailable", status_code=503, headers=_HEADERS)
        return PlainTextResponse("ok", headers=_HEADERS)

    # the silence form's choices: a few lengths a nurse picks from, none over the configured maximum
    lengths = [n for n in ("1d", "3d", "7d", "14d", "30d", "90d")
               if int(n[:-1]) <= settings.notify.silence_max_days] or ["1d"]

    def form(alert_id: str, token: str, by: str = "", reason: str = "", length: str = "14d") -> dict:
        return {"action": f"/alerts/{quote(alert_id)}/ack", "token": token, "by": by,
                "silence_action": f"/alerts/{quote(alert_id)}/silence", "reason": reason,
                "lengths": lengths, "length": length if length in lengths else lengths[-1]}

    def with_silence(alert: dict) -> dict:
        with engine.connect() as conn:
            held = silences.silenced_alerts(conn, clock(), [alert]).get(alert["alert_id"])
        return {**alert, "silenced": held}

    @app.api_route("/alerts/{alert_id}", methods=["GET", "HEAD"], response_class=HTMLResponse)
    def show(alert_id: str, t: str | None = None) -> Any:
        alert, refusal = check(alert_id, t)
        if refusal is not None:
            return refusal
        return page(200, "Acknowledge this alert", "", with_silence(alert), form(alert_id, t))

    @app.post("/alerts/{alert_id}/silence", response_class=HTMLResponse)
    async def silence(alert_id: str, request: Request) -> Any:
        # the same signed token as the ack form: it is the credential, in the body, never a cookie
        fields = parse_qs((await request.body()).decode("utf-8", "replace"), keep_blank_values=True)
        token = (fields.get("t") or [""])[0]
        by = " ".join((fields.get("by") or [""])[0].split())[:128]
        reason = " ".join((fields.get("reason") or [""])[0].split())[:1000]
        length = (fields.get("for") or [""])[0].strip()
        alert, refusal = check(alert_id, token)
        if refusal is not None:
            return refusal
        if not by or not reason:
            return page(400, "Your name and a reason are needed", "Enter your name and why the alert is "
                        "handled outside bonewatch to silence it.", alert, form(alert_id, token, by, reason, length))
        try:
            duration = silences.parse_duration(length, settings.notify.silence_max_days)
            with engine.begin() as conn:
                made = silences.create(conn, alert_id=alert_id, duration=duration, reason=reason, by=by,
                                       at=clock(), via="web")
        except SilenceError as exc:
            return page(400, "Not silenced", str(exc).replace("--for ", "The length "), alert,
                        form(alert_id, token, by, reason, length))
        return page(200, "Silenced", f"Alert {alert_id} silenced by {by} until "
                    f"{made['ends_at']:%Y-%m-%d %H:%M} UTC (silence {made['silence_id']}). It is not emailed "
                    "until then, and comes back afterwards if its condition still holds.",
                    with_silence(load(alert_id)))

    @app.post("/alerts/{alert_id}/ack", response_class=HTMLResponse)
    async def acknowledge(alert_id: str, request: Request) -> Any:
        # A plain urlencoded form; parsed here so the app needs no multipart library.
        fields = parse_qs((await request.body()).decode("utf-8", "replace"), keep_blank_values=True)
        token = (fields.get("t") or [""])[0]
        by = " ".join((fields.get("by") or [""])[0].split())[:128]
        alert, refusal = check(alert_id, token)
        if refusal is not None:
            return refusal
        if not by:
            return page(400, "Your name is needed", "Enter your name to acknowledge the alert.", alert,
                        {"action": f"/alerts/{quote(alert_id)}/ack", "token": token, "by": ""})
        with engine.begin() as conn:
            previous = store_alerts.acknowledge(conn, alert_id, by, clock(), via="web")
        if previous not in ("open", "notified"):
            # lost a race with another acknowledgement (or a resolution): say what it is now
            return check(alert_id, token)[1] or page(409, "Not acknowledged", "The alert changed meanwhile.")
        return page(200, "Acknowledged", f"Alert {alert_id} acknowledged by {by}. It will not be re-sent.",
                    load(alert_id))

    # the data-quality dashboard (static, built by `bonewatch dashboard`), behind its login
    from bonewatch.dashboard.build import default_folder

    app.mount(DASHBOARD, _Dashboard(default_folder(settings), settings.quality.dashboard_user,
                                    settings.quality.dashboard_password, notice), name="dashboard")
    # the CDS Hooks service for the EHR (bonewatch.cds): hook calls carry prefetched FHIR data
    from bonewatch.cds import service as cds

    cds.mount(app, settings, engine, clock=clock, ack_url=lambda a: ack_link(
        settings.site.ack_base_url, secret, a["alert_id"], a["raised_on"], issued_at=clock()))
    app.add_middleware(_Guard, max_body=MAX_BODY_BYTES, page=notice,
                       limits={cds.PREFIX: settings.cds_hooks.max_body_bytes})
    return app


def serve(settings: Settings, host: str, port: int) -> None:
    """Run the app with uvicorn until interrupted (the `bonewatch serve` command)."""
    import uvicorn

    app = create_app(settings)
    # warning: no access log (the ack links carry their token in the query string); no Server header
    uvicorn.run(app, host=host, port=port, log_level="warning", server_header=False)
