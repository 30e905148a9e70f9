"""``radrepo deidentify``: clean one export folder now, with the pipeline's own profile and gate.

No Prefect and no catalog: ingest the folder (zips included) into a private temporary area,
de-identify every study (on Dask workers when asked), quarantine each file the gate still finds
an identifier in, then move the others into ``OUT/<patient>/<study>/<series>/<sop>.dcm``.
"""

from __future__ import annotations

import shutil
import tempfile
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import pyarrow.compute as pc

from flows.cluster import dask_client
from schemas.config import DaskConfig, SiteConfig
from schemas.pipeline import OK, QUARANTINED
from tasks import ingest, verify
from tasks.deidentify import DeidContext, PseudonymKeys, deidentify_batch


@dataclass(frozen=True)
class FolderResult:
    files_in: int
    written: int
    same_sop_uid: int
    quarantined: Counter


def deidentify_folder(in_dir: Path, out_dir: Path, site_id: str, options: tuple[str, ...],
                      keys: PseudonymKeys, workers: int = 1) -> FolderResult:
    """De-identify every DICOM object under ``in_dir`` into ``out_dir``; a file the gate still
    finds an identifier in is quarantined (``gate: <element>``); raise LeakFound if an output
    path would hold one (nothing is written then)."""
    site = SiteConfig(site_id=site_id, source={"kind": "folder", "path": str(in_dir)})
    with tempfile.TemporaryDirectory(prefix="radrepo-deid-") as private:
        [batch] = ingest.discover_batches(site, private, set()) or [None]
        if batch is None:
            return FolderResult(0, 0, 0, Counter())
        index = ingest.ingest_batch(batch, site.source, private).index
        staged = Path(private) / "deidentified"
        ctx = DeidContext(keys=keys, site_id=site_id, options=options, remap={},
                          out_dir=str(staged))
        identifiers = str(Path(private) / "identifiers.parquet")
        scratch = str(Path(private) / "scratch")  # spilled rows hold source identifiers
        cluster = (dask_client(DaskConfig(workers=workers, local_directory=scratch))
                   if workers > 1 else nullcontext())
        with cluster as client:
            table = deidentify_batch(index, ctx, identifiers, client)
        matcher = verify.read_identifiers([Path(identifiers)])
        table = verify.gate_deidentified(table, matcher)  # a file still identifying: quarantined
        done = table.filter(pc.equal(table["status"], OK)).to_pylist()
        placed = [(r["output_path"], f"{r['patient_id']}/{r['study_uid']}/{r['series_uid']}/"
                   f"{r['sop_uid']}.dcm") for r in done]
        verify.raise_if_found(verify.scan_names([rel for _, rel in placed], matcher))
        targets = dict((rel, path) for path, rel in placed)  # same SOP UID: one file
        for rel, path in targets.items():
            target = out_dir / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(path, target)
        quarantined = Counter(
            index.filter(pc.equal(index["status"], QUARANTINED))["reason"].to_pylist())
        quarantined.update(r["reason"] for r in table.to_pylist() if r["status"] == QUARANTINED)
        return FolderResult(index.num_rows, len(targets), len(placed) - len(targets), quarantined)
