"""Trusting CDS Clients (CDS Hooks 2.0): the EHR's signed JWT, checked on every call.

`Authorization: Bearer <JWT>`; the JWT is signed with an asymmetric algorithm (`[cds_hooks]
algorithms`, ES384 and RS384 by default, as the specification recommends; never `none` or HMAC);
its `iss` is one of `[cds_hooks.issuers]`, whose public keys come from a JWK Set file, a JWK Set
URL (pyjwt's `PyJWKClient`, cached) or one PEM key; `aud` is the URL called; `exp`, `iat` and
`jti` are present, and a `jti` is accepted once while its token lives (replay). The `jku` header
is not followed: keys come from configuration only (the specification asks services to allow-list
them). pyjwt does the cryptography and the claim checks.

A refusal is `Unauthorized` with a one-line reason fit for the caller (it names no key material
and no patient).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import jwt

from bonewatch.config import CdsHooks
from bonewatch.errors import BonewatchError, ConfigError

REQUIRED_CLAIMS = ["iss", "aud", "exp", "iat", "jti"]


class Unauthorized(BonewatchError):
    """A CDS Hooks call without a valid JWT of a trusted EHR (the service answers 401)."""


class _Keys:
    """The public keys of one issuer, looked up by `kid`."""

    def __init__(self, issuer: str, jwks_file: str = "", jwks_url: str = "", pem_file: str = ""):
        self.issuer, self.client, self.pem, self.keys = issuer, None, None, {}
        try:
            if jwks_url:
                self.client = jwt.PyJWKClient(jwks_url, cache_keys=True, lifespan=3600, timeout=5)
            elif jwks_file:
                keyset = jwt.PyJWKSet.from_dict(json.loads(Path(jwks_file).read_text("utf-8")))
                self.keys = {k.key_id: k for k in keyset.keys}
            else:
                self.pem = Path(pem_file).read_bytes()
        except (OSError, ValueError, jwt.PyJWTError) as exc:
            where = jwks_file or pem_file or jwks_url
            raise ConfigError(f"[cds_hooks.issuers.\"{issuer}\"]: the public keys in {where} cannot be read "
                              f"({type(exc).__name__})") from None

    def key(self, token: str, kid: str | None):
        if self.pem is not None:
            return self.pem
        if not kid:
            raise Unauthorized("the JWT header has no kid")
        if self.client is not None:
            try:
                return self.client.get_signing_key(kid).key
            except jwt.PyJWKClientConnectionError:
                raise Unauthorized("the issuer's JWK Set URL cannot be reached; try again later") from None
            except jwt.PyJWKClientError:
                raise Unauthorized("no key of the issuer matches the JWT's kid") from None
        found = self.keys.get(kid)
        if found is None:
            raise Unauthorized("no key of the issuer matches the JWT's kid")
        return found.key


class Verifier:
    """Checks the bearer JWT of a call. In: the `[cds_hooks]` settings, and a clock (epoch seconds)."""

    def __init__(self, config: CdsHooks, clock=time.time):
        self.algorithms = list(config.algorithms)
        self.leeway = config.leeway_s
        self.clock = clock
        self.issuers = {iss: _Keys(iss, i.jwks_file, i.jwks_url, i.pem_file) for iss, i in config.issuers.items()}
        self._seen: dict[tuple[str, str], float] = {}     # (iss, jti) -> exp
        self._lock = threading.Lock()

    def verify(self, authorization: str | None, audience: str) -> dict:
        """The JWT's claims, or Unauthorized with the reason."""
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("a CDS Hooks call needs the EHR's signed JWT in 'Authorization: Bearer'")
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise Unauthorized("the bearer token is not a JWT") from None
        if header.get("alg") not in self.algorithms:
            raise Unauthorized(f"JWT algorithm {str(header.get('alg'))[:16]!r} is not accepted "
                               f"(accepted: {', '.join(self.algorithms)})")
        if header.get("typ") not in (None, "JWT"):
            raise Unauthorized("the JWT header's typ is not JWT")
        issuer = unverified.get("iss")
        keys = self.issuers.get(issuer) if isinstance(issuer, str) else None
        if keys is None:
            raise Unauthorized("the JWT's issuer is not a trusted EHR ([cds_hooks.issuers])")
        try:
            claims = jwt.decode(token, keys.key(token, header.get("kid")), algorithms=self.algorithms,
                                audience=audience, issuer=issuer, leeway=self.leeway,
                                options={"require": REQUIRED_CLAIMS})
        except jwt.ExpiredSignatureError:
            raise Unauthorized("the JWT has expired") from None
        except jwt.InvalidAudienceError:
            raise Unauthorized(f"the JWT's aud is not this endpoint ({audience})") from None
        except jwt.MissingRequiredClaimError as exc:
            raise Unauthorized(f"the JWT has no {exc.claim} claim") from None
        except jwt.ImmatureSignatureError:
            raise Unauthorized("the JWT is issued in the future") from None
        except (jwt.PyJWTError, ValueError, TypeError):
            raise Unauthorized("the JWT's signature does not verify with the issuer's key") from None
        self._once(issuer, str(claims["jti"]), float(claims["exp"]))
        return claims

    def _once(self, issuer: str, jti: str, expires: float) -> None:
        now = self.clock()
        with self._lock:
            if len(self._seen) > 10_000:      # forget the tokens that have expired
                self._seen = {k: e for k, e in self._seen.items() if e + self.leeway >= now}
            if (issuer, jti) in self._seen:
                raise Unauthorized("this JWT was already used (its jti is seen once)")
            self._seen[(issuer, jti)] = expires
