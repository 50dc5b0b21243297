"""Configuration: one versioned TOML file, the packaged default, and environment overrides.

`load_settings()` merges the user's file (BONEWATCH_CONFIG) over `default.toml`, applies the
BONEWATCH_* environment overrides of SPEC section 9, and validates the result. A bad value fails
at start with its key and the reason.
"""

from __future__ import annotations

import hashlib
import json
import os
import tomllib
from importlib.resources import files
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from bonewatch.errors import ConfigError

_STRICT = ConfigDict(extra="forbid", frozen=True)


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


class Database(BaseModel):
    model_config = _STRICT
    url: str = ""


class Smtp(BaseModel):
    model_config = _STRICT
    host: str = "localhost"
    port: int = Field(8025, ge=1, le=65535)
    user: str = ""
    password: str = Field("", repr=False)
    starttls: bool = False
    sender: str = "bonewatch@hospital.example"
    timeout_s: float = Field(30, gt=0)


class Recipients(BaseModel):
    model_config = _STRICT
    default: list[str] = Field(min_length=1)
    data_team: list[str] = Field(min_length=1)
    teams: dict[str, list[str]] = {}


class Ingest(BaseModel):
    model_config = _STRICT
    chunk_size: int = Field(50000, ge=1)
    code_map: dict[str, str] = {}
    plausible: dict[str, tuple[float, float]] = {}


class Clinical(BaseModel):
    model_config = _STRICT
    weight_window_days: int = Field(90, ge=0)
    weight_kind: Literal["actual"] = "actual"
    renal_baseline_window_days: int = Field(30, ge=0)
    alp_baseline_window_days: int = Field(30, ge=0)
    course_gap_days: int = Field(180, ge=1)
    alp_uln: float = Field(130.0, gt=0)
    ggt_uln: float = Field(55.0, gt=0)


class RuleSettings(BaseModel):
    """A rule's metadata and thresholds; any extra key is a threshold (a number)."""

    model_config = ConfigDict(extra="allow", frozen=True)
    version: str
    severity: Literal["high", "medium", "info"]
    action: str
    citation: str

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class Settings(BaseModel):
    model_config = _STRICT
    site: Site
    database: Database = Database()
    smtp: Smtp = Smtp()
    recipients: Recipients
    ingest: Ingest = Ingest()
    clinical: Clinical = Clinical()
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

    def rule(self, rule_id: str) -> RuleSettings:
        return self.rules[rule_id]

    def rule_version(self, rule_id: str) -> str:
        """The declared version, plus a short digest of the thresholds when they differ from the
        shipped defaults: changing a threshold always changes the version alerts record."""
        rule = self.rules[rule_id]
        shipped = _default_document().get("rules", {}).get(rule_id, {})
        shipped_params = {k: v for k, v in shipped.items() if k not in RuleSettings.model_fields}
        if rule.params == shipped_params and rule.version == shipped.get("version"):
            return rule.version
        digest = hashlib.sha256(json.dumps(rule.params, sort_keys=True).encode()).hexdigest()[:6]
        return f"{rule.version}+{digest}"


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
}


def _default_document() -> dict[str, Any]:
    return tomllib.loads(files("bonewatch").joinpath("default.toml").read_text("utf-8"))


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
            document = _merge(document, tomllib.loads(Path(path).read_text("utf-8")))
        except FileNotFoundError:
            raise ConfigError(f"configuration file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"configuration file {path} is not valid TOML: {exc}") from None
    for var, (section, key) in _ENV_OVERRIDES.items():
        if env.get(var, "") != "":
            value: Any = env[var]
            if key == "starttls":
                if value.lower() not in {"true", "false", "1", "0", "yes", "no"}:
                    raise ConfigError(f"{var}: expected true or false, got {value!r}")
                value = value.lower() in {"true", "1", "yes"}
            document.setdefault(section, {})[key] = value
    try:
        return Settings.model_validate(document)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(part) for part in first["loc"])
        raise ConfigError(f"configuration key {key}: {first['msg']}") from None


def with_overrides(settings: Settings, **dotted: Any) -> Settings:
    """A copy with some values replaced, keys written `section__key` (e.g. smtp__port=2525)."""
    document = settings.model_dump()
    for name, value in dotted.items():
        section, key = name.split("__", 1)
        document[section][key] = value
    return Settings.model_validate(document)
