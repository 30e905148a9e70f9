"""Frozen releases and their audit trail: the layout under ``releases/<name>/`` and the schema of
one audit record, declared once for the writers, the views and the tests."""

from __future__ import annotations

import pyarrow as pa

RELEASES_DIR = "releases"
CURRENT = "current"  # releases/current: a one-line file naming the newest frozen release
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"

# inside releases/<name>/; CHECKSUM is written last: a release without it is not frozen yet
MANIFEST_FILE = "manifest.parquet"  # every DICOM file of the release: path, size, sha256
SELECTION_FILE = "selection.json"  # the predicate and the batches it was applied to
SNAPSHOT_DIR = "catalog"  # catalog/<table>.parquet: each table filtered to the chosen studies
SUMS_FILE = "SHA256SUMS"  # `sha256sum -c` lines for the manifest, selection and snapshot
CHECKSUM_FILE = "CHECKSUM"  # sha256 of SHA256SUMS: the release's identity
INFO_FILE = "release.json"  # name, description, creation time: outside the checksum
AUDIT_DIR = "audit"  # audit/<time>-<record_id>.parquet: one file per record, never rewritten

CREATED = "release_created"
EXPORTED = "export"

AUDIT = pa.schema(
    [
        ("record_id", pa.string()),
        ("action", pa.string()),  # release_created | export
        ("release", pa.string()),  # the frozen release's name
        ("release_checksum", pa.string()),
        ("requester", pa.string()),  # the OS user, or --requester
        ("purpose", pa.string()),  # purpose or approval id (the description, at creation)
        ("time", pa.timestamp("ms", tz="UTC")),
        ("where_sql", pa.string()),  # the predicate, as given
        ("patients", pa.int64()),
        ("studies", pa.int64()),
        ("series", pa.int64()),
        ("instances", pa.int64()),
        ("files", pa.int64()),
        ("bytes", pa.int64()),
        ("checksum", pa.string()),  # of what was frozen or exported (its SHA256SUMS)
        ("destination", pa.string()),  # export folder as the requester named it
    ]
)
