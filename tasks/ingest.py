"""Ingest: find a site's new batches, list every object in one, and index it in the private zone.

File sources are fsspec URLs (local folders by default). Zip archives are read member by member
and staged under the work folder by an opaque object id, never by their (identifying) names.
PACS sources (DIMSE, DICOMweb) are asked for studies, and each new study is retrieved whole
into the staging folder. Every object ends up in the source index as ``ok`` or
``quarantined`` with one clear reason, entries that are no readable regular file included
(discovery never opens one, nor follows a symlink out of the source).
"""

from __future__ import annotations

import errno
import functools
import hashlib
import hmac
import json
import lzma
import os
import re
import secrets
import shutil
import stat
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import date
from importlib import resources
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit, urlunsplit

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem
from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from schemas.config import (
    PACS_KINDS,
    DicomWebSourceConfig,
    DimseSourceConfig,
    SiteConfig,
    SourceConfig,
)
from schemas.pipeline import LEDGER, OK, QUARANTINE, QUARANTINED, SOURCE_INDEX
from tasks import pacs, verify
from tasks.failures import SourceUnavailable

BATCH_FOLDER = re.compile(r"^(?P<batch>.+?)-(?P<state>COMPLETE|IN-PROGRESS)$")
BATCH_ID = re.compile(r"^(?P<words>[A-Z][A-Z0-9]*(?:-[A-Z][A-Z0-9]*)*)-(?P<date>\d{8})$")
ZIP_NAME = re.compile(
    r"^(?P<patient>[^_]+)_(?P<time>\d{8}-\d{6})_(?P<exam>[^_]+)_(?P<description>.+)\.zip$",
    re.IGNORECASE,
)
DICOMDIR_CLASS = "1.2.840.10008.1.3.10"
HEADER_TAGS = [
    "PatientID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "SOPClassUID",
    "Modality",
    "StudyDate",
]
CHUNK = 1 << 20
_LOCAL = LocalFileSystem()
MAX_MEMBER_BYTES = 4 << 30
MAX_COMPRESSION_RATIO = 200


@dataclass(frozen=True)
class SourceObject:
    """One file in a source as discovery saw it (``sha256`` only where discovery hashed it)."""

    key: str
    size: int
    mtime_ns: int
    sha256: str | None = None
    problem: str | None = None  # why the entry cannot be ingested (then it is quarantined)


@dataclass(frozen=True)
class BatchRef:
    """A batch found in a source: which objects belong to it and where they live."""

    site_id: str
    batch_id: str
    root: str
    objects: tuple[SourceObject, ...]
    already_ingested: int = 0
    pacs: bool = False  # objects are studies (key: Study Instance UID, size: instance count)


@dataclass(frozen=True)
class IngestResult:
    index: pa.Table
    quarantine: pa.Table


def site_work_dir(work_dir: str, site_id: str) -> Path:
    return Path(work_dir) / site_id


def _list_files(fs, root: str, site_id: str) -> dict[str, dict]:
    """Relative key -> info (``size``, ``mtime``; ``problem`` for an entry that cannot be
    ingested) for every entry under ``root``, sorted, forward slashes. A local source is
    walked without following a symlink out of it or opening anything."""
    root = root.rstrip("/")
    if isinstance(fs, LocalFileSystem):
        if not os.path.isdir(root) or not os.access(root, os.R_OK | os.X_OK):
            raise SourceUnavailable(f"site {site_id}: the source folder is missing or "
                                    "unreadable")
        return dict(sorted(_walk_local(root).items()))
    try:
        if not fs.isdir(root):
            raise SourceUnavailable(f"site {site_id}: the source folder is missing or "
                                    "unreadable")
        found = fs.find(root, detail=True, withdirs=False)
    except OSError:
        raise SourceUnavailable(f"site {site_id}: the source folder cannot be listed "
                                "(missing or unreadable)") from None
    return {p[len(root) + 1 :]: info for p, info in sorted(found.items()) if p != root}


def _entry_key(parts: list[bytes]) -> tuple[str, str | None]:
    """The entry's key (as text even when its bytes are not UTF-8) and, for such a name,
    the problem it is quarantined for."""
    try:
        return "/".join(p.decode("utf-8") for p in parts), None
    except UnicodeDecodeError:
        return ("/".join(p.decode("utf-8", "backslashreplace") for p in parts),
                "file name is not valid UTF-8")


def _special_kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    return "special file"


