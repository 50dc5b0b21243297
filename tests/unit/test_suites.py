"""`suites.run_definition` is GX's `ValidationDefinition.run` without its freshness check and
result store (issue 14, the cost a one-row file pays): the same result, meta included."""

from __future__ import annotations

import pandas as pd

from bonewatch.quality import suites

FRAME = pd.DataFrame({"patient_id": ["1", "2"], "result_id": ["r1", "r2"], "analyte": ["creatinine", "creatinine"],
                      "status": ["final", "bogus"], "collected_at": pd.to_datetime(["2025-01-03", "2025-01-04"]),
                      suites.POSITION: [0.5, 2.0]})


def _comparable(document: dict) -> dict:
    """The result without what differs from one run to the next (the clock)."""
    meta = {k: v for k, v in document["meta"].items() if k not in ("run_id", "validation_time")}
    meta["batch_markers"] = {k: v for k, v in meta["batch_markers"].items() if k != "ge_load_time"}
    return {**document, "meta": meta, "id": None}


def test_run_definition_gives_what_a_validation_definition_run_gives():
    definition = suites._validation_definition("labs", ())
    for result_format in ("SUMMARY", "COMPLETE"):
        ours = suites.run_definition(definition, FRAME, result_format)
        theirs = definition.run(batch_parameters={"dataframe": FRAME}, result_format={"result_format": result_format})
        assert [r.success for r in ours.results] == [r.success for r in theirs.results]
        assert not ours.success, "the bogus status and the implausible value fail"
        assert _comparable(ours.to_json_dict()) == _comparable(theirs.to_json_dict())
        assert set(ours.meta) == set(theirs.meta)
