"""Audited cohort export: `radrepo export` from a frozen release (local and in moto's S3) writes
the chosen DICOM (or object URLs) and catalog rows, and adds a record to the release's audit."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from flows.cli import app
from tests.moto_s3 import moto_s3

runner = CliRunner()
COHORT = "status = 'published' AND covid_status = 'positive' AND age_at_index >= 50"


@pytest.fixture
def release(published_release, tmp_path) -> Path:
    """A private copy of the session's published release, with one frozen release."""
    root = Path(shutil.copytree(published_release, tmp_path / "release"))
    made = cli("release", "create", root, "v1", "--description", "all studies")
    assert made.exit_code == 0, made.output
    return root


def cli(*args: str) -> object:
    return runner.invoke(app, [str(a) for a in args])


def frozen(root: Path, sql: str) -> list[tuple]:
    with duckdb.connect(str(root / "releases" / "v1" / "catalog.duckdb"), read_only=True) as con:
        return con.execute(sql).fetchall()


def cohort_paths(root: Path) -> list[str]:
    return [p for (p,) in frozen(root, "SELECT i.path FROM instances i JOIN studies s USING "
                                       "(study_uid) JOIN patients p USING (patient_id) WHERE "
                                       "s.status = 'published' AND p.covid_status = 'positive' "
                                       "AND p.age_at_index >= 50 ORDER BY 1")]


def test_export_writes_the_cohort_and_an_append_only_audit_record(release, tmp_path):
    want = cohort_paths(release)
    assert want
    out = tmp_path / "out"
    result = cli("export", release, out, "--release", "current", "--where", COHORT,
                 "--purpose", "IRB-2020-117: severity model", "--requester", "dr-analyst")
    assert result.exit_code == 0, result.output
    exported = sorted(p.relative_to(out).as_posix() for p in (out / "dicom").rglob("*.dcm"))
    assert exported == want
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    for row in manifest:
        assert hashlib.sha256((out / row["path"]).read_bytes()).hexdigest() == row["sha256"]
        assert (out / row["path"]).stat().st_ino != (
            release / "releases" / "v1" / row["path"]).stat().st_ino  # a copy, not a link
    instances = pq.read_table(out / "catalog" / "instances.parquet")
    assert sorted(instances.column("path").to_pylist()) == want
    patients = pq.read_table(out / "catalog" / "patients.parquet").to_pylist()
    assert patients and all(p["covid_status"] == "positive" and p["age_at_index"] >= 50
                            for p in patients)
    checksum = hashlib.sha256((out / "SHA256SUMS").read_bytes()).hexdigest()
    assert checksum in result.output

    audit = cli("query", release, "--release", "v1", "SELECT action, requester, purpose, "
                "where_sql, files, checksum FROM audit ORDER BY time")
    assert audit.exit_code == 0, audit.output
    rows = frozen(release, "SELECT action, requester, purpose, where_sql, studies, files, "
                  "bytes, checksum, release_checksum FROM audit ORDER BY time")
    assert [r[0] for r in rows] == ["release_created", "export"]
    record = rows[1]
    v1_checksum = (release / "releases" / "v1" / "CHECKSUM").read_text().split()[1]
    assert record == ("export", "dr-analyst", "IRB-2020-117: severity model", COHORT,
                      len({p.split("/")[3] for p in want}), len(want),
                      sum(r["size_bytes"] for r in manifest), checksum, v1_checksum)
    assert json.loads((out / "EXPORT.json").read_text())["checksum"] == checksum

    # a second export adds a record and leaves the first one's file as it was
    audit_dir = release / "releases" / "v1" / "audit"
    before = {p.name: p.read_bytes() for p in audit_dir.iterdir()}
    again = cli("export", release, tmp_path / "out2", "--release", "v1", "--where",
                "modalities = 'CT'", "--purpose", "QA")
    assert again.exit_code == 0, again.output
    after = {p.name: p.read_bytes() for p in audit_dir.iterdir()}
    assert len(after) == len(before) + 1 and all(after[k] == v for k, v in before.items())
    assert frozen(release, "SELECT count(*) FROM audit WHERE action = 'export'") == [(2,)]
    # the frozen release's checksum does not cover its audit trail
    assert cli("release", "verify", release, "v1").exit_code == 0


def test_export_is_refused_without_a_frozen_release_or_into_a_used_folder(release, tmp_path):
    audit_dir = release / "releases" / "v1" / "audit"
    records = sorted(p.name for p in audit_dir.iterdir())
    missing = cli("export", release, tmp_path / "out", "--release", "no-such", "--purpose", "x")
    assert missing.exit_code == 2 and "no frozen release named 'no-such'" in missing.output
    assert not (tmp_path / "out").exists()
    required = cli("export", release, tmp_path / "out", "--purpose", "x")
    assert required.exit_code == 2 and "--release" in required.output
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("mine")
    refused = cli("export", release, used, "--release", "v1", "--purpose", "x")
    assert refused.exit_code == 1 and "not an empty folder" in refused.output
    assert sorted(p.name for p in used.iterdir()) == ["keep.txt"]
    bad = cli("export", release, tmp_path / "out", "--release", "v1", "--purpose", "x",
              "--where", "true; COPY studies TO '/tmp/x.csv'")
    assert bad.exit_code == 2 and "may not contain ';'" in bad.output
    empty = cli("export", release, tmp_path / "out", "--release", "v1", "--purpose", "x",
                "--where", "false")
    assert empty.exit_code == 1 and "keeps no study" in empty.output
    snapshot = release / "releases" / "v1" / "catalog" / "patients.parquet"
    snapshot.write_bytes(snapshot.read_bytes() + b"\0")  # a snapshot changed after freezing
    changed = cli("export", release, tmp_path / "out", "--release", "v1", "--purpose", "x")
    assert changed.exit_code == 1
    assert "catalog/patients.parquet: missing or changed" in changed.output
    assert sorted(p.name for p in audit_dir.iterdir()) == records  # nothing was recorded


def test_export_from_a_release_in_s3_lists_object_urls(release, tmp_path):
    import s3fs

    with moto_s3() as endpoint:
        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
        fs.mkdir("exports")
        fs.put(str(release / "batches"), "exports/v1/batches", recursive=True)
        for folder in ("dicom", "catalog"):
            fs.put(str(release / folder), f"exports/v1/{folder}", recursive=True)
        url = "s3://exports/v1"
        assert cli("release", "create", url, "v1").exit_code == 0
        out = tmp_path / "out"
        result = cli("export", url, out, "--release", "v1", "--where", COHORT,
                     "--purpose", "IRB-2020-117")
        assert result.exit_code == 0, result.output
        objects = pq.read_table(out / "objects.parquet").to_pylist()
        assert sorted(o["path"] for o in objects) == cohort_paths(release)
        assert not (out / "dicom").exists()
        for row in objects:
            assert row["url"] == f"s3://exports/v1/releases/v1/{row['path']}"
            assert hashlib.sha256(fs.cat_file(row["url"])).hexdigest() == row["sha256"]
        fs.invalidate_cache()
        records = fs.glob("exports/v1/releases/v1/audit/*.parquet")
        assert len(records) == 2
        audit = cli("query", url, "--release", "v1",
                    "SELECT action, files FROM audit WHERE action = 'export'")
        assert audit.exit_code == 0, audit.output
        assert f"│ {len(objects)} " in audit.output