def _symlink_problem(path: bytes, real_root: str) -> tuple[str | None, os.stat_result | None]:
    """Why a symlink cannot be taken (None when it leads to a regular file inside the
    source), and the stat of what it leads to."""
    try:
        target = os.stat(path)
    except FileNotFoundError:
        return "dangling symlink", None
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "symlink loop", None
        return f"unreadable symlink ({type(err).__name__})", None
    real = os.path.realpath(os.fsdecode(path))
    if os.path.commonpath([real, real_root]) != real_root:
        return "symlink leads outside the source folder", target
    if stat.S_ISDIR(target.st_mode):
        return "symlink to a folder (not followed)", target
    if not stat.S_ISREG(target.st_mode):
        return f"symlink to a {_special_kind(target.st_mode)}", target
    return None, target


def _walk_local(root: str) -> dict[str, dict]:
    """Every entry under a local ``root`` by lstat: folders are descended (never through a
    symlink), regular files listed, anything else listed with its problem."""
    real_root = os.path.realpath(root)
    out: dict[str, dict] = {}
    pending: list[list[bytes]] = [[]]
    while pending:
        parts = pending.pop()
        folder = os.path.join(os.fsencode(root), *parts)
        try:
            with os.scandir(folder) as entries:
                listed = sorted((e.name, e) for e in entries)
        except OSError as err:
            key, _ = _entry_key(parts)
            out[key or "."] = {"size": 0, "mtime": 0,
                               "problem": f"folder unreadable ({type(err).__name__})"}
            continue
        for name, entry in listed:
            key, problem = _entry_key([*parts, name])
            try:
                info = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # gone between listing and looking: nothing there to account for
            except OSError as err:  # e.g. a path too long to look at: quarantined, not fatal
                out[key] = {"size": 0, "mtime": 0, "problem": _unreadable(err)}
                continue
            size, mtime = info.st_size, info.st_mtime
            if stat.S_ISDIR(info.st_mode):
                pending.append([*parts, name])
                continue
            if problem is None and stat.S_ISLNK(info.st_mode):
                problem, target = _symlink_problem(entry.path, real_root)
                if problem is None:
                    size, mtime = target.st_size, target.st_mtime
            elif problem is None and not stat.S_ISREG(info.st_mode):
                problem = f"not a regular file ({_special_kind(info.st_mode)})"
            out[key] = {"size": size, "mtime": mtime, **({"problem": problem} if problem else {})}
    return out


def discover_batches(site: SiteConfig, work_dir: str, published: set[str],
                     window: tuple[date | None, date | None] | None = None,
                     notify: Callable[[str], None] | None = None) -> list[BatchRef]:
    """The site's batches not yet published, by name (IN-PROGRESS folders wait).

    ``published`` holds the site's complete batch ids: the ledger only vouches for objects
    of those, so a release rebuilt from scratch picks every object up again. ``window``
    replaces a PACS source's study date window (a backfill's); file sources ignore it.
    ``notify`` hears what the operator should know that is no object to account for (an
    accession number no study answered to), in words that quote no identifier.
    """
    if site.source.kind in PACS_KINDS:
        return _discover_studies(site, work_dir, published, window, notify)
    fs, root = fsspec.core.url_to_fs(site.source.path, **site.source.storage_options)
    files = _list_files(fs, root, site.site_id)
    if site.source.kind == "zip_batches":
        return _zip_batches(site, work_dir, root, files, published)
    known = {row["key"]: row for row in _ledger_rows(work_dir, site.site_id, published)}
    new: list[SourceObject] = []
    fingerprint = hashlib.sha256()
    skipped = 0
    for key, info in files.items():
        seen = known.get(key)
        if seen and seen["size"] == info["size"] and seen["mtime_ns"] == _mtime_ns(info):
            skipped += 1
            continue
        problem = info.get("problem")
        digest = None
        if problem is None:
            try:
                digest = _hash_source(fs, root, key)
            except _Unusable as err:
                problem = str(err)
        if digest and seen and seen["sha256"] == digest:
            skipped += 1
            continue
        new.append(SourceObject(key, info["size"], _mtime_ns(info), digest, problem))
        fingerprint.update(f"{key}\t{digest or '!' + problem}\n".encode())
    return _new_batch(site, root, new, fingerprint, skipped, published)


