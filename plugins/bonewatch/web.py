"""`bonewatch serve`: the small web app behind the acknowledgement links in the emails.

`create_app(settings)` returns a FastAPI app (FastAPI and uvicorn ship with Airflow 3); importing
this module starts nothing and touches no database.

    GET  /alerts/{alert_id}?t=TOKEN       the alert and a one-field form (your name)
    POST /alerts/{alert_id}/ack           t=TOKEN&by=NAME: acknowledge it
    GET  /healthz                         "ok" when the store answers

The token (see `bonewatch.notify.tokens`) is signed with BONEWATCH_ACK_SECRET, expires, and names
one alert occurrence: it acknowledges that alert and nothing else, and only once. The GET never
changes anything, because mail security scanners open every link in an email; the click on the
form's button is what acknowledges. Refusals (a tampered, expired or foreign token, an alert
already acknowledged) get a clear page and a 4xx status; pages carry `no-store` and
`no-referrer` so the token does not leak into caches or other sites.
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures at runtime,
# and `Request` is imported inside create_app (importing this module stays cheap).
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, quote

from bonewatch.config import Settings
from bonewatch.errors import ConfigError

_HEADERS = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY",
            "X-Content-Type-Options": "nosniff"}


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
    from fastapi.responses import HTMLResponse, PlainTextResponse

    from bonewatch import pipeline
    from bonewatch.notify import render
    from bonewatch.notify.tokens import TokenExpired, TokenInvalid, read_token
    from bonewatch.store import alerts as store_alerts
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

    @app.get("/healthz", response_class=PlainTextResponse)
    def healthz() -> Any:
        from sqlalchemy import text

        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return PlainTextResponse("ok", headers=_HEADERS)

    @app.get("/alerts/{alert_id}", response_class=HTMLResponse)
    def show(alert_id: str, t: str | None = None) -> Any:
        alert, refusal = check(alert_id, t)
        if refusal is not None:
            return refusal
        return page(200, "Acknowledge this alert", "", alert,
                    {"action": f"/alerts/{quote(alert_id)}/ack", "token": t, "by": ""})

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

    # the data-quality dashboard (static, built by `bonewatch dashboard`) under /dashboard
    from bonewatch.dashboard.build import mount

    mount(app, settings)
    return app


def serve(settings: Settings, host: str, port: int) -> None:
    """Run the app with uvicorn until interrupted (the `bonewatch serve` command)."""
    import uvicorn

    app = create_app(settings)
    uvicorn.run(app, host=host, port=port, log_level="warning")
