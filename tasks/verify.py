"""The verification gate: look for every identifying value seen at the source in what is about to
be published (file headers, file names, catalog rows, log text), and check each DICOM file's
structure against the profile. Findings name the file and the element, never the value.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID_dictionary

from tasks.deidentify.profile import Profile
from tasks.publish import Release

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


TOKEN = re.compile(r"[0-9]+(?:\.[0-9]+)+|[^\W_]+")


def _tokens(text: str) -> list[str]:
    return TOKEN.findall(text.lower())


class IdentifierMatcher:
    """Case-insensitive search for a set of identifying values, in text or bytes, by token.

    Text is cut into tokens (words, numbers, dotted numbers such as UIDs); a single-token
    identifier matches a whole token only, so an ID inside a longer number or UID, or a name
    inside a longer word, is no finding. Identifiers of several tokens (a full name, an
    address) match as a phrase. Words under 3 letters and numbers under 5 digits are too
    common to search for without drowning real findings.
    """

    def __init__(self, values: Iterable[str]):
        self.words: set[str] = set()
        phrases: set[str] = set()
        for value in values:
            v = value.strip().lower()
            toks = _tokens(v)
            if not toks:
                continue
            if len(toks) == 1 and toks[0] == v:
                digits = sum(c.isdigit() for c in v)
                if (digits >= MIN_NUMBER) if digits == len(v.replace(".", "")) else (
                        len(v) >= MIN_WORD):
                    self.words.add(v)
            elif len(v) >= MIN_WORD:
                phrases.add(v)
        alternation = "|".join(re.escape(p) for p in sorted(phrases, key=len, reverse=True))
        self.phrases = (re.compile(rf"(?<![^\W_])(?:{alternation})(?![^\W_])", re.IGNORECASE)
                        if phrases else None)
        self.empty = not (self.words or phrases)

    def in_text(self, text: str) -> bool:
        if self.empty:
            return False
        if not self.words.isdisjoint(_tokens(text)):
            return True
        return self.phrases is not None and self.phrases.search(text) is not None

    def in_bytes(self, data: bytes) -> bool:
        """Search raw bytes read as UTF-8 and as Latin-1 (the character sets a header uses)."""
        if self.empty:
            return False
        if data.isascii():
            return self.in_text(data.decode("ascii"))
        return self.in_text(data.decode("utf-8", "replace")) or self.in_text(
            data.decode("latin-1"))


HEAD_READ = 1 << 16


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
    """A DICOM file's bytes before its pixel data (the whole file if it has none).

    Headers are small: the first 64 KiB usually hold the pixel data tag, so the pixels are
    not read at all; otherwise the whole file is read and the last such tag taken.
    """
    with _opened(source) as fh:
        head = fh.read(HEAD_READ)
        cut = head.find(b"\xe0\x7f\x10\x00O")
        if cut > 0:
            return head[:cut]
        data = head + fh.read()
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


def locate(source: DicomSource, matcher: IdentifierMatcher) -> list[str]:
    """The elements (by keyword or tag, nested and private included) that hold a match."""
    with _opened(source) as fh:
        ds = dcmread(fh, stop_before_pixels=True, force=True)
    found = [name for name, value in _element_values(ds) if matcher.in_text(value)]
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        found += [f"file meta {n}" for n, v in _element_values(meta) if matcher.in_text(v)]
    return sorted(set(found)) or ["(raw bytes)"]


def scan_dicom_file(source: DicomSource, shown_as: str,
                    matcher: IdentifierMatcher) -> list[Finding]:
    """Identifier findings in one DICOM file's header (nested and private elements included)."""
    if not matcher.in_bytes(header_bytes(source)):
        return []
    return [Finding(shown_as, element, "identifying value")
            for element in locate(source, matcher)]


def scan_outputs(files: Iterable[tuple[str, str]], matcher: IdentifierMatcher) -> list[Finding]:
    """Findings in de-identified files about to be published: ``(path on disk, path shown)``
    pairs, their headers and the names they will be published under."""
    findings: list[Finding] = []
    for path, shown_as in files:
        findings += scan_names([shown_as], matcher)
        findings += scan_dicom_file(path, shown_as, matcher)
    return findings


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


def check_structure(source: DicomSource, shown_as: str, profile: Profile) -> list[Finding]:
    """What the profile promises about any output file, checked without knowing the source."""
    with _opened(source) as fh:
        ds = dcmread(fh, stop_before_pixels=True)
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
            # small blocks: a remote file's pixel data is not fetched
            with release.fs.open(path, "rb", block_size=HEAD_READ) as fh:
                findings += check_structure(fh, rel, profile)
                if matcher is not None:
                    findings += scan_dicom_file(fh, rel, matcher)
    if matcher is not None:
        for path, rel in catalog_parts:
            findings += scan_table(rel, pq.read_table(path, filesystem=release.fs), matcher)
    return checked, findings


def read_identifiers(paths: Iterable[Path]) -> IdentifierMatcher:
    """A matcher over the identifier files the de-identification step left in the private zone."""
    values: set[str] = set()
    for path in paths:
        values.update(v for v in pq.read_table(path).column("value").to_pylist() if v)
    return IdentifierMatcher(values)


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
