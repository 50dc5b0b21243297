"""`make test`'s short version of `make faults` (tests/faults/harness.py): a few real faults on
each store, the invariants against a clean run. The full set, PostgreSQL restarted and the soak
of 365 nights run with `make faults`."""

from __future__ import annotations

import pytest

from tests.faults import harness


@pytest.mark.parametrize("store", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_faults_lose_nothing_and_send_nothing_twice(store, tmp_path):
    plan = harness.Plan(scenarios=harness.SHORT[store], stores=(store,), nights=14, tail=2)
    outcomes = harness.run(plan, tmp_path)

    assert [o.scenario for o in outcomes] == list(harness.SHORT[store])
    assert [(o.scenario, o.notes) for o in outcomes if not o.ok] == []
    assert all(o.faulted for o in outcomes)
    line = harness.summary_line(outcomes)
    assert "rows lost 0, rows duplicated 0, alerts lost 0, duplicate sends 0" in line and line.endswith("PHI hits 0")
    if store == "sqlite":       # the process killed after the 250: one copy more, counted apart
        assert [o.window for o in outcomes] == [0, 1, 0]
