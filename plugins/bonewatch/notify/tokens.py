"""Signed, expiring, single-alert acknowledgement tokens for the links in the emails.

A token names one alert and the night that occurrence of it was raised (`raised_on`), signed with
HMAC-SHA256 under `BONEWATCH_ACK_SECRET` (itsdangerous) and stamped with its issue time. So a link
acknowledges that alert and nothing else, stops working after `[notify] ack_link_ttl_hours`, and
cannot acknowledge a later occurrence of the same alert (a reopened alert has a new `raised_on`).
Once the alert is acknowledged the link has done its work: the web app refuses it the second time.

Times are passed in (`issued_at`, `now`): the shell reads the clock, these functions do not.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, date, datetime
from urllib.parse import quote

from itsdangerous import BadData, SignatureExpired, TimestampSigner, URLSafeTimedSerializer

from bonewatch.errors import BonewatchError

_SALT = "bonewatch.ack.v1"


class TokenInvalid(BonewatchError):
    """An acknowledgement token was tampered with, malformed, or signed with another key."""


class TokenExpired(TokenInvalid):
    """An acknowledgement token is older than the configured lifetime."""


def _epoch(moment: datetime) -> int:
    # The store keeps naive UTC; an aware time is converted.
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp())


def _serializer(secret: str, moment: datetime) -> URLSafeTimedSerializer:
    stamp = _epoch(moment)

    class _At(TimestampSigner):
        # itsdangerous reads time.time() for both signing and checking the age; pinning it
        # keeps these functions free of the clock (and the expiry testable without waiting).
        def get_timestamp(self) -> int:
            return stamp

    return URLSafeTimedSerializer(secret, salt=_SALT, signer=_At,
                                  signer_kwargs={"digest_method": hashlib.sha256})


def make_token(secret: str, alert_id: str, raised_on: date, *, issued_at: datetime) -> str:
    """A URL-safe token for one alert occurrence, issued at `issued_at`."""
    if not secret:
        raise TokenInvalid("no signing key: set BONEWATCH_ACK_SECRET")
    return _serializer(secret, issued_at).dumps([alert_id, raised_on.isoformat()])


def read_token(secret: str, token: str, *, max_age_s: float, now: datetime) -> tuple[str, date]:
    """(alert_id, raised_on) of a valid token; TokenExpired or TokenInvalid otherwise."""
    if not secret:
        raise TokenInvalid("no signing key: set BONEWATCH_ACK_SECRET")
    try:
        payload = _serializer(secret, now).loads(token, max_age=max_age_s)
    except SignatureExpired:
        raise TokenExpired("this acknowledgement link has expired") from None
    except BadData:
        raise TokenInvalid("this acknowledgement link is not valid (altered or incomplete)") from None
    try:
        alert_id, raised_on = payload
        return str(alert_id), date.fromisoformat(raised_on)
    except (TypeError, ValueError):
        raise TokenInvalid("this acknowledgement link is not valid (altered or incomplete)") from None


def ack_link(base_url: str, secret: str, alert_id: str, raised_on: date, *, issued_at: datetime) -> str:
    """The link a digest carries for one alert: `<base>/alerts/<id>?t=<token>`."""
    token = make_token(secret, alert_id, raised_on, issued_at=issued_at)
    return f"{base_url.rstrip('/')}/alerts/{quote(alert_id)}?t={token}"
