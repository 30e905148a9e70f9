"""The data dictionary in the release: COMMENT statements for catalog.duckdb, and the
generated ``catalog/README.md``, both from the descriptions in schemas/catalog.py."""

from __future__ import annotations

import duckdb

from schemas import catalog as cat


def _quoted(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def descriptions() -> dict[str, tuple[str, dict[str, str]]]:
    """Every view of catalog.duckdb: its description and its columns' descriptions."""
    out = {name: (doc.description, {**{c: cat.PARTITION_DESCRIPTIONS[c]
                                        for c in cat.PARTITION_COLUMNS},
                                     **doc.column_descriptions})
           for name, doc in {**cat.DOCS, **cat.APPENDED_DOCS}.items()}
    out["batches"] = cat.BATCHES_DOC
    out.update({name: (view.description, view.columns) for name, view in cat.VIEWS.items()})
    return out


def comment_statements() -> list[str]:
    """COMMENT ON VIEW / COLUMN for every view and column of catalog.duckdb."""
    statements = []
    for view, (text, columns) in descriptions().items():
        statements.append(f"COMMENT ON VIEW {view} IS {_quoted(text)}")
        statements += [f'COMMENT ON COLUMN {view}."{column}" IS {_quoted(about)}'
                       for column, about in columns.items()]
    return statements


def catalog_info_statements(fingerprint: str) -> list[str]:
    """The catalog_info table, described like the views."""
    name, text, columns = cat.CATALOG_INFO
    return [f"CREATE TABLE {name} AS SELECT {_quoted(fingerprint)} AS views_sha256",
            f"COMMENT ON TABLE {name} IS {_quoted(text)}",
            *[f"COMMENT ON COLUMN {name}.{c} IS {_quoted(about)}" for c, about in columns.items()]]


def dictionary_markdown(con: duckdb.DuckDBPyConnection) -> str:
    """catalog/README.md: the dictionary view of a built catalog.duckdb as Markdown."""
    rows = con.execute('SELECT "table", "column", type, description FROM dictionary').fetchall()
    lines = ["# The radrepo catalog: data dictionary", "",
             "Generated from `schemas/catalog.py` each time `catalog.duckdb` is rebuilt; the "
             "same text is in the database (`SELECT * FROM dictionary`, or DuckDB's "
             "`duckdb_columns()` comments). Each catalog table is Parquet under "
             "`catalog/<table>/site_id=…/batch_id=…/` with a view of the same name; "
             f"{', '.join(['batches', *cat.VIEWS])} are views derived from them; "
             f"{cat.CATALOG_INFO[0]} is a table of the database.", ""]
    for table, column, type_, description in rows:
        if column is None:
            lines += ["", f"## {table}", "", description or "", "",
                      "| column | type | description |", "| --- | --- | --- |"]
        else:
            text = (description or "").replace("|", "\\|")
            lines.append(f"| `{column}` | {type_} | {text} |")
    return "\n".join(lines) + "\n"
