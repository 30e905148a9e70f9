"""The two zones: the public release (``Release``) and a site's private work folder (``WorkDir``).

Every path inside either zone is named here, so steps and flows ask a zone where a thing lives
instead of building the path by hand. The release holds only what is safe to publish; the work
folder holds what must never leave the site's machine: the ledger of source objects, pending
batches, indexes and identifier lists, staging, quarantine and republish markers.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from schemas.catalog import APPENDED_TABLES, MANIFEST

COMPLETE = "COMPLETE"
CATALOG_DB = "catalog.duckdb"
KEY_CHECK = "KEY-CHECK"
LEGACY_MANIFEST = "manifest.parquet"  # the one manifest of a batch published before versions
MANIFEST_FILE = re.compile(r"^manifest(-[0-9a-f]{16})?\.parquet$")
TEMPORARY = ".tmp-"


@dataclass(frozen=True)
class BatchVersion:
    """What a COMPLETE marker says: the current manifest, its sha256, the key check value."""

    manifest: str
    manifest_sha256: str
    key_check: str | None

    def marker(self) -> bytes:
        return (f"manifest {self.manifest}\nmanifest sha256 {self.manifest_sha256}\n"
                f"key check {self.key_check or '-'}\n").encode()


def parse_marker(data: bytes) -> BatchVersion:
    """A COMPLETE marker's fields; a marker from before versions names ``manifest.parquet``."""
    fields = {}
    for line in data.decode("ascii", "replace").splitlines():
        for name in ("manifest sha256 ", "manifest ", "key check "):
            if line.startswith(name):
                fields[name.strip()] = line[len(name):].strip()
                break
    key = fields.get("key check")
    return BatchVersion(fields.get("manifest", LEGACY_MANIFEST),
                        fields.get("manifest sha256", ""), None if key in (None, "-") else key)


class Release:
    """A release location (local folder or fsspec URL) and the layout inside it."""

    def __init__(self, url: str, storage_options: dict | None = None):
        self.url = url.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **self.storage_options)
        self.local = isinstance(self.fs, LocalFileSystem)

    def path(self, relative: str) -> str:
        return f"{self.root}/{relative}"

    def uri(self, relative: str) -> str:
        """An address DuckDB can read: a local path, or the URL with its protocol."""
        if self.local:
            return self.path(relative)
        return f"{self.fs.unstrip_protocol(self.path(relative))}"

    def batch_dir(self, site_id: str, batch_id: str) -> str:
        return f"batches/{site_id}/{batch_id}"

    def partition(self, table: str, site_id: str, batch_id: str) -> str:
        return f"catalog/{table}/site_id={site_id}/batch_id={batch_id}"

    def is_complete(self, site_id: str, batch_id: str) -> bool:
        return self.fs.exists(self.path(f"{self.batch_dir(site_id, batch_id)}/{COMPLETE}"))

    def complete_batches(self) -> list[tuple[str, str]]:
        """(site_id, batch_id) of every batch readers may trust, sorted."""
        found = self.fs.glob(self.path(f"batches/*/*/{COMPLETE}"))
        out = []
        for p in found:
            parts = p.split("/")
            out.append((parts[-3], parts[-2]))
        return sorted(out)

    def current_version(self, site_id: str, batch_id: str) -> BatchVersion | None:
        """The version the batch's COMPLETE marker names; None for a batch not complete."""
        data = self.read_bytes(f"{self.batch_dir(site_id, batch_id)}/{COMPLETE}")
        return None if data is None else parse_marker(data)

    def manifest(self, site_id: str, batch_id: str) -> pa.Table:
        """The current manifest of a complete batch (every file, size, sha256); empty if none."""
        version = self.current_version(site_id, batch_id)
        if version is None:
            return MANIFEST.empty_table()
        return self.read_manifest(site_id, batch_id, version.manifest)

    def read_manifest(self, site_id: str, batch_id: str, name: str) -> pa.Table:
        data = self.read_bytes(f"{self.batch_dir(site_id, batch_id)}/{name}")
        return MANIFEST.empty_table() if data is None else pq.read_table(io.BytesIO(data))

    def manifest_names(self, site_id: str, batch_id: str) -> list[str]:
        """Every manifest in a batch's folder: the current one and any not yet dropped."""
        folder = self.path(self.batch_dir(site_id, batch_id))
        if not self.fs.isdir(folder):
            return []
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(folder, detail=False)]
        return sorted(n for n in names if MANIFEST_FILE.match(n))

    def catalog_files(self, table: str, site_id: str, batch_id: str) -> list[str]:
        """Relative paths of the Parquet files that hold a batch's rows of one catalog table.

        Readers (views, dedupe, frozen releases, exports) list a batch's catalog files here
        and nowhere else: the files the batch's current manifest names. Run records, and the
        labels and segmentations that come back after publication, are appended outside the
        manifest: for those, the whole partition."""
        partition = self.partition(table, site_id, batch_id)
        if table == "runs" or table in APPENDED_TABLES:
            pattern = self.path(f"{partition}/*.parquet")
            return sorted(p[len(self.root) + 1:] for p in self.fs.glob(pattern))
        return sorted(p for p in self.manifest(site_id, batch_id).column("path").to_pylist()
                      if p.startswith(f"{partition}/") and p.endswith(".parquet"))

    def read_bytes(self, relative: str) -> bytes | None:
        try:
            with self.fs.open(self.path(relative), "rb") as fh:
                return fh.read()
        except FileNotFoundError:
            return None

    def write_bytes(self, relative: str, data: bytes, atomic: bool = False) -> bool:
        """Write unless the same bytes are already there; True when something was written.

        Files no current version names may be written in place on an object store (a crash
        leaves a file only a manifest that is not current lists). A local file is always
        written beside and renamed over, never truncated: the path may be a hard link a frozen
        release holds, whose bytes must not change. ``atomic`` marks the files readers trust at
        once (COMPLETE, KEY-CHECK); a PUT to an object store replaces the object whole."""
        if self.read_bytes(relative) == data:
            return False
        target = self.path(relative)
        self.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        if self.local:  # a rename, never an in-place truncate (see above)
            tmp = f"{target}{TEMPORARY}{os.getpid()}"
            Path(tmp).write_bytes(data)
            os.replace(tmp, target)
        else:
            self.fs.pipe_file(target, data)
        return True

    def remove(self, relative: str) -> None:
        """Remove a file if it is there; a local folder left empty goes too."""
        target = self.path(relative)
        try:
            self.fs.rm_file(target)
        except FileNotFoundError:
            return
        if self.local:
            folder = Path(target).parent
            while folder != Path(self.root) and folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
                folder = folder.parent

    def remove_temporary(self, pattern: str) -> list[str]:
        """Remove leftovers of atomic writes a killed run never renamed (``pattern`` is a
        glob relative to the release); returns what was removed."""
        found = [p for p in self.fs.glob(self.path(pattern)) if TEMPORARY in p]
        for p in found:
            self.fs.rm_file(p)
        return [p[len(self.root) + 1:] for p in found]

    def place_file(self, staged: str, relative: str, size: int, sha256: str,
                   previous: dict[str, tuple[int, str]]) -> bool:
        """Move a staged file into place unless the manifest says it is already there."""
        target = self.path(relative)
        if (previous.get(relative) == (size, sha256) and self.fs.exists(target)
                and self.fs.size(target) == size):
            return False
        self.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        if self.local:
            try:
                os.replace(staged, target)
            except OSError:
                shutil.copyfile(staged, target)
        else:
            self.fs.put_file(staged, target)
        return True


