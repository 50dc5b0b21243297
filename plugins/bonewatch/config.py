"""Configuration: one versioned TOML file, the packaged default, and environment overrides.

`load_settings()` merges the user's file (BONEWATCH_CONFIG) over `default.toml`, applies the
BONEWATCH_* environment overrides of SPEC section 9, and validates the result. A bad value fails
at start with its key and the reason.

Secrets (the acknowledgement signing key, the SMTP and dashboard passwords, a password in a
database URL) are read from the environment only: one in the file is a ConfigError naming the
variable to use. They never appear in `repr`/`str` of the settings or in `model_dump()` (shown as
`***`; `with_overrides` is the one caller that asks for them back).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import tomllib
from functools import lru_cache
from importlib.resources import files
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    SerializationInfo,
    ValidationError,
    field_validator,
    model_validator,
)

from bonewatch.errors import ConfigError
from bonewatch.model import MAX_PARTITIONS

_STRICT = ConfigDict(extra="forbid", frozen=True)

#: `model_dump(context={REVEAL_SECRETS: True})` gives the secrets back (for a copy of the settings).
REVEAL_SECRETS = "reveal_secrets"
#: The shortest acknowledgement signing key and dashboard password accepted (characters).
MIN_ACK_SECRET = 32
MIN_DASHBOARD_PASSWORD = 16

# A password in an SQLAlchemy URL, parsed as SQLAlchemy parses it (`name://user:password@host`,
# the password running to the first "@"), or in its query (`?password=`, psycopg's form).
_URL_PASSWORD = re.compile(r"^(?P<head>[\w+]+://[^:/]*:)(?P<password>[^@]*)@")
_QUERY_PASSWORD = re.compile(r"(?P<head>[?&]password=)(?P<password>[^&]*)", re.IGNORECASE)


def url_has_password(url: str) -> bool:
    """Whether an SQLAlchemy URL carries a (non-empty) password."""
    found = _URL_PASSWORD.match(url)
    return bool(found and found["password"]) or any(m["password"] for m in _QUERY_PASSWORD.finditer(url))


def mask_url(url: str) -> str:
    """The URL with its password (if any) shown as `***`."""
    url = _URL_PASSWORD.sub(lambda m: m["head"] + ("***" if m["password"] else "") + "@", url, count=1)
    return _QUERY_PASSWORD.sub(lambda m: m["head"] + ("***" if m["password"] else ""), url)


def _revealed(info: SerializationInfo) -> bool:
    return bool(isinstance(info.context, dict) and info.context.get(REVEAL_SECRETS))


def _dump_secret(value: str, info: SerializationInfo) -> str:
    return value if _revealed(info) or not value else "***"


def _dump_url(value: str, info: SerializationInfo) -> str:
    return value if _revealed(info) else mask_url(value)


#: A secret string: hidden from repr, `***` in model_dump.
Secret = Annotated[str, Field(repr=False), PlainSerializer(_dump_secret)]
#: A URL that may carry a password: masked in model_dump (and in repr, see `_MaskedUrlRepr`).
UrlWithSecret = Annotated[str, PlainSerializer(_dump_url)]


class _MaskedUrlRepr(BaseModel):
    """A model whose `url` field is shown with its password masked by repr() and str()."""

    def __repr_args__(self):
        for name, value in super().__repr_args__():
            yield name, (mask_url(value) if name == "url" and isinstance(value, str) else value)


class Site(BaseModel):
    model_config = _STRICT
    name: str = "bonewatch"
    timezone: str = "UTC"
    data_dir: str = "data"
    inbox: str = ""
    ack_base_url: str = "http://localhost:8099"
    phi_minimal: bool = False

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {value!r}") from exc
        return value


class Database(_MaskedUrlRepr):
    model_config = _STRICT
    url: UrlWithSecret = ""      # a password in it comes from BONEWATCH_DATABASE_URL only
    # A run that needs a lock another process holds (the same night, the same file, the
    # evaluation) waits this long, then exits 1 naming the holder (`bonewatch.store.locks`).
    lock_wait_s: float = Field(600, ge=0)


class Airflow(BaseModel):
    model_config = _STRICT
    # The monitor DAG evaluates a night in this many patient partitions, one mapped task each
    # (read when the run starts, not at parse time); 1: one task.
    evaluate_partitions: int = Field(1, ge=1, le=MAX_PARTITIONS)


class Smtp(BaseModel):
    model_config = _STRICT
    host: str = "localhost"
    port: int = Field(8025, ge=1, le=65535)
    user: str = ""
    password: Secret = ""          # BONEWATCH_SMTP_PASSWORD only
    starttls: bool = False
    # Log in (send `user` and `password`) over a connection without TLS: off unless set on purpose.
    allow_plaintext_login: bool = False

    def check_login_transport(self) -> None:
        """Raise a one-line ConfigError when sending would log in (a user is set) over a connection
        without TLS (STARTTLS off) and `allow_plaintext_login` does not allow it; call it before
        connecting, so not even the AUTH command leaves."""
        if self.user and not self.starttls and not self.allow_plaintext_login:
            raise ConfigError(f"SMTP login to {self.host}:{self.port} refused: smtp.starttls is off, so the password "
                              "would cross the network in plain text; turn on starttls (BONEWATCH_SMTP_STARTTLS) or "
                              "set [smtp] allow_plaintext_login = true for a relay on a trusted link")
    sender: str = "bonewatch@hospital.example"
    timeout_s: float = Field(30, gt=0)


class Recipients(BaseModel):
    model_config = _STRICT
    default: list[str] = Field(min_length=1)
    data_team: list[str] = Field(min_length=1)
    teams: dict[str, list[str]] = {}


class Notify(BaseModel):
    """Alert delivery: re-notify interval, outbox back-off, acknowledgement links and charts."""

    model_config = _STRICT
    # Unacknowledged alerts of these severities are re-sent once this many nights have passed
    # since the last digest that carried them; 0 turns re-notification off.
    renotify_interval_days: int = Field(2, ge=0)
    renotify_severities: list[Literal["high", "medium", "info"]] = ["high"]
    # After a failed attempt a message waits base x 2^(attempts-1) seconds, at most max.
    retry_backoff_s: float = Field(60, ge=0)
    retry_backoff_max_s: float = Field(1800, ge=0)
    # Acknowledgement links: signed with BONEWATCH_ACK_SECRET (environment only), valid this long.
    ack_link_ttl_hours: float = Field(168, gt=0)
    ack_secret: Secret = ""
    # A flush claims a message for this long before sending it; a flush that died holding the
    # claim lets another take the message over once it has expired. Longer than any send.
    claim_lease_s: float = Field(600, gt=0)
    charts: bool = True
    chart_days: int = Field(180, ge=7)
    # The longest a silence may last (`bonewatch silence --for`), so nothing is muted forever.
    silence_max_days: int = Field(90, ge=1, le=366)


class Ingest(BaseModel):
    model_config = _STRICT
    chunk_size: int = Field(50000, ge=1)
    # a row (CSV line, HL7 segment, NDJSON line) longer than this is quarantined unread
    max_row_bytes: int = Field(1 << 20, ge=1024)
    code_map: dict[str, str] = {}
    # codes (local or LOINC) the hospital does not need: skipped without being listed for mapping
    ignore_codes: list[str] = []
    snomed_map: dict[str, str] = {}
    unit_aliases: dict[str, str] = {}
    plausible: dict[str, tuple[float, float]] = {}

    @field_validator("snomed_map")
    @classmethod
    def _known_event(cls, value: dict[str, str]) -> dict[str, str]:
        for code, event in value.items():
            if event != "dental_exam":
                raise ValueError(f"SNOMED CT code {code!r} maps to {event!r}; only dental_exam is supported")
        return value

    @field_validator("unit_aliases")
    @classmethod
    def _known_unit(cls, value: dict[str, str]) -> dict[str, str]:
        from bonewatch.units import convertible

        for local, standard in value.items():
            if not convertible(standard):   # read as UCUM and convertible for some monitored analyte
                raise ValueError(f"unit alias {local!r} points to {standard!r}, which is not a known unit")
        return value


class SqlSource(_MaskedUrlRepr):
    """A lab table or view in another database, pulled each night above a high-water mark."""

    model_config = _STRICT
    # SQLAlchemy URL of the source database; put the password in the environment variable named
    # by `url_env` (it wins over `url`), never in this file.
    url: UrlWithSecret = ""
    url_env: str = ""
    table: str                          # table or view, optionally schema-qualified
    watermark: str                      # a column that only grows: an insert/update sequence or timestamp
    columns: dict[str, str] = {}        # canonical lab column -> source column (default: same name)
    batch_rows: int = Field(50000, ge=1)
    deadline: str = "01:00"
    expected: bool = True

    @field_validator("deadline")
    @classmethod
    def _deadline(cls, value: str) -> str:
        return _hhmm(value)

    @field_validator("table", "watermark")
    @classmethod
    def _identifier(cls, value: str) -> str:
        return _sql_name(value)

    @field_validator("columns")
    @classmethod
    def _lab_columns(cls, value: dict[str, str]) -> dict[str, str]:
        canonical = ("patient_id", "result_id", "loinc", "value", "unit", "collected_at", "status")
        for key, column in value.items():
            if key not in canonical:
                raise ValueError(f"{key!r} is not a lab column (expected one of {', '.join(canonical)})")
            _sql_name(column)
        return value

    def resolved_url(self) -> str:
        url = os.environ.get(self.url_env, "") if self.url_env else ""
        return url or self.url


class Clinical(BaseModel):
    model_config = _STRICT
    weight_window_days: int = Field(90, ge=0)
    weight_kind: Literal["actual"] = "actual"
    renal_baseline_window_days: int = Field(30, ge=0)
    alp_baseline_window_days: int = Field(30, ge=0)
    course_gap_days: int = Field(180, ge=1)
    alp_uln: float = Field(130.0, gt=0)
    ggt_uln: float = Field(55.0, gt=0)


def _sql_name(value: str) -> str:
    """Source tables and columns are configuration, quoted into SQL: plain names only."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?", value):
        raise ValueError(f"expected a plain (optionally schema-qualified) SQL name, got {value!r}")
    return value


