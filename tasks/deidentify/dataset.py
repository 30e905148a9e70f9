"""How each kind of value is de-identified: dummy values per VR, date shifts, and what the
engine knows about the file's patient (text cleaning: ``text.py``). ``rewrite.py`` applies
them."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, timedelta
from functools import lru_cache

from tasks.deidentify.text import IdentifierMatcher

DUMMY_BY_VR: dict[str, object] = {
    "AE": "ANONYMOUS",
    "AS": "000D",
    "CS": "ANONYMIZED",
    "DA": "19000101",
    "DS": "0",
    "DT": "19000101000000",
    "IS": "0",
    "LO": "ANONYMIZED",
    "LT": "ANONYMIZED",
    "PN": "ANONYMIZED",
    "SH": "ANONYMIZED",
    "ST": "ANONYMIZED",
    "TM": "000000",
    "UC": "ANONYMIZED",
    "UR": "ANONYMIZED",
    "UT": "ANONYMIZED",
    "AT": 0,
    "FD": 0.0,
    "FL": 0.0,
    "SL": 0,
    "SS": 0,
    "SV": 0,
    "UL": 0,
    "US": 0,
    "UV": 0,
    "OB": b"\0\0",
    "OD": b"\0" * 8,
    "OF": b"\0" * 4,
    "OL": b"\0" * 4,
    "OV": b"\0" * 8,
    "OW": b"\0\0",
    "UN": b"\0\0",
}
TEXT_VRS = frozenset({"LO", "LT", "SH", "ST", "UC", "UT", "PN"})
# kept values of these VRs are searched for the file's own identifiers before they pass
SCANNED_VRS = TEXT_VRS | {"CS", "AE", "UR"}
# what the C (clean) action changes; under C every other VR is kept as it is
CLEANED_VRS = SCANNED_VRS | {"DA", "DT", "SQ"}
# numbers shorter than this are not taken for identifiers when free text is cleaned: a one- or
# two-digit Study ID would strip every count from the descriptions
MIN_CLEANED_NUMBER = 3


@dataclass(frozen=True)
class PatientContext:
    """What the engine needs to know about the file's patient to rewrite it."""

    pseudonym: str
    siteid: str
    offset_days: int
    identifiers: tuple[str, ...]

    @property
    def matcher(self) -> IdentifierMatcher:
        """The file's identifiers, matched as whole tokens after normalization."""
        return cleaning_matcher(self.identifiers)


@lru_cache(maxsize=256)
def cleaning_matcher(identifiers: tuple[str, ...]) -> IdentifierMatcher:
    """One matcher per set of identifiers (the files of a study mostly share theirs)."""
    return IdentifierMatcher(identifiers, min_number=MIN_CLEANED_NUMBER)


def age_in_years(birth: date | None, at: date | None) -> int | None:
    """Completed years between two dates; above 89 reported as 90 (HIPAA), None if unknown."""
    if not birth or not at:
        return None
    years = at.year - birth.year - ((at.month, at.day) < (birth.month, birth.day))
    return min(years, 90) if years >= 0 else None


def shift_da(value: str, offset_days: int) -> str:
    """Shift a DA value; an unparseable one becomes empty rather than pass through."""
    value = value.strip()
    try:
        day = date(int(value[:4]), int(value[4:6]), int(value[6:8]))
    except (ValueError, IndexError):
        return ""
    if len(value) != 8:
        return ""
    return (day + timedelta(days=offset_days)).strftime("%Y%m%d")


def shift_dt(value: str, offset_days: int) -> str:
    """Shift the date part of a DT value and keep its time part; unparseable becomes empty."""
    value = value.strip()
    if len(value) < 8:
        return ""
    shifted = shift_da(value[:8], offset_days)
    return shifted + value[8:] if shifted else ""
