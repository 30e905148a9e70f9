"""The verification gate: look for every identifying value seen at the source in what is about to
be published (file headers, file names, catalog rows, log text), and check each DICOM file's
structure against the profile. Findings name the file and the element, never the value.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID_dictionary

from tasks.deidentify.profile import Profile

MIN_WORD = 3
MIN_NUMBER = 5
PIXEL_TAGS = (b"\xe0\x7f\x10\x00", b"\x7f\xe0\x00\x10")
PSEUDONYM = re.compile(r"^P[0-9A-F]{16}$")


class LeakFound(RuntimeError):
    """The gate found identifying data; the batch must not be published."""


@dataclass(frozen=True)
class Finding:
    where: str
    element: str
    what: str

    def __str__(self) -> str:
        return f"{self.where}: {self.element}: {self.what}"


class IdentifierMatcher:
    """Word-bounded, case-insensitive search for a set of identifying values, in text or bytes.

    Words shorter than 3 letters and numbers shorter than 5 digits are too common to search for
    without drowning real findings; numbers and UIDs only match between non-digits, so an ID
    inside a longer number or UID is no finding.
    """

    def __init__(self, values: Iterable[str]):
        words, numbers = set(), set()
        for value in values:
            v = value.strip()
            if re.fullmatch(r"[0-9.\-/ ]+", v):
                if sum(c.isdigit() for c in v) >= MIN_NUMBER:
                    numbers.add(v)
            elif len(v) >= MIN_WORD:
                words.add(v)
        self.empty = not (words or numbers)
        parts = []
        if words:
            alt = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
            parts.append(rf"(?<![A-Za-z0-9])(?:{alt})(?![A-Za-z0-9])")
        if numbers:
            alt = "|".join(re.escape(n) for n in sorted(numbers, key=len, reverse=True))
            parts.append(rf"(?<![0-9.])(?:{alt})(?![0-9])(?!\.[0-9])")
        pattern = "|".join(parts) or r"(?!x)x"
        self.text = re.compile(pattern, re.IGNORECASE)

    def in_text(self, text: str) -> bool:
        return not self.empty and self.text.search(text) is not None

    def in_bytes(self, data: bytes) -> bool:
        """Search raw bytes read as UTF-8 and as Latin-1 (the character sets a header uses)."""
        return not self.empty and (self.in_text(data.decode("utf-8", "replace"))
                                   or self.in_text(data.decode("latin-1")))


def header_bytes(data: bytes) -> bytes:
    """A DICOM file's bytes before its pixel data (the whole file if it has none)."""
    cut = max(data.rfind(tag) for tag in PIXEL_TAGS)
    return data[:cut] if cut > 0 else data


def _element_values(ds: Dataset):
    """(keyword or tag, value as text) for every non-sequence element but the pixel data."""
    for elem in ds.iterall():
        if elem.VR == "SQ" or elem.tag == 0x7FE00010 or elem.value is None:
            continue
        value = elem.value
        text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
        yield elem.keyword or str(elem.tag), text


def locate(path: str, matcher: IdentifierMatcher) -> list[str]:
    """The elements (by keyword or tag, nested and private included) that hold a match."""
    ds = dcmread(path, stop_before_pixels=True, force=True)
    found = [name for name, value in _element_values(ds) if matcher.in_text(value)]
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        found += [f"file meta {n}" for n, v in _element_values(meta) if matcher.in_text(v)]
    return sorted(set(found)) or ["(raw bytes)"]


def scan_dicom_file(path: str, shown_as: str, matcher: IdentifierMatcher) -> list[Finding]:
    """Identifier findings in one DICOM file's header (nested and private elements included)."""
    with open(path, "rb") as fh:
        data = fh.read()
    if not matcher.in_bytes(header_bytes(data)):
        return []
    return [Finding(shown_as, element, "identifying value") for element in locate(path, matcher)]


def scan_names(names: Iterable[str], matcher: IdentifierMatcher) -> list[Finding]:
    return [Finding(n, "file name", "identifying value") for n in names if matcher.in_text(n)]


