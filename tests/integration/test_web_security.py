"""`bonewatch serve` as a hostile client sees it: the dashboard only behind its login (or off),
no 500 and no traceback for odd paths, methods or a missing dashboard, request bodies refused
before they are read when too large, and the security headers on every response. The app runs
under uvicorn in a thread (raw sockets where a client would normalise the request) or is called
as an ASGI app where the test must count what it reads."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import socket
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, date, datetime, timedelta

import httpx
import pytest

from bonewatch import pipeline
from bonewatch.config import load_settings, with_overrides
from bonewatch.notify.tokens import make_token
from bonewatch.web import MAX_BODY_BYTES, create_app
from tests.integration.alerting import SECRET, alert_row, insert_alerts, served

PASSWORD = "dashboard-Pw-0123456789"
NIGHT = date(2025, 6, 5)
HEADERS = {"cache-control": "no-store", "referrer-policy": "no-referrer", "x-frame-options": "DENY",
           "x-content-type-options": "nosniff"}
PLANTED = "DOE JOHN MRN 44556677"


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def _settings(tmp, password: str = "", dashboard: str = "dq"):
    env = {"BONEWATCH_DATA_DIR": str(tmp), "BONEWATCH_ACK_SECRET": SECRET}
    if password:
        env["BONEWATCH_DASHBOARD_PASSWORD"] = password
    return with_overrides(load_settings(env=env), quality__dashboard_dir=str(tmp / dashboard))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A migrated SQLite store with one notified alert: (folder, engine, alert id)."""
    tmp = tmp_path_factory.mktemp("web")
    engine = pipeline.engine_for(_settings(tmp), migrate=True)
    hold = alert_row("000123", "RENAL_HOLD", "high", status="notified")
    insert_alerts(engine, hold)
    dashboard = tmp / "dq"
    dashboard.mkdir()
    (dashboard / "index.html").write_text("<html><body>the dashboard index</body></html>", "utf-8")
    yield tmp, engine, hold["alert_id"]
    engine.dispose()


@pytest.fixture(scope="module")
def open_site(store):
    """Served without a dashboard password (the dashboard is off)."""
    tmp, engine, alert = store
    with served(create_app(_settings(tmp), engine=engine)) as base:
        yield base, alert


@pytest.fixture(scope="module")
def locked_site(store):
    """Served with a dashboard password: (base url, alert id)."""
    tmp, engine, alert = store
    with served(create_app(_settings(tmp, PASSWORD), engine=engine)) as base:
        yield base, alert


def _login(user: str = "data-team", password: str = PASSWORD) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def _secured(response: httpx.Response) -> None:
    for name, value in HEADERS.items():
        assert response.headers.get(name) == value, (response.request.url, name)
    assert "default-src" in response.headers.get("content-security-policy", ""), response.request.url


