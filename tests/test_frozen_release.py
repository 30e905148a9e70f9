"""Frozen releases: `radrepo release create` over a published release (local and in moto's S3),
immutable, deterministic, owning its files, queryable with `radrepo query --release`."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from flows.cli import app
from tests.moto_s3 import moto_s3

runner = CliRunner()

POSITIVE_CT = "status = 'published' AND modalities LIKE '%CT%' AND covid_status = 'positive'"
NEGATIVE_CT = "status = 'published' AND modalities LIKE '%CT%' AND covid_status = 'negative'"
POSITIVE_RADIOGRAPHS = ("status = 'published' AND (modalities LIKE '%CR%' OR modalities LIKE "
                        "'%DX%') AND covid_status = 'positive'")
STUDY_UIDS = "SELECT DISTINCT study_uid FROM studies ORDER BY 1"


@pytest.fixture
def release(published_release, tmp_path) -> Path:
    """A private copy of the session's published release."""
    return Path(shutil.copytree(published_release, tmp_path / "release"))


def cli(*args: str) -> object:
    return runner.invoke(app, [str(a) for a in args])


def live(release: Path, sql: str, params: list | None = None) -> list[tuple]:
    with duckdb.connect(str(release / "catalog.duckdb"), read_only=True) as con:
        return con.execute(sql, params or []).fetchall()


def expected_studies(release: Path, modality_sql: str, status: str) -> list[str]:
    """Study UIDs of a RICORD collection, computed by hand from the live catalog."""
    return [uid for (uid,) in live(
        release, "SELECT s.study_uid FROM studies s JOIN patients p ON p.patient_id = "
        f"s.patient_id WHERE s.status = 'published' AND ({modality_sql}) AND p.covid_status = ? "
        "ORDER BY 1", [status])]


def frozen_rows(release: Path, name: str, sql: str) -> list[tuple]:
    with duckdb.connect(str(release / "releases" / name / "catalog.duckdb"),
                        read_only=True) as con:
        return con.execute(sql).fetchall()


