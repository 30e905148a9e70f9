"""Publication: layout, idempotent writes, COMPLETE last, and views over complete batches only."""

from __future__ import annotations

import io
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pyarrow as pa

from schemas import catalog as cat
from tasks.publish import publish_batch, read_published, refresh_catalog_db
from tasks.zones import Release


def batch_tables(sop: str) -> dict[str, pa.Table]:
    tables = {name: schema.empty_table() for name, schema in cat.TABLES.items()}
    tables["instances"] = pa.Table.from_pylist(
        [{"sop_uid": sop, "series_uid": "2.25.2", "study_uid": "2.25.1", "path": "x",
          "size_bytes": 4, "sha256": "s"}], schema=cat.INSTANCES)
    return tables


def run_table(run_id: str) -> pa.Table:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    return pa.Table.from_pylist([{"run_id": run_id, "flow": "site_batch", "started": now,
                                  "finished": now, "files_in": 1, "published": 1}],
                                schema=cat.RUNS)


def publish(release: Release, tmp_path, batch: str, sop: str, run_id: str = "r1"):
    staged = tmp_path / f"staged-{batch}-{run_id}.dcm"
    staged.write_bytes(b"DICM")
    files = [(str(staged), f"dicom/s1/P1/2.25.1/2.25.2/{sop}.dcm", 4, "sha-" + sop)]
    return publish_batch(release, "s1", batch, batch_tables(sop), files, run_table(run_id),
                         run_id)


def snapshot(root) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")
            if p.is_file()}


def test_publish_layout_marker_and_views(tmp_path):
    root = tmp_path / "release"
    release = Release(str(root))
    result = publish(release, tmp_path, "B1", "2.25.3")
    assert result.files_written >= 1 and release.is_complete("s1", "B1")
    assert (root / "dicom/s1/P1/2.25.1/2.25.2/2.25.3.dcm").read_bytes() == b"DICM"
    for table in cat.TABLES:
        if table != "runs":
            (part,) = release.catalog_files(table, "s1", "B1")
            assert (root / part).exists() and part.startswith(
                f"catalog/{table}/site_id=s1/batch_id=B1/part-")
    manifest = release.manifest("s1", "B1").to_pylist()
    assert {"path": "dicom/s1/P1/2.25.1/2.25.2/2.25.3.dcm", "size_bytes": 4,
            "sha256": "sha-2.25.3"} in manifest
    assert refresh_catalog_db(release, str(tmp_path / "work"))
    with duckdb.connect(str(root / "catalog.duckdb"), read_only=True) as con:
        assert con.sql("select site_id, batch_id, sop_uid from instances").fetchall() == [
            ("s1", "B1", "2.25.3")]
        assert con.sql("select count(*) from duplicates").fetchone() == (0,)
        assert con.sql("select * from batches").fetchall() == [("s1", "B1")]
    assert read_published(release, "instances", "s1", "B2", ["sop_uid"]).column(
        "sop_uid").to_pylist() == ["2.25.3"]
    assert read_published(release, "instances", "s1", "B1", ["sop_uid"]).num_rows == 0


def test_republishing_identical_content_rewrites_nothing(tmp_path):
    root = tmp_path / "release"
    release = Release(str(root))
    publish(release, tmp_path, "B1", "2.25.3")
    refresh_catalog_db(release, str(tmp_path / "work"))
    before = snapshot(root)
    result = publish(release, tmp_path, "B1", "2.25.3", run_id="r2")
    assert not refresh_catalog_db(release, str(tmp_path / "work"))
    after = snapshot(root)
    assert result.files_written == 0 and result.files_unchanged == 1
    new = set(after) - set(before)
    assert new == {"catalog/runs/site_id=s1/batch_id=B1/run-r2.parquet"}
    assert all(after[p] == before[p] for p in before)


def test_batch_without_complete_marker_is_invisible(tmp_path):
    root = tmp_path / "release"
    release = Release(str(root))
    publish(release, tmp_path, "B1", "2.25.3")
    publish(release, tmp_path, "B2", "2.25.4")
    (root / "batches/s1/B2/COMPLETE").unlink()  # as if the run died before the marker
    refresh_catalog_db(release, str(tmp_path / "work"))
    with duckdb.connect(str(root / "catalog.duckdb"), read_only=True) as con:
        assert con.sql("select sop_uid from instances").fetchall() == [("2.25.3",)]
    assert release.complete_batches() == [("s1", "B1")]


def test_empty_release_has_queryable_views(tmp_path):
    release = Release(str(tmp_path / "release"))
    refresh_catalog_db(release, str(tmp_path / "work"))
    with duckdb.connect(str(tmp_path / "release" / "catalog.duckdb"), read_only=True) as con:
        for table in cat.TABLES:
            assert con.sql(f"select count(*) from {table}").fetchone() == (0,)


