"""The catalog at scale: a release of >= 1,000,000 published instances over 50 sites and many
batches, written with the real schemas and publish_batch (no DICOM files, catalog partitions
only), then catalog.duckdb built by the real refresh_catalog_db; times the refresh,
``site_summary`` and a ``study_overview`` filter (medians over rounds).

    .venv/bin/python bench/catalog_scale.py [--sites 50] [--batches 8] [--per-batch 2600]
                                            [--rounds 5] [--out bench/out/catalog_scale]

Target: site_summary under 1 s on the project machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from datetime import UTC, date, datetime, timedelta
from datetime import time as clock
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from schemas import catalog as cat  # noqa: E402
from tasks.catalog_query import open_catalog  # noqa: E402
from tasks.publish import publish_batch, refresh_catalog_db  # noqa: E402
from tasks.zones import CATALOG_DB, Release  # noqa: E402

CT_SERIES, CT_SLICES, CR_IMAGES = 2, 45, 2  # a CT study: 2 series of 45; a radiograph: 2
SITE_SUMMARY = "SELECT * FROM site_summary"
OVERVIEW_FILTER = ("SELECT site_id, study_uid, days_from_index, covid_status, "
                   "nearest_measurements, qc_flags, dicom_folder FROM study_overview "
                   "WHERE site_id = 'site-017' AND covid_status = 'positive' "
                   "AND days_from_index BETWEEN 0 AND 7 "
                   "AND list_contains(string_split(modalities, ','), 'CT')")


def batch_tables(site: int, batch: int, per_batch: int,
                 rng: np.random.Generator) -> tuple[dict[str, pa.Table], int]:
    """One batch's catalog tables: CT and radiograph studies filling ``per_batch`` files."""
    tag = f"{site:03d}.{batch:03d}"
    ct_files = CT_SERIES * CT_SLICES
    n_ct = per_batch // (2 * ct_files)
    n_cr = (per_batch - n_ct * ct_files) // CR_IMAGES
    n_patients = max(1, (n_ct + n_cr) // 2)
    patients = [f"P{tag}.{p:04d}" for p in range(n_patients)]
    index = [date(2020, 3, 1) + timedelta(days=int(d)) for d in rng.integers(0, 90, n_patients)]
    studies, series, instances, excluded, qc = [], [], [], [], []
    for s in range(n_ct + n_cr):
        is_ct = s < n_ct
        p = int(rng.integers(n_patients))
        days = int(rng.integers(-20, 40))
        study_uid = f"2.25.{tag}.{s}"
        n_series = CT_SERIES if is_ct else 1
        per_series = CT_SLICES if is_ct else CR_IMAGES
        modality = "CT" if is_ct else str(rng.choice(["CR", "DX"]))
        for k in range(n_series):
            series_uid = f"{study_uid}.{k}"
            series.append({"series_uid": series_uid, "study_uid": study_uid,
                           "modality": modality, "body_part": "CHEST",
                           "view_position": None if is_ct else "PA",
                           "slice_thickness": 2.5 if is_ct else None, "description": "AXIAL",
                           "image_type": "ORIGINAL\\PRIMARY", "n_instances": per_series,
                           "n_excluded": 1 if is_ct else 0, "status": "published",
                           "reason": None})
            for i in range(per_series):
                sop = f"{series_uid}.{i}"
                instances.append((sop, series_uid, study_uid, i + 1,
                                  f"dicom/site-{site:03d}/{patients[p]}/{study_uid}/"
                                  f"{series_uid}/{sop}.dcm"))
            if is_ct:
                sop = f"{series_uid}.scout"
                excluded.append({"sop_uid": sop, "series_uid": series_uid,
                                 "study_uid": study_uid, "modality": "CT",
                                 "reason": "qc:ct_localizer", "size_bytes": 9000})
                qc.append({"level": "instance", "uid": sop, "study_uid": study_uid,
                           "rule": "ct_localizer",
                           "outcome": "excluded", "detail": "CT localizer (scout)"})
            elif rng.random() < 0.3:
                qc.append({"level": "instance", "uid": f"{series_uid}.1",
                           "study_uid": study_uid, "rule": "radiograph_not_frontal",
                           "outcome": "flagged",
                           "detail": "view position LL is not frontal"})
        studies.append({
            "study_uid": study_uid, "patient_id": patients[p], "siteid": f"{100000 + site}",
            "study_date": index[p] + timedelta(days=days),
            "study_time": clock(int(rng.integers(24)), int(rng.integers(60))),
            "days_from_index": days, "modalities": modality, "all_modalities": modality,
            "description": "CT CHEST" if is_ct else "XR CHEST", "n_series": n_series,
            "n_instances": n_series * per_series, "n_excluded": n_series if is_ct else 0,
            "status": "published", "reason": None})
    methods = rng.choice(["PCR", "PCR", "PCR", "serology", "clinical"], n_patients)
    status = [("positive" if rng.random() < 0.8 else "negative") if m == "PCR" else "unknown"
              for m in methods]
    patient_rows = [{"patient_id": patients[p], "siteid": f"{100000 + site}",
                     "sex": str(rng.choice(["F", "M"])),
                     "age_at_index": int(rng.integers(18, 91)), "covid_status": status[p],
                     "covid_status_reason": "result" if methods[p] == "PCR" else "no_result",
                     "test_method": str(methods[p]), "index_date": index[p],
                     "has_clinical": True} for p in range(n_patients)]
    clinical = [{"patient_id": patients[p], "name": name, "value": float(rng.uniform(1, 200)),
                 "unit": unit, "day": int(rng.integers(-2, 6))}
                for p in range(n_patients)
                for name, unit in (("wcc", "10^9/L"), ("crp", "mg/L"), ("po2", "kPa"))]
    sop, series_uid, study_uid, number, path = (list(c) for c in zip(*instances, strict=True))
    n = len(sop)
    tables = {
        "patients": pa.Table.from_pylist(patient_rows, schema=cat.PATIENTS),
        "studies": pa.Table.from_pylist(studies, schema=cat.STUDIES),
        "series": pa.Table.from_pylist(series, schema=cat.SERIES),
        "instances": pa.table({
            "sop_uid": sop, "series_uid": series_uid, "study_uid": study_uid,
            "sop_class_uid": ["1.2.840.10008.5.1.4.1.1.2"] * n,
            "instance_number": pa.array(number, pa.int32()), "path": path,
            "size_bytes": rng.integers(100_000, 600_000, n),
            "sha256": [f"{h:064x}" for h in rng.integers(0, 2**62, n)],
            "pixel_sha256": [f"{h:064x}" for h in rng.integers(0, 2**62, n)],
            "rows": pa.array([512] * n, pa.int32()), "columns": pa.array([512] * n, pa.int32()),
            "transfer_syntax": ["1.2.840.10008.1.2.1"] * n,
        }, schema=cat.INSTANCES),
        "excluded_instances": pa.Table.from_pylist(excluded, schema=cat.EXCLUDED_INSTANCES),
        "clinical": pa.Table.from_pylist(clinical, schema=cat.CLINICAL),
        "qc": pa.Table.from_pylist(qc, schema=cat.QC),
        "duplicates": cat.DUPLICATES.empty_table(),
    }
    return tables, n


def run_table(site: int, batch: int, files: int) -> pa.Table:
    when = datetime(2020, 6, 1, tzinfo=UTC) + timedelta(days=batch)
    return pa.Table.from_pylist([{
        "run_id": f"run-{site:03d}-{batch:03d}", "flow": "site_batch", "code_version": "bench",
        "profile": "bench", "started": when, "finished": when, "files_in": files + 2,
        "published": files, "excluded": 2, "quarantined": 0, "counts": "{}"}], schema=cat.RUNS)


def timed(fn, rounds: int) -> tuple[float, float, object]:
    """Median wall-clock and CPU seconds (all of the process's threads) over ``rounds``; on a
    shared machine the CPU time is what the work costs, the wall time what waiting adds."""
    wall, cpu, result = [], [], None
    for _ in range(rounds):
        start, start_cpu = time.perf_counter(), time.process_time()
        result = fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=50)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--per-batch", type=int, default=2600)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench/out/catalog_scale"))
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    release = Release(str(args.out / "release"))
    rng = np.random.default_rng(2020)
    start, files = time.perf_counter(), 0
    for site in range(args.sites):
        for batch in range(args.batches):
            tables, n = batch_tables(site, batch, args.per_batch, rng)
            publish_batch(release, f"site-{site:03d}", f"B{batch:03d}", tables, [],
                          run_table(site, batch, n), f"run-{site:03d}-{batch:03d}")
            files += n
    written = time.perf_counter() - start
    work = str(args.out / "work")

    def rebuild() -> bool:
        Path(release.path(CATALOG_DB)).unlink(missing_ok=True)
        return refresh_catalog_db(release, work)

    refresh = timed(rebuild, max(1, args.rounds // 2))
    unchanged = timed(lambda: refresh_catalog_db(release, work), args.rounds)
    with open_catalog(release) as con:  # the reader radrepo query uses
        counted = con.execute("SELECT count(*), count(DISTINCT site_id), "
                              "count(DISTINCT (site_id, batch_id)) FROM instances").fetchone()
        con.execute(SITE_SUMMARY).fetchall()  # warm the OS file cache once
        summary = timed(lambda: con.execute(SITE_SUMMARY).fetchall(), args.rounds)
        overview = timed(lambda: con.execute(OVERVIEW_FILTER).fetchall(), args.rounds)
    print(f"release: {counted[0]:,} instance rows, {counted[1]} sites, {counted[2]} batches "
          f"(written in {written:.1f} s)")
    for name, (wall, cpu, _) in {
            "catalog.duckdb refresh (full rebuild)": refresh,
            "catalog.duckdb refresh (unchanged)": unchanged,
            f"site_summary ({len(summary[2])} rows)": summary,
            f"study_overview filter ({len(overview[2])} rows)": overview}.items():
        print(f"{name}: {wall:.3f} s wall, {cpu:.3f} s CPU")
    verdict = "under" if summary[0] < 1 else "OVER"
    print(f"site_summary is {verdict} the 1 s target (wall clock)")
    print(f"load average while measuring: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    if counted[0] < 1_000_000 or counted[1] < 50:
        print("note: below the 1,000,000 instances / 50 sites the issue asks for")


if __name__ == "__main__":
    main()
