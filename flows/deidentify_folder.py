"""``radrepo deidentify``: clean one export folder now, with the pipeline's own profile and gate.

No Prefect and no catalog: the flow's one pass over the folder (zips included; one Dask worker
process per core by default, forked from this one so none imports anything again) writes into
a private temporary area, each file the gate still finds an identifier in quarantined, then the
others move into ``OUT/<patient>/<study>/<series>/<sop>.dcm``.
"""

from __future__ import annotations

import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from flows.one_pass import PassContext, read_batch, work_units
from schemas.config import SiteConfig
from schemas.pipeline import OK
from tasks import discovery, verify
from tasks.deidentify import DeidContext, PseudonymKeys
from tasks.deidentify.text import IdentifierMatcher


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
        [batch] = discovery.discover_batches(site, private, set()) or [None]
        if batch is None:
            return FolderResult(0, 0, 0, Counter())
        units = work_units(batch, site.source, private)
        ctx = PassContext(deid=DeidContext(keys=keys, site_id=site_id, options=options,
                                           remap={}),
                          out_dir=str(Path(private) / "deidentified"),
                          quarantine_dir=str(Path(private) / "quarantine"), thumbnails=False)
        done = read_batch(units, ctx, workers=workers)
        matcher = IdentifierMatcher(done.identifiers)
        table = done.deidentified
        placed = [(r["output_path"], f"{r['patient_id']}/{r['study_uid']}/{r['series_uid']}/"
                   f"{r['sop_uid']}.dcm")
                  for r in table.to_pylist() if r["status"] == OK]
        verify.raise_if_found(verify.scan_names([rel for _, rel in placed], matcher))
        targets = dict((rel, path) for path, rel in placed)  # same SOP UID: one file
        for rel, path in targets.items():
            target = out_dir / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(path, target)
        quarantined = Counter(r["reason"] for r in done.quarantine.to_pylist())
        return FolderResult(done.index.num_rows, len(targets), len(placed) - len(targets),
                            quarantined)
