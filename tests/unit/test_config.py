"""Configuration: thresholds live in one file; a changed threshold changes the rule version that
alerts record; a bad value fails at start with its key and the reason."""

from __future__ import annotations

import pytest

from bonewatch.config import load_settings
from bonewatch.errors import ConfigError
from tests.unit.test_rules import renal_history


def write(tmp_path, text: str):
    path = tmp_path / "bonewatch.toml"
    path.write_text(text)
    return path


def test_changed_threshold_bumps_the_version_alerts_record(tmp_path):
    from bonewatch.rules import evaluate

    default = load_settings(env={})
    changed = load_settings(write(tmp_path, "[rules.RENAL_HOLD]\nrise_normal = 0.3\n"), env={})
    assert default.rule_version("RENAL_HOLD") == "1"
    assert changed.rule_version("RENAL_HOLD").startswith("1+")
    assert changed.rule_version("DOSE_BAND") == "1"
    labs, events = renal_history(0.9, 1.2).frames()
    from datetime import date

    assert not [f for f in evaluate(labs, events, date(2025, 2, 10), default) if f.rule == "RENAL_HOLD"]
    hold = [f for f in evaluate(labs, events, date(2025, 2, 10), changed) if f.rule == "RENAL_HOLD"]
    assert hold and hold[0].rule_version == changed.rule_version("RENAL_HOLD")


def test_clinical_limits_change_every_rule_version(tmp_path):
    changed = load_settings(write(tmp_path, "[clinical]\nalp_uln = 120\n"), env={})
    assert changed.rule_version("ALP_ELEVATED_START").startswith("1+")
    assert "120 U/L" in changed.describe_rule("ALP_ELEVATED_START")


@pytest.mark.parametrize(("text", "message"), [
    ("[site]\ntimezone = 'Mars/Olympus'\n", "configuration key site.timezone: Value error, unknown time zone 'Mars/Olympus'"),
    ("[smtp]\nport = 0\n", "configuration key smtp.port: Input should be greater than or equal to 1"),
    ("[rules.HYPOCALCEMIA]\nwhen = 'below {nothing}'\n", "configuration key rules.HYPOCALCEMIA.when: unknown placeholder 'nothing'"),
    ("[sitee]\nname = 'x'\n", "configuration key sitee: Extra inputs are not permitted"),
    ("[site\n", "is not valid TOML"),
    ("[ingest.unit_aliases]\n'mcg/L' = 'furlongs'\n", "configuration key ingest.unit_aliases: Value error, unit alias 'mcg/L' points to 'furlongs'"),
    ("[ingest.snomed_map]\n'123' = 'tea_party'\n", "configuration key ingest.snomed_map: Value error, SNOMED CT code '123' maps to 'tea_party'"),
    ("[sources.lis]\ntable = 'labs; DROP TABLE x'\nwatermark = 'v'\n", "configuration key sources.lis.table: Value error, expected a plain"),
    ("[sources.lis]\ntable = 'labs'\nwatermark = 'v'\n[sources.lis.columns]\nmrn = 'x'\n", "'mrn' is not a lab column"),
    ("[sources.lis]\ntable = 'labs'\n", "configuration key sources.lis.watermark: Field required"),
])
def test_bad_configuration_names_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError) as error:
        load_settings(write(tmp_path, text), env={})
    assert message in str(error.value)


def test_environment_overrides(tmp_path):
    settings = load_settings(env={"BONEWATCH_SMTP_PORT": "2525", "BONEWATCH_SMTP_STARTTLS": "true",
                                  "BONEWATCH_TIMEZONE": "Europe/Berlin", "BONEWATCH_DATABASE_URL": "sqlite:///x.db"})
    assert (settings.smtp.port, settings.smtp.starttls, settings.site.timezone, settings.database_url) == \
        (2525, True, "Europe/Berlin", "sqlite:///x.db")
    with pytest.raises(ConfigError, match="BONEWATCH_SMTP_STARTTLS"):
        load_settings(env={"BONEWATCH_SMTP_STARTTLS": "maybe"})



# ---- secrets: from the environment only, long enough, never shown --------------------------------