def test_contact_sheet_lists_flagged_series_first_with_thumbnails(tmp_path):
    from PIL import Image

    from tasks.contact_sheet import contact_sheet, thumbnail_png
    from tests.test_deidentify import identified_ct, run_study

    sources = [tmp_path / "a.dcm", tmp_path / "b.dcm"]
    identified_ct(sources[0], sop="1.2.60.1", study="1.2.60")
    identified_ct(sources[1], sop="1.2.61.1", study="1.2.61")
    rows = run_study(tmp_path, sources)
    series = pa.Table.from_pylist([
        {"series_uid": r["series_uid"], "study_uid": r["study_uid"], "modality": "CR",
         "description": "CHEST <b>", "n_instances": 1, "status": "published"} for r in rows
    ], schema=cat.SERIES)
    qc = pa.Table.from_pylist([{"level": "series", "uid": rows[1]["series_uid"],
                                "rule": "radiograph_not_frontal", "outcome": "flagged",
                                "detail": "view position LL is not frontal"}], schema=cat.QC)
    thumbnails = {r["series_uid"]: thumbnail_png(Path(r["output_path"]).read_bytes())
                  for r in rows}
    out = contact_sheet("s1", "B1", series, qc, thumbnails)
    page = out["reports/s1/B1/contact-sheet.html"].decode()
    assert page.index(rows[1]["series_uid"]) < page.index(rows[0]["series_uid"])
    assert "2 published series, 1 flagged" in page and "CHEST &lt;b&gt;" in page
    for r in rows:
        png = out[f"reports/s1/B1/thumbs/{r['series_uid']}.png"]
        image = Image.open(io.BytesIO(png))
        assert image.format == "PNG" and max(image.size) <= 128


def test_contact_sheet_decodes_compressed_pixel_data(tmp_path):
    import numpy as np
    import pydicom
    from pydicom.uid import JPEG2000Lossless, RLELossless

    from tasks.contact_sheet import thumbnail_png
    from tests.test_deidentify import identified_ct, run_study

    for syntax in (RLELossless, JPEG2000Lossless):
        src = tmp_path / f"{syntax.name}.dcm"
        identified_ct(src, sop=f"1.2.70.{len(syntax)}")
        ds = pydicom.dcmread(src)
        ds.Rows = ds.Columns = 64
        ds.PixelData = (np.arange(64 * 64, dtype=np.uint16) % 4096).tobytes()
        ds.compress(syntax)
        ds.save_as(src)
        [row] = run_study(tmp_path, [src])
        assert row["transfer_syntax"] == syntax  # passed through, not re-encoded
        png = thumbnail_png(Path(row["output_path"]).read_bytes())
        assert png is not None and png.startswith(b"\x89PNG")


def test_thumbnails_of_large_images_are_averaged_down_before_windowing(tmp_path):
    import numpy as np
    import pydicom

    from tasks.contact_sheet import _windowed, thumbnail_png
    from tests.test_deidentify import identified_ct

    src = tmp_path / "large.dcm"
    identified_ct(src, sop="1.2.80.1")
    ds = pydicom.dcmread(src)
    ds.Rows, ds.Columns = 1000, 2100
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ramp = np.tile(np.arange(2100, dtype=np.uint16) * 2, (1000, 1))  # 0 .. 4198, left to right
    ramp[501, :] = 4000  # one thin line of burned-in text, on an odd row
    ds.PixelData = ramp.tobytes()
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.WindowCenter, ds.WindowWidth = 0, 2000  # stored 24 .. 2024 maps to 0 .. 255
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(src)
    grey = _windowed(pydicom.dcmread(src))
    step = 9  # 2100 / 256, rounded up: at most twice the 128-pixel thumbnail
    assert grey.shape == (1000 // step, 2100 // step)
    blocks = ramp[:999, :2097].reshape(111, step, 233, step).mean(axis=(1, 3))
    expected = 255 - (np.clip((blocks - 1024.0 + 1000) / 2000, 0, 1) * 255).astype(np.uint8)
    assert np.abs(grey.astype(int) - expected.astype(int)).max() <= 1
    assert grey[0, 0] == 255 and grey[0, -1] == 0  # MONOCHROME1: low values are white
    line = 501 // step
    assert (grey[line, :50] < grey[line - 1, :50]).all()  # the line still shows
    png = thumbnail_png(src.read_bytes())
    assert png is not None and png.startswith(b"\x89PNG")
    thin = pydicom.dcmread(src)  # a strip thinner than one block still gets a thumbnail
    thin.Rows, thin.PixelData = 3, ramp[:3].tobytes()
    assert _windowed(thin).shape == (1, 2100 // 3)
