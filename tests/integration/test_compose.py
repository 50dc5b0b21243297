"""docker-compose.yml, read as data (no Docker engine runs in the tests): the Airflow 3 services are
all there, the project is mounted where Airflow looks, bonewatch talks to the compose PostgreSQL
and Mailpit, and no credential is committed other than the documented development default."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"

AIRFLOW_SERVICES = ["airflow-init", "airflow-apiserver", "airflow-scheduler",
                    "airflow-dag-processor", "airflow-triggerer"]
# The one literal password allowed, documented in the file's header as a compose-local default.
DEV_DEFAULT_PASSWORDS = {"airflow"}
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|FERNET|API_KEY|PRIVATE", re.I)
# ${VAR}, ${VAR:-} or ${VAR:-default}: the default is what is committed.
INTERPOLATION = re.compile(r"^\$\{(?P<var>[A-Z0-9_]+)(?::?-(?P<default>[^}]*))?\}$")
URL_CREDENTIALS = re.compile(r"://(?P<user>[^:/@\s]+):(?P<password>\$\{[^}]*\}|[^@\s]*)@")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def _committed(value: str) -> str:
    """What the file itself supplies: the literal, or the default of a ${VAR:-default}."""
    match = INTERPOLATION.match(value.strip())
    if match:
        return match.group("default") or ""
    return value


def test_services(compose):
    services = compose["services"]
    for name in ["postgres", "mailpit", *AIRFLOW_SERVICES]:
        assert name in services, name
    assert services["mailpit"]["image"].startswith("axllent/mailpit")
    commands = {name: services[name].get("command") for name in AIRFLOW_SERVICES[1:]}
    assert commands == {"airflow-apiserver": "api-server", "airflow-scheduler": "scheduler",
                        "airflow-dag-processor": "dag-processor", "airflow-triggerer": "triggerer"}
    for name in AIRFLOW_SERVICES[1:]:
        needs = services[name]["depends_on"]
        assert needs["airflow-init"]["condition"] == "service_completed_successfully", name
        assert needs["postgres"]["condition"] == "service_healthy", name


def test_airflow_image_matches_the_lock(compose):
    lock = (REPO / "requirements.lock").read_text(encoding="utf-8")
    pinned = re.search(r"^apache-airflow==(\S+)$", lock, re.M).group(1)
    for name in AIRFLOW_SERVICES:
        image = _committed(compose["services"][name]["image"])
        assert image.startswith(f"apache/airflow:{pinned}"), (name, image)


def test_airflow3_settings(compose):
    for name in AIRFLOW_SERVICES:
        env = _env(compose["services"][name])
        assert env["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor"
        assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == \
            "http://airflow-apiserver:8080/execution/"
        assert "@postgres/airflow" in env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
        assert env["AIRFLOW__CORE__LOAD_EXAMPLES"].lower() == "false"


def test_project_is_mounted(compose):
    for name in AIRFLOW_SERVICES:
        mounts = {v.split(":")[0]: v.split(":")[1] for v in compose["services"][name]["volumes"]}
        assert mounts.get("./dags") == "/opt/airflow/dags", name
        assert mounts.get("./plugins") == "/opt/airflow/plugins", name
        # bonewatch.store.db looks for the Alembic scripts at <plugins>/../sql
        assert mounts.get("./sql") == "/opt/airflow/sql", name
        for local in mounts:
            if local.startswith("./"):
                assert (REPO / local).exists() or local == "./data", local


def test_bonewatch_uses_the_compose_services(compose):
    for name in AIRFLOW_SERVICES:
        env = _env(compose["services"][name])
        url = env["BONEWATCH_DATABASE_URL"]
        assert url.startswith("postgresql+psycopg://") and "@postgres/bonewatch" in url
        assert _committed(env["BONEWATCH_SMTP_HOST"]) == "mailpit"
        assert _committed(env["BONEWATCH_SMTP_PORT"]) == "1025"
        assert _committed(env["BONEWATCH_TIMEZONE"]) == "UTC"
        assert _committed(env["BONEWATCH_SMTP_USER"]) == ""
    init = compose["services"]["airflow-init"]
    assert "bonewatch.cli db upgrade" in "\n".join(init["command"])
    created = compose["configs"]["bonewatch-initdb"]["content"]
    assert "CREATE DATABASE bonewatch" in created


def test_no_committed_secrets(compose):
    text = COMPOSE_FILE.read_text(encoding="utf-8")
    assert "compose-local development default" in text  # the allowance is documented
    environments = [_env(compose.get("x-airflow-common", {}))]
    environments += [_env(service) for service in compose["services"].values()]
    for env in environments:
        for key, value in env.items():
            if SECRET_NAME.search(key):
                committed = _committed(value)
                assert committed in {""} | DEV_DEFAULT_PASSWORDS, f"{key} commits {committed!r}"
            for match in URL_CREDENTIALS.finditer(value):
                password = _committed(match.group("password"))
                assert password in DEV_DEFAULT_PASSWORDS, f"{key} embeds a password"
    # Nothing that looks like a pasted key or token anywhere in the file.
    assert "BEGIN " not in text
    tokens = re.findall(r"[A-Za-z0-9+=_-]{24,}", text)
    assert not [t for t in tokens if re.search(r"\d", t) and re.search(r"[A-Za-z]", t)], tokens


def test_ports_are_local_only(compose):
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)