ACK_SECRET = "k" * 31 + "Z"                      # exactly the minimum length
SECRETS_ENV = {
    "BONEWATCH_ACK_SECRET": ACK_SECRET,
    "BONEWATCH_SMTP_PASSWORD": "smtp-Pw-4417",
    "BONEWATCH_DASHBOARD_PASSWORD": "dash-Pw-88213377",
    "BONEWATCH_DATABASE_URL": "postgresql+psycopg://bw:db-Pw-5521@db.hospital.example/bw?password=q-Pw-90",
}
SECRET_VALUES = ("kkkkkkkk", "smtp-Pw-4417", "dash-Pw-88213377", "db-Pw-5521", "q-Pw-90")


@pytest.mark.parametrize(("text", "variable"), [
    ("[notify]\nack_secret = 'file-secret-0123456789-0123456789-x'\n", "BONEWATCH_ACK_SECRET"),
    ("[smtp]\nuser = 'relay'\npassword = 'file-secret-0123456789'\n", "BONEWATCH_SMTP_PASSWORD"),
    ("[quality]\ndashboard_password = 'file-secret-0123456789'\n", "BONEWATCH_DASHBOARD_PASSWORD"),
    ("[database]\nurl = 'postgresql://bw:file-secret-0123456789@db/bw'\n", "BONEWATCH_DATABASE_URL"),
    ("[database]\nurl = 'postgresql://bw@db/bw?password=file-secret-0123456789'\n", "BONEWATCH_DATABASE_URL"),
    ("[sources.lis]\ntable = 'labs'\nwatermark = 'v'\nurl = 'postgresql://lis:file-secret-0123456789@lis/x'\n",
     "url_env"),
], ids=["ack_secret", "smtp_password", "dashboard_password", "database_url", "database_url_query", "source_url"])
def test_a_secret_in_the_configuration_file_is_refused_naming_the_variable(tmp_path, text, variable):
    with pytest.raises(ConfigError) as error:
        load_settings(write(tmp_path, text), env={})
    message = str(error.value)
    assert variable in message and "\n" not in message
    assert "file-secret" not in message


def test_a_database_url_without_password_may_stay_in_the_file(tmp_path):
    settings = load_settings(write(tmp_path, "[database]\nurl = 'postgresql://bw@db/bw'\n"), env={})
    assert settings.database_url == "postgresql://bw@db/bw"


@pytest.mark.parametrize(("variable", "minimum"), [("BONEWATCH_ACK_SECRET", 32),
                                                   ("BONEWATCH_DASHBOARD_PASSWORD", 16)])
def test_a_short_key_is_refused_naming_the_variable_and_the_length(variable, minimum):
    short = "Q" * (minimum - 1)
    with pytest.raises(ConfigError) as error:
        load_settings(env={variable: short})
    message = str(error.value)
    assert variable in message and f"at least {minimum} characters" in message
    assert short not in message and "\n" not in message
    assert load_settings(env={variable: "Q" * minimum}) is not None


def test_secrets_never_show_in_repr_str_dumps_or_logs(caplog):
    import logging

    with caplog.at_level(logging.DEBUG):
        settings = load_settings(env=SECRETS_ENV)
    # they are there for the code that needs them ...
    assert settings.notify.ack_secret == ACK_SECRET and settings.smtp.password == "smtp-Pw-4417"
    assert settings.quality.dashboard_password == "dash-Pw-88213377"
    assert settings.database_url == SECRETS_ENV["BONEWATCH_DATABASE_URL"]
    # ... and nowhere a person or a log could read them
    shown = {"repr": repr(settings), "str": str(settings), "dump": str(settings.model_dump()),
             "json": settings.model_dump_json(), "database": repr(settings.database), "log": caplog.text}
    for where, text in shown.items():
        assert not [s for s in SECRET_VALUES if s in text], where
    assert "postgresql+psycopg://bw:***@db.hospital.example/bw?password=***" in shown["repr"]
    assert "postgresql+psycopg://bw:***@db.hospital.example/bw?password=***" in shown["json"]


def test_with_overrides_keeps_the_secrets():
    from bonewatch.config import with_overrides

    copy = with_overrides(load_settings(env=SECRETS_ENV), smtp__port=2525)
    assert (copy.smtp.port, copy.smtp.password, copy.notify.ack_secret, copy.database_url) == \
        (2525, "smtp-Pw-4417", ACK_SECRET, SECRETS_ENV["BONEWATCH_DATABASE_URL"])