def _zip_batches(site: SiteConfig, work_dir: str, root: str, files: dict[str, dict],
                 published: set[str]) -> list[BatchRef]:
    """One batch per COMPLETE batch folder (and one for anything else at the top level)."""
    by_folder: dict[str, list[SourceObject]] = {}
    loose: list[SourceObject] = []
    for key, info in files.items():
        folder = key.split("/", 1)[0]
        match = BATCH_FOLDER.match(folder)
        if match and match["state"] == "IN-PROGRESS":
            continue
        obj = SourceObject(key, info["size"], _mtime_ns(info), problem=info.get("problem"))
        if "/" in key:
            by_folder.setdefault(folder, []).append(obj)
        else:  # a file beside the batch folders: its own batch, so nothing goes unseen
            loose.append(obj)
    names = BatchNames(work_dir, site.site_id)
    by_batch = {names.batch_id(folder, published): objs for folder, objs in by_folder.items()}
    if loose:
        by_batch[names.loose_id(loose)] = loose
    names.save()
    return [BatchRef(site.site_id, b, root, tuple(objs))
            for b, objs in sorted(by_batch.items()) if b not in published]


def site_identifier_files(work_dir: str, site_id: str) -> list[Path]:
    """Every identifier list the de-identification step left for the site, one per batch:
    what the gate on any one batch searches for (names met in another batch included)."""
    return sorted((site_work_dir(work_dir, site_id) / "index").glob("*.identifiers.parquet"))


@functools.cache
def _batch_words() -> frozenset[str]:
    text = resources.files("schemas").joinpath("batch_id_words.txt").read_text()
    return frozenset(w for line in text.splitlines() for w in line.split("#", 1)[0].split())


def readable_batch_id(name: str) -> str | None:
    """``name`` when it has the documented batch-id shape: words from the batch vocabulary
    (``schemas/batch_id_words.txt``) and a valid YYYYMMDD date, dash-separated."""
    match = BATCH_ID.match(name)
    if not match:
        return None
    try:
        date(int(match["date"][:4]), int(match["date"][4:6]), int(match["date"][6:]))
    except ValueError:
        return None
    words = match["words"].split("-")
    return name if set(words) <= _batch_words() else None


class BatchNames:
    """The batch id each source folder was given, kept in the site's private zone.

    A folder's id is decided once: its readable name when that passes ``readable_batch_id``
    and names no identifier met in any batch of the site, else ``batch-<hash>`` keyed by a
    random per-site salt (so the folder name cannot be guessed back from the id). The record
    keeps the decision, so a patient met later never renames a published batch."""

    def __init__(self, work_dir: str, site_id: str):
        self.work_dir, self.site_id = work_dir, site_id
        self.path = site_work_dir(work_dir, site_id) / "batch_ids.json"
        record = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.salt: str = record.get("salt") or secrets.token_hex(32)
        self.folders: dict[str, dict] = record.get("folders", {})
        self.changed = False
        self._matcher = None

    def _identifier(self, text: str) -> bool:
        if self._matcher is None:
            self._matcher = verify.read_identifiers(
                site_identifier_files(self.work_dir, self.site_id))
        return self._matcher.in_text(text)

    def opaque(self, name: str) -> str:
        """``batch-`` and 12 hex digits of the salted HMAC of ``name``."""
        self.changed |= not self.path.exists()  # the salt must be kept once it named a batch
        return "batch-" + hmac.new(bytes.fromhex(self.salt), name.encode(),
                                   hashlib.sha256).hexdigest()[:12]

    def batch_id(self, folder: str, published: set[str]) -> str:
        """The id of a batch folder: as recorded, else decided now and recorded."""
        if folder in self.folders:
            return self.folders[folder]["batch_id"]
        match = BATCH_FOLDER.match(folder)
        legacy = [match["batch"] if match else None,
                  "batch-" + hashlib.sha256(folder.encode()).hexdigest()[:12]]
        readable = readable_batch_id(match["batch"]) if match else None
        if any(b in published for b in legacy if b):  # named so before ids were recorded
            chosen = next(b for b in legacy if b in published)
        elif readable and not self._identifier(readable):
            chosen = readable
        else:
            chosen = self.opaque(folder)
        self.folders[folder] = {"batch_id": chosen, "published": chosen in published}
        self.changed = True
        return chosen

    def loose_id(self, objects: list[SourceObject]) -> str:
        """The id of the batch of files beside the batch folders, by their names and sizes."""
        listing = "".join(f"{o.key}\t{o.size}\n" for o in objects)
        return "loose-" + self.opaque(listing).removeprefix("batch-")

    def withdraw(self, batch_id: str) -> bool:
        """Give the folder behind a readable, unpublished ``batch_id`` an opaque id from now
        on (the gate found an identifier in the id); False when there is none to withdraw."""
        for folder, entry in self.folders.items():
            if entry["batch_id"] == batch_id and not entry["published"] and (
                    not batch_id.startswith("batch-")):
                entry["batch_id"] = self.opaque(folder)
                self.changed = True
                return True
        return False

    def mark_published(self, batch_id: str) -> None:
        """Pin the folder behind a published ``batch_id`` to it for good."""
        for entry in self.folders.values():
            if entry["batch_id"] == batch_id and not entry["published"]:
                entry["published"] = self.changed = True

    def save(self) -> None:
        """Write the record (atomically) if anything was decided."""
        if not self.changed:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"salt": self.salt, "folders": self.folders}, indent=1,
                                  sort_keys=True))
        os.replace(tmp, self.path)
        self.changed = False


