"""Units through the UCUM library (SPEC 3), the default LOINC map and the LOINC check digit.

Behaviour the old hand table lacked (each marked `# new` below): any `factor`; mmol/L creatinine,
nmol/L and mg/L prefixes, `mg/24h` without an alias, `mcg/L`, `lbs` spelt any way, `[IU]` as UCUM
writes it, mEq/L calcium with its valence, the albumin/creatinine ratio in mg/mmol, wrong
dimensions refused by analysis rather than by absence from a list, `is_loinc`, BSAP activity's real
code 1777-2, the blood/serum/plasma variants, and 2862-1 (a serum albumin) no longer a urine test.
"""

from __future__ import annotations

import subprocess
import sys
from fractions import Fraction

import pytest

from bonewatch import units
from bonewatch.units import ANALYTES, LOINC, factor, is_loinc, normalise_unit

F = Fraction


def exact(value: Fraction) -> float:
    """The double nearest to an exact rational: what 'exact to floating precision' means here."""
    return float(value)


# SPEC 3's table, row by row: (analyte, unit as sent, exact factor to the canonical unit)
SPEC_TABLE = [
    ("alp", "ukat/L", F(60)),
    ("alp", "IU/L", F(1)),
    ("alp", "U/L", F(1)),
    ("bsap_activity", "ukat/L", F(60)),
    ("creatinine", "umol/L", 1 / F("88.4")),
    ("creatinine", "mg/dL", F(1)),
    ("calcium", "mmol/L", F("4.008")),
    ("calcium", "mg/dL", F(1)),
    ("albumin", "g/L", F(1, 10)),
    ("albumin", "g/dL", F(1)),
    ("ggt", "ukat/L", F(60)),
    ("weight", "[lb_av]", F("0.45359237")),
    ("weight", "lb", F("0.45359237")),
    ("weight", "kg", F(1)),
    ("urine_albumin_24h", "g/(24.h)", F(1000)),
    ("urine_albumin_24h", "mg/(24.h)", F(1)),
    ("bsap_mass", "ug/L", F(1)),
]


@pytest.mark.parametrize(("analyte", "unit", "expected"), SPEC_TABLE)
def test_spec_table_is_exact(analyte, unit, expected):
    assert factor(analyte, unit) == exact(expected)


def test_creatinine_molar_mass_is_the_spec_convention():
    # 88.4 µmol/L per mg/dL: 1 µmol/L = 1/88.4 mg/dL, and 88.4 µmol/L is 1 mg/dL to the last bit
    assert 88.4 * factor("creatinine", "umol/L") == pytest.approx(1.0, rel=1e-15)
    assert factor("creatinine", "umol/L") == exact(F(5, 442))