def _hhmm(value: str) -> str:
    if not re.fullmatch(r"([01]\d|2[0-3]):[0-5]\d", value.strip()):
        raise ValueError(f"expected a local time like 01:00, got {value!r}")
    return value.strip()


class Feed(BaseModel):
    """One nightly feed (`[feeds.<name>]`, the name the ledger records: labs, events, ...)."""

    model_config = _STRICT
    # Night D is due by this local time on day D+1; keep it before the ingest run (01:30) so
    # the run itself can tell a missing feed from one not yet due.
    deadline: str = "01:00"
    expected: bool = True          # false: a night without it is not "missing"

    @field_validator("deadline")
    @classmethod
    def _deadline(cls, value: str) -> str:
        return _hhmm(value)


class Quality(BaseModel):
    """Data-quality monitoring and its dashboard (bonewatch.dashboard)."""

    model_config = _STRICT
    # When a delivery "arrived": the file's modification time in the inbox (when the sender
    # finished writing it), or when bonewatch ingested it.
    arrival: Literal["file_mtime", "ingested"] = "file_mtime"
    bad_row_rate_max: float = Field(0.05, ge=0, le=1)
    bad_row_rate_red: float = Field(0.25, ge=0, le=1)
    history_nights: int = Field(30, ge=1)
    window_nights: int = Field(30, ge=1, le=366)
    page_max_age_hours: float = Field(48, gt=0)
    default_deadline: str = "01:00"
    dashboard_hint: str = ""       # where the data team finds the dashboard (URL or path), for emails
    dashboard_dir: str = ""        # where `bonewatch dashboard` writes and `bonewatch serve` serves it
    # `bonewatch serve` serves the dashboard only behind HTTP Basic: this user, the password from
    # BONEWATCH_DASHBOARD_PASSWORD (environment only); without that password /dashboard is off.
    dashboard_user: str = "data-team"
    dashboard_password: Secret = ""

    @field_validator("default_deadline")
    @classmethod
    def _deadline(cls, value: str) -> str:
        return _hhmm(value)


