"""docker-compose.yml and the Dockerfile, read as data (no Docker engine runs in the tests): the
Airflow 3 services are all there, built from the production image (bonewatch and the runtime lock,
nothing installed at start), bonewatch talks to the compose PostgreSQL and Mailpit, `bonewatch
serve` runs, every image is pinned, the `celery` profile has Redis and two workers, and no
credential is committed other than the documented development default."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"

AIRFLOW_SERVICES = ["airflow-init", "airflow-apiserver", "airflow-scheduler",
                    "airflow-dag-processor", "airflow-triggerer"]
# The one literal password allowed, documented in the file's header as a compose-local default.
DEV_DEFAULT_PASSWORDS = {"airflow"}
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|FERNET|API_KEY|PRIVATE", re.I)
# ${VAR}, ${VAR:-} or ${VAR:-default}: the default is what is committed; ${VAR:?message}: nothing
# (compose refuses to start without VAR).
INTERPOLATION = re.compile(r"^\$\{(?P<var>[A-Z0-9_]+)(?::?-(?P<default>[^}]*)|:?\?(?P<required>[^}]*))?\}$")
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
    for name in ["postgres", "mailpit", "bonewatch-serve", *AIRFLOW_SERVICES]:
        assert name in services, name
        assert "profiles" not in services[name], f"{name} runs by default"
    assert services["mailpit"]["image"].startswith("axllent/mailpit")
    commands = {name: services[name].get("command") for name in AIRFLOW_SERVICES[1:]}
    assert commands == {"airflow-apiserver": "api-server", "airflow-scheduler": "scheduler",
                        "airflow-dag-processor": "dag-processor", "airflow-triggerer": "triggerer"}
    for name in AIRFLOW_SERVICES[1:]:
        needs = services[name]["depends_on"]
        assert needs["airflow-init"]["condition"] == "service_completed_successfully", name
        assert needs["postgres"]["condition"] == "service_healthy", name


def test_every_image_is_pinned(compose):
    for name, service in compose["services"].items():
        image = _committed(service["image"])
        repository, _, tag = image.rpartition(":")
        assert repository and tag and tag != "latest", (name, image)
        assert re.search(r"\d+\.\d+", tag), f"{name}: {image} is not pinned to a version"


def test_airflow_services_run_the_built_image_on_the_locked_airflow(compose):
    lock = (REPO / "requirements.lock").read_text(encoding="utf-8")
    pinned = re.search(r"^apache-airflow==(\S+)$", lock, re.M).group(1)
    base = re.search(r"^FROM (\S+)$", DOCKERFILE.read_text(encoding="utf-8"), re.M).group(1)
    assert base == f"apache/airflow:{pinned}-python3.11"
    for name in [*AIRFLOW_SERVICES, "bonewatch-serve", "airflow-worker-1", "airflow-worker-2"]:
        service = compose["services"][name]
        assert service["build"] == ".", name
        assert _committed(service["image"]).startswith("bonewatch-airflow:"), name
        env = _env(service)
        assert "_PIP_ADDITIONAL_REQUIREMENTS" not in env, f"{name}: build the image instead"
    assert "_PIP_ADDITIONAL_REQUIREMENTS" not in COMPOSE_FILE.read_text(encoding="utf-8")


def test_the_image_installs_bonewatch_and_only_the_runtime_lock():
    dockerfile = DOCKERFILE.read_text(encoding="utf-8")
    installs = re.findall(r"^RUN pip install (.+)$", dockerfile, re.M)
    assert installs == ["--no-cache-dir -r /opt/bonewatch/requirements.runtime.lock",
                        "--no-cache-dir --no-deps -e /opt/bonewatch"]
    copied = re.findall(r"^COPY (?:--chown=\S+ )?(.+) (\S+)$", dockerfile, re.M)
    sources = {src for group, _ in copied for src in group.split()}
    assert sources == {"requirements.runtime.lock", "pyproject.toml", "README.md", "sql", "plugins", "dags"}
    assert "requirements.lock" not in sources, "the development lock stays out of the image"
    # the editable install keeps the repository layout: <plugins>/../sql holds the migrations
    assert ("sql", "/opt/bonewatch/sql") in copied and ("plugins", "/opt/bonewatch/plugins") in copied


def test_airflow3_settings(compose):
    for name in AIRFLOW_SERVICES:
        env = _env(compose["services"][name])
        assert _committed(env["AIRFLOW__CORE__EXECUTOR"]) == "LocalExecutor"
        assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == \
            "http://airflow-apiserver:8080/execution/"
        # psycopg 3 is what the lock has (no psycopg2); the async URL must then be given too
        sync, async_ = env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"], env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC"]
        assert sync.startswith("postgresql+psycopg://") and "@postgres/airflow" in sync
        assert async_ == sync
        assert env["AIRFLOW__CORE__LOAD_EXAMPLES"].lower() == "false"


def test_celery_profile_has_redis_and_two_workers(compose):
    services = compose["services"]
    celery = {name for name, service in services.items() if "celery" in service.get("profiles", [])}
    assert celery == {"redis", "airflow-worker-1", "airflow-worker-2"}
    assert _committed(services["redis"]["image"]).startswith("redis:")
    ports = set()
    for name in ("airflow-worker-1", "airflow-worker-2"):
        env = _env(services[name])
        assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
        assert env["AIRFLOW__CELERY__BROKER_URL"] == "redis://redis:6379/0"
        assert services[name]["command"].startswith("celery worker")
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"
        ports.add(env["AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT"])
    assert len(ports) == 2, "two workers on one host need distinct log server ports"
    # the scheduler switches with AIRFLOW_EXECUTOR (the header says how)
    assert "AIRFLOW_EXECUTOR=CeleryExecutor docker compose --profile celery up" in \
        COMPOSE_FILE.read_text(encoding="utf-8")


def test_data_and_config_are_mounted_and_the_code_is_in_the_image(compose):
    for name in [*AIRFLOW_SERVICES, "bonewatch-serve"]:
        mounts = {v.split(":")[0]: v.split(":")[1] for v in compose["services"][name]["volumes"]}
        assert mounts.get("./data") == "/opt/airflow/bonewatch-data", name
        assert mounts.get("./config") == "/opt/bonewatch/config", name
        assert not {"./dags", "./plugins", "./sql"} & set(mounts), f"{name}: the code comes from the image"
        for local in mounts:
            if local.startswith("./"):
                assert (REPO / local).exists() or local == "./data", local
    # BONEWATCH_CONFIG is a path in the containers: the header says the file lives in ./config
    text = COMPOSE_FILE.read_text(encoding="utf-8")
    assert "BONEWATCH_CONFIG=/opt/bonewatch/config/bonewatch.toml" in text
    assert "AIRFLOW_UID" in text and "id -u" in text


def test_serve_runs_the_ack_links_and_the_dashboard(compose):
    serve = compose["services"]["bonewatch-serve"]
    assert "bonewatch serve --host 0.0.0.0 --port 8099" in " ".join(serve["command"])
    assert serve["ports"] == ["127.0.0.1:8099:8099"]
    env = _env(serve)
    assert _committed(env["BONEWATCH_DASHBOARD_PASSWORD"]) == ""
    assert INTERPOLATION.match(env["BONEWATCH_DASHBOARD_PASSWORD"]).group("var") == "BONEWATCH_DASHBOARD_PASSWORD"


def test_ack_secret_is_passed_and_required(compose):
    for name in [*AIRFLOW_SERVICES, "bonewatch-serve", "airflow-worker-1"]:
        value = _env(compose["services"][name])["BONEWATCH_ACK_SECRET"]
        match = INTERPOLATION.match(value)
        assert match and match.group("var") == "BONEWATCH_ACK_SECRET", name
        assert match.group("required"), f"{name}: compose must refuse to start without it"


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