# FHIR/HL7 UCUM codes and the common non-UCUM spellings labs send
SPELLINGS = [
    ("creatinine", "µmol/L", 1 / F("88.4")),
    ("creatinine", "μmol/L", 1 / F("88.4")),        # Greek mu, not the micro sign
    ("creatinine", "umol/l", 1 / F("88.4")),
    ("creatinine", "mg/dl", F(1)),
    ("creatinine", "MG/DL", F(1)),
    ("creatinine", "mcmol/L", 1 / F("88.4")),       # new
    ("creatinine", "mmol/L", 1000 / F("88.4")),     # new: the FHIR creatinine in mmol/L
    ("creatinine", "nmol/L", 1 / (1000 * F("88.4"))),   # new: any prefix
    ("creatinine", "mg/L", F(1, 10)),               # new
    ("alp", "µkat/L", F(60)),
    ("alp", "[IU]/L", F(1)),                        # UCUM's spelling
    ("alp", "iu/l", F(1)),
    ("alp", "u/l", F(1)),                           # not UCUM's atomic mass unit 'u'
    ("alp", "mU/mL", F(1)),                         # new
    ("alp", "U/L{37Cel}", F(1)),                    # new: an annotation changes nothing
    ("ggt", "IU/L", F(1)),
    ("calcium", "mEq/L", F("4.008") / 2),           # new: calcium is divalent
    ("albumin", "g/dL", F(1)),
    ("albumin", "g/l", F(1, 10)),
    ("weight", "lbs", F("0.45359237")),
    ("weight", "LBS", F("0.45359237")),
    ("weight", "g", F(1, 1000)),                    # new
    ("urine_albumin_24h", "mg/d", F(1)),
    ("urine_albumin_24h", "mg/24h", F(1)),          # new: without an alias
    ("urine_albumin_24h", "g/24 h", F(1000)),       # new
    ("urine_albumin_24h", "mg/day", F(1)),
    ("urine_albumin_24h", "ug/min", F("1.44")),     # new: an excretion rate is a mass per time
    ("bsap_mass", "ng/mL", F(1)),
    ("bsap_mass", "mcg/L", F(1)),                   # new
    ("urine_albumin_spot", "mg/L", F(1)),
    ("urine_albumin_ratio", "mg/g", F(1)),          # new analyte
    ("urine_albumin_ratio", "ug/mg", F(1)),
    ("urine_albumin_ratio", "mg/mmol", F("8.84")),  # new: with creatinine's molar mass
    ("urine_albumin_ratio", "mg/mmol{creat}", F("8.84")),
]


@pytest.mark.parametrize(("analyte", "unit", "expected"), SPELLINGS)
def test_spellings_convert_exactly(analyte, unit, expected):
    assert factor(analyte, unit) == exact(expected)


@pytest.mark.parametrize(("analyte", "unit"), [
    ("alp", "mg/dL"),                    # a mass for an enzyme activity
    ("ggt", "%"),
    ("creatinine", "U/L"),               # an activity for a concentration
    ("creatinine", "mEq/L"),             # creatinine carries no charge
    ("calcium", "%"),
    ("albumin", "[IU]/L"),               # UCUM's [IU] is arbitrary: no mass
    ("albumin", "umol/L"),               # no molar mass for albumin in the table
    ("bsap_mass", "U/L"),                # BSAP mass and activity are never converted
    ("bsap_activity", "ug/L"),
    ("weight", "mg/dL"),
    ("urine_albumin_24h", "mg/L"),       # a concentration is not an excretion
    ("urine_albumin_spot", "mg/g"),      # a ratio is not a concentration (the old table said 1.0)
    ("urine_albumin_ratio", "%"),        # a ratio must name its masses
    ("urine_albumin_ratio", "{ratio}"),
    ("creatinine", "Cel"),               # an offset unit
])
def test_wrong_dimension_is_none(analyte, unit):
    assert factor(analyte, unit) is None


@pytest.mark.parametrize("unit", ["", " ", "parsecs", "furlongs", "mg/", "/", "((", "mg//dL", "{", "}",
                                  "mg/dL)", "10*", "\x00", "µ", "é/L", "mg/dL" * 50, "1e3/L"])
def test_garbage_is_none_and_never_raises(unit):
    assert factor("creatinine", unit) is None


def test_unknown_analyte_and_non_strings_are_none():
    assert factor("sodium", "mmol/L") is None
    assert factor("creatinine", None) is None       # type: ignore[arg-type]


def test_factor_is_cached():
    factor.cache_clear()
    factor("creatinine", "umol/L")
    factor("creatinine", "umol/L")
    assert factor.cache_info().hits == 1


def test_convertible_is_what_configured_aliases_must_point_to():
    assert units.convertible("umol/L") and units.convertible("mg/24h")
    assert not units.convertible("furlongs")
    assert not units.convertible("m")             # a real unit, but no analyte is a length


def test_normalise_unit_folds_spellings_and_drops_annotations():
    assert normalise_unit(" µmol / L ") == "umol/l"
    assert normalise_unit("[IU]/L") == "iu/l"
    assert normalise_unit("mg/mmol{creat}") == "mg/mmol"       # new: the annotation goes whole
    assert factor("urine_albumin_ratio", normalise_unit("mg/mmol{creat}")) == exact(F("8.84"))