def table_bytes(table: pa.Table) -> bytes:
    """Parquet bytes for a table; the same table always gives the same bytes."""
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd", write_statistics=True)
    return sink.getvalue()


INDEX = "index"
IDENTIFIERS = ".identifiers.parquet"


class WorkDir:
    """One site's private zone, ``<work_dir>/<site_id>/``, and the layout inside it."""

    def __init__(self, work_dir: str | Path, site_id: str):
        self.site_id = site_id
        self.root = Path(work_dir) / site_id

    @property
    def ledger(self) -> Path:
        """The source objects of published batches, so discovery skips them."""
        return self.root / "ledger.parquet"

    @property
    def batch_ids(self) -> Path:
        """The batch id each source folder was given, and the salt of the opaque ones."""
        return self.root / "batch_ids.json"

    @property
    def received(self) -> Path:
        """PACS studies received whole, kept until a published batch holds them."""
        return self.root / "received"

    def received_study(self, study_uid: str) -> Path:
        """The folder of one received study, named by a hash (no UID in a path)."""
        return self.received / hashlib.sha256(study_uid.encode()).hexdigest()[:16]

    def pending(self, batch_id: str) -> Path:
        """A discovered batch kept for the run that takes it."""
        return self.root / "pending" / f"{batch_id}.json"

    def index(self, batch_id: str) -> Path:
        """The batch's source index (one row per object)."""
        return self.root / INDEX / f"{batch_id}.parquet"

    def identifiers(self, batch_id: str) -> Path:
        """The identifying values de-identification met in the batch, for the gate."""
        return self.root / INDEX / f"{batch_id}{IDENTIFIERS}"

    def identifier_files(self) -> list[Path]:
        """Every identifier list of the site, sorted: what the gate on any batch searches."""
        return sorted((self.root / INDEX).glob(f"*{IDENTIFIERS}"))

    def staging(self, batch_id: str) -> Path:
        """The batch's staged copies (``source``, ``deidentified``), dropped once published."""
        return self.root / "staging" / batch_id

    def quarantine(self, batch_id: str) -> Path:
        """The objects of the batch a step refused, with ``quarantine.parquet`` listing them."""
        return self.root / "quarantine" / batch_id

    def quarantine_list(self, batch_id: str) -> Path:
        """The listing of the batch's quarantined objects (object, stage, reason)."""
        return self.quarantine(batch_id) / "quarantine.parquet"

    def republish(self, batch_id: str) -> Path:
        """The marker of a complete batch being republished, so a rerun finishes it."""
        return self.root / "republish" / batch_id

    def republishing(self) -> set[str]:
        """The batches whose republish marker is there."""
        folder = self.root / "republish"
        return {p.name for p in folder.iterdir()} if folder.is_dir() else set()


def all_identifier_files(work_dir: str | Path) -> list[Path]:
    """Every site's identifier lists in a work folder (sites no longer configured included)."""
    return sorted(Path(work_dir).glob(f"*/{INDEX}/*{IDENTIFIERS}"))