def withdraw_batch_id(work_dir: str, site_id: str, batch_id: str) -> bool:
    """Stop using a readable batch id the gate found an identifier in (see BatchNames)."""
    names = BatchNames(work_dir, site_id)
    withdrawn = names.withdraw(batch_id)
    names.save()
    return withdrawn


def _new_batch(site: SiteConfig, root: str, new: list[SourceObject], fingerprint,
               skipped: int, published: set[str]) -> list[BatchRef]:
    """One batch of the new objects, named by what they are (so discovery is repeatable).

    Studies a PACS source lists again after a published batch took them are studies that
    batch could not retrieve whole: they get the next attempt number (``-2``, ``-3``...)."""
    if not new:
        return []
    pacs_batch = site.source.kind in PACS_KINDS
    base = batch_id = f"{site.source.kind}-{fingerprint.hexdigest()[:12]}"
    attempt = 1
    while batch_id in published:
        if not pacs_batch:
            return []
        attempt += 1
        batch_id = f"{base}-{attempt}"
    return [BatchRef(site.site_id, batch_id, root, tuple(new), already_ingested=skipped,
                     pacs=pacs_batch)]


def _ledger_rows(work_dir: str, site_id: str, published: set[str]) -> list[dict]:
    return [row for row in read_ledger(work_dir, site_id).to_pylist()
            if row["batch_id"] in published]


def _discover_studies(site: SiteConfig, work_dir: str, published: set[str],
                      window: tuple[date | None, date | None] | None,
                      notify: Callable[[str], None] | None) -> list[BatchRef]:
    """The PACS's matching studies that were never received whole, or whose instance count
    changed since; the ledger keys received objects by study UID and SOP Instance UID."""
    source = site.source
    plan = pacs.query_plan(source.query, window)
    with pacs.open_client(source) as client:
        answers = pacs.with_retries(lambda: client.find_studies(plan.matches), source,
                                    pacs.PacsUnavailable)
        studies = pacs.with_counts(client, pacs.merged(answers), source)
    note = pacs.unmatched_accessions(plan, answers)
    if note and notify:
        notify(note)
    received = Counter(row["key"].split("/", 1)[0]
                       for row in _ledger_rows(work_dir, site.site_id, published))
    new: list[SourceObject] = []
    fingerprint = hashlib.sha256()
    skipped = 0
    for study in studies:
        if study.instances == 0:  # nothing to retrieve, nothing to account for
            continue
        if study.instances is not None and received.get(study.study_uid) == study.instances:
            skipped += study.instances
            continue
        # size carries the reported instance count (-1: not reported)
        count = study.instances if study.instances is not None else -1
        new.append(SourceObject(study.study_uid, count, 0))
        fingerprint.update(f"{study.study_uid}\t{study.instances}\n".encode())
    return _new_batch(site, _pacs_location(source), new, fingerprint, skipped, published)


def _pacs_location(source: DimseSourceConfig | DicomWebSourceConfig) -> str:
    """Where a PACS source lives, as a URL (for the batch record; never credentials)."""
    if source.kind == "dimse":
        return f"dimse://{source.called_ae}@{source.host}:{source.port}"
    url = urlsplit(source.url)
    return urlunsplit(url._replace(netloc=url.hostname + (f":{url.port}" if url.port else "")))