def _raw(base: str, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send bytes as they are (no client normalises the path) and read the whole answer."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
            if b"\r\n\r\n" in data:
                head, _, body = data.partition(b"\r\n\r\n")
                length = [int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:")]
                if length and len(body) >= length[0]:
                    break
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


# ---- the dashboard: off, or behind its login ------------------------------------------------------

def test_the_dashboard_is_off_without_a_password(open_site):
    base, _ = open_site
    with httpx.Client() as client:
        for path in ("/dashboard/", "/dashboard/index.html"):
            response = client.get(base + path, headers=_login())
            assert response.status_code == 404, path
            assert "set BONEWATCH_DASHBOARD_PASSWORD" in response.text and "the dashboard index" not in response.text
            _secured(response)


def test_the_dashboard_needs_its_login_and_the_ack_links_do_not(locked_site):
    base, alert = locked_site
    with httpx.Client() as client:
        refused = {"none": {}, "wrong password": _login(password=PASSWORD + "x"),
                   "wrong user": _login(user="nurse"), "not basic": {"Authorization": f"Bearer {PASSWORD}"},
                   "garbage": {"Authorization": "Basic !!!notbase64"}}
        for name, headers in refused.items():
            response = client.get(f"{base}/dashboard/", headers=headers)
            assert response.status_code == 401, name
            assert response.headers["www-authenticate"].startswith("Basic realm="), name
            assert "the dashboard index" not in response.text, name
            _secured(response)
        shown = client.get(f"{base}/dashboard/", headers=_login())
        assert shown.status_code == 200 and "the dashboard index" in shown.text
        _secured(shown)
        # the ack links carry their own credential (the signed token): no login asked
        token = make_token(SECRET, alert, NIGHT, issued_at=_now())
        page = client.get(f"{base}/alerts/{alert}", params={"t": token})
        assert page.status_code == 200 and "Acknowledge this alert" in page.text
        _secured(page)


def test_no_dashboard_yet_is_a_page_that_says_so(store):
    tmp, engine, _ = store
    app = create_app(_settings(tmp, PASSWORD, dashboard="not-built-yet"), engine=engine)
    with served(app) as base, httpx.Client() as client:
        response = client.get(f"{base}/dashboard/", headers=_login())
    assert response.status_code == 404 and "run `bonewatch dashboard`" in response.text
    _secured(response)


# ---- hostile paths and methods: never a 500, never a traceback -----------------------------------

HOSTILE = [
    ("GET", "/dashboard/../../etc/passwd"),
    ("GET", "/dashboard/..%2f..%2f..%2fetc%2fpasswd"),
    ("GET", "/dashboard/%2e%2e/%2e%2e/%2e%2e/etc/passwd"),
    ("GET", "/dashboard/%2e%2e%2f%2e%2e%2f%2e%2e%2fetc%2fpasswd"),
    ("GET", "/dashboard/..\\..\\..\\etc\\passwd"),
    ("GET", "/%2e%2e/%2e%2e/etc/passwd"),
    ("GET", "/dashboard//etc/passwd"),
    ("GET", "/dashboard/%00"),
    ("GET", "/dashboard/" + "a" * 5000),
    ("GET", "/nothing-here"),
    ("GET", "/alerts/"),
    ("GET", "/alerts/%ff%fe?t=%ff%00"),
    ("HEAD", "/healthz"),
    ("HEAD", "/dashboard/"),
    ("HEAD", "/alerts/x?t=y"),
    ("OPTIONS", "/alerts/x"),
    ("PUT", "/healthz"),
    ("DELETE", "/alerts/x/ack"),
    ("TRACE", "/"),
    ("PATCH", "/dashboard/index.html"),
    ("POST", "/dashboard/"),
    ("BREW", "/healthz"),
]


@pytest.mark.parametrize("login", [False, True], ids=["anonymous", "logged-in"])
def test_hostile_paths_and_methods_get_a_plain_answer(locked_site, login):
    base, _ = locked_site
    auth = ("Authorization: " + _login()["Authorization"] + "\r\n") if login else ""
    for method, path in HOSTILE:
        status, headers, body = _raw(base, f"{method} {path} HTTP/1.1\r\nHost: bonewatch\r\n{auth}"
                                           "Content-Length: 0\r\nConnection: close\r\n\r\n".encode())
        assert status < 500, (method, path, status)
        assert b"Traceback" not in body and b'File "' not in body and b"root:" not in body, (method, path)
        if (status, body) == (400, b"Invalid HTTP request received."):
            continue                      # refused by uvicorn's HTTP parser before reaching the app
        for name, value in HEADERS.items():
                assert headers.get(name) == value, (method, path, name)


def test_the_missing_dashboard_folder_is_never_a_500(open_site, store):
    base, _ = open_site
    tmp, engine, _ = store
    app = create_app(_settings(tmp, PASSWORD, dashboard="absent"), engine=engine)
    with served(app) as locked:
        for where in (base, locked):
            for path in ("/dashboard/", "/dashboard/%00", "/dashboard/../x"):
                status, _, body = _raw(where, f"GET {path} HTTP/1.1\r\nHost: b\r\n{_auth_line()}"
                                              "Connection: close\r\n\r\n".encode())
                assert status == 404 and b"Traceback" not in body, (where, path)


def _auth_line() -> str:
    return "Authorization: " + _login()["Authorization"] + "\r\n"


class _Exploding:
    """An engine whose every connection fails with a message that quotes patient data."""

    def __init__(self, error: Exception):
        self.error = error

    def connect(self):
        raise self.error

    begin = connect


def test_an_unexpected_error_is_a_generic_page_and_one_log_line_without_its_message(store, caplog, capfd):
    from sqlalchemy.exc import OperationalError

    tmp, _, alert = store
    token = make_token(SECRET, alert, NIGHT, issued_at=_now())
    crashing = create_app(_settings(tmp), engine=_Exploding(RuntimeError(f"bad row for {PLANTED}")))
    down = create_app(_settings(tmp), engine=_Exploding(OperationalError("SELECT", {"p": PLANTED}, Exception("down"))))
    with caplog.at_level(logging.INFO), served(crashing) as base, served(down) as base_down, httpx.Client() as client:
        failed = client.get(f"{base}/alerts/{alert}", params={"t": token})
        unavailable = client.get(f"{base_down}/alerts/{alert}", params={"t": token})
        health = client.get(f"{base_down}/healthz")
    assert failed.status_code == 500 and "the detail is in its log (reference " in failed.text
    assert unavailable.status_code == 503 and health.status_code == 503
    for response in (failed, unavailable, health):
        _secured(response)
        assert PLANTED not in response.text and "Traceback" not in response.text
    reference = failed.text.split("(reference ")[1][:8]
    (line,) = [r.getMessage() for r in caplog.records if reference in r.getMessage()]
    assert "RuntimeError" in line and "web.py" in line
    server_side = " ".join(r.getMessage() for r in caplog.records if not r.name.startswith("httpx"))
    assert PLANTED not in server_side and token not in server_side
    err = capfd.readouterr().err
    assert PLANTED not in err and "Traceback" not in err


# ---- request size --------------------------------------------------------------------------------

def test_a_declared_large_body_is_refused_before_it_is_read(locked_site):
    """The server answers 413 to the headers alone: it does not wait for the 100 MB."""
    base, alert = locked_site
    status, headers, body = _raw(base, f"POST /alerts/{alert}/ack HTTP/1.1\r\nHost: b\r\n"
                                       "Content-Type: application/x-www-form-urlencoded\r\n"
                                       "Content-Length: 100000000\r\n\r\n".encode())
    assert status == 413 and b"at most 8192 bytes" in body
    assert headers["cache-control"] == "no-store"


def _call(app, headers: list[tuple[bytes, bytes]], chunks: int, chunk: bytes = b"t=x&" * 1024):
    """Call the app as an ASGI server would, with a body of `chunks` chunks; return (status, body
    chunks the app read)."""
    reads, sent = [0], []

    async def receive():
        reads[0] += 1
        return {"type": "http.request", "body": chunk, "more_body": reads[0] < chunks}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/alerts/x/ack", "raw_path": b"/alerts/x/ack", "query_string": b"",
             "root_path": "", "headers": headers, "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2)}
    # a thread of its own: the session's Playwright keeps an event loop running on this one
    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, app(scope, receive, send)).result()
    return next(m["status"] for m in sent if m["type"] == "http.response.start"), reads[0]


def test_body_limits_for_declared_and_chunked_bodies(store):
    tmp, engine, _ = store
    app = create_app(_settings(tmp), engine=engine)
    form = (b"content-type", b"application/x-www-form-urlencoded")
    # declared too large: not one chunk read
    assert _call(app, [form, (b"content-length", b"100000000")], chunks=1000) == (413, 0)
    # chunked (no length): refused once past the limit, the rest never read
    status, reads = _call(app, [form, (b"transfer-encoding", b"chunked")], chunks=1000)
    assert status == 413 and reads * 4096 <= MAX_BODY_BYTES + 4096
    # a form of ordinary size goes through to the token check
    assert _call(app, [form, (b"content-length", b"4096")], chunks=1) == (403, 1)
    assert _call(app, [form, (b"content-length", b"12x")], chunks=1) == (400, 0)


# ---- the dashboard's own pages under the Content-Security-Policy -------------------------------

def test_the_built_dashboard_works_under_its_content_security_policy(tmp_path, smtp_server, browser):
    """A real dashboard (two nights, Plotly charts) served behind the login and opened in Chromium:
    charts drawn, no CSP violation, nothing requested outside the server."""
    from bonewatch.dashboard import build
    from tests.integration.dq_feeds import Night, at, history, run_nights

    first = date(2025, 6, 20)
    settings = with_overrides(_settings(tmp_path, PASSWORD), site__inbox=str(tmp_path / "inbox"),
                              smtp__host="127.0.0.1", smtp__port=smtp_server.port)
    engine = pipeline.engine_for(settings, migrate=True)
    pipeline.ingest(settings, history(tmp_path / "history"))
    run_nights(settings, tmp_path / "inbox", [Night(first), Night(first + timedelta(days=1))])
    build.build(engine, settings, build.default_folder(settings), now=at(first, "07:00", days=2))
    with served(create_app(settings, engine=engine)) as base:
        context = browser.new_context(http_credentials={"username": "data-team", "password": PASSWORD})
        try:
            outside, errors = [], []
            context.route("**/*", lambda route: route.continue_() if route.request.url.startswith(base)
                          else (outside.append(route.request.url), route.abort()))
            page = context.new_page()
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            for name in ("index.html", "feed-labs.html"):
                response = page.goto(f"{base}/dashboard/{name}", wait_until="load")
                assert response.status == 200, name
                assert "script-src 'self' 'unsafe-inline'" in response.headers["content-security-policy"]
                page.wait_for_function("() => document.querySelectorAll('.plotly-graph-div .main-svg').length > 0")
            # GX's Data Docs under their own policy: the vendored jQuery and bootstrap-table run
            # (their tables are drawn by script), still nothing from outside
            runs = page.goto(f"{base}/dashboard/datadocs/index.html", wait_until="load")
            assert runs.status == 200
            assert page.evaluate("() => typeof jQuery === 'function' && typeof jQuery.fn.bootstrapTable === 'function'")
            page.wait_for_function("() => document.querySelectorAll('table tbody tr').length > 0")
            assert errors == [] and outside == []
        finally:
            context.close()
    engine.dispose()
    assert json.dumps(errors) == "[]"


# ---- the command -----------------------------------------------------------------------------------

def test_serve_explains_the_dashboard_login_and_refuses_a_short_key(monkeypatch):
    from tests.integration.alerting import run_cli

    shown = run_cli("serve", "--help")
    assert shown.returncode == 0
    text = " ".join(shown.stdout.split())
    assert "BONEWATCH_DASHBOARD_PASSWORD" in text and "[quality] dashboard_user" in text and "404" in text
    monkeypatch.setenv("BONEWATCH_ACK_SECRET", "abc123")
    refused = run_cli("serve", "--port", "1")
    assert refused.returncode == 2 and refused.stderr.strip().count("\n") == 0
    assert "BONEWATCH_ACK_SECRET" in refused.stderr and "at least 32 characters" in refused.stderr
    assert "abc123" not in refused.stderr
