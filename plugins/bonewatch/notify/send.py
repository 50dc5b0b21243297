"""Send one email through the configured SMTP server (yagmail for the connection).

We build the MIME message ourselves and hand it to yagmail's SMTP connection: yagmail's
`contents` handling turns a text + HTML pair into one mangled body (it copies the HTML into the
plain part, replaces newlines with <br>, and premailer drops parts of the HTML), and a nurse's
mail client must get a clean multipart/alternative. yagmail's own login is skipped too: it logs in
with the sender address (and appends "@gmail.com" to a user without "@"), whereas hospital relays
often use a service account that differs from the From address.

Errors come back as `AlertDeliveryError` with one line naming the server and the SMTP reply; the
message's content (patient data) is never logged or put in an error.
"""

from __future__ import annotations

import logging
import smtplib
from collections.abc import Sequence
from email.message import EmailMessage
from email.utils import formatdate, parseaddr

import yagmail
from yagmail.error import YagInvalidEmailAddress

from bonewatch.config import Smtp
from bonewatch.errors import AlertDeliveryError, ConfigError

log = logging.getLogger(__name__)


def build_message(sender: str, recipient: str, subject: str, text: str, html: str | None,
                  message_id: str, images: Sequence[tuple[str, bytes]] = ()) -> EmailMessage:
    """A multipart/alternative message (text first, HTML preferred by clients that show it).

    `images` are (Content-ID without brackets, PNG bytes) that the HTML shows as `cid:` links:
    they go into a multipart/related around the HTML part, so nothing loads from outside and
    text-only clients never see them. Without `html` the message is plain text alone.
    """
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = recipient
    msg["Subject"] = subject
    msg["Date"] = formatdate(usegmt=True)
    msg["Message-ID"] = message_id
    # RFC 3834: out-of-office replies and auto-responders must not answer a robot.
    msg["Auto-Submitted"] = "auto-generated"
    msg.set_content(text)
    if html is None:
        return msg
    msg.add_alternative(html, subtype="html")
    if images:
        html_part = msg.get_payload()[1]
        for cid, png in images:
            html_part.add_related(png, "image", "png", cid=f"<{cid}>", disposition="inline",
                                  filename=cid.split("@", 1)[0] + ".png")
    return msg


def send_message(smtp: Smtp, recipient: str, subject: str, text: str, html: str | None,
                 message_id: str, *, images: Sequence[tuple[str, bytes]] = ()) -> None:
    """Deliver one message to one recipient; return only once the server accepted it.

    In: the SMTP settings, the recipient address, subject, plain-text and HTML bodies, and the
    stable Message-ID (angle brackets included), and the inline images of the HTML part. Raises `AlertDeliveryError` when the server
    cannot be reached, times out, refuses the sender or the recipient, or rejects the data;
    `ConfigError` (before connecting) when it would log in without TLS and that is not allowed.
    """
    smtp.check_login_transport()       # never a password in plain text on the wire
    msg = build_message(smtp.sender, recipient, subject, text, html, message_id, images)
    envelope_from = parseaddr(smtp.sender)[1]   # the sender may carry a display name
    where = f"{smtp.host}:{smtp.port}"
    yag = None
    try:
        yag = yagmail.SMTP(
            user=envelope_from,
            host=smtp.host,
            port=smtp.port,
            smtp_starttls=smtp.starttls,
            smtp_ssl=False,
            smtp_skip_login=True,          # authenticated below with smtp.user, if any
            timeout=smtp.timeout_s,        # passed through to smtplib.SMTP
        )
        yag.login()                        # yagmail's name for connect (+ STARTTLS)
        if smtp.user:
            yag.smtp.login(smtp.user, smtp.password)
        # Not yagmail's send(): its retry loop sleeps and then returns False instead of raising.
        refused = yag.smtp.send_message(msg, from_addr=envelope_from, to_addrs=[recipient])
    except YagInvalidEmailAddress:
        raise ConfigError(f"configuration key smtp.sender: not an email address "
                          f"({smtp.sender!r})") from None
    except smtplib.SMTPRecipientsRefused as exc:
        code, reply = next(iter(exc.recipients.values()), (0, b""))
        raise AlertDeliveryError(f"SMTP server {where} refused the recipient: "
                                 f"{code} {_reply(reply)}") from None
    except smtplib.SMTPSenderRefused as exc:
        raise AlertDeliveryError(f"SMTP server {where} refused the sender: "
                                 f"{exc.smtp_code} {_reply(exc.smtp_error)}") from None
    except smtplib.SMTPAuthenticationError as exc:
        raise AlertDeliveryError(f"SMTP login to {where} failed: {exc.smtp_code} "
                                 f"{_reply(exc.smtp_error)}") from None
    except smtplib.SMTPResponseException as exc:
        raise AlertDeliveryError(f"SMTP server {where} rejected the message: "
                                 f"{exc.smtp_code} {_reply(exc.smtp_error)}") from None
    except smtplib.SMTPServerDisconnected as exc:
        # smtplib reports a read timeout (no greeting, no reply) as a disconnect
        if isinstance(exc.__context__, TimeoutError):
            raise AlertDeliveryError(f"SMTP server {where} did not answer within "
                                     f"{smtp.timeout_s:g} s") from None
        raise AlertDeliveryError(f"SMTP server {where} closed the connection") from None
    except smtplib.SMTPException as exc:
        raise AlertDeliveryError(f"SMTP error with {where}: {type(exc).__name__}: "
                                 f"{_reply(str(exc))}") from None
    except TimeoutError:
        raise AlertDeliveryError(f"SMTP server {where} did not answer within "
                                 f"{smtp.timeout_s:g} s") from None
    except ConnectionRefusedError:
        raise AlertDeliveryError(f"SMTP server {where} refused the connection "
                                 "(nothing listening?)") from None
    except OSError as exc:
        raise AlertDeliveryError(f"cannot reach SMTP server {where}: "
                                 f"{exc.strerror or type(exc).__name__}") from None
    finally:
        if yag is not None:
            _close_quietly(yag)
    if refused:  # a partial refusal; with one recipient it cannot happen, but never assume
        raise AlertDeliveryError(f"SMTP server {where} refused the recipient")
    log.info("SMTP server %s accepted message %s", where, message_id)


def _close_quietly(yag: yagmail.SMTP) -> None:
    # The server has already answered DATA by now (or we failed before): a failing QUIT must not
    # turn an accepted message into a "failed" one that the outbox would send again.
    try:
        yag.close()
    except Exception:  # noqa: BLE001
        log.debug("SMTP QUIT failed after the exchange; ignored", exc_info=True)


def _reply(reply: bytes | str) -> str:
    """An SMTP reply as one short line."""
    if isinstance(reply, bytes):
        reply = reply.decode("utf-8", "replace")
    return " ".join(str(reply).split())[:200]