def _mtime_ns(info: dict) -> int:
    mtime = info.get("mtime") or info.get("LastModified") or 0
    if hasattr(mtime, "timestamp"):
        mtime = mtime.timestamp()
    return int(float(mtime) * 1e9)


def _hash_file(fs, path: str) -> str:
    with fs.open(path, "rb") as fh:
        return _hash_stream(fh)


def _hash_stream(fh) -> str:
    h = hashlib.sha256()
    while chunk := fh.read(CHUNK):
        h.update(chunk)
    return h.hexdigest()


def _open_local(root: str, key: str) -> BinaryIO:
    """A source file opened for reading if it is (or links, inside ``root``, to) a regular
    file; else _Unusable saying why. Never opens anything else (a FIFO would block)."""
    path = os.path.join(root, key)
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    if os.path.commonpath([real, real_root]) != real_root:
        raise _Unusable("symlink leads outside the source folder")
    try:
        if not stat.S_ISREG(os.stat(real).st_mode):
            raise _Unusable(f"not a regular file ({_special_kind(os.stat(real).st_mode)})")
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise _Unusable("file vanished during ingest") from None
    except OSError as err:
        raise _Unusable(_unreadable(err)) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # swapped between the look and the open
        os.close(fd)
        raise _Unusable("not a regular file")
    return os.fdopen(fd, "rb")


def _unreadable(err: OSError) -> str:
    return ("unreadable (permission denied)" if isinstance(err, PermissionError)
            else f"unreadable ({type(err).__name__})")


def _open_source(fs, root: str, key: str) -> BinaryIO:
    """A source object opened for reading; _Unusable saying why it cannot be."""
    if isinstance(fs, LocalFileSystem):
        return _open_local(root, key)
    try:
        return fs.open(f"{root}/{key}", "rb")
    except FileNotFoundError:
        raise _Unusable("file vanished during ingest") from None
    except OSError as err:
        raise _Unusable(_unreadable(err)) from None


def _hash_source(fs, root: str, key: str) -> str:
    try:
        with _open_source(fs, root, key) as fh:
            return _hash_stream(fh)
    except FileNotFoundError:
        raise _Unusable("file vanished during ingest") from None
    except OSError as err:
        raise _Unusable(_unreadable(err)) from None


class _Objects:
    """Accumulates index and quarantine rows while a batch is walked."""

    def __init__(self, batch: BatchRef, work: Path):
        self.batch = batch
        self.staging = work / "staging" / batch.batch_id / "source"
        self.quarantine_dir = work / "quarantine" / batch.batch_id
        self.rows: list[dict] = []
        self.quarantined: list[dict] = []

    def next_id(self) -> str:
        return f"o{len(self.rows):07d}"

    def add(self, key: str, **fields) -> dict:
        row = {"seq": len(self.rows), "object_id": self.next_id(), "key": key, **fields}
        self.rows.append(row)
        return row

    def quarantine(self, key: str, reason: str, data_path: str | None = None, **fields) -> dict:
        row = self.add(key, status=QUARANTINED, reason=reason, **fields)
        if data_path and os.path.exists(data_path):
            self.quarantine_dir.mkdir(parents=True, exist_ok=True)
            target = self.quarantine_dir / row["object_id"]
            if os.path.abspath(data_path) != str(target):
                try:
                    shutil.copyfile(data_path, target)
                except OSError:  # the record and its reason stand without the copy
                    target.unlink(missing_ok=True)
        self.quarantined.append(
            {"object_id": row["object_id"], "key": key, "stage": "ingest", "reason": reason}
        )
        return row


def _header(path: str) -> dict:
    """The header fields later steps need; raises for anything that is not usable DICOM."""
    ds = dcmread(path, stop_before_pixels=True, specific_tags=HEADER_TAGS)
    meta_class = str(ds.file_meta.get("MediaStorageSOPClassUID", ""))
    if meta_class == DICOMDIR_CLASS:
        raise _Unusable("DICOMDIR index file (not an image)")
    values = {kw: str(ds.get(kw) or "").strip() or None for kw in HEADER_TAGS}
    if not values["SOPInstanceUID"]:
        raise _Unusable("no SOP Instance UID")
    return {
        "patient_id": values["PatientID"],
        "study_uid": values["StudyInstanceUID"],
        "series_uid": values["SeriesInstanceUID"],
        "sop_uid": values["SOPInstanceUID"],
        "sop_class_uid": values["SOPClassUID"],
        "modality": values["Modality"],
        "study_date": values["StudyDate"],
    }


