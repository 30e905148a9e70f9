"""Versioned batches: a republish writes beside the current version and switches with COMPLETE;
what only the old version held goes after; verify checks manifests against files."""

from __future__ import annotations

import hashlib

import duckdb
import pyarrow as pa

from tasks.publish import drop_superseded, publish_batch, refresh_catalog_db, versioned_path
from tasks.verify import check_manifests
from tasks.zones import Release, parse_marker
from tests.test_publish import batch_tables, run_table

DICOM = "dicom/s1/P1/2.25.1/2.25.2/2.25.3.dcm"


def publish(release: Release, tmp_path, content: bytes, run_id: str):
    staged = tmp_path / f"staged-{run_id}.dcm"
    staged.write_bytes(content)
    sha = hashlib.sha256(content).hexdigest()
    files = [(str(staged), DICOM, len(content), sha)]
    tables = batch_tables("2.25.3")
    instances = tables["instances"]
    tables["instances"] = instances.set_column(
        instances.schema.get_field_index("path"), "path", pa.array([DICOM], pa.string()))
    return publish_batch(release, "s1", "B1", tables, files, run_table(run_id), run_id,
                         key_check="k1"), sha


def test_a_changed_file_goes_beside_the_old_one_and_the_old_goes_after_the_switch(tmp_path):
    root = tmp_path / "release"
    release = Release(str(root))
    publish(release, tmp_path, b"DICM-old", "r1")
    first = release.current_version("s1", "B1")
    assert first.key_check == "k1" and first.manifest.startswith("manifest-")

    _, sha = publish(release, tmp_path, b"DICM-new!", "r2")
    moved = versioned_path(DICOM, sha)
    assert moved == f"dicom/s1/P1/2.25.1/2.25.2/2.25.3.v{sha[:12]}.dcm"
    # switched: the manifest and the instances rows name the new file; the old one is still
    # whole on disk for a reader that read the old manifest, until drop_superseded
    assert release.manifest("s1", "B1").column("path").to_pylist().count(moved) == 1
    assert (root / moved).read_bytes() == b"DICM-new!"
    assert (root / DICOM).read_bytes() == b"DICM-old"
    assert len(release.manifest_names("s1", "B1")) == 2
    refresh_catalog_db(release, str(tmp_path / "work"))
    with duckdb.connect(str(root / "catalog.duckdb"), read_only=True) as con:
        assert con.sql("select path from instances").fetchall() == [(moved,)]
    assert drop_superseded(release, "s1", "B1") >= 1
    assert not (root / DICOM).exists()
    assert release.manifest_names("s1", "B1") == [release.current_version("s1", "B1").manifest]
    assert check_manifests(release) == (len(release.manifest("s1", "B1")), [])
    assert drop_superseded(release, "s1", "B1") == 0  # idempotent

    # back to the first bytes: the usual path is free again
    publish(release, tmp_path, b"DICM-old", "r3")
    drop_superseded(release, "s1", "B1")
    assert (root / DICOM).read_bytes() == b"DICM-old" and not (root / moved).exists()
    assert release.current_version("s1", "B1") == first


def test_verify_finds_a_file_that_does_not_match_its_manifest(tmp_path):
    root = tmp_path / "release"
    release = Release(str(root))
    publish(release, tmp_path, b"DICM-old", "r1")
    (root / DICOM).write_bytes(b"DICM-bad")
    checked, findings = check_manifests(release)
    assert checked == len(release.manifest("s1", "B1"))
    assert [(f.where, f.element, f.what) for f in findings] == [
        ("batch s1/B1", DICOM, "sha256 differs from the manifest")]
    (root / DICOM).unlink()
    assert [f.what for f in check_manifests(release)[1]] == ["listed in the manifest, missing"]
    (root / DICOM).write_bytes(b"DICM-old, longer")
    assert check_manifests(release)[1][0].what.endswith("bytes, manifest says 8")


def test_a_marker_from_before_versions_names_the_one_manifest():
    legacy = parse_marker(b"manifest sha256 " + b"a" * 64 + b"\n")
    assert legacy.manifest == "manifest.parquet" and legacy.key_check is None
    current = parse_marker(b"manifest manifest-0123456789abcdef.parquet\nmanifest sha256 ff\n"
                           b"key check 00aa\n")
    assert (current.manifest, current.manifest_sha256, current.key_check) == (
        "manifest-0123456789abcdef.parquet", "ff", "00aa")
    assert parse_marker(current.marker()) == current
