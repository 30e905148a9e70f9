"""Discovery: find a site's new batches, cheaply: names, sizes and modification times.

A folder source's files are listed (never opened, nor followed through a symlink out of the
source); an object the ledger knows by key, size and time is taken as seen, and only one whose
time changed but size did not is hashed, to tell a touch from a change. A zip source's COMPLETE
batch folders are batches (IN-PROGRESS ones wait). A PACS source is asked for its studies.
Every entry that is no readable regular file is listed with its problem, to be quarantined.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import hmac
import json
import os
import re
import secrets
import stat
from collections import Counter
from collections.abc import Callable
from datetime import date
from importlib import resources
from urllib.parse import urlsplit, urlunsplit

import fsspec
from fsspec.implementations.local import LocalFileSystem

from schemas.config import (
    PACS_KINDS,
    DicomWebSourceConfig,
    DimseSourceConfig,
    SiteConfig,
)
from tasks import pacs, sources
from tasks.deidentify.text import IdentifierMatcher
from tasks.failures import SourceUnavailable
from tasks.ledger import BatchRef, SourceObject, read_ledger, site_identifiers
from tasks.zones import WorkDir

BATCH_FOLDER = re.compile(r"^(?P<batch>.+?)-(?P<state>COMPLETE|IN-PROGRESS)$")
BATCH_ID = re.compile(r"^(?P<words>[A-Z][A-Z0-9]*(?:-[A-Z][A-Z0-9]*)*)-(?P<date>\d{8})$")


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
        return f"symlink to a {sources.special_kind(target.st_mode)}", target
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
                out[key] = {"size": 0, "mtime": 0, "problem": sources.unreadable(err)}
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
                problem = f"not a regular file ({sources.special_kind(info.st_mode)})"
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
        digest = None
        if seen and seen["size"] == info["size"]:
            if seen["mtime_ns"] == _mtime_ns(info):
                skipped += 1
                continue
            # a touched file (same size, other time) is the one discovery reads: unchanged
            # bytes are skipped, changed ones name the batch they join by their hash
            digest = _hash_of(fs, root, key)
            if digest is not None and digest == seen["sha256"]:
                skipped += 1
                continue
        problem = info.get("problem")
        new.append(SourceObject(key, info["size"], _mtime_ns(info), digest, problem))
        # named by what discovery knows of the objects (never their times), so one listing
        # gives one id wherever the files are kept
        fingerprint.update(f"{key}\t{info['size']}\t{digest or ''}\t{problem or ''}\n"
                           .encode())
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
        self.path = WorkDir(work_dir, site_id).batch_ids
        record = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.salt: str = record.get("salt") or secrets.token_hex(32)
        self.folders: dict[str, dict] = record.get("folders", {})
        self.changed = False
        self._matcher = None

    def _identifier(self, text: str) -> bool:
        if self._matcher is None:
            self._matcher = IdentifierMatcher(site_identifiers(self.work_dir, self.site_id))
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


def mark_batch_published(work_dir: str, site_id: str, batch_id: str) -> None:
    """Pin a published batch's folder to its id for good (see BatchNames)."""
    names = BatchNames(work_dir, site_id)
    names.mark_published(batch_id)
    names.save()


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


def _hash_of(fs, root: str, key: str) -> str | None:
    """The SHA-256 of a source file's bytes; None when it cannot be read (then it is taken
    again, to be quarantined with its reason)."""
    try:
        with sources.open_source(fs, root, key) as fh:
            digest = hashlib.sha256()
            while block := fh.read(1 << 20):
                digest.update(block)
    except (sources.Unusable, OSError):
        return None
    return digest.hexdigest()


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


def detect_source_kind(url: str, storage_options: dict | None = None) -> str:
    """``zip_batches`` when the folder holds tip-sheet batch folders, else ``folder``."""
    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    if not fs.isdir(root):
        raise FileNotFoundError("the source folder does not exist")  # the caller names the site
    names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False) if fs.isdir(p)]
    return "zip_batches" if any(BATCH_FOLDER.match(n) for n in names) else "folder"




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


