"""Analytes, their LOINC codes and canonical units, and unit conversion through a UCUM library.

Two parts, kept apart on purpose:
- **The clinical table** (`ANALYTES`, `LOINC`): which codes mean which monitored analyte, the
  canonical unit each is stored in, and the molar mass that links its molar and mass units. Small,
  explicit, reviewed by hand: these are clinical decisions, not units questions.
- **The units**: a unit as sent is read as UCUM (the grammar of the whole UCUM specification from
  `ucumvert`, evaluated by `pint`), after folding the spellings labs send that are not UCUM
  (`µmol/L`, `IU/L`, `mg/dl`, `lbs`, `mcg/L`, `mg/24h`). The factor to the canonical unit comes
  from dimensional analysis in exact rational arithmetic (the registry runs on `Fraction`), with
  the analyte's molar mass when one side is molar, and is rounded to a float once: SPEC 3's
  conversions come out as the nearest double to the exact value.

The registry and the parser cost about a second to build, so they are built on the first call of
`factor`, not on import (the CLI imports this module on every command).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from typing import Any

__all__ = ["ANALYTES", "LOINC", "Analyte", "convertible", "factor", "is_loinc", "normalise_unit",
           "ucum_readings",
           "unit_key_table"]


@dataclass(frozen=True)
class Analyte:
    """A monitored analyte: the unit it is stored in (`canonical_unit`, as shown and stored),
    that unit in UCUM (`ucum`), the molar mass in g/mol linking its molar and mass units (for a
    ratio to creatinine: creatinine's), the ion's valence (UCUM's `eq` is a mole: 1 mEq of Ca2+ is
    0.5 mmol), and whether it is an enzyme activity (then `IU` is the IUB enzyme unit, 1 µmol/min,
    not UCUM's arbitrary WHO `[IU]`)."""

    name: str
    canonical_unit: str
    ucum: str
    molar_mass: Fraction | None = None
    valence: int | None = None
    enzyme: bool = False


# Creatinine: SPEC 3 and the clinical convention convert with 88.4 µmol/L per mg/dL, i.e. a molar
# mass of 10 000 / 88.4 = 113.122 g/mol (C4H7N3O is 113.12 g/mol: 10 000 / 113.12 = 88.402). The
# convention wins so that the SPEC's conversion is exact.
_CREATININE_G_MOL = Fraction(10000) / Fraction("88.4")
# Calcium: 40.08 g/mol, so mmol/L × 4.008 = mg/dL exactly.
_CALCIUM_G_MOL = Fraction("40.08")

ANALYTES: dict[str, Analyte] = {
    a.name: a
    for a in (
        Analyte("alp", "U/L", "U/L", enzyme=True),
        Analyte("bsap_activity", "U/L", "U/L", enzyme=True),
        Analyte("bsap_mass", "ug/L", "ug/L"),      # never converted to or from the activity
        Analyte("creatinine", "mg/dL", "mg/dL", molar_mass=_CREATININE_G_MOL),
        Analyte("calcium", "mg/dL", "mg/dL", molar_mass=_CALCIUM_G_MOL, valence=2),
        Analyte("albumin", "g/dL", "g/dL"),
        Analyte("ggt", "U/L", "U/L", enzyme=True),
        Analyte("weight", "kg", "kg"),
        Analyte("urine_albumin_24h", "mg/24h", "mg/d"),
        Analyte("urine_albumin_spot", "mg/L", "mg/L"),
        # albumin/creatinine ratio: mg albumin per g creatinine; mg/mmol converts with
        # creatinine's molar mass (1 mg/mmol = 8.84 mg/g)
        Analyte("urine_albumin_ratio", "mg/g", "mg/g", molar_mass=_CREATININE_G_MOL),
    )
}

# LOINC codes mapped by default. Each is safe by LOINC's own definition: the same component
# (total, not ionized or an isoenzyme or a fraction), the same kind of property up to the unit
# (mass and moles concentrations convert), a blood, serum or plasma system (urine for the urine
# analytes), quantitative. Codes left out on purpose are listed in `_NOT_MAPPED` with the reason.
LOINC: dict[str, str] = {
    "6768-6": "alp",                  # Alkaline phosphatase [Enzymatic activity/volume] in Serum or Plasma
    "77141-0": "alp",                 # Alkaline phosphatase [Enzymatic activity/volume] in Serum, Plasma or Blood: same total ALP
    "1777-2": "bsap_activity",        # Alkaline phosphatase.bone [Enzymatic activity/volume] in Serum or Plasma (SPEC 3 says 1777-3: no such LOINC, its check digit fails)
    "17838-4": "bsap_mass",           # Alkaline phosphatase.bone [Mass/volume] in Serum or Plasma (the immunoassay)
    "2160-0": "creatinine",           # Creatinine [Mass/volume] in Serum or Plasma
    "14682-9": "creatinine",          # Creatinine [Moles/volume] in Serum or Plasma: converts with the molar mass
    "38483-4": "creatinine",          # Creatinine [Mass/volume] in Blood: what Synthea and POC analysers send
    "59826-8": "creatinine",          # Creatinine [Moles/volume] in Blood
    "77140-2": "creatinine",          # Creatinine [Moles/volume] in Serum, Plasma or Blood
    "21232-4": "creatinine",          # Creatinine [Mass/volume] in Arterial blood: blood, same component and property
    "101475-2": "creatinine",         # Creatinine [Moles/volume] in Venous blood
    "17861-6": "calcium",             # Calcium [Mass/volume] in Serum or Plasma (total calcium)
    "2000-8": "calcium",              # Calcium [Moles/volume] in Serum or Plasma (total calcium)
    "49765-1": "calcium",             # Calcium [Mass/volume] in Blood: total calcium (component Calcium, not Calcium.ionized); Synthea's code
    "1751-7": "albumin",              # Albumin [Mass/volume] in Serum or Plasma
    "61151-7": "albumin",             # Albumin [Mass/volume] in Serum or Plasma by Bromocresol green (BCG) dye binding method
    "61152-5": "albumin",             # Albumin [Mass/volume] in Serum or Plasma by Bromocresol purple (BCP) dye binding method
    "77148-5": "albumin",             # Albumin [Mass/volume] in Serum, Plasma or Blood by Bromocresol green (BCG) dye binding method
    "54347-0": "albumin",             # Albumin [Mass/volume] in Blood
    "2324-2": "ggt",                  # Gamma glutamyl transferase [Enzymatic activity/volume] in Serum or Plasma
    "29463-7": "weight",              # Body weight
    "3141-9": "weight",               # Body weight Measured: the same property, measured
    "14956-7": "urine_albumin_24h",   # Microalbumin [Mass/time] in 24 hour Urine
    "1755-8": "urine_albumin_24h",    # Albumin [Mass/time] in 24 hour Urine
    "14957-5": "urine_albumin_spot",  # Microalbumin [Mass/volume] in Urine
    "1754-1": "urine_albumin_spot",   # Albumin [Mass/volume] in Urine
    "14959-1": "urine_albumin_ratio",  # Microalbumin/Creatinine [Mass Ratio] in Urine
    "9318-7": "urine_albumin_ratio",   # Albumin/Creatinine [Mass Ratio] in Urine
    "32294-1": "urine_albumin_ratio",  # Albumin/Creatinine [Ratio] in Urine: the unit sent (mg/g, mg/mmol) decides; a bare ratio is quarantined
}

# Valid LOINC codes of the same analytes that are NOT mapped by default, and why. A hospital that
# wants one maps it on purpose in `[ingest.code_map]`.
_NOT_MAPPED: dict[str, str] = {
    "1994-3": "Calcium.ionized [Moles/volume]: ionized, not total calcium; correcting it for albumin is wrong",
    "1995-0": "Calcium.ionized [Moles/volume] in Serum or Plasma: ionized calcium",
    "17863-2": "Calcium.ionized [Mass/volume] in Serum or Plasma: ionized calcium",
    "12180-6": "Calcium.ionized [Mass/volume] in Serum or Plasma by ISE: ionized calcium",
    "38230-9": "Calcium.ionized [Mass/volume] in Blood: ionized calcium",
    "1996-8": ("Calcium [Moles/volume] in Blood: whole-blood mmol/L calcium is what blood-gas analysers "
               "report, and they measure the ionized fraction; a miscoded ionized 1.2 mmol/L would read as "
               "a total 4.8 mg/dL and raise a false HYPOCALCEMIA"),
    "2862-1": ("Albumin [Mass/volume] in Serum or Plasma by Electrophoresis: the SPEP albumin runs beside the "
               "chemistry albumin in myeloma and differs from the dye-binding methods the calcium correction "
               "assumes (and it is not a urine test, as the old table had it)"),
    "2161-8": "Creatinine [Mass/volume] in Urine: urine, not serum creatinine",
    "2164-2": "Creatinine renal clearance in 24 hour Urine: a clearance, not a concentration",
    "11041-1": "Creatinine [Mass/volume] in Serum or Plasma --post dialysis: not the patient's renal function",
    "11042-9": "Creatinine [Mass/volume] in Serum or Plasma --pre dialysis: a dialysis patient's CrCl is not the dosing CrCl",
    "51619-5": "Creatinine [Moles/volume] in Serum or Plasma --pre dialysis: as 11042-9",
    "51620-3": "Creatinine [Moles/volume] in Serum or Plasma --post dialysis: as 11041-1",
    "3142-7": "Body weight Stated: reported by the patient, not measured; CrCl for dosing needs a measured weight",
}


# ---- LOINC codes ---------------------------------------------------------------------------------

# LOINC codes are 3 to 7 characters today; Regenstrief reserves 10 for growth: up to 8 digits.
_LOINC_SHAPE = re.compile(r"(\d{1,8})-(\d)")


def is_loinc(code: object) -> bool:
    """True when `code` is shaped like a LOINC code (1-8 digits, '-', a check digit) and its check
    digit is right (LOINC's mod 10 algorithm, the Luhn algorithm over the digits before the hyphen).
    Tells a LOINC the product does not monitor from a hospital's local code."""
    if not isinstance(code, str):
        return False
    match = _LOINC_SHAPE.fullmatch(code)
    if match is None:
        return False
    total = 0
    for i, ch in enumerate(reversed(match.group(1))):
        digit = int(ch)
        if i % 2 == 0:              # rightmost digit and every second one to its left are doubled
            digit = digit * 2 - 9 if digit > 4 else digit * 2
        total += digit
    return (10 - total % 10) % 10 == int(match.group(2))


# ---- spellings -----------------------------------------------------------------------------------

_SPACES = re.compile(r"\s+")
_ANNOTATION = re.compile(r"\{[^{}]*\}")
_MICRO = str.maketrans({"µ": "u", "μ": "u"})


def normalise_unit(unit: str) -> str:
    """One lookup key for the spellings of a unit (for `[ingest.unit_aliases]`): no spaces, lower
    case, µ/μ as u, `[IU]` as iu, UCUM annotations (`{creat}`) dropped: they never change a unit."""
    u = _SPACES.sub("", unicodedata.normalize("NFKC", unit)).translate(_MICRO).lower()
    return _ANNOTATION.sub("", u).replace("[iu]", "iu")


# A day as labs write it after a slash: /24h, /24hr, /24hours, /day -> UCUM /d (= /(24.h), exactly).
_PER_DAY = re.compile(r"/(?:24h(?:rs?|ours?)?|days?)(?=$|[/.)])", re.IGNORECASE)
# Atoms (letters, brackets, apostrophes) outside annotations; annotations are kept as they are.
_ATOM = re.compile(r"\{[^{}]*\}|[A-Za-z_\[\]']+")
# Lab spellings of atoms that are not UCUM, or that UCUM reads otherwise (`u` alone is UCUM's
# atomic mass unit; no lab means that). Keys are lower case; a metric prefix may precede IU and U.
_ATOMS = {"iu": "[IU]", "[iu]": "[IU]", "u": "U", "lb": "[lb_av]", "lbs": "[lb_av]", "[lb]": "[lb_av]"}
_PREFIXED = re.compile(r"([kmu]?)(iu|\[iu\]|u)", re.IGNORECASE)


def _fold_atom(match: re.Match[str]) -> str:
    atom = match.group(0)
    if atom.startswith("{"):
        return atom
    if len(atom) > 2 and atom[:2].lower() == "mc":       # mcg, mcmol, mckat: the pharmacy micro
        atom = "u" + atom[2:]
    if atom.lower() in _ATOMS:
        return _ATOMS[atom.lower()]
    prefixed = _PREFIXED.fullmatch(atom)
    if prefixed and prefixed.group(1):
        return prefixed.group(1).lower() + _ATOMS[prefixed.group(2).lower()]
    return atom


def _fold(text: str) -> str:
    return _ATOM.sub(_fold_atom, _PER_DAY.sub("/d", text))


def ucum_readings(unit: str) -> tuple[str, ...]:
    """The UCUM readings to try for a unit as sent, most faithful first: the text with lab spellings
    folded (`µmol/L` -> `umol/L`, `IU/L` -> `[IU]/L`, `lbs` -> `[lb_av]`, `mg/24h` -> `mg/d`), then the
    same in lower case (`MG/DL`, `mg/DL` -> `mg/dl`: UCUM is case-sensitive, labs are not)."""
    text = _SPACES.sub("", unicodedata.normalize("NFKC", unit)).translate(_MICRO)
    first = _fold(text)
    second = _fold(text.lower())
    return (first,) if second == first else (first, second)


# ---- the library ---------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def _ucum() -> tuple[Any, Any, Any]:
    """(pint registry with the UCUM atoms, UCUM parser, parse tree -> quantity), built once."""
    from pathlib import Path

    import pint
    import ucumvert
    from ucumvert.parser import get_ucum_parser
    from ucumvert.ucum_pint import UcumToPintTransformer

    # Fraction, not float: 1 mg/dL is 1/100 kg/m3 exactly, so factors are exact until the end
    registry = pint.UnitRegistry(non_int_type=Fraction)
    registry.load_definitions(Path(ucumvert.__file__).resolve().parent / "pint_ucum_defs.txt")
    return registry, get_ucum_parser(), UcumToPintTransformer(ureg=registry).transform


@lru_cache(maxsize=1024)
def _quantity(code: str) -> Any:
    """A UCUM code as a pint quantity (magnitude 1, or the code's own factor as in `10*3/L`), or None."""
    registry, parser, transform = _ucum()
    try:
        quantity = transform(parser.parse(code))
    except Exception:   # lark's parse errors and pint's unknown-unit errors alike: not a unit we read
        return None
    return quantity if isinstance(quantity, registry.Quantity) else registry.Quantity(1, quantity)


def _read(unit: str, enzyme: bool) -> Any:
    for code in ucum_readings(unit):
        if enzyme:      # in an enzyme activity IU is the IUB unit (1 µmol/min): SPEC 3, IU/L = U/L
            code = code.replace("[IU]", "U").replace("[iU]", "U")
        quantity = _quantity(code)
        if quantity is not None:
            return quantity
    return None


def _has_mass(quantity: Any) -> bool:
    registry = _ucum()[0]
    return any("[mass]" in registry.get_dimensionality(name) for name, _ in quantity.unit_items())


@lru_cache(maxsize=4096)
def factor(analyte: str, unit: str) -> float | None:
    """The number to multiply a value in `unit` (as sent, or after the configured aliases) by to get
    `analyte`'s canonical unit; None when the unit cannot be read, or measures something else for
    this analyte (a mass for an enzyme, a percentage, a different quantity). Never raises."""
    spec = ANALYTES.get(analyte)
    if spec is None or not isinstance(unit, str) or not unit.strip():
        return None
    registry = _ucum()[0]   # outside the try: a missing library fails loudly, not as "cannot be converted"
    try:
        sent = _read(unit, spec.enzyme)
        target = _read(spec.ucum, spec.enzyme)
        if sent is None or target is None:
            return None
        equivalents = sum(power for name, power in sent.unit_items() if name.endswith("equivalents"))
        if equivalents:     # mEq/L: moles of charge; only an ion with a known valence converts
            if spec.valence is None:
                return None
            sent = sent * Fraction(1, spec.valence) ** equivalents
        if target.dimensionless and not _has_mass(sent):
            return None     # a ratio must name its masses: '%' or a bare number is not mg/g
        molar = registry.Quantity(spec.molar_mass, "g/mol") if spec.molar_mass is not None else None
        for candidate in (sent, *((sent * molar, sent / molar) if molar is not None else ())):
            if candidate.dimensionality == target.dimensionality:
                ratio = Fraction((candidate / target).to("dimensionless").magnitude)
                return float(ratio) if ratio > 0 else None
    except Exception:   # an offset unit (Cel) or anything pint cannot scale: not convertible
        return None
    return None


#: spellings every lab uses, known convertible (a unit test proves each through the library): the
#: configuration check accepts an alias to one of them without building the registry, which costs
#: a second or two that every command (listing alerts, --help) would otherwise pay at start
COMMON_UNITS = frozenset({
    "mg/dl", "umol/l", "mmol/l", "u/l", "iu/l", "ukat/l", "g/dl", "g/l", "mg/l", "ug/l", "ng/ml", "kg",
    "lb", "lbs", "[lb_av]", "mg/24h", "mg/(24.h)", "g/24h", "mg/d", "g/d", "mg/g", "mg/mmol",
})


def convertible(unit: str) -> bool:
    """True when some monitored analyte can be converted from `unit` (checks configured aliases)."""
    if normalise_unit(unit) in COMMON_UNITS:
        return True
    return any(factor(name, unit) is not None for name in ANALYTES)


class _FactorTable(Mapping):
    """Compatibility view for callers of `unit_key_table`: (analyte, unit) -> factor, looked up
    through `factor` on demand. Iterating it yields only the canonical units."""

    def __getitem__(self, key: tuple[str, str]) -> float:
        value = factor(*key) if isinstance(key, tuple) and len(key) == 2 else None
        if value is None:
            raise KeyError(key)
        return value

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter([(name, a.canonical_unit) for name, a in ANALYTES.items()])

    def __len__(self) -> int:
        return len(ANALYTES)


def unit_key_table() -> Mapping[tuple[str, str], float]:
    """(analyte, unit) -> factor to the canonical unit. Deprecated: call `factor` directly."""
    return _FactorTable()
