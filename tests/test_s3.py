"""Ingest from object storage: zip batches in a bucket on moto's S3 server (127.0.0.1), read
through s3fs, index exactly as the same batches read from a local folder."""

from __future__ import annotations

import hashlib
import io
import os

import pyarrow.parquet as pq
import pydicom
import pytest

from schemas.config import SiteConfig
from tasks import discovery, ledger
from tests.moto_s3 import moto_s3
from tests.passes import take_batch

COMPARED = ("key", "size", "sha256", "status", "reason", "patient_id", "study_uid",
            "series_uid", "sop_uid", "sop_class_uid", "modality", "exam_id", "exam_time",
            "exam_description", "member_path")


@pytest.fixture(scope="module")
def s3_endpoint():
    """moto's S3 server on loopback; credentials are moto's dummies, from the environment."""
    with moto_s3() as endpoint:
        yield endpoint


def test_zip_batches_on_s3_index_like_the_local_copy(s3_endpoint, corpus, tmp_path):
    import s3fs

    corpus_dir, truth = corpus
    site_id, site = next((k, v) for k, v in truth["sites"].items()
                         if v["layout"] == "zip_batches")
    local_root = corpus_dir / site["source"]
    options = {"client_kwargs": {"endpoint_url": s3_endpoint}}
    fs = s3fs.S3FileSystem(**options)
    fs.mkdir("radrepo-sources")
    fs.put(str(local_root), "radrepo-sources/site-a", recursive=True)

    local = SiteConfig(site_id=site_id, source={"kind": "zip_batches", "path": str(local_root)})
    remote = SiteConfig(site_id=site_id, source={
        "kind": "zip_batches", "path": "s3://radrepo-sources/site-a", "storage_options": options})
    local_batches = discovery.discover_batches(local, str(tmp_path / "work-local"), set())
    remote_batches = discovery.discover_batches(remote, str(tmp_path / "work-s3"), set())
    assert [b.batch_id for b in remote_batches] == [b.batch_id for b in local_batches]
    assert [b.batch_id for b in remote_batches] == sorted(
        b for b, info in site["batches"].items() if info["complete"])
    for lb, rb in zip(local_batches, remote_batches, strict=True):
        want = take_batch(local, lb, str(tmp_path / "work-local")).index
        got = take_batch(remote, rb, str(tmp_path / "work-s3")).index
        assert got.select(COMPARED).to_pylist() == want.select(COMPARED).to_pylist()
        # what came from S3 was read into memory, never staged
        assert set(got.column("staged_path").to_pylist()) == {None}
    assert discovery.detect_source_kind("s3://radrepo-sources/site-a", options) == "zip_batches"


@pytest.mark.parametrize("layout", ["tree", "flat"])
def test_folder_sources_on_s3_index_like_the_local_copy_and_are_incremental(
        s3_endpoint, corpus, tmp_path, layout):
    import s3fs

    corpus_dir, truth = corpus
    site_id, site = next((k, v) for k, v in truth["sites"].items() if v["layout"] == layout)
    kind = "folder" if layout == "tree" else "flat"
    local_root = corpus_dir / site["source"]
    options = {"client_kwargs": {"endpoint_url": s3_endpoint}}
    fs = s3fs.S3FileSystem(**options)
    bucket = f"radrepo-{layout}"
    fs.mkdir(bucket)
    fs.put(str(local_root), f"{bucket}/{site_id}", recursive=True)

    local = SiteConfig(site_id=site_id, source={"kind": kind, "path": str(local_root)})
    remote = SiteConfig(site_id=site_id, source={
        "kind": kind, "path": f"s3://{bucket}/{site_id}", "storage_options": options})
    work = str(tmp_path / "work-s3")
    [lb] = discovery.discover_batches(local, str(tmp_path / "work-local"), set())
    [rb] = discovery.discover_batches(remote, work, set())
    assert rb.batch_id == lb.batch_id  # named by content, wherever it is kept
    want = take_batch(local, lb, str(tmp_path / "work-local")).index
    done = take_batch(remote, rb, work)
    got = done.index
    assert got.num_rows == len(site["files"])  # one row per file, bad ones included
    assert got.select(COMPARED).to_pylist() == want.select(COMPARED).to_pylist()
    assert done.quarantine.num_rows  # the planted bad files
    # a one-off run detects the kind; a flat folder reads as a folder of depth one
    assert discovery.detect_source_kind(f"s3://{bucket}/{site_id}", options) == "folder"

    # once published, the same bucket yields nothing new; one added object is exactly one batch
    ledger.record_ingested(rb, got, work)
    assert discovery.discover_batches(remote, work, {rb.batch_id}) == []
    extra = next(k for k, s in zip(got.column("key").to_pylist(),
                                   got.column("status").to_pylist(), strict=True) if s == "ok")
    fs.copy(f"{bucket}/{site_id}/{extra}", f"{bucket}/{site_id}/added/copy.dcm")
    fs.invalidate_cache()
    [added] = discovery.discover_batches(remote, work, {rb.batch_id})
    assert [o.key for o in added.objects] == ["added/copy.dcm"]