def scan_table(name: str, table: pa.Table, matcher: IdentifierMatcher) -> list[Finding]:
    """Findings in the string cells of a catalog table (row numbers, not values, reported)."""
    findings = []
    for field in table.schema:
        if not pa.types.is_string(field.type):
            continue
        for i, value in enumerate(table.column(field.name).to_pylist()):
            if value is not None and matcher.in_text(value):
                findings.append(Finding(f"catalog {name} row {i}", field.name,
                                        "identifying value"))
    return findings


def scan_text(where: str, lines: Iterable[str], matcher: IdentifierMatcher) -> list[Finding]:
    return [Finding(where, f"line {i}", "identifying value")
            for i, line in enumerate(lines) if matcher.in_text(line)]


def check_structure(path: str, shown_as: str, profile: Profile) -> list[Finding]:
    """What the profile promises about any output file, checked without knowing the source."""
    ds = dcmread(path, stop_before_pixels=True)
    out = []

    def bad(element: str, what: str) -> None:
        out.append(Finding(shown_as, element, what))

    if ds.get("PatientIdentityRemoved") != "YES":
        bad("PatientIdentityRemoved", "not YES")
    for keyword in ("PatientID", "PatientName"):
        if not PSEUDONYM.match(str(ds.get(keyword) or "")):
            bad(keyword, "not a radrepo pseudonym")
    if ds.get("PatientBirthDate"):
        bad("PatientBirthDate", "has a value")
    for elem in ds.iterall():
        tag = int(elem.tag)
        action = profile.action(tag)
        name = elem.keyword or str(elem.tag)
        if action == "X" and (tag >> 16) % 2 == 0:
            bad(name, "present although the profile removes it")
        elif action == "Z" and elem.VR != "SQ" and elem.value not in (None, ""):
            bad(name, "has a value although the profile empties it")
        elif action == "safe-private":
            continue
        elif elem.tag.is_private and profile.private_action == "X":
            bad(name, "private element present")
        if elem.VR == "UI" and elem.value:
            values = elem.value if elem.VM > 1 else [elem.value]
            for v in values:
                if str(v) not in UID_dictionary and not str(v).startswith("2.25."):
                    bad(name, "UID not remapped")
    meta_uid = str(ds.file_meta.get("MediaStorageSOPInstanceUID", ""))
    if meta_uid != str(ds.get("SOPInstanceUID", "")):
        bad("file meta MediaStorageSOPInstanceUID", "differs from SOP Instance UID")
    if "SourceApplicationEntityTitle" in ds.file_meta:
        bad("file meta SourceApplicationEntityTitle", "present")
    return out


def raise_if_found(findings: list[Finding], limit: int = 20) -> None:
    """Stop the batch with a message that lists where, never what."""
    if not findings:
        return
    shown = "\n  ".join(str(f) for f in findings[:limit])
    more = f"\n  ... and {len(findings) - limit} more" if len(findings) > limit else ""
    raise LeakFound(f"verification gate: {len(findings)} finding(s); the batch is not "
                    f"published:\n  {shown}{more}")


def scan_release_files(root: Path, matcher: IdentifierMatcher | None,
                       profile: Profile) -> list[Finding]:
    """Every DICOM file under ``root/dicom`` and every path under ``root``."""
    findings: list[Finding] = []
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if matcher is not None:
            findings += scan_names([rel], matcher)
        if path.suffix == ".dcm":
            findings += check_structure(str(path), rel, profile)
            if matcher is not None:
                findings += scan_dicom_file(str(path), rel, matcher)
    return findings


def read_identifiers(paths: Iterable[Path]) -> IdentifierMatcher:
    """A matcher over the identifier files the de-identification step left in the private zone."""
    values: set[str] = set()
    for path in paths:
        values.update(v for v in pq.read_table(path).column("value").to_pylist() if v)
    return IdentifierMatcher(values)
