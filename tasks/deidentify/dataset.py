"""Apply a resolved profile to one pydicom dataset, nested sequences included.

The profile says what to do with each attribute; this module only knows how to do it for
each value representation (shift a date, remap a UID, empty a name, clean a description).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, timedelta
from functools import cached_property

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import UID_dictionary

from tasks.deidentify.profile import Profile

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
    def needles(self) -> tuple[bytes, ...]:
        """Lower-cased encodings of the identifiers, to test raw values without decoding."""
        found = set()
        for ident in self.identifiers:
            if len(ident) < MIN_CLEANED_LENGTH:
                continue
            for form in {ident, ident.lower(), ident.upper(), ident.title()}:
                for codec in ("utf-8", "latin-1"):
                    try:
                        found.add(form.encode(codec).lower())  # bytes.lower(): ASCII only,
                    except UnicodeEncodeError:               # as on the raw value side
                        continue
        return tuple(found)


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


def identifying_values(ds: Dataset) -> tuple[str, ...]:
    """The identifiers in a file that descriptors must not repeat, longest first."""
    found: set[str] = set()
    for keyword in (
        "PatientName",
        "OtherPatientNames",
        "PatientBirthName",
        "PatientMotherBirthName",
        "ReferringPhysicianName",
        "PerformingPhysicianName",
        "OperatorsName",
        "NameOfPhysiciansReadingStudy",
    ):
        for name in _values(ds, keyword):
            text = str(name)
            found.add(text)
            found.update(p for p in re.split(r"[\^= ]+", text) if p)
    for keyword in (
        "PatientID",
        "OtherPatientIDs",
        "AccessionNumber",
        "PatientBirthDate",
        "InstitutionName",
        "PatientAddress",
        "StudyID",
    ):
        found.update(str(v) for v in _values(ds, keyword) if len(str(v)) >= 2)
    return tuple(sorted(found, key=len, reverse=True))


def _values(ds: Dataset, keyword: str) -> list[object]:
    elem = ds.data_element(keyword) if keyword in ds else None
    if elem is None or elem.VR == "SQ" or elem.value in (None, ""):
        return []
    return list(elem.value) if elem.VM > 1 else [elem.value]


def deidentify_dataset(ds: Dataset, profile: Profile, patient: PatientContext, uid_map) -> None:
    """Rewrite ``ds`` in place: every element gets its profile action, sequences recursively.

    Elements the profile keeps are left as read (never decoded or re-encoded), which is most
    of a header; only what changes is touched.
    """
    for tag in list(ds.keys()):
        action = profile.action(int(tag))
        if action == "X":
            del ds[tag]
            continue
        if action == "computed":
            action = "Z"  # filled by set_computed at the top level; emptied anywhere nested
        if action == "safe-private":
            if not _is_safe_private(ds, tag, profile):
                del ds[tag]
            continue
        raw = ds.get_item(tag)
        if action == "C" and raw.VR is not None and raw.VR not in CLEANED_VRS:
            action = "K"  # times, codes and numbers carry no identity once dates have moved
        if action == "K" and raw.VR is not None and raw.VR not in ("SQ", "UI"):
            if raw.VR not in SCANNED_VRS or not _mentions_patient(raw, patient):
                continue
            action = "C"  # kept free text that repeats an identifier of this file is cleaned
        elem = ds[tag]
        if elem.VR == "SQ":
            _apply_to_sequence(elem, action, profile, patient, uid_map)
        elif action == "K":
            if elem.VR == "UI" and elem.value:
                elem.value = _map_uids(elem, uid_map, keep_standard=True)
            elif elem.VR in SCANNED_VRS and _mentions_patient(elem, patient):
                _clean(ds, tag, elem, patient)
        else:
            _apply_to_value(ds, tag, elem, action, patient, uid_map)
    if profile.private_action == "C":
        _drop_empty_private_blocks(ds)


def _mentions_patient(elem, patient: PatientContext) -> bool:
    value = elem.value
    if value is None:
        return False
    if isinstance(value, bytes):
        lowered = value.lower()
        return any(needle in lowered for needle in patient.needles)
    return patient.pattern is not None and patient.pattern.search(str(value)) is not None


def _is_safe_private(ds: Dataset, tag, profile: Profile) -> bool:
    group, elem = tag.group, tag.element
    if elem < 0x1000:
        return elem >= 0x10  # a private creator: kept until its block turns out empty
    creator_tag = (group << 16) | (elem >> 8)
    creator = ds.get(creator_tag)
    name = str(creator.value).strip() if creator is not None else ""
    return (name, group, elem & 0xFF) in profile.safe_private


def _drop_empty_private_blocks(ds: Dataset) -> None:
    used = {(t.group, t.element >> 8) for t in ds.keys() if t.is_private and t.element >= 0x1000}
    for tag in [t for t in ds.keys() if t.is_private and 0x10 <= t.element < 0x100]:
        if (tag.group, tag.element) not in used:
            del ds[tag]


def _apply_to_sequence(elem: DataElement, action, profile, patient, uid_map) -> None:
    if action == "Z":
        elem.value = Sequence()
        return
    for item in elem.value:
        deidentify_dataset(item, profile, patient, uid_map)


def _apply_to_value(ds, tag, elem: DataElement, action: str, patient, uid_map) -> None:
    if elem.value is None or elem.value == "":
        return
    if action == "Z":
        elem.value = None
    elif action == "D":
        if elem.VR == "UI":
            elem.value = _map_uids(elem, uid_map)
        else:
            elem.value = DUMMY_BY_VR.get(elem.VR)
    elif action == "U":
        elem.value = _map_uids(elem, uid_map)
    elif action == "C":
        _clean(ds, tag, elem, patient)


def _map_uids(elem: DataElement, uid_map, keep_standard: bool = False):
    """Remap instance UIDs; with ``keep_standard``, registered DICOM UIDs (SOP classes,
    transfer syntaxes, coding schemes) pass unchanged since they identify nobody."""

    def one(value: str) -> str:
        value = str(value)
        return value if keep_standard and value in UID_dictionary else uid_map(value)

    if elem.VM > 1:
        return [one(v) for v in elem.value]
    return one(elem.value)


def _clean(ds: Dataset, tag, elem: DataElement, patient: PatientContext) -> None:
    if elem.VR == "DA":
        elem.value = _each(elem, lambda v: shift_da(v, patient.offset_days))
    elif elem.VR == "DT":
        elem.value = _each(elem, lambda v: shift_dt(v, patient.offset_days))
    elif elem.VR in SCANNED_VRS:
        cleaned = _each(elem, lambda v: clean_text(str(v), patient.pattern))
        if cleaned in ("", []) or (isinstance(cleaned, list) and not any(cleaned)):
            elem.value = None
        else:
            elem.value = cleaned
    # other VRs (times, codes, numbers) carry no identity once dates have moved: kept


def _each(elem: DataElement, fn):
    if elem.VM > 1:
        return [fn(str(v)) for v in elem.value]
    return fn(str(elem.value))


def set_computed(ds: Dataset, profile: Profile, patient: PatientContext) -> None:
    """Fill the attributes radrepo computes (pseudonyms, SITEID, method) after the walk."""
    values = {"pseudonym": patient.pseudonym, "siteid": patient.siteid}
    for tag, what in profile.computed.items():
        ds.add_new(tag, dictionary_VR(tag), values.get(what, what))
    ds.DeidentificationMethod = profile.method_description
    codes = []
    for value, meaning in profile.method_codes:
        item = Dataset()
        item.CodeValue = value
        item.CodingSchemeDesignator = "DCM"
        item.CodeMeaning = meaning
        codes.append(item)
    ds.DeidentificationMethodCodeSequence = Sequence(codes)
