"""Let a DuckDB connection read Parquet where a release lives: local disk needs nothing; S3
needs the httpfs extension, installed from the ``duckdb-extension-httpfs`` package because
extensions cannot be downloaded at run time, and a temporary secret (never stored)."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

import duckdb
import duckdb_extension_httpfs


def enable_remote_reads(con: duckdb.DuckDBPyConnection, storage_options: dict) -> None:
    """Load httpfs and give the connection the release's S3 credentials for this session."""
    load_httpfs(con)
    con.execute(s3_secret_sql(storage_options))


def load_httpfs(con: duckdb.DuckDBPyConnection) -> None:
    """Install DuckDB's httpfs from the pip package that carries it, then load it."""
    package = Path(duckdb_extension_httpfs.__file__).parent / "extensions"
    extension = package / f"v{duckdb.__version__}" / "httpfs.duckdb_extension"
    if not extension.exists():
        raise RuntimeError(f"duckdb-extension-httpfs has no build for DuckDB "
                           f"{duckdb.__version__}: install the matching version")
    con.execute(f"INSTALL '{extension}'")
    con.execute("LOAD httpfs")


def s3_secret_sql(storage_options: dict) -> str:
    """A temporary DuckDB S3 secret from the release's fsspec options, falling back on the
    standard AWS environment variables (the same ones s3fs reads)."""
    client = storage_options.get("client_kwargs") or {}
    endpoint = (client.get("endpoint_url") or storage_options.get("endpoint_url")
                or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"))
    values = {
        "KEY_ID": storage_options.get("key") or os.environ.get("AWS_ACCESS_KEY_ID"),
        "SECRET": storage_options.get("secret") or os.environ.get("AWS_SECRET_ACCESS_KEY"),
        "SESSION_TOKEN": storage_options.get("token") or os.environ.get("AWS_SESSION_TOKEN"),
        "REGION": (client.get("region_name") or os.environ.get("AWS_REGION")
                   or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"),
    }
    if endpoint:
        url = urlsplit(endpoint)
        values.update(ENDPOINT=url.netloc, URL_STYLE="path")
        use_ssl = "true" if url.scheme == "https" else "false"
    else:
        use_ssl = "true"
    settings = [f"{name} '{_quoted(value)}'" for name, value in values.items() if value]
    return f"CREATE OR REPLACE TEMPORARY SECRET radrepo_release (TYPE s3, " \
           f"{', '.join(settings)}, USE_SSL {use_ssl})"


def _quoted(value: str) -> str:
    return str(value).replace("'", "''")
