"""The SMTP catcher `make airflow` runs (`python -m bonewatch.notify.catcher`): a restart keeps the
.eml files it saved before."""

from __future__ import annotations

import smtplib
import subprocess
import sys
from email.message import EmailMessage

from bonewatch.notify.catcher import MailCatcher
from tests.integration.alerting import free_port


def _send(port: int, subject: str) -> None:
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = "a@example.org", "b@example.org", subject
    message.set_content("body")
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.send_message(message)


def test_a_restarted_catcher_numbers_on_after_the_saved_files(tmp_path):
    for subject in ("first", "second"):
        with MailCatcher(folder=tmp_path) as catcher:
            _send(catcher.port, subject)
    saved = sorted(tmp_path.glob("*.eml"))
    assert [p.name for p in saved] == ["0001.eml", "0002.eml"]
    assert "Subject: first" in saved[0].read_text() and "Subject: second" in saved[1].read_text()


def test_the_entry_point_serves_until_terminated(tmp_path):
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "bonewatch.notify.catcher", "--port", str(port),
                               "--folder", str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert "SMTP catcher on 127.0.0.1:" in server.stdout.readline()   # printed once it listens
        _send(port, "through the entry point")
    finally:
        server.terminate()
        assert server.wait(timeout=30) == 0
    assert "through the entry point" in (tmp_path / "0001.eml").read_text()
