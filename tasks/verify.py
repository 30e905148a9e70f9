"""The verification gate: look for every identifying value seen at the source in what is about to
be published (file headers, file names, catalog rows, log text), and check each DICOM file's
structure against the profile. Findings name the file and the element, never the value.
"""

from __future__ import annotations

import html
import os
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from pydicom.uid import UID_dictionary

from tasks.deidentify.dataset import DUMMY_BY_VR
from tasks.deidentify.profile import BASIC_PROFILE_CODE, OPTIONS, Profile
from tasks.deidentify.rewrite import (
    MalformedDataset,
    dataset_start,
    elements,
    items_of,
    read_charset,
    text_readings,
)
from tasks.deidentify.study import explicit_little_endian
from tasks.deidentify.text import IdentifierMatcher
from tasks.deidentify.walk import (
    OPAQUE_VRS,
    PIXEL_TAGS,
    TEXT_VRS,
    NotExplicitLittleEndian,
    meta_elements,
    name_of,
    read_header,
    walk,
)
from tasks.ledger import identifier_values
from tasks.zones import Release

__all__ = ["IdentifierMatcher"]  # the gate's matcher is the cleaner's (tasks/deidentify/text.py)

PSEUDONYM = re.compile(r"^P[0-9A-F]{16}$")
HEAD_READ = 1 << 16
# radrepo's own text in its output: the method it names and the codes of its options. Such a
# value is never searched for source identifiers (a patient called CLEAN would match "Clean
# Descriptors Option"); any other value in the same elements still is.
METHOD_DESCRIPTION = re.compile(r"radrepo PS3\.15 Basic ?[0-9+]*")
CODE_TEXT = frozenset({BASIC_PROFILE_CODE[0], BASIC_PROFILE_CODE[1], "DCM"}
                      | {part for _, code, meaning in OPTIONS.values() for part in (code, meaning)})
CONSTANT_VALUES = frozenset({"YES", "MODIFIED"} | {v for v in DUMMY_BY_VR.values()
                                                   if isinstance(v, str)})
METHOD, METHOD_CODES = 0x00120063, 0x00120064
IDENTITY_REMOVED, PATIENT_ID, PATIENT_NAME, BIRTH_DATE = (0x00120062, 0x00100020, 0x00100010,
                                                          0x00100030)
SOP_INSTANCE_UID, MEDIA_SOP_INSTANCE, SOURCE_AE = 0x00080018, 0x00020003, 0x00020016


class LeakFound(RuntimeError):
    """The gate found identifying data; the batch must not be published."""


@dataclass(frozen=True)
class Finding:
    where: str
    element: str
    what: str

    def __str__(self) -> str:
        return f"{self.where}: {self.element}: {self.what}"


DicomSource = str | os.PathLike | BinaryIO  # a local path, or a file open for reading


@contextmanager
def _opened(source: DicomSource) -> Iterator[BinaryIO]:
    """``source`` open for reading from its first byte."""
    if isinstance(source, str | os.PathLike):
        with open(source, "rb") as fh:
            yield fh
    else:
        source.seek(0)
        yield source


def header_bytes(source: DicomSource) -> bytes:
    """A DICOM file's bytes, every element read by its length, with the pixel values left out
    (seeked past, never read). A file in another encoding (a source file, never radrepo's
    output) is re-encoded as explicit VR little endian first, pixels and all."""
    with _opened(source) as fh:
        try:
            return read_header(fh)
        except NotExplicitLittleEndian:
            fh.seek(0)
            return bytes(explicit_little_endian(fh.read())[0])


@dataclass(frozen=True)
class OutputScan:
    """A DICOM file's bytes parsed once for the gate: every value it holds that a source
    identifier could hide in (element name and decoded text, or opaque bytes; nested,
    private, after the pixels and file meta included; radrepo's own constants and the pixels
    left out), and its elements for the structure check."""

    buf: memoryview
    raws: list
    meta: list
    encodings: list[str]
    values: tuple[tuple[str, str | bytes], ...]

    @classmethod
    def of(cls, data: bytes | memoryview) -> OutputScan:
        buf = memoryview(data)
        found = dataset_start(buf)
        if found is None:
            raise MalformedDataset("not a Part 10 file")
        raws = elements(buf, found[0], len(buf))[0]
        meta = meta_elements(buf)
        encodings = read_charset(buf, raws)
        values = [*_values(buf, raws, encodings, ""), *_values(buf, meta, encodings,
                                                                "file meta ")]
        return cls(buf, raws, meta, encodings, tuple(dict.fromkeys(values)))

    def holding(self, matcher: IdentifierMatcher) -> list[str]:
        """The elements whose value holds an identifier ``matcher`` knows."""
        return sorted({name for name, value in self.values if value_holds(value, matcher)})