#: JWT algorithms CDS Hooks 2.0 allows ("Trusting CDS Clients": asymmetric only, never `none` or HMAC)
CDS_ALGORITHMS = ("ES256", "ES384", "ES512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512")


class CdsIssuer(BaseModel):
    """One EHR trusted to call the CDS Hooks service (`[cds_hooks.issuers."<iss>"]`): where its
    public keys are. Exactly one of the three."""

    model_config = _STRICT
    jwks_file: str = ""            # a JWK Set file (air-gapped sites)
    jwks_url: str = ""             # the EHR's JWK Set URL (fetched and cached)
    pem_file: str = ""             # one public key in PEM

    @model_validator(mode="after")
    def _one_source(self) -> CdsIssuer:
        if sum(bool(v) for v in (self.jwks_file, self.jwks_url, self.pem_file)) != 1:
            raise ValueError("set exactly one of jwks_file, jwks_url or pem_file")
        return self


class CdsHooks(BaseModel):
    """The CDS Hooks 2.0 service of `bonewatch serve` (`bonewatch.cds`)."""

    model_config = _STRICT
    # The service's public base URL as the EHR calls it (the JWT `aud` is <base_url>/cds-services/<id>);
    # empty: [site] ack_base_url.
    base_url: str = ""
    max_body_bytes: int = Field(1 << 20, ge=1024, le=64 << 20)
    algorithms: list[str] = ["ES384", "RS384"]
    public_discovery: bool = False
    # browser-based CDS clients (the CDS Hooks sandbox) call from these origins: CORS for /cds-services only
    cors_origins: list[str] = []
    leeway_s: float = Field(30, ge=0, le=300)
    issuers: dict[str, CdsIssuer] = {}
    source_urls: dict[str, str] = {}

    @field_validator("algorithms")
    @classmethod
    def _asymmetric(cls, value: list[str]) -> list[str]:
        for name in value:
            if name not in CDS_ALGORITHMS:
                raise ValueError(f"{name!r} is not allowed: CDS Hooks 2.0 accepts only asymmetric signatures "
                                 f"({', '.join(CDS_ALGORITHMS)})")
        return value