def release_files(fs, root: str) -> dict[str, str]:
    """Relative path -> SHA-256 of every file of a release but its run records and its
    DuckDB views file (which name run ids and the release's own location)."""
    out = {}
    for path in fs.find(root):
        relative = path[len(root.rstrip("/")) + 1:]
        if relative.startswith("catalog/runs/") or relative == "catalog.duckdb":
            continue
        out[relative] = hashlib.sha256(fs.cat_file(path)).hexdigest()
    return out


def test_nightly_publishes_to_s3_as_to_a_folder_and_duckdb_reads_it_there(
        s3_endpoint, make_config, prefect_server, tmp_path, monkeypatch):
    import s3fs
    from fsspec.implementations.local import LocalFileSystem
    from typer.testing import CliRunner

    from flows.cli import app
    from flows.nightly import nightly
    from tasks.catalog_query import open_catalog
    from tasks.zones import Release

    options = {"client_kwargs": {"endpoint_url": s3_endpoint}}
    fs = s3fs.S3FileSystem(**options)
    fs.mkdir("radrepo-release")
    url = "s3://radrepo-release/v1"
    local = nightly(make_config(tmp_path / "release", tmp_path / "work-local"), sites=["site-c"])
    remote = nightly(make_config(url, tmp_path / "work-s3", release_storage_options=options),
                     sites=["site-c"])
    assert [r["batch_id"] for r in remote] == [r["batch_id"] for r in local] != []
    assert [r["published"] for r in remote] == [r["published"] for r in local]

    fs.invalidate_cache()
    published = release_files(fs, "radrepo-release/v1")
    assert any(p.endswith(".dcm") for p in published)
    assert published == release_files(LocalFileSystem(), str(tmp_path / "release"))

    sql = ("select site_id, batch_id, count(*) as n, count(distinct sop_uid) as sops "
           "from instances group by all order by all")
    with open_catalog(Release(str(tmp_path / "release"))) as con:
        want = con.execute(sql).fetchall()
    with open_catalog(Release(url, options)) as con:  # the Parquet is read in the bucket
        assert con.execute(sql).fetchall() == want
    assert os.environ["AWS_SECRET_ACCESS_KEY"].encode() not in fs.cat_file(
        "radrepo-release/v1/catalog.duckdb")  # the session's secret is never stored
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    result = CliRunner().invoke(app, ["query", url, "select count(*) as n from instances"])
    assert result.exit_code == 0, result.output
    assert str(sum(n for *_, n, _ in want)) in result.output

    # verify reads the release in the bucket, headers only, as it reads a folder
    files = sum(1 for p in published if p.endswith(".dcm"))
    local_check = CliRunner().invoke(app, ["verify", str(tmp_path / "release"),
                                           "--work", str(tmp_path / "work-local")])
    remote_check = CliRunner().invoke(app, ["verify", url, "--work", str(tmp_path / "work-s3")])
    assert remote_check.exit_code == local_check.exit_code == 0, remote_check.output
    assert f"{files} DICOM files checked, 0 finding(s)" in remote_check.output
    name = next(v for v in pq.read_table(next((tmp_path / "work-s3").glob(
        "*/index/*.identifiers.parquet"))).column("value").to_pylist()
        if v.isalpha() and len(v) >= 4)
    key = next(p for p in sorted(published) if p.endswith(".dcm"))
    ds = pydicom.dcmread(io.BytesIO(fs.cat_file(f"radrepo-release/v1/{key}")))
    ds.StudyDescription = f"follow-up {name}"
    out = io.BytesIO()
    ds.save_as(out)
    fs.pipe_file(f"radrepo-release/v1/{key}", out.getvalue())
    leaked = CliRunner().invoke(app, ["verify", url, "--work", str(tmp_path / "work-s3")])
    assert leaked.exit_code == 1
    assert f"{key}: StudyDescription: identifying value" in leaked.output
    assert name not in leaked.output