def value_holds(value: str | bytes, matcher: IdentifierMatcher) -> bool:
    """Whether one scanned value (text, or opaque bytes) holds an identifier."""
    if isinstance(value, str):
        return matcher.in_text(value)
    return matcher.in_bytes(value)


def elements_holding(data: bytes, matcher: IdentifierMatcher) -> list[str]:
    """The elements (keyword or tag; nested, private, after the pixels and file meta
    included) whose decoded value holds an identifier ``matcher`` knows."""
    return OutputScan.of(data).holding(matcher)


def _values(buf: memoryview, raws, encodings: list[str], prefix: str):
    """(element name, value) for every scanned value of one level and below."""
    own = [r for r in raws if not _radrepo_constant(buf, r, encodings)]
    for r, vr, charset, nested in walk(buf, own, encodings):
        if r.value_end == r.value_start or (r.tag in PIXEL_TAGS and not nested):
            continue
        value = bytes(buf[r.value_start:r.value_end])
        if vr in TEXT_VRS:
            try:
                readings = text_readings(value, tuple(charset), vr)
            except (LookupError, ValueError):
                readings = (value.decode("latin-1"),)
            for text in readings:
                if text.strip() not in CONSTANT_VALUES:
                    yield prefix + name_of(r.tag), text
        elif vr in OPAQUE_VRS:
            yield prefix + name_of(r.tag), value


def _radrepo_constant(buf: memoryview, r, encodings: list[str]) -> bool:
    """Whether a top-level element holds exactly what radrepo writes there itself."""
    if r.tag == METHOD:
        text = bytes(buf[r.value_start:r.value_end]).decode("latin-1").rstrip("\0 ")
        return METHOD_DESCRIPTION.fullmatch(text) is not None
    if r.tag == METHOD_CODES:
        values = {bytes(buf[i.value_start:i.value_end]).decode("latin-1").rstrip("\0 ")
                  for i, _, _, _ in walk(buf, [r], encodings)}
        return values <= CODE_TEXT
    return False


def scan_dicom_file(source: DicomSource, shown_as: str,
                    matcher: IdentifierMatcher) -> list[Finding]:
    """Identifier findings in one DICOM file (every element, nested, private, after the pixels
    and file meta included; the pixels themselves are not read)."""
    return gate(header_bytes(source), shown_as, matcher, None)[0]


def scan_names(names: Iterable[str], matcher: IdentifierMatcher) -> list[Finding]:
    return [Finding(n, "file name", "identifying value") for n in names if matcher.in_text(n)]


# the clinical join's fixed words in its QC details (tasks/clinical.py)
CLINICAL_DETAIL_TEXT = ("no clinical record for the patient (is an ID remap missing?)",
                        " days before the index date; the window starts ",
                        " days after the index date; the window ends ", " before", " after",
                        " study ")


@cache
def qc_detail_text() -> tuple[str, ...]:
    """radrepo's fixed words in QC details (the literals of the rule table's detail
    expressions and the clinical join's), longest first: never searched, only what fills
    them in is."""
    rules = yaml.safe_load(resources.files("schemas").joinpath("qc_rules.yaml").read_text())
    found = set(CLINICAL_DETAIL_TEXT)
    for rule in rules["rules"]:
        found.update(m.replace("''", "'") for m in re.findall(r"'((?:[^']|'')*)'",
                                                               rule["detail"]))
    return tuple(sorted((f for f in found if f.strip()), key=len, reverse=True))


def _own_text_removed(table_kind: str, column: str, value: str) -> str:
    """A catalog cell without radrepo's own constant text."""
    if table_kind == "qc" and column == "detail":
        for fragment in qc_detail_text():
            value = value.replace(fragment, " ")
    elif table_kind == "runs" and column == "profile" and METHOD_DESCRIPTION.fullmatch(value):
        return ""
    return value


def scan_table(name: str, table: pa.Table, matcher: IdentifierMatcher) -> list[Finding]:
    """Findings in the string cells of a catalog table (row numbers, not values, reported).
    ``name`` is the table's name or its path under ``catalog/``."""
    kind = name.split("/")[1] if name.startswith("catalog/") else name
    findings = []
    for field in table.schema:
        if not pa.types.is_string(field.type):
            continue
        for i, value in enumerate(table.column(field.name).to_pylist()):
            if value is not None and matcher.in_text(_own_text_removed(kind, field.name,
                                                                        value)):
                findings.append(Finding(f"catalog {name} row {i}", field.name,
                                        "identifying value"))
    return findings


# the contact sheet's fixed text (tasks/contact_sheet.py): whole cells, and words of its lines
CONTACT_SHEET_CELLS = frozenset({"image", "modality", "description", "files", "study / series",
                                 "flags", "no preview (pixel data not decodable here)"})
