"""De-identification: the one door PHI may not pass.

``deidentify_batch`` fans the batch out as one Dask task per study; what comes back (and the
files written to the staging folder) carries pseudonyms only.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from schemas.pipeline import DEIDENTIFIED, OK
from tasks.deidentify.clinical import DeidentifiedClinical, deidentify_clinical
from tasks.deidentify.keys import PseudonymKeys
from tasks.deidentify.remap import load_remap
from tasks.deidentify.study import DeidContext, SourceFile, deidentify_study

__all__ = [
    "DeidContext",
    "DeidentifiedClinical",
    "PseudonymKeys",
    "deidentify_batch",
    "deidentify_clinical",
    "load_remap",
]


def study_groups(index: pa.Table) -> list[list[SourceFile]]:
    """Ingested objects grouped by original Study Instance UID, in ingest order."""
    groups: dict[str, list[SourceFile]] = defaultdict(list)
    for row in index.filter(pc.equal(index["status"], OK)).to_pylist():
        groups[row["study_uid"] or ""].append(
            SourceFile(
                seq=row["seq"],
                object_id=row["object_id"],
                staged_path=row["staged_path"],
                exam_id=row["exam_id"],
                exam_time=row["exam_time"],
                member_path=row["member_path"],
            )
        )
    return list(groups.values())


IDENTIFIERS = pa.schema([("value", pa.string())])


def deidentify_batch(index: pa.Table, ctx: DeidContext, identifiers_path: str,
                     client=None, files_done: Callable[[int], None] | None = None) -> pa.Table:
    """De-identify every readable object of a batch; one Dask task per study when ``client``.

    The identifying values met on the way go to ``identifiers_path`` in the private zone, for
    the verification gate; the returned table holds pseudonymized values only.
    ``files_done(n)`` is told each time a study of ``n`` files is done (a progress bar).
    """
    Path(ctx.out_dir).mkdir(parents=True, exist_ok=True)
    groups = study_groups(index)
    tell = files_done or (lambda n: None)
    if client is None:
        results = []
        for group in groups:
            results.append(deidentify_study(group, ctx))
            tell(len(group))
    else:
        from distributed import as_completed

        [ctx_future] = client.scatter([ctx], broadcast=True)
        futures = client.map(deidentify_study, groups, ctx=ctx_future, pure=False)
        sizes = {f.key: len(g) for f, g in zip(futures, groups, strict=True)}
        for future in as_completed(futures):
            tell(sizes[future.key])
        results = client.gather(futures)
    rows = sorted((r for study in results for r in study.rows), key=lambda r: r["seq"])
    seen = sorted(set().union(*(study.identifiers for study in results)))
    Path(identifiers_path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"value": seen}, schema=IDENTIFIERS), identifiers_path)
    return pa.Table.from_pylist(rows, schema=DEIDENTIFIED)
