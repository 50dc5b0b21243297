"""The README's rule table is generated from the shipped configuration: it must not drift."""

from pathlib import Path

from bonewatch.config import load_settings
from bonewatch.explain import TABLE_BEGIN, TABLE_END, rules_markdown

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_rule_table_matches_the_configuration():
    text = README.read_text("utf-8")
    table = text[text.index(TABLE_BEGIN) + len(TABLE_BEGIN):text.index(TABLE_END)].strip()
    assert table == rules_markdown(load_settings(env={})), "run `bonewatch rules` and paste it into README.md"


def test_every_rule_is_in_the_table_with_its_citation():
    settings = load_settings(env={})
    table = rules_markdown(settings)
    assert len(settings.rules) == 15
    for rule_id, rule in settings.rules.items():
        assert f"`{rule_id}`" in table and rule.citation in table