CONTACT_SHEET_TEXT = ("QC contact sheet:", "QC contact sheet", " published series, ",
                      " flagged (listed first). Look for burned-in text and wrong anatomy.")


@cache
def report_text() -> tuple[str, ...]:
    """radrepo's fixed words in a report line, longest first: the contact sheet's, the QC
    rule ids and the QC details' fixed words."""
    rules = yaml.safe_load(resources.files("schemas").joinpath("qc_rules.yaml").read_text())
    found = {*CONTACT_SHEET_TEXT, *qc_detail_text(), "no_clinical_record: ",
             "inclusion_window: "}
    found.update(f"{rule['id']}: " for rule in rules["rules"])
    return tuple(sorted(found, key=len, reverse=True))


def scan_report(where: str, data: bytes, matcher: IdentifierMatcher) -> list[Finding]:
    """Findings in an HTML report: its markup and radrepo's fixed text are not searched, what
    fills them in (descriptions, details, ids) is."""
    text = re.sub(r"<style>.*?</style>", " ", data.decode("utf-8", "replace"), flags=re.S)
    lines = []
    for line in html.unescape(re.sub(r"<[^>]*>", "\n", text)).splitlines():
        if line.strip() in CONTACT_SHEET_CELLS:
            continue
        for fragment in report_text():
            line = line.replace(fragment, " ")
        lines.append(line)
    return scan_text(where, lines, matcher)


def scan_text(where: str, lines: Iterable[str], matcher: IdentifierMatcher) -> list[Finding]:
    return [Finding(where, f"line {i}", "identifying value")
            for i, line in enumerate(lines) if matcher.in_text(line)]


def check_structure(source: DicomSource, shown_as: str, profile: Profile) -> list[Finding]:
    """What the profile promises about any output file, checked without knowing the source."""
    return gate(header_bytes(source), shown_as, None, profile)[0]


def structure_findings(scan: OutputScan, shown_as: str, profile: Profile) -> list[Finding]:
    """``check_structure`` over a file's elements as the gate parsed them."""
    buf = scan.buf
    out: list[Finding] = []

    def text(r) -> str:
        return bytes(buf[r.value_start:r.value_end]).decode("latin-1").strip("\0 ")

    top = {r.tag: r for r in scan.raws}
    if IDENTITY_REMOVED not in top or text(top[IDENTITY_REMOVED]) != "YES":
        out.append(Finding(shown_as, "PatientIdentityRemoved", "not YES"))
    for tag, keyword in ((PATIENT_ID, "PatientID"), (PATIENT_NAME, "PatientName")):
        if not PSEUDONYM.match(text(top[tag]) if tag in top else ""):
            out.append(Finding(shown_as, keyword, "not a radrepo pseudonym"))
    if BIRTH_DATE in top and text(top[BIRTH_DATE]):
        out.append(Finding(shown_as, "PatientBirthDate", "has a value"))
    for r in _every_element(buf, scan.raws):
        what = _against_profile(r, text, profile)
        if what:
            out.append(Finding(shown_as, name_of(r.tag), what))
    meta = {r.tag: r for r in scan.meta}
    sop = text(top[SOP_INSTANCE_UID]) if SOP_INSTANCE_UID in top else ""
    if (text(meta[MEDIA_SOP_INSTANCE]) if MEDIA_SOP_INSTANCE in meta else "") != sop:
        out.append(Finding(shown_as, "file meta MediaStorageSOPInstanceUID",
                           "differs from SOP Instance UID"))
    if SOURCE_AE in meta:
        out.append(Finding(shown_as, "file meta SourceApplicationEntityTitle", "present"))
    return out


def _every_element(buf: memoryview, raws):
    """Every element of a dataset, sequences and the elements of their items included."""
    for r in raws:
        yield r
        if r.vr == b"SQ":
            for start, end in items_of(buf, r):
                yield from _every_element(buf, elements(buf, start, end)[0])


def _against_profile(r, text, profile: Profile) -> str | None:
    """What is wrong with one element by the profile (None when nothing)."""
    tag, group = r.tag, r.tag >> 16
    action = profile.action(tag)
    private = group % 2 == 1
    if action == "X" and not private:
        return "present although the profile removes it"
    if action == "Z" and r.vr != b"SQ" and text(r):
        return "has a value although the profile empties it"
    if action == "safe-private":
        return None
    if private and profile.private_action == "X":
        return "private element present"
    if not private and (tag & 0xFFFF) and group != 0xFFFE and name_of(tag).startswith("("):
        return "public element the dictionary does not know"
    if r.vr == b"UI":
        for uid in text(r).split("\\"):
            uid = uid.strip("\0 ")
            if uid and uid not in UID_dictionary and not uid.startswith("2.25."):
                return "UID not remapped"
    return None


