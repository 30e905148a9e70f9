"""QC: evaluate the rule table in schemas/qc_rules.yaml over the de-identified instances.

Each rule is one SQL condition run by DuckDB; the engine only groups, substitutes parameters
and records outcomes, so reviewing QC means reading a table, not code.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import resources

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import yaml

from schemas.catalog import QC
from schemas.config import QcConfig
from schemas.pipeline import OK

LEVEL_KEYS = {"instance": "sop_uid", "series": "series_uid", "study": "study_uid"}
OUTCOMES = {"exclude": "excluded", "flag": "flagged"}


@dataclass(frozen=True)
class QcResult:
    """Rule outcomes (the ``qc`` table) and the first excluding rule per excluded file."""

    outcomes: pa.Table
    excluded: dict[int, str]


@cache
def load_rules() -> dict:
    """The rule table shipped in schemas/."""
    text = resources.files("schemas").joinpath("qc_rules.yaml").read_text()
    return yaml.safe_load(text)


def _literal(value: object) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_literal(v) for v in value) + "]::VARCHAR[]"
    if isinstance(value, (int, float)):
        return repr(value)
    return "'" + str(value).replace("'", "''") + "'"


def _rule_sql(rule: dict, params: dict) -> str:
    literals = {k: _literal(v) for k, v in params.items()}
    when, detail = rule["when"].format(**literals), rule["detail"].format(**literals)
    level = rule["level"]
    if level == "instance":
        return (f"SELECT seq, sop_uid AS uid, study_uid, {detail} AS detail FROM instances "
                f"WHERE {when}")
    key = LEVEL_KEYS[level]
    return (
        f"WITH hits AS (SELECT {key} AS uid, {detail} AS detail FROM instances "
        f"GROUP BY {key} HAVING {when}) "
        f"SELECT i.seq, hits.uid, i.study_uid, hits.detail FROM hits "
        f"JOIN instances i ON i.{key} = hits.uid"
    )


def evaluate_qc(deidentified: pa.Table, params: dict | None = None) -> QcResult:
    """Run every rule over the readable files; return outcomes and excluded files by seq.

    ``params`` are the rule parameters (the config's ``qc`` block, site overrides applied).
    """
    rules = load_rules()
    params = {**QcConfig().model_dump(), **(params or {})}
    instances = deidentified.filter(pc.equal(deidentified["status"], OK))
    con = duckdb.connect()
    con.register("readable", instances)
    # rules also see each slice's distance to its neighbour in the series (slice_gap)
    con.execute("CREATE VIEW instances AS SELECT *, abs(slice_position - lag(slice_position) "
                "OVER (PARTITION BY series_uid ORDER BY slice_position)) AS slice_gap "
                "FROM readable")
    outcome_rows: list[dict] = []
    excluded: dict[int, str] = {}
    for rule in rules["rules"]:
        hits = con.execute(_rule_sql(rule, params)).fetchall()
        reported: set[str] = set()
        for seq, uid, study_uid, detail in sorted(hits, key=lambda h: h[0]):
            if rule["action"] == "exclude":
                excluded.setdefault(seq, rule["id"])
            if uid not in reported:
                reported.add(uid)
                outcome_rows.append({"level": rule["level"], "uid": uid, "study_uid": study_uid,
                                     "rule": rule["id"], "outcome": OUTCOMES[rule["action"]],
                                     "detail": detail})
    con.close()
    return QcResult(outcomes=pa.Table.from_pylist(outcome_rows, schema=QC), excluded=excluded)
