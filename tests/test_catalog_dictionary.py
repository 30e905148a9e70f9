"""The data dictionary: every view and column of catalog.duckdb is described, in the database
(COMMENT ON), in the dictionary view and in the release's generated catalog/README.md."""

from __future__ import annotations

import duckdb
import pyarrow as pa
import pytest

from schemas import catalog as cat
from tasks.catalog_dictionary import descriptions
from tasks.publish import CATALOG_README, refresh_catalog_db
from tasks.zones import CATALOG_DB, Release
from tests.test_publish import publish


@pytest.fixture
def catalog_db(tmp_path):
    release = Release(str(tmp_path / "release"))
    publish(release, tmp_path, "B1", "2.25.3")
    assert refresh_catalog_db(release, str(tmp_path / "work"))
    return release, tmp_path / "release" / CATALOG_DB


def undescribed(con: duckdb.DuckDBPyConnection) -> list[str]:
    views = [f"view {name}" for name, comment in con.execute(
        "SELECT view_name, comment FROM duckdb_views() WHERE NOT internal").fetchall()
        if not comment]
    tables = [f"table {name}" for name, comment in con.execute(
        "SELECT table_name, comment FROM duckdb_tables()").fetchall() if not comment]
    columns = [f"{t}.{c}" for t, c, comment in con.execute(
        "SELECT table_name, column_name, comment FROM duckdb_columns() WHERE NOT internal"
    ).fetchall() if not comment]
    return views + tables + columns


def test_every_view_and_column_of_the_catalog_is_described(catalog_db):
    _, path = catalog_db
    with duckdb.connect(str(path), read_only=True) as con:
        assert undescribed(con) == []
        names = {n for (n,) in con.execute(
            "SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}
        assert names == set(cat.TABLES) | set(cat.APPENDED_TABLES) | set(cat.VIEWS) | {"batches"}
        rows = con.execute('SELECT "table", "column", type, description FROM dictionary'
                           ).fetchall()
        about = {(t, c): (ty, d) for t, c, ty, d in rows}
        assert about[("studies", "study_time")][0] == "TIME"
        assert "negative before the index date" in about[("studies", "days_from_index")][1]
        assert about[("catalog_info", "views_sha256")][1]
        assert "no_result" in about[("patients", "covid_status_reason")][1]
        assert "index date" in about[("clinical", "day")][1]
        assert about[("patients", "siteid")][1].startswith("RICORD's SITEID")
        # every column of every view, derived ones included, has a dictionary row
        n_columns = con.execute("SELECT count(*) FROM duckdb_columns() WHERE NOT internal"
                                ).fetchone()[0]
        assert sum(c is not None for _, c, _, _ in rows) == n_columns


def test_the_release_carries_the_dictionary_as_markdown(catalog_db):
    release, path = catalog_db
    text = release.read_bytes(CATALOG_README).decode()
    with duckdb.connect(str(path), read_only=True) as con:
        rows = con.execute('SELECT "table", "column" FROM dictionary').fetchall()
    for table, column in rows:
        assert (f"## {table}" if column is None else f"| `{column}` |") in text
    assert "| `study_time` | TIME |" in text
    before = release.fs.modified(release.path(CATALOG_README))
    assert not refresh_catalog_db(release, "unused")  # unchanged: neither file is rewritten
    assert release.fs.modified(release.path(CATALOG_README)) == before


def test_an_undescribed_column_is_caught():
    """The check above can fail: a view column without a comment is named."""
    con = duckdb.connect()
    con.execute("CREATE VIEW studies AS SELECT 1 AS study_uid, 2 AS surprise")
    con.execute("COMMENT ON VIEW studies IS 'one row per study'")
    con.execute("COMMENT ON COLUMN studies.study_uid IS 'the study'")
    assert undescribed(con) == ["studies.surprise"]


def test_an_empty_release_is_described_too(tmp_path):
    release = Release(str(tmp_path / "empty"))
    assert refresh_catalog_db(release, str(tmp_path / "work"))
    with duckdb.connect(release.path(CATALOG_DB), read_only=True) as con:
        assert undescribed(con) == []
        assert con.execute("SELECT count(*) FROM study_overview").fetchone() == (0,)
        assert con.execute("SELECT count(*) FROM site_summary").fetchone() == (0,)


def test_descriptions_cover_every_schema_column():
    for name, schema in cat.TABLES.items():
        text, columns = descriptions()[name]
        assert text and set(schema.names) | set(cat.PARTITION_COLUMNS) == set(columns), name
        assert all(columns.values()), name
    assert cat.STUDIES.field("study_time").type == pa.time64("us")