def gate(data: bytes | memoryview, shown_as: str, matcher: IdentifierMatcher | None,
         profile: Profile | None) -> tuple[list[Finding], OutputScan | None]:
    """The verification gate on one DICOM file's bytes: its identifier findings (against
    ``matcher``) and structure findings (against ``profile``), and its parse for later
    scans. The flow, ``radrepo deidentify`` and ``radrepo verify`` all judge files so."""
    try:
        scan = OutputScan.of(data)
    except MalformedDataset:
        return [Finding(shown_as, "file", "not an explicit VR DICOM file")], None
    findings = []
    if profile is not None:
        findings += structure_findings(scan, shown_as, profile)
    if matcher is not None and not matcher.empty:
        findings += [Finding(shown_as, element, "identifying value")
                     for element in scan.holding(matcher)]
    return findings, scan


def raise_if_found(findings: list[Finding], limit: int = 20) -> None:
    """Stop the batch with a message that lists where, never what."""
    if not findings:
        return
    shown = "\n  ".join(str(f) for f in findings[:limit])
    more = f"\n  ... and {len(findings) - limit} more" if len(findings) > limit else ""
    raise LeakFound(f"verification gate: {len(findings)} finding(s); the batch is not "
                    f"published:\n  {shown}{more}")


def scan_release_files(release: Release, matcher: IdentifierMatcher | None,
                       profile: Profile) -> tuple[int, list[Finding]]:
    """Every path of a release (local or remote) and the header of every DICOM file in it:
    how many DICOM files were checked, and the findings. Headers are read, pixels are not."""
    findings: list[Finding] = []
    checked = 0
    release.fs.invalidate_cache()  # what is there now, not what an earlier listing saw
    catalog_parts = []
    for path in sorted(release.fs.find(release.root)):
        rel = path[len(release.root) + 1:]
        if matcher is not None:
            findings += scan_names([rel], matcher)
        if rel.startswith("catalog/") and rel.endswith(".parquet"):
            catalog_parts.append((path, rel))
        if rel.endswith(".dcm"):
            checked += 1
            # small blocks, elements read by their lengths: the pixel data is seeked past,
            # so a remote file's pixels are not fetched
            with release.fs.open(path, "rb", block_size=HEAD_READ) as fh:
                try:
                    data = read_header(fh)
                except MalformedDataset:
                    findings.append(Finding(rel, "file", "not an explicit VR DICOM file"))
                    continue
            findings += gate(data, rel, matcher, profile)[0]
    if matcher is not None:
        for path, rel in catalog_parts:
            findings += scan_table(rel, pq.read_table(path, filesystem=release.fs), matcher)
    return checked, findings


def read_identifiers(paths: Iterable[Path]) -> IdentifierMatcher:
    """A matcher over the identifier files the one pass left in the private zone."""
    return IdentifierMatcher(identifier_values(paths))


def check_manifests(release: Release) -> tuple[int, list[Finding]]:
    """Every COMPLETE batch's current manifest against the release: each file there, with
    the size and sha256 it lists, and the marker's manifest sha256 right. Returns the number
    of entries checked and the findings (paths only: they carry no identifier)."""
    import hashlib

    findings: list[Finding] = []
    checked = 0
    release.fs.invalidate_cache()
    for site_id, batch_id in release.complete_batches():
        where = f"batch {site_id}/{batch_id}"
        version = release.current_version(site_id, batch_id)
        data = release.read_bytes(f"{release.batch_dir(site_id, batch_id)}/{version.manifest}")
        if data is None:
            findings.append(Finding(where, version.manifest, "manifest named by COMPLETE is "
                                    "missing"))
            continue
        if version.manifest_sha256 and hashlib.sha256(data).hexdigest() != \
                version.manifest_sha256:
            findings.append(Finding(where, version.manifest, "sha256 differs from COMPLETE"))
        for row in release.manifest(site_id, batch_id).to_pylist():
            checked += 1
            digest, size = hashlib.sha256(), 0
            try:
                with release.fs.open(release.path(row["path"]), "rb") as fh:
                    while block := fh.read(1 << 20):
                        digest.update(block)
                        size += len(block)
            except FileNotFoundError:
                findings.append(Finding(where, row["path"], "listed in the manifest, missing"))
                continue
            if size != row["size_bytes"]:
                findings.append(Finding(where, row["path"], f"{size} bytes, manifest says "
                                        f"{row['size_bytes']}"))
            elif digest.hexdigest() != row["sha256"]:
                findings.append(Finding(where, row["path"], "sha256 differs from the manifest"))
    return checked, findings