class _Unusable(Exception):
    pass


def _index_staged(objects: _Objects, key: str, path: str, size: int, digest: str,
                  extra: dict) -> dict:
    try:
        header = _header(path)
    except _Unusable as err:
        return objects.quarantine(key, str(err), path, size=size, sha256=digest, **extra)
    except InvalidDicomError:
        return objects.quarantine(key, "not DICOM", path, size=size, sha256=digest, **extra)
    except Exception as err:  # noqa: BLE001 - any parse failure quarantines the object
        reason = f"unreadable DICOM header ({type(err).__name__})"
        return objects.quarantine(key, reason, path, size=size, sha256=digest, **extra)
    return objects.add(key, staged_path=path, size=size, sha256=digest, status=OK, reason=None,
                       **header, **extra)


def _stream_to(src, dest: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with dest.open("wb") as out:
        while chunk := src.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
            out.write(chunk)
    return size, h.hexdigest()


def _exam_fields(zip_key: str, member: str) -> dict:
    match = ZIP_NAME.match(zip_key.rsplit("/", 1)[-1])
    if not match:
        return {"member_path": member}
    return {
        "exam_id": match["exam"],
        "exam_time": match["time"],
        "exam_description": match["description"],
        "member_path": member,
    }


def _ingest_zip(objects: _Objects, raw: BinaryIO, key: str, local_path: str | None) -> None:
    try:
        with zipfile.ZipFile(raw) as archive:
            for info in sorted(archive.infolist(), key=lambda i: i.filename):
                if info.is_dir():
                    continue
                _ingest_member(objects, archive, info, key)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as err:  # bad UTF-8 name
        objects.quarantine(key, f"corrupt zip archive ({type(err).__name__})", local_path)


def _ingest_member(objects: _Objects, archive, info: zipfile.ZipInfo, zip_key: str) -> None:
    key = f"{zip_key}!{info.filename}"
    extra = _exam_fields(zip_key, info.filename)
    if info.flag_bits & 0x1:
        objects.quarantine(key, "encrypted zip entry", **extra)
        return
    if info.file_size > MAX_MEMBER_BYTES:
        objects.quarantine(key, "zip entry larger than the size limit", **extra)
        return
    if info.compress_size and info.file_size / info.compress_size > MAX_COMPRESSION_RATIO:
        objects.quarantine(key, "zip entry compression ratio too high (zip bomb)", **extra)
        return
    staged = objects.staging / objects.next_id()
    try:
        with archive.open(info) as member:
            size, digest = _stream_to(member, staged)
    except (zipfile.BadZipFile, EOFError, OSError, RuntimeError, zlib.error,
            lzma.LZMAError) as err:  # a corrupt compressed stream raises zlib/lzma errors
        staged.unlink(missing_ok=True)
        objects.quarantine(key, f"corrupt zip entry ({type(err).__name__})", **extra)
        return
    _index_staged(objects, key, str(staged), size, digest, extra)


def _ingest_file(objects: _Objects, fs, root: str, obj: SourceObject) -> None:
    """Index one source entry: a file (a zip's members one by one), or, for an entry that is
    no readable regular file, a quarantine record with the reason."""
    key = obj.key
    if obj.problem:
        objects.quarantine(key, obj.problem)
        return
    local = isinstance(fs, LocalFileSystem)
    try:
        with _open_source(fs, root, key) as fh:
            if fh.read(4) == b"PK\x03\x04":
                fh.seek(0)
                _ingest_zip(objects, fh, key, os.path.join(root, key) if local else None)
                return
            fh.seek(0)
            if local:
                size = os.fstat(fh.fileno()).st_size
                digest = obj.sha256 or _hash_stream(fh)
                staged = os.path.realpath(os.path.join(root, key))
            else:
                staged_path = objects.staging / objects.next_id()
                size, digest = _stream_to(fh, staged_path)
                staged = str(staged_path)
    except _Unusable as err:
        objects.quarantine(key, str(err))
        return
    except FileNotFoundError:
        objects.quarantine(key, "file vanished during ingest")
        return
    except OSError as err:
        objects.quarantine(key, _unreadable(err))
        return
    _index_staged(objects, key, staged, size, digest, {})


def _received_folder(received: Path, study_uid: str) -> Path:
    return received / hashlib.sha256(study_uid.encode()).hexdigest()[:16]


def _ingest_studies(objects: _Objects, source, received: Path) -> None:
    """Retrieve each study of the batch whole and index its files; a study that cannot be
    retrieved whole is quarantined as one record. Studies an earlier, interrupted run
    received whole (for whichever batch) are taken from ``received`` without asking the PACS
    again; they stay there until a published batch holds them."""
    with pacs.open_client(source, receive=True) as client:
        for obj in objects.batch.objects:
            if not pacs.well_formed_uid(obj.key):
                objects.quarantine(obj.key, pacs.MALFORMED_UID)
                continue
            study = pacs.PacsStudy(obj.key, obj.size if obj.size >= 0 else None)
            folder = _received_folder(received, obj.key)
            try:
                files = pacs.retrieve_study(client, study, folder, source)
            except pacs.RetrieveFailed as err:
                objects.quarantine(obj.key, str(err))
                continue
            for path in files:
                row = _index_staged(objects, f"{obj.key}/{path.name}", str(path),
                                    path.stat().st_size, _hash_file(_LOCAL, str(path)), {})
                if row["status"] == OK:  # known by study and SOP UID, as the ledger keeps it
                    row["key"] = f"{obj.key}/{row['sop_uid']}"


def ingest_batch(batch: BatchRef, source: SourceConfig, work_dir: str) -> IngestResult:
    """Index every object of a batch; write the index and quarantine list to the private zone.

    Objects on a remote filesystem (S3 and other fsspec URLs) are staged into the work folder
    as they are read, by opaque id; local files are read in place."""
    work = site_work_dir(work_dir, batch.site_id)
    objects = _Objects(batch, work)
    if objects.staging.exists():
        shutil.rmtree(objects.staging)
    objects.staging.mkdir(parents=True)
    if source.kind in PACS_KINDS:
        _ingest_studies(objects, source, work / "received")
    else:
        fs, _ = fsspec.core.url_to_fs(source.path, **source.storage_options)
        for obj in batch.objects:
            _ingest_file(objects, fs, batch.root, obj)
    index = pa.Table.from_pylist(objects.rows, schema=SOURCE_INDEX)
    quarantine = pa.Table.from_pylist(objects.quarantined, schema=QUARANTINE)
    index_dir = work / "index"
    index_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(index, index_dir / f"{batch.batch_id}.parquet")
    if quarantine.num_rows:
        objects.quarantine_dir.mkdir(parents=True, exist_ok=True)
        pq.write_table(quarantine, objects.quarantine_dir / "quarantine.parquet")
    return IngestResult(index=index, quarantine=quarantine)


def read_ledger(work_dir: str, site_id: str) -> pa.Table:
    path = site_work_dir(work_dir, site_id) / "ledger.parquet"
    return pq.read_table(path, schema=LEDGER) if path.exists() else LEDGER.empty_table()


def record_ingested(batch: BatchRef, index: pa.Table, work_dir: str) -> None:
    """Remember a published batch's source objects so the next run skips them: hashed files,
    or for a PACS batch the objects received (from the index)."""
    names = BatchNames(work_dir, batch.site_id)
    names.mark_published(batch.batch_id)
    names.save()
    ledger = read_ledger(work_dir, batch.site_id).to_pylist()
    if batch.pacs:  # every object of the studies received whole, whatever became of it
        studies_asked = {o.key for o in batch.objects}  # keys of the study-level records
        rows = [{"key": r["key"], "size": r["size"], "mtime_ns": 0, "sha256": r["sha256"],
                 "batch_id": batch.batch_id}
                for r in index.select(["key", "size", "sha256"]).to_pylist()
                if r["key"] not in studies_asked]
        studies = {r["key"].split("/", 1)[0] for r in rows}
        kept = [r for r in ledger if r["key"].split("/", 1)[0] not in studies]
    else:
        rows = [{"key": o.key, "size": o.size, "mtime_ns": o.mtime_ns, "sha256": o.sha256,
                 "batch_id": batch.batch_id}
                for o in batch.objects if o.sha256 or o.problem]  # a bad entry stays seen
        done = {r["key"] for r in rows}
        kept = [r for r in ledger if r["key"] not in done]
    if not rows:
        return
    path = site_work_dir(work_dir, batch.site_id) / "ledger.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    pq.write_table(pa.Table.from_pylist(kept + rows, schema=LEDGER), tmp)
    os.replace(tmp, path)


def batch_from_ledger(site: SiteConfig, work_dir: str, batch_id: str) -> BatchRef | None:
    """A published batch of a folder or PACS source as its ledger rows record it, so it can
    be republished (a rekey, a forced rerun) though discovery would no longer name it."""
    rows = [r for r in read_ledger(work_dir, site.site_id).to_pylist()
            if r["batch_id"] == batch_id]
    if not rows or site.source.kind == "zip_batches":
        return None
    if site.source.kind in PACS_KINDS:
        studies = Counter(r["key"].split("/", 1)[0] for r in rows)
        objects = tuple(SourceObject(uid, n, 0) for uid, n in sorted(studies.items()))
        return BatchRef(site.site_id, batch_id, _pacs_location(site.source), objects,
                        pacs=True)
    _, root = fsspec.core.url_to_fs(site.source.path, **site.source.storage_options)
    objects = tuple(SourceObject(r["key"], r["size"], r["mtime_ns"], r["sha256"])
                    for r in sorted(rows, key=lambda r: r["key"]))
    return BatchRef(site.site_id, batch_id, root.rstrip("/"), objects)


def _pending_path(work_dir: str, site_id: str, batch_id: str) -> Path:
    return site_work_dir(work_dir, site_id) / "pending" / f"{batch_id}.json"


def save_pending(batch: BatchRef, work_dir: str) -> None:
    """Keep a discovered batch in the private zone so the run that takes it need not rescan."""
    path = _pending_path(work_dir, batch.site_id, batch.batch_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(batch)))