class RuleSettings(BaseModel):
    """A rule's metadata and thresholds; any extra key is a threshold of that rule."""

    model_config = ConfigDict(extra="allow", frozen=True)
    version: str
    severity: Literal["high", "medium", "info"]
    when: str
    action: str
    citation: str

    def describe(self, clinical: dict[str, Any] | None = None) -> str:
        """`when` with its {placeholders} filled from the thresholds (and the clinical section)."""
        return self.when.format(**(clinical or {}), **self.params)

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class Settings(BaseModel):
    model_config = _STRICT
    site: Site
    database: Database = Database()
    airflow: Airflow = Airflow()
    smtp: Smtp = Smtp()
    recipients: Recipients
    notify: Notify = Notify()
    ingest: Ingest = Ingest()
    clinical: Clinical = Clinical()
    feeds: dict[str, Feed] = {}
    sources: dict[str, SqlSource] = {}
    quality: Quality = Quality()
    cds_hooks: CdsHooks = CdsHooks()
    rules: dict[str, RuleSettings]

    # ---- derived paths -------------------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        return Path(self.site.data_dir).expanduser().resolve()

    @property
    def inbox(self) -> Path:
        return Path(self.site.inbox).expanduser().resolve() if self.site.inbox else self.data_dir / "inbox"

    @property
    def database_url(self) -> str:
        return self.database.url or f"sqlite:///{self.data_dir / 'bonewatch.db'}"

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.site.timezone)

    @property
    def feed_rules(self) -> dict[str, Feed]:
        """Every nightly feed with its deadline: `[feeds.*]` and the SQL sources (`[sources.*]`)."""
        return {**{name: Feed(deadline=s.deadline, expected=s.expected) for name, s in self.sources.items()},
                **self.feeds}

    def rule(self, rule_id: str) -> RuleSettings:
        return self.rules[rule_id]

    def describe_rule(self, rule_id: str) -> str:
        return self.rules[rule_id].describe(self.clinical.model_dump())

    def rule_version(self, rule_id: str) -> str:
        """The declared version, plus a short digest of the thresholds when they differ from the
        shipped defaults: changing a threshold always changes the version alerts record."""
        # The clinical section (upper limits of normal, windows) feeds every rule, so it counts too.
        return _rule_version(rule_id, json.dumps(self.rules[rule_id].model_dump(), sort_keys=True),
                             json.dumps(self.clinical.model_dump(), sort_keys=True))


