"""Agreement between readers per site and questionnaire item: Fleiss' kappa (statsmodels) over
the studies that the usual number of readers labelled, from the ``label_votes`` view."""

from __future__ import annotations

import math
from collections import Counter

import duckdb
import numpy as np
import pyarrow as pa
from statsmodels.stats.inter_rater import fleiss_kappa

from schemas.label_schema import LabelSchema, load_label_schema
from tasks.catalog_query import open_catalog
from tasks.zones import Release

AGREEMENT = pa.schema([
    ("site_id", pa.string()),  # the site whose studies were read
    ("item", pa.string()),  # the questionnaire item
    ("studies", pa.int32()),  # studies in the kappa: those read by readers_per_study readers
    ("readers_per_study", pa.int32()),  # the usual number of readers per study
    ("studies_left_out", pa.int32()),  # studies read by another number of readers (or one)
    ("observed_agreement", pa.float64()),  # Fleiss' mean pairwise agreement P-bar
    ("kappa", pa.float64()),  # Fleiss' kappa; null when it is undefined (one category used)
])


def agreement_table(con: duckdb.DuckDBPyConnection, schema: LabelSchema) -> pa.Table:
    """One row per site and choice item with readers' labels: Fleiss' kappa and its inputs."""
    rows = con.execute("SELECT site_id, item, study_uid, answer FROM label_votes "
                       "WHERE NOT adjudicates ORDER BY ALL").fetchall()
    grouped: dict[tuple[str, str], dict[str, list[str]]] = {}
    for site, item, study, answer in rows:
        grouped.setdefault((site, item), {}).setdefault(study, []).append(answer)
    out = []
    for (site, link_id), studies in sorted(grouped.items()):
        item = schema.item(link_id)
        if item is None or item.type != "choice":
            continue
        sizes = Counter(len(a) for a in studies.values() if len(a) >= 2)
        if not sizes:
            out.append({"site_id": site, "item": link_id, "studies": 0,
                        "readers_per_study": None, "studies_left_out": len(studies),
                        "observed_agreement": None, "kappa": None})
            continue
        readers = max(sizes, key=lambda n: (sizes[n], n))
        used = [a for a in studies.values() if len(a) == readers]
        codes = [a.code for a in item.answers]
        table = np.array([[answers.count(c) for c in codes] for answers in used])
        observed = float(((table * (table - 1)).sum(axis=1) / (readers * (readers - 1))).mean())
        with np.errstate(divide="ignore", invalid="ignore"):
            kappa = float(fleiss_kappa(table, method="fleiss"))
        out.append({"site_id": site, "item": link_id, "studies": len(used),
                    "readers_per_study": readers, "studies_left_out": len(studies) - len(used),
                    "observed_agreement": observed,
                    "kappa": None if math.isnan(kappa) or math.isinf(kappa) else kappa})
    return pa.Table.from_pylist(out, schema=AGREEMENT)


def release_agreement(release: Release, schema: LabelSchema | None = None) -> pa.Table:
    """The agreement table of a release's catalog (for its reports), by the default schema
    unless another is given."""
    with open_catalog(release) as con:
        return agreement_table(con, schema or load_label_schema())


def agreement_csv(table: pa.Table) -> bytes:
    """The agreement table as CSV text, for the release's reports."""
    lines = [",".join(table.column_names)]
    for row in table.to_pylist():
        lines.append(",".join("" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)
                              for v in row.values()))
    return ("\n".join(lines) + "\n").encode()