def test_unit_key_table_still_answers_its_callers():
    table = units.unit_key_table()
    assert table.get(("creatinine", "umol/l")) == exact(1 / F("88.4"))
    assert table.get(("creatinine", "mmol/l")) == exact(1000 / F("88.4"))     # new
    assert table.get(("creatinine", "parsecs")) is None


def test_import_builds_no_registry():
    code = ("import sys; import bonewatch.units as u; "
            "assert 'pint' not in sys.modules and 'ucumvert' not in sys.modules; "
            "assert u.is_loinc('2160-0'); u.normalise_unit('mg/dL'); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.stdout.strip() == "ok", out.stderr


# ---- LOINC ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("code", ["2160-0", "14682-9", "718-7", "4548-4", "2345-7", "8480-6", "33914-3",
                                  "98979-8", "1777-2", "101475-2", "29463-7", "3141-9", "10-9"])
def test_is_loinc_accepts_valid_check_digits(code):
    assert is_loinc(code)


@pytest.mark.parametrize("code", ["2160-1", "1777-3", "14682-8", "2160", "2160-", "-0", "2160-00", "123456789-0",
                                  "2160_0", " 2160-0", "2160-0 ", "ABC-1", "CREA", "", None, 21600])
def test_is_loinc_refuses_bad_check_digits_and_shapes(code):
    assert not is_loinc(code)


def test_every_default_code_is_a_valid_loinc_of_a_monitored_analyte():
    assert all(is_loinc(code) for code in LOINC), [c for c in LOINC if not is_loinc(c)]
    assert set(LOINC.values()) == set(ANALYTES)
    assert all(is_loinc(code) for code in units._NOT_MAPPED)
    assert not set(LOINC) & set(units._NOT_MAPPED)


def test_synthea_and_spec_codes_are_mapped():
    assert LOINC["38483-4"] == "creatinine"        # Creatinine [Mass/volume] in Blood (Synthea)
    assert LOINC["49765-1"] == "calcium"           # Calcium [Mass/volume] in Blood (Synthea)
    for code, analyte in {"6768-6": "alp", "1777-2": "bsap_activity", "17838-4": "bsap_mass",
                          "2160-0": "creatinine", "14682-9": "creatinine", "17861-6": "calcium",
                          "2000-8": "calcium", "1751-7": "albumin", "2324-2": "ggt", "29463-7": "weight",
                          "14956-7": "urine_albumin_24h", "14957-5": "urine_albumin_spot",
                          "14959-1": "urine_albumin_ratio"}.items():
        assert LOINC[code] == analyte


@pytest.mark.parametrize("code", [
    "1994-3", "1995-0", "17863-2", "12180-6", "38230-9",   # ionized calcium: not corrected for albumin
    "1996-8",                                              # whole-blood mmol/L calcium: blood-gas territory
    "2161-8", "2164-2",                                    # urine creatinine, creatinine clearance
    "11041-1", "51620-3",                                  # post-dialysis creatinine
    "2862-1",                                              # SPEP albumin (and never a urine albumin)
    "15013-6",                                             # an ALP isoenzyme fraction
])
def test_different_measurements_are_not_mapped(code):
    assert is_loinc(code)
    assert code not in LOINC


def test_common_units_are_convertible_through_the_library():
    """The configuration check's shortcut (`COMMON_UNITS`) holds only units the library converts."""
    for unit in sorted(units.COMMON_UNITS):
        assert any(units.factor(name, unit) is not None for name in units.ANALYTES), unit


def test_loading_the_default_configuration_builds_no_registry():
    code = ("from bonewatch.config import load_settings; from bonewatch import units; load_settings(env={}); "
            "import sys; assert units._ucum.cache_info().currsize == 0; assert 'pint' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