@lru_cache(maxsize=256)
def _rule_version(rule_id: str, rule_json: str, clinical_json: str) -> str:
    """Cached: evaluation asks for it once a finding."""
    rule = RuleSettings.model_validate(json.loads(rule_json))
    document = _parsed_defaults()
    shipped = document.get("rules", {}).get(rule_id, {})
    shipped_params = {k: v for k, v in shipped.items() if k not in RuleSettings.model_fields}
    clinical = json.loads(clinical_json)
    if (rule.params == shipped_params and rule.version == shipped.get("version")
            and clinical == Clinical.model_validate(document.get("clinical", {})).model_dump()):
        return rule.version
    payload = json.dumps({"rule": rule.params, "clinical": clinical}, sort_keys=True)
    return f"{rule.version}+{hashlib.sha256(payload.encode()).hexdigest()[:6]}"


_ENV_OVERRIDES: dict[str, tuple[str, str]] = {
    "BONEWATCH_DATABASE_URL": ("database", "url"),
    "BONEWATCH_DATA_DIR": ("site", "data_dir"),
    # one variable for the hospital zone: the Airflow schedule reads it at parse time too
    "BONEWATCH_TIMEZONE": ("site", "timezone"),
    "BONEWATCH_SMTP_HOST": ("smtp", "host"),
    "BONEWATCH_SMTP_PORT": ("smtp", "port"),
    "BONEWATCH_SMTP_USER": ("smtp", "user"),
    "BONEWATCH_SMTP_PASSWORD": ("smtp", "password"),
    "BONEWATCH_SMTP_STARTTLS": ("smtp", "starttls"),
    "BONEWATCH_ACK_SECRET": ("notify", "ack_secret"),
    "BONEWATCH_DASHBOARD_PASSWORD": ("quality", "dashboard_password"),
    "BONEWATCH_LOCK_WAIT_S": ("database", "lock_wait_s"),
    "BONEWATCH_EVALUATE_PARTITIONS": ("airflow", "evaluate_partitions"),
}

#: Secrets and where they may come from instead of the configuration file.
_SECRETS_FROM_ENV: dict[tuple[str, str], str] = {
    ("notify", "ack_secret"): "BONEWATCH_ACK_SECRET",
    ("smtp", "password"): "BONEWATCH_SMTP_PASSWORD",
    ("quality", "dashboard_password"): "BONEWATCH_DASHBOARD_PASSWORD",
}
_MIN_LENGTHS: dict[tuple[str, str], int] = {
    ("notify", "ack_secret"): MIN_ACK_SECRET,
    ("quality", "dashboard_password"): MIN_DASHBOARD_PASSWORD,
}


