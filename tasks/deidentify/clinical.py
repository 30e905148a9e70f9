"""De-identify a site's EMR export: the clinical half of the one door PHI may not pass.

Patient IDs get the same pseudonym as the images, dates the same per-patient shift; only
mapped, typed columns come out (free text never does). Ages above 89 are reported as 90.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime, timedelta

import pyarrow as pa

from schemas.catalog import CLINICAL
from schemas.config import ClinicalConfig
from schemas.pipeline import DEIDENTIFIED_CLINICAL
from tasks.deidentify.dataset import age_in_years
from tasks.deidentify.keys import PseudonymKeys, normalize_patient_id
from tasks.deidentify.remap import current_id
from tasks.deidentify.tabular import read_rows
from tasks.failures import SourceUnavailable

COVID_STATUS = {"positive": "positive", "pos": "positive", "detected": "positive",
                "negative": "negative", "neg": "negative", "not detected": "negative"}


class ClinicalError(ValueError):
    """The clinical export cannot be used; the message names a column, never a value."""


@dataclass
class DeidentifiedClinical:
    patients: pa.Table
    measurements: pa.Table
    rows_read: int = 0
    rows_skipped: dict[str, int] = field(default_factory=dict)


def _parse_date(text: str) -> date | None:
    text = (text or "").strip()
    for fmt in ("%Y-%m-%d", "%Y%m%d", "%m/%d/%Y", "%Y-%m-%dT%H:%M:%S"):
        try:
            return datetime.strptime(text, fmt).date()
        except ValueError:
            continue
    return None


def _age_at_index(row: dict, cfg: ClinicalConfig, index_day: date) -> int | None:
    """From the birth date when the export has one, else from its age column; 90 above 89."""
    if cfg.birth_date and row.get(cfg.birth_date):
        return age_in_years(_parse_date(row[cfg.birth_date]), index_day)
    age = _float(row.get(cfg.age)) if cfg.age else None
    return min(int(age), 90) if age is not None and age >= 0 else None


def covid_status_reason(result: str) -> str:
    """Why covid_status is what it is (the values schemas/catalog.py documents)."""
    if not result:
        return "no_result"
    return "result" if result in COVID_STATUS else "unrecognised_result"


def _float(text: str | None) -> float | None:
    try:
        return float(text) if text not in (None, "") else None
    except ValueError:
        return None


def deidentify_clinical(
    path: str, cfg: ClinicalConfig, keys: PseudonymKeys, site_id: str, remap: dict[str, str]
) -> DeidentifiedClinical:
    """Read an EMR export (CSV, Excel or Parquet) and return pseudonymized patient rows and
    long-form measurements."""
    try:
        header, raw_rows = read_rows(path)
    except OSError:
        raise SourceUnavailable(f"site {site_id}: the clinical export is missing or "
                                "unreadable") from None
    wanted = [cfg.patient_id, cfg.index_date, cfg.sex, cfg.test_method, cfg.result] + [
        c for c in (cfg.birth_date, cfg.age, cfg.measured_on) if c] + [
        m.column for m in cfg.measurements.values()]
    for column in wanted:
        if column not in header:
            raise ClinicalError(f"clinical export has no column {column!r}")

    patients: dict[str, dict] = {}
    measurements: list[dict] = []
    skipped: dict[str, int] = {}
    for row in raw_rows:
        source_id = normalize_patient_id(row[cfg.patient_id] or "")
        index_day = _parse_date(row[cfg.index_date])
        if not source_id:
            skipped["no patient id"] = skipped.get("no patient id", 0) + 1
            continue
        if index_day is None:
            skipped["no index date"] = skipped.get("no index date", 0) + 1
            continue
        key = current_id(source_id, remap)
        pseudonym = keys.patient_id(site_id, key)
        if pseudonym in patients:
            skipped["repeated patient"] = skipped.get("repeated patient", 0) + 1
            continue
        offset = timedelta(days=keys.date_offset_days(site_id, key))
        result = (row[cfg.result] or "").strip().lower()
        measured = _parse_date(row[cfg.measured_on]) if cfg.measured_on else None
        day = (measured - index_day).days if measured else None
        patients[pseudonym] = {
            "patient_id": pseudonym,
            "index_date": index_day + offset,
            "sex": (row[cfg.sex] or "").strip().upper()[:1] or None,
            "age_at_index": _age_at_index(row, cfg, index_day),
            "covid_status": COVID_STATUS.get(result, "unknown"),
            "covid_status_reason": covid_status_reason(result),
            "test_method": (row[cfg.test_method] or "").strip() or None,
        }
        for name, m in cfg.measurements.items():
            value = _float(row[m.column])
            if value is not None:
                measurements.append(
                    {"patient_id": pseudonym, "name": name, "value": value, "unit": m.unit,
                     "day": day}
                )
    return DeidentifiedClinical(
        patients=pa.Table.from_pylist(list(patients.values()), schema=DEIDENTIFIED_CLINICAL),
        measurements=pa.Table.from_pylist(measurements, schema=CLINICAL),
        rows_read=len(raw_rows),
        rows_skipped=skipped,
    )
