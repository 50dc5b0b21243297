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