def _refuse_file_secrets(document: dict[str, Any], path: str | os.PathLike) -> None:
    """A ConfigError naming the environment variable for the first secret found in the user's
    file (never its value): files get copied, committed and mailed around; the environment does not."""
    for (section, key), var in _SECRETS_FROM_ENV.items():
        value = (document.get(section) or {}).get(key) if isinstance(document.get(section), dict) else None
        if value not in (None, ""):
            raise ConfigError(f"configuration key {section}.{key} in {path}: secrets are not read from the "
                              f"configuration file; set {var} in the environment instead")
    url = (document.get("database") or {}).get("url") if isinstance(document.get("database"), dict) else None
    if isinstance(url, str) and url_has_password(url):
        raise ConfigError(f"configuration key database.url in {path} carries a password: set the whole URL "
                          "in BONEWATCH_DATABASE_URL in the environment instead")
    sources = document.get("sources") if isinstance(document.get("sources"), dict) else {}
    for name, source in sources.items():
        url = source.get("url") if isinstance(source, dict) else None
        if isinstance(url, str) and url_has_password(url):
            raise ConfigError(f"configuration key sources.{name}.url in {path} carries a password: put the "
                              "URL in an environment variable and name it in url_env instead")


def _check_secret_lengths(document: dict[str, Any]) -> None:
    for (section, key), minimum in _MIN_LENGTHS.items():
        value = document.get(section, {}).get(key) or ""
        if 0 < len(str(value)) < minimum:
            raise ConfigError(f"{_SECRETS_FROM_ENV[section, key]} is too short: at least {minimum} characters "
                              "are required (a random key, e.g. from `python -c \"import secrets; "
                              "print(secrets.token_urlsafe(32))\"`)")


@lru_cache(maxsize=1)
def _default_text() -> str:
    return files("bonewatch").joinpath("default.toml").read_text("utf-8")


def _default_document() -> dict[str, Any]:
    """A fresh copy of the shipped defaults (callers may modify it)."""
    return copy.deepcopy(_parsed_defaults())


@lru_cache(maxsize=1)
def _parsed_defaults() -> dict[str, Any]:
    return tomllib.loads(_default_text())


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_settings(path: str | os.PathLike | None = None, env: dict[str, str] | None = None) -> Settings:
    """Read the configuration (file, then environment) and validate it; raise ConfigError."""
    env = dict(os.environ if env is None else env)
    document = _default_document()
    path = path or env.get("BONEWATCH_CONFIG")
    if path:
        try:
            users = tomllib.loads(Path(path).read_text("utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"configuration file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"configuration file {path} is not valid TOML: {exc}") from None
        _refuse_file_secrets(users, path)
        document = _merge(document, users)
    for var, (section, key) in _ENV_OVERRIDES.items():
        if env.get(var, "") != "":
            value: Any = env[var]
            if key == "starttls":
                if value.lower() not in {"true", "false", "1", "0", "yes", "no"}:
                    raise ConfigError(f"{var}: expected true or false, got {value!r}")
                value = value.lower() in {"true", "1", "yes"}
            document.setdefault(section, {})[key] = value
    _check_secret_lengths(document)
    try:
        settings = Settings.model_validate(document)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(part) for part in first["loc"])
        raise ConfigError(f"configuration key {key}: {first['msg']}") from None
    missing = sorted(set(_default_document()["rules"]) - set(settings.rules))
    if missing:
        raise ConfigError(f"configuration key rules: missing rule(s) {', '.join(missing)}")
    for rule_id, rule in settings.rules.items():
        try:
            rule.describe(settings.clinical.model_dump())
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigError(f"configuration key rules.{rule_id}.when: unknown placeholder {exc}") from None
    return settings


def with_overrides(settings: Settings, **dotted: Any) -> Settings:
    """A copy with some values replaced, keys written `section__key` (e.g. smtp__port=2525)."""
    document = settings.model_dump(context={REVEAL_SECRETS: True})
    for name, value in dotted.items():
        section, key = name.split("__", 1)
        document[section][key] = value
    return Settings.model_validate(document)
