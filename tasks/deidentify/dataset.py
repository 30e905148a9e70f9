"""How each kind of value is de-identified: dummy values per VR, date shifts, descriptor
cleaning, and what the engine knows about the file's patient. ``rewrite.py`` applies them."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, timedelta
from functools import cached_property

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
_LONG_NUMBER = re.compile(r"\d{5,}")
_DATE_LIKE = re.compile(r"\b\d{1,4}[-/.]\d{1,2}[-/.]\d{1,4}\b")
_SPACES = re.compile(r"\s{2,}")


MIN_CLEANED_LENGTH = 3


@dataclass(frozen=True)
class PatientContext:
    """What the engine needs to know about the file's patient to rewrite it."""

    pseudonym: str
    siteid: str
    offset_days: int
    identifiers: tuple[str, ...]

    @cached_property
    def pattern(self) -> re.Pattern[str] | None:
        """The file's identifiers as one case-insensitive, word-bounded pattern."""
        words = [i for i in self.identifiers if len(i) >= MIN_CLEANED_LENGTH]
        if not words:
            return None
        alternation = "|".join(re.escape(w) for w in words)
        return re.compile(rf"(?<![A-Za-z0-9])(?:{alternation})(?![A-Za-z0-9])", re.IGNORECASE)

    @cached_property
    def needle_pattern(self) -> re.Pattern[bytes] | None:
        """The identifiers' encodings, lower-cased as ``bytes.lower()`` does (ASCII only), as one
        pattern, to test raw values without decoding them."""
        found = set()
        for ident in self.identifiers:
            if len(ident) < MIN_CLEANED_LENGTH:
                continue
            for form in {ident, ident.lower(), ident.upper(), ident.title()}:
                for codec in ("utf-8", "latin-1"):
                    try:
                        found.add(form.encode(codec).lower())
                    except UnicodeEncodeError:
                        continue
        if not found:
            return None
        return re.compile(b"|".join(re.escape(n) for n in sorted(found, key=len, reverse=True)))

    def mentioned_in(self, value: bytes) -> bool:
        """Whether a raw value contains one of the file's identifiers (case-insensitively)."""
        return self.needle_pattern is not None and self.needle_pattern.search(
            value.lower()) is not None


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


def clean_text(value: str, pattern: re.Pattern[str] | None) -> str:
    """Drop known identifiers, long digit runs and date-like tokens from a descriptor."""
    text = pattern.sub(" ", value) if pattern else value
    text = _LONG_NUMBER.sub(" ", text)
    text = _DATE_LIKE.sub(" ", text)
    return _SPACES.sub(" ", text).strip(" ,;:-^")
