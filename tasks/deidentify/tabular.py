"""Read a site's tabular export (CSV, Excel or Parquet) as rows of text, whatever the format.

EMR exports and ID remap files arrive as CSV, as Excel workbooks (the tip sheet's
``C19_HIRO_LDS_REMAP_PUB-LIST.xlsx``) or as Parquet; downstream code sees one shape.
"""

from __future__ import annotations

import csv
from datetime import date, datetime
from pathlib import Path

import pyarrow.parquet as pq


class TabularError(ValueError):
    """The file cannot be read as a table; the message names the file type, never a value."""


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.date().isoformat() if value.time() == datetime.min.time() else (
            value.isoformat())
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # Excel stores 1234567 as 1234567.0
    return str(value).strip()


def read_rows(path: str) -> tuple[list[str], list[dict[str, str]]]:
    """(column names, rows) of a .csv, .xlsx/.xlsm or .parquet file; cells as stripped text."""
    suffix = Path(path).suffix.lower()
    if suffix in (".xlsx", ".xlsm"):
        from openpyxl import load_workbook

        sheet = load_workbook(path, read_only=True, data_only=True).active
        cells = sheet.iter_rows(values_only=True)
        header = [_text(c) for c in next(cells, ())]
        rows = [dict(zip(header, (_text(c) for c in row), strict=False)) for row in cells
                if any(c is not None for c in row)]
        return header, rows
    if suffix == ".parquet":
        table = pq.read_table(path)
        return table.column_names, [{k: _text(v) for k, v in r.items()}
                                    for r in table.to_pylist()]
    if suffix not in (".csv", ".txt", ""):
        raise TabularError(f"cannot read a {suffix} file as a table (CSV, Excel or Parquet)")
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or ()), [{k: (v or "").strip() for k, v in r.items()}
                                                for r in reader]
