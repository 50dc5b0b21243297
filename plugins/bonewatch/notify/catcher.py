"""A local SMTP catcher (aiosmtpd) for the demo and the tests: every accepted message is kept in
memory and, when a folder is given, saved there as an .eml file."""

from __future__ import annotations

import asyncio
import email
import email.policy
import socket
import threading
from email.message import EmailMessage
from pathlib import Path

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import Envelope


class _Handler:
    def __init__(self, folder: Path | None):
        self.folder = folder
        # Numbering goes on after the files already there: a restarted catcher overwrites nothing.
        self._saved = len(list(folder.glob("*.eml"))) if folder is not None and folder.is_dir() else 0
        self.messages: list[EmailMessage] = []
        self.envelopes: list[tuple[str, list[str]]] = []
        self.refuse: set[str] = set()
        self.delay_s = 0.0              # a slow server: wait this long before answering DATA
        self.drop_after_data = 0        # keep the next N messages, then hang up instead of "250"
        self._lock = threading.Lock()

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):  # noqa: N802
        if address.lower() in self.refuse:
            return "550 5.1.1 recipient refused by test server"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope: Envelope):  # noqa: N802
        message = email.message_from_bytes(envelope.original_content or envelope.content,
                                           policy=email.policy.default)
        with self._lock:
            self.messages.append(message)
            self.envelopes.append((envelope.mail_from, list(envelope.rcpt_tos)))
            if self.folder is not None:
                self.folder.mkdir(parents=True, exist_ok=True)
                self._saved += 1
                name = f"{self._saved:04d}.eml"
                (self.folder / name).write_bytes(envelope.original_content or envelope.content)
            drop = self.drop_after_data > 0
            self.drop_after_data -= int(drop)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if drop:
            # the message was received, but the client never hears "250": the connection drops
            server.transport.abort()
            return "421 connection dropped by test server"
        return "250 Message accepted for delivery"


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class MailCatcher:
    """Start with `with MailCatcher(port=0) as catcher:`; `catcher.port` is the bound port."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, folder: str | Path | None = None):
        self.host = host
        self.handler = _Handler(Path(folder) if folder else None)
        self._requested_port = port
        self.controller: Controller | None = None

    @property
    def messages(self) -> list[EmailMessage]:
        return self.handler.messages

    @property
    def envelopes(self) -> list[tuple[str, list[str]]]:
        return self.handler.envelopes

    @property
    def port(self) -> int:
        assert self.controller is not None, "catcher not started"
        return self.controller.port

    def refuse(self, *addresses: str) -> None:
        """Make the server answer 550 for these recipients (a real refusal, not a mock)."""
        self.handler.refuse = {a.lower() for a in addresses}

    def slow(self, seconds: float) -> None:
        """Answer DATA only after `seconds` (a slow relay), so two senders overlap for real."""
        self.handler.delay_s = seconds

    def drop_after_data(self, messages: int = 1) -> None:
        """Keep the next `messages` messages, then close the connection instead of answering."""
        self.handler.drop_after_data = messages

    def clear(self) -> None:
        with self.handler._lock:
            self.handler.messages.clear()
            self.handler.envelopes.clear()
            self.handler.delay_s = 0.0
            self.handler.drop_after_data = 0

    def start(self) -> MailCatcher:
        # aiosmtpd's readiness probe cannot connect to port 0, so pick a free port first.
        port = self._requested_port or _free_port(self.host)
        self.controller = Controller(self.handler, hostname=self.host, port=port, ready_timeout=10)
        self.controller.start()
        return self

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop()
            self.controller = None

    def __enter__(self) -> MailCatcher:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    """`python -m bonewatch.notify.catcher --port 1025 --folder DIR`: serve until SIGTERM or
    Ctrl-C, saving every accepted message as DIR/NNNN.eml (the local Airflow deployment's mail
    server, `scripts/airflow-local`). Local development only: it accepts mail for anyone."""
    import argparse
    import signal

    parser = argparse.ArgumentParser(prog="python -m bonewatch.notify.catcher", description=main.__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1025)
    parser.add_argument("--folder", required=True, help="where the .eml files go")
    args = parser.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with MailCatcher(args.host, args.port, folder=args.folder) as catcher:
        print(f"SMTP catcher on {args.host}:{catcher.port}, saving to {args.folder}", flush=True)
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
