"""No SMTP password in plain text on the wire: against a real aiosmtpd server that advertises AUTH
without TLS, a configured login with STARTTLS off fails before connecting (not even the AUTH
command leaves) unless `[smtp] allow_plaintext_login` says otherwise."""

from __future__ import annotations

import smtplib

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult

from bonewatch.config import load_settings, with_overrides
from bonewatch.errors import ConfigError
from bonewatch.notify.send import send_message
from bonewatch.orchestration import send_to_data_team
from tests.integration.alerting import free_port

PASSWORD = "relay-Pw-73310"


class _Recorder:
    """Every AUTH attempt (mechanism, login) and every accepted message."""

    def __init__(self):
        self.logins: list[tuple[str, str]] = []
        self.messages: list[bytes] = []

    def authenticator(self, server, session, envelope, mechanism, auth_data):
        self.logins.append((mechanism, getattr(auth_data, "login", b"").decode()))
        return AuthResult(success=True)

    async def handle_DATA(self, server, session, envelope):  # noqa: N802
        self.messages.append(envelope.content)
        return "250 OK"


@pytest.fixture(scope="module")
def plaintext_auth_server():
    recorder = _Recorder()
    controller = Controller(recorder, hostname="127.0.0.1", port=free_port(), auth_require_tls=False,
                            authenticator=recorder.authenticator)
    controller.start()
    try:
        yield controller.port, recorder
    finally:
        controller.stop()


@pytest.fixture
def server(plaintext_auth_server):
    port, recorder = plaintext_auth_server
    recorder.logins.clear()
    recorder.messages.clear()
    # the server really offers AUTH on a connection without TLS: the client is the only guard
    with smtplib.SMTP("127.0.0.1", port, timeout=5) as probe:
        probe.ehlo()
        assert probe.has_extn("auth") and not probe.has_extn("starttls")
    settings = load_settings(env={"BONEWATCH_SMTP_HOST": "127.0.0.1", "BONEWATCH_SMTP_PORT": str(port),
                                  "BONEWATCH_SMTP_USER": "relay", "BONEWATCH_SMTP_PASSWORD": PASSWORD})
    assert settings.smtp.starttls is False and not getattr(settings.smtp, "allow_plaintext_login", False)
    return settings, recorder


def _send(settings) -> None:
    send_message(settings.smtp, "nurses@hospital.example", "s", "text", None, "<login.test@bonewatch>")


def test_no_login_without_tls_by_default(server):
    settings, recorder = server
    with pytest.raises(ConfigError) as error:
        _send(settings)
    message = str(error.value)
    assert "allow_plaintext_login" in message and "starttls" in message and "\n" not in message
    assert PASSWORD not in message
    assert recorder.logins == [] and recorder.messages == []


def test_the_data_team_path_does_not_log_in_without_tls_either(server):
    settings, recorder = server
    with pytest.raises(ConfigError, match="allow_plaintext_login"):
        send_to_data_team("subject", "body", settings)
    assert recorder.logins == [] and recorder.messages == []


def test_plaintext_login_when_explicitly_allowed(server):
    settings, recorder = server
    _send(with_overrides(settings, smtp__allow_plaintext_login=True))
    assert [login for _, login in recorder.logins] == ["relay"] and len(recorder.messages) == 1


def test_no_user_no_login(server):
    settings, recorder = server
    _send(with_overrides(settings, smtp__user=""))
    assert recorder.logins == [] and len(recorder.messages) == 1