def load_pending(work_dir: str, site_id: str, batch_id: str) -> BatchRef | None:
    path = _pending_path(work_dir, site_id, batch_id)
    if not path.exists():
        return None
    raw = json.loads(path.read_text())
    return BatchRef(raw["site_id"], raw["batch_id"], raw["root"],
                    tuple(SourceObject(**o) for o in raw["objects"]), raw["already_ingested"],
                    raw.get("pacs", False))


def forget_pending(work_dir: str, site_id: str, batch_id: str) -> None:
    _pending_path(work_dir, site_id, batch_id).unlink(missing_ok=True)


def clear_staging(batch: BatchRef, work_dir: str) -> None:
    """Drop a published batch's staged copies, PACS studies received for it included (the
    source and the release keep what matters)."""
    work = site_work_dir(work_dir, batch.site_id)
    shutil.rmtree(work / "staging" / batch.batch_id, ignore_errors=True)
    if batch.pacs:
        for obj in batch.objects:
            shutil.rmtree(_received_folder(work / "received", obj.key), ignore_errors=True)


def detect_source_kind(url: str, storage_options: dict | None = None) -> str:
    """``zip_batches`` when the folder holds tip-sheet batch folders, else ``folder``."""
    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    if not fs.isdir(root):
        raise FileNotFoundError("the source folder does not exist")  # the caller names the site
    names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False) if fs.isdir(p)]
    return "zip_batches" if any(BATCH_FOLDER.match(n) for n in names) else "folder"


