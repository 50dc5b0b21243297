"""The HTTP side of the CDS Hooks service, mounted into `bonewatch serve`'s app (`mount`).

    GET  /cds-services                              discovery (needs the JWT unless public_discovery)
    POST /cds-services/bonewatch-patient-view       patient-view
    POST /cds-services/bonewatch-order-sign         order-sign

Answers are JSON. Without a valid JWT of a trusted EHR: 401 with the reason (and
`WWW-Authenticate: Bearer`); a body that is not a hook call of that service: 400; an unknown
service: 404. The log gets one line a call (service, cards, milliseconds) and the reason of a
refusal, never the patient's id or anything from the request body.
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures at runtime, and
# `Request` is imported inside `mount` (importing this module stays cheap), as in `bonewatch.web`.
import json
import logging
import time
from typing import Any

from bonewatch.cds import hooks
from bonewatch.cds.auth import Unauthorized, Verifier
from bonewatch.config import Settings

log = logging.getLogger(__name__)

PREFIX = "/cds-services"
SERVICES = {hooks.PATIENT_VIEW: "patient-view", hooks.ORDER_SIGN: "order-sign"}


def base_url(settings: Settings) -> str:
    """The service's public base URL (the JWT audience is built on it)."""
    return (settings.cds_hooks.base_url or settings.site.ack_base_url).rstrip("/")


def _json(body: Any, status: int = 200, headers: dict | None = None):
    from starlette.responses import Response

    return Response(json.dumps(body, default=str), status_code=status, headers=headers,
                    media_type="application/json")


def _problem(status: int, message: str):
    headers = {"WWW-Authenticate": 'Bearer realm="bonewatch cds-hooks"'} if status == 401 else None
    return _json({"error": message}, status, headers)


def _bad_request(body: bytes, hook: str) -> tuple[dict | None, str]:
    """The parsed hook call, or why it is not one."""
    try:
        request = json.loads(body)
    except (ValueError, RecursionError):
        return None, "the body is not JSON"
    if not isinstance(request, dict):
        return None, "the body is not a JSON object"
    if request.get("hook") != hook:
        return None, f"this service answers the {hook} hook"
    if not isinstance(request.get("hookInstance"), str) or not request["hookInstance"]:
        return None, "hookInstance is missing"
    context = request.get("context")
    if not isinstance(context, dict) or not isinstance(context.get("patientId"), str) or not context["patientId"]:
        return None, "context.patientId is missing"
    if hook == "order-sign" and not isinstance(context.get("draftOrders"), dict):
        return None, "context.draftOrders (a Bundle) is missing"
    if request.get("prefetch") is not None and not isinstance(request["prefetch"], dict):
        return None, "prefetch is not an object"
    return request, ""


def mount(app, settings: Settings, engine, *, clock, ack_url) -> None:
    """Add the CDS Hooks routes to the FastAPI `app`. `clock()` gives naive UTC; `ack_url(alert)`
    the acknowledgement link of an alert row."""
    from fastapi import Request
    from starlette.concurrency import run_in_threadpool

    verifier = Verifier(settings.cds_hooks)
    base = base_url(settings)
    if settings.cds_hooks.cors_origins:
        app.add_middleware(_Cors, origins=list(settings.cds_hooks.cors_origins))

    @app.get(PREFIX, include_in_schema=False)
    def discover(request: Request) -> Any:
        if not settings.cds_hooks.public_discovery:
            try:
                verifier.verify(request.headers.get("authorization"), f"{base}{PREFIX}")
            except Unauthorized as exc:
                log.warning("cds-hooks discovery refused: %s", exc)
                return _problem(401, str(exc))
        return _json(hooks.discovery())

    @app.post(PREFIX + "/{service_id}", include_in_schema=False)
    async def call(service_id: str, request: Request) -> Any:
        hook = SERVICES.get(service_id)
        if hook is None:
            return _problem(404, "no such CDS service (see GET /cds-services)")
        try:
            verifier.verify(request.headers.get("authorization"), f"{base}{PREFIX}/{service_id}")
        except Unauthorized as exc:
            log.warning("cds-hooks %s refused: %s", service_id, exc)
            return _problem(401, str(exc))
        payload, problem = _bad_request(await request.body(), hook)
        if payload is None:
            return _problem(400, problem)
        started = time.perf_counter()
        answer = await run_in_threadpool(_answer, engine, settings, hook, payload, clock(), ack_url)
        log.info("cds-hooks %s: %d card(s) in %.0f ms", service_id, len(answer["cards"]),
                 (time.perf_counter() - started) * 1000)
        return _json(answer)


class _Cors:
    """CORS (Starlette's middleware) for the CDS Hooks paths only, for the configured origins: a
    browser-based CDS client (the CDS Hooks sandbox) calls from its own origin; the acknowledgement
    pages and the dashboard stay same-origin."""

    def __init__(self, app, origins: list[str]):
        from starlette.middleware.cors import CORSMiddleware

        self.app = app
        self.cors = CORSMiddleware(app, allow_origins=origins, allow_methods=["GET", "POST"],
                                   allow_headers=["Authorization", "Content-Type"], max_age=600)

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "") if scope["type"] == "http" else ""
        target = self.cors if path == PREFIX or path.startswith(PREFIX + "/") else self.app
        await target(scope, receive, send)


def _answer(engine, settings: Settings, hook: str, payload: dict, now, ack_url) -> dict:
    with engine.connect() as conn:
        if hook == "patient-view":
            return hooks.patient_view(conn, settings, payload, now, ack_url)
        return hooks.order_sign(conn, settings, payload, now)