def tree_state(root: Path) -> dict[str, tuple[int, str]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns,
                                       hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_frozen_release_is_immutable_deterministic_and_owns_its_files(release):
    want = expected_studies(release, "s.modalities LIKE '%CT%'", "positive")
    assert want
    first = cli("release", "create", release, "ct-positive", "--where", POSITIVE_CT,
                "--description", "RICORD 1a: COVID-positive CT")
    assert first.exit_code == 0, first.output
    frozen = release / "releases" / "ct-positive"
    checksum = (frozen / "CHECKSUM").read_text().split()[1]
    assert checksum in first.output
    assert checksum == hashlib.sha256((frozen / "SHA256SUMS").read_bytes()).hexdigest()
    assert frozen_rows(release, "ct-positive", STUDY_UIDS) == [(u,) for u in want]

    # the release holds its own copy of every file of its studies, as the manifest says
    manifest = pq.read_table(frozen / "manifest.parquet").to_pylist()
    paths = [p for (p,) in live(release, "SELECT path FROM instances WHERE study_uid IN "
                                f"({', '.join(repr(u) for u in want)}) ORDER BY 1")]
    assert [r["path"] for r in manifest] == paths
    for row in manifest:
        data = (frozen / row["path"]).read_bytes()
        assert len(data) == row["size_bytes"]
        assert hashlib.sha256(data).hexdigest() == row["sha256"]
        assert (frozen / row["path"]).stat().st_ino == (release / row["path"]).stat().st_ino
    # every snapshot table is cut down to the chosen studies
    n_patients = len({p for (p,) in live(release, "SELECT patient_id FROM studies WHERE "
                                         f"study_uid IN ({', '.join(map(repr, want))})")})
    assert frozen_rows(release, "ct-positive", "SELECT count(*) FROM patients") == [
        (n_patients,)]
    assert frozen_rows(release, "ct-positive",
                       "SELECT count(*) FROM series WHERE study_uid NOT IN "
                       "(SELECT study_uid FROM studies)") == [(0,)]
    assert frozen_rows(release, "ct-positive", "SELECT DISTINCT covid_status FROM selection"
                       ) == [("positive",)]

    # the same input gives the same checksum; the pointer names the newest release
    again = cli("release", "create", release, "ct-positive-again", "--where", POSITIVE_CT)
    assert again.exit_code == 0, again.output
    assert (release / "releases" / "ct-positive-again" / "CHECKSUM").read_text() == (
        frozen / "CHECKSUM").read_text()
    assert (release / "releases" / "current").read_text() == "ct-positive-again\n"
    info = json.loads((frozen / "release.json").read_text())
    assert info["where"] == POSITIVE_CT and info["checksum"] == checksum

    # an existing name is refused, and nothing under it is touched
    before = tree_state(frozen)
    refused = cli("release", "create", release, "ct-positive", "--where", "true")
    assert refused.exit_code == 1
    assert "exists" in refused.output
    assert tree_state(frozen) == before

    # a later republication replaces the published files and removes old ones: the frozen
    # release keeps its bytes, its answers and its checksum
    republished, removed = (release / manifest[0]["path"]), (release / manifest[1]["path"])
    replacement = republished.with_name("new.tmp")
    replacement.write_bytes(b"republished bytes")
    os.replace(replacement, republished)
    removed.unlink()
    assert cli("release", "verify", release, "ct-positive").exit_code == 0
    assert tree_state(frozen) == before
    query = cli("query", release, "--release", "ct-positive",
                "SELECT count(*) AS n FROM instances")
    assert query.exit_code == 0, query.output
    assert f"│ {len(manifest)} " in query.output

    # a frozen file changed in place is found by verify
    (frozen / manifest[2]["path"]).write_bytes(b"tampered")
    tampered = cli("release", "verify", release, "ct-positive")
    assert tampered.exit_code == 1
    assert f"{manifest[2]['path']}: missing or changed" in tampered.output


def test_ricord_collections_are_one_where_each(release):
    collections = {
        "ct-positive": (POSITIVE_CT, "s.modalities LIKE '%CT%'", "positive"),
        "ct-negative": (NEGATIVE_CT, "s.modalities LIKE '%CT%'", "negative"),
        "cxr-positive": (POSITIVE_RADIOGRAPHS,
                         "s.modalities LIKE '%CR%' OR s.modalities LIKE '%DX%'", "positive"),
    }
    for name, (where, modality_sql, status) in collections.items():
        want = expected_studies(release, modality_sql, status)
        result = cli("release", "create", release, name, "--where", where)
        if not want:  # the synthetic corpus may hold no study of a collection
            assert result.exit_code == 1 and "keeps no study" in result.output
            assert not (release / "releases" / name / "CHECKSUM").exists()
            continue
        assert result.exit_code == 0, result.output
        assert f"{len(want)} studies" in result.output
        assert frozen_rows(release, name, STUDY_UIDS) == [(u,) for u in want]
        assert frozen_rows(release, name, "SELECT DISTINCT p.covid_status FROM studies s "
                           "JOIN patients p USING (patient_id)") == [(status,)]
    assert (release / "releases" / "ct-positive" / "CHECKSUM").exists()
    assert (release / "releases" / "cxr-positive" / "CHECKSUM").exists()
    listed = cli("release", "list", release)
    assert listed.exit_code == 0 and "cxr-positive" in listed.output


def test_query_release_current_and_the_creation_audit_record(release):
    assert cli("query", release, "--release", "current", "SELECT 1").exit_code == 2
    made = cli("release", "create", release, "everything", "--requester", "analyst-7",
               "--description", "all studies")
    assert made.exit_code == 0, made.output
    total = live(release, "SELECT count(DISTINCT study_uid) FROM studies")[0][0]
    result = cli("query", release, "--release", "current",
                 "SELECT count(DISTINCT study_uid) AS n FROM studies")
    assert result.exit_code == 0, result.output
    assert f"│ {total} " in result.output
    audit = cli("query", release, "--release", "everything",
                "SELECT action, requester, purpose, where_sql, studies FROM audit")
    assert audit.exit_code == 0, audit.output
    assert "release_created" in audit.output and "analyst-7" in audit.output
    assert f"│ {total} " in audit.output
    missing = cli("query", release, "--release", "no-such-release", "SELECT 1")
    assert missing.exit_code == 2 and "no frozen release named 'no-such-release'" in (
        missing.output)


@pytest.mark.parametrize(("where", "message"), [
    ("true; DROP VIEW studies", "may not contain ';'"),
    ("modalities LIKE", "not a SQL expression"),
    ("n_instances", "not BOOLEAN"),
    ("no_such_column = 1", "the predicate failed"),
    ("study_uid IN (SELECT column0 FROM read_csv('/etc/hostname'))", "the predicate failed"),
    ("study_uid IN (SELECT study_uid FROM read_parquet('catalog/studies/*/*/*.parquet'))",
     "the predicate failed"),
])
def test_a_predicate_that_is_not_a_safe_boolean_expression_is_refused(release, where,
                                                                       message):
    result = cli("release", "create", release, "bad", "--where", where)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (release / "releases").exists()


def test_bad_names_are_refused(release):
    for name in ("current", "../escape", ".hidden"):
        result = cli("release", "create", release, name)
        assert result.exit_code == 1 and "must match" in result.output
    assert not (release / "releases").exists()


def test_a_release_in_s3_freezes_with_server_side_copies_and_the_same_checksum_and_report(
        release):
    import s3fs

    local = cli("release", "create", release, "ct-positive", "--where", POSITIVE_CT)
    assert local.exit_code == 0, local.output
    checksum = (release / "releases" / "ct-positive" / "CHECKSUM").read_text()
    with moto_s3() as endpoint:
        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
        fs.mkdir("frozen")
        for path in sorted(release.rglob("*")):
            relative = path.relative_to(release).as_posix()
            if path.is_file() and not relative.startswith("releases/"):
                fs.pipe_file(f"frozen/v1/{relative}", path.read_bytes())
        url = "s3://frozen/v1"
        made = cli("release", "create", url, "ct-positive", "--where", POSITIVE_CT)
        assert made.exit_code == 0, made.output
        fs.invalidate_cache()
        assert fs.cat_file("frozen/v1/releases/ct-positive/CHECKSUM").decode() == checksum
        assert fs.cat_file("frozen/v1/releases/current") == b"ct-positive\n"
        manifest = pq.read_table(release / "releases" / "ct-positive" / "manifest.parquet")
        for row in manifest.to_pylist():
            data = fs.cat_file(f"frozen/v1/releases/ct-positive/{row['path']}")
            assert hashlib.sha256(data).hexdigest() == row["sha256"]
        fs.rm(f"frozen/v1/{manifest.column('path')[0].as_py()}")  # republished, old one gone
        assert cli("release", "verify", url, "current").exit_code == 0
        result = cli("query", url, "--release", "current", "SELECT count(*) AS n FROM instances")
        assert result.exit_code == 0, result.output
        assert f"│ {manifest.num_rows} " in result.output
        assert cli("release", "create", url, "ct-positive").exit_code == 1
        # the report of a release in S3 is written there, the same page as the local one's
        assert cli("report", url).exit_code == 0
        assert cli("report", release).exit_code == 0
        assert fs.cat_file("frozen/v1/reports/index.html") == (
            release / "reports" / "index.html").read_bytes()


def test_a_creation_that_never_finished_is_replaced_not_trusted(release):
    stale = release / "releases" / "v1"
    (stale / "dicom").mkdir(parents=True)
    (stale / "dicom" / "left-over.dcm").write_bytes(b"from a crashed run")
    assert cli("query", release, "--release", "v1", "SELECT 1").exit_code == 2  # not frozen
    made = cli("release", "create", release, "v1", "--where", POSITIVE_CT)
    assert made.exit_code == 0, made.output
    assert not (stale / "dicom" / "left-over.dcm").exists()
    assert cli("release", "verify", release, "v1").exit_code == 0


def test_every_catalog_table_has_a_rule_cutting_it_down_to_studies():
    from schemas.catalog import TABLES
    from tasks.cohort import FILTERS

    assert set(FILTERS) == set(TABLES)


def test_a_file_removed_before_it_is_frozen_stops_the_creation(release):
    [(path,)] = live(release, "SELECT min(path) FROM instances")
    (release / path).unlink()  # as a republication removing the old version would
    result = cli("release", "create", release, "v1")
    assert result.exit_code == 1
    assert f"{path} was removed while it was being frozen" in result.output
    assert not (release / "releases" / "v1" / "CHECKSUM").exists()


def test_a_rerun_after_a_kill_before_the_pointer_moves_current(release):
    assert cli("release", "create", release, "v1", "--where", POSITIVE_CT).exit_code == 0
    assert cli("release", "create", release, "v2", "--where", POSITIVE_CT).exit_code == 0
    pointer = release / "releases" / "current"
    pointer.write_text("v1\n")  # as if killed after v2's CHECKSUM, before the pointer
    again = cli("release", "create", release, "v2", "--where", POSITIVE_CT)
    assert again.exit_code != 0  # still never rewritten
    assert pointer.read_text() == "v2\n"
    cli("release", "create", release, "v1", "--where", POSITIVE_CT)
    assert pointer.read_text() == "v2\n"  # an older release never takes the pointer back