def quarantine_later(index: pa.Table, refused: pa.Table, stage: str, work_dir: str,
                     site_id: str, batch_id: str) -> None:
    """Keep the objects a later step refused (rows of ``refused`` whose status is quarantined)
    in the batch's quarantine, beside those ingest refused, so each can be looked at after
    its staging is cleared."""
    quarantined = [(r["object_id"], r["reason"])
                   for r in refused.select(["object_id", "status", "reason"]).to_pylist()
                   if r["status"] == QUARANTINED]
    if not quarantined:
        return
    rows = {r["object_id"]: r for r in index.select(["object_id", "key", "staged_path"])
            .to_pylist()}
    folder = site_work_dir(work_dir, site_id) / "quarantine" / batch_id
    folder.mkdir(parents=True, exist_ok=True)
    listing = folder / "quarantine.parquet"
    records = pq.read_table(listing).to_pylist() if listing.exists() else []
    done = {(r["object_id"], r["stage"]) for r in records}
    for object_id, reason in quarantined:
        source = rows[object_id]
        if source["staged_path"] and os.path.exists(source["staged_path"]):
            shutil.copyfile(source["staged_path"], folder / object_id)
        if (object_id, stage) not in done:
            records.append({"object_id": object_id, "key": source["key"], "stage": stage,
                            "reason": reason})
    pq.write_table(pa.Table.from_pylist(records, schema=QUARANTINE), listing)
