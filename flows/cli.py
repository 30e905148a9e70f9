"""The ``radrepo`` command line: synth, run, query and demo."""

from __future__ import annotations

import logging
import os
import secrets
import sys
from pathlib import Path
from typing import Annotated

import duckdb
import typer
import yaml
from rich.console import Console
from rich.table import Table

from flows.secret import SecretError
from schemas.config import ConfigError, RadrepoConfig, load_config, parse_config

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Build a de-identified, multi-site imaging research repository.")
console = Console(width=max(Console().width, 160), soft_wrap=True)

DEMO_SECRET_FILE = "demo-secret"


def _fail(message: str, code: int) -> None:
    typer.echo(f"radrepo: {message}", err=True)
    raise typer.Exit(code)


def _pairs(values: list[str], option: str) -> dict[str, str]:
    out = {}
    for value in values:
        site, sep, path = value.partition("=")
        if not sep or not site or not path:
            _fail(f"{option} expects SITE_ID=PATH, got {value!r}", 2)
        out[site] = path
    return out


def _one_off_config(sources: list[str], clinical: list[str], remaps: list[str],
                    release: Path | None, work: Path | None) -> RadrepoConfig:
    from tasks.ingest import detect_source_kind

    if release is None or work is None:
        _fail("without a CONFIG file, --source, --release and --work are all required", 2)
    source_paths = _pairs(sources, "--source")
    clinical_paths = _pairs(clinical, "--clinical")
    remap_paths = _pairs(remaps, "--remap")
    for site in [*clinical_paths, *remap_paths]:
        if site not in source_paths:
            _fail(f"--clinical/--remap names site {site!r}, which has no --source", 2)
    sites = []
    for site, path in source_paths.items():
        try:
            kind = detect_source_kind(path)
        except FileNotFoundError as err:
            _fail(str(err), 2)
        entry = {"site_id": site, "source": {"kind": kind, "path": path}}
        if site in clinical_paths:
            entry["clinical"] = {"path": clinical_paths[site]}
        if site in remap_paths:
            entry["id_remap"] = remap_paths[site]
        sites.append(entry)
    raw = {"release": str(release), "work_dir": str(work), "sites": sites}
    return parse_config(raw, Path.cwd())


def print_summaries(summaries: list[dict],
                    empty: str = "nothing to do: every batch found is already published") -> None:
    """One line per batch with its accounting."""
    if not summaries:
        console.print(empty)
        return
    table = Table("site", "batch", "status", "files in", "published", "excluded", "quarantined")
    for s in summaries:
        table.add_row(s["site_id"], s["batch_id"], s["status"], *(str(s.get(k, "")) for k in (
            "files_in", "published", "excluded", "quarantined")))
    console.print(table)
    for s in summaries:
        notes = [f"{s['skipped_already_ingested']} objects skipped, already ingested"
                 ] if s.get("skipped_already_ingested") else []
        for label, key in (("excluded", "excluded_by_reason"),
                           ("quarantined", "quarantined_by_reason")):
            reasons = s.get(key) or {}
            if reasons:
                notes.append(f"{label}: " + ", ".join(f"{n} {r}" for r, n in reasons.items()))
        if notes:
            console.print(f"  {s['site_id']} {s['batch_id']}: " + "; ".join(notes),
                          highlight=False, markup=False)


def _data_errors() -> tuple[type[Exception], ...]:
    """Problems in a site's data or source that stop a run; their messages quote no
    identifier."""
    from flows.site_batch import BatchNotFound
    from tasks.catalog import AccountingError
    from tasks.deidentify.clinical import ClinicalError
    from tasks.deidentify.remap import RemapError
    from tasks.deidentify.tabular import TabularError
    from tasks.pacs import PacsUnavailable
    from tasks.verify import LeakFound

    return (BatchNotFound, AccountingError, ClinicalError, RemapError, TabularError, LeakFound,
            PacsUnavailable)


def _sites_failed_error() -> type[Exception]:
    from flows.nightly import SitesFailed

    return SitesFailed


def _run_nightly(config: RadrepoConfig, config_path: Path | None, sites: list[str] | None,
                 batches: list[str] | None, force: bool) -> list[dict]:
    from flows.nightly import nightly
    from flows.progress import progress_bars
    from flows.secret import keys_from_env

    keys_from_env(config.secret_env)
    with progress_bars(console, len(sites or config.sites)):
        return nightly(config_path or config, sites=sites, batches=batches, force=force)


def _sites_failed(err) -> None:
    """The summary of every site, then one ``radrepo:`` line per failed site; exit 1."""
    print_summaries(err.summaries)
    for line in err.lines:
        typer.echo(f"radrepo: {line}", err=True)
    raise typer.Exit(1)


@app.command()
def synth(
    out: Annotated[Path, typer.Argument(help="folder to write the synthetic sites into")],
    sites: Annotated[int, typer.Option(min=1)] = 3,
    patients: Annotated[int, typer.Option(min=1)] = 4,
    seed: int = 0,
    ct_slices: Annotated[int, typer.Option(min=1)] = 6,
    ct_size: Annotated[int, typer.Option(min=8)] = 64,
    cr_size: Annotated[int, typer.Option(min=8)] = 96,
) -> None:
    """Write synthetic *identified* hospital exports (deterministic by seed)."""
    from tasks.synth import synthesize

    truth = synthesize(out, sites=sites, patients=patients, seed=seed, ct_slices=ct_slices,
                       ct_size=ct_size, cr_size=cr_size)
    for site_id, site in truth["sites"].items():
        console.print(f"{site_id}: {site['layout']}, {len(site['files'])} files "
                      f"-> {out / site['source']}", highlight=False)


@app.command()
def run(
    config: Annotated[Path | None, typer.Argument(help="consortium YAML")] = None,
    site: Annotated[list[str] | None, typer.Option(help="only this site (repeatable)")] = None,
    batch: Annotated[list[str] | None, typer.Option(help="only this batch (repeatable)")] = None,
    force: Annotated[bool, typer.Option(help="re-run batches already published")] = False,
    source: Annotated[list[str] | None, typer.Option(help="SITE_ID=PATH (no CONFIG)")] = None,
    clinical: Annotated[list[str] | None, typer.Option(help="SITE_ID=CSV (no CONFIG)")] = None,
    remap: Annotated[list[str] | None, typer.Option(help="SITE_ID=CSV (no CONFIG)")] = None,
    release: Annotated[Path | None, typer.Option(help="release folder (no CONFIG)")] = None,
    work: Annotated[Path | None, typer.Option(help="private work folder (no CONFIG)")] = None,
) -> None:
    """Run every new batch (nightly), or the named sites/batches."""
    try:
        if config is not None:
            if source or clinical or remap or release or work:
                _fail("give either a CONFIG file or --source/--release/--work, not both", 2)
            cfg = load_config(config)
        else:
            if not source:
                _fail("give a CONFIG file, or --source SITE_ID=PATH with --release and --work", 2)
            cfg = _one_off_config(source, clinical or [], remap or [], release, work)
        for s in site or []:
            cfg.site(s)
        summaries = _run_nightly(cfg, config, site, batch, force)
    except (ConfigError, SecretError) as err:
        _fail(str(err), 2)
    except _sites_failed_error() as err:
        _sites_failed(err)
    except _data_errors() as err:
        _fail(str(err), 1)
    print_summaries(summaries)


@app.command()
def backfill(
    config: Annotated[Path, typer.Argument(help="consortium YAML")],
    site: Annotated[list[str] | None, typer.Option(help="only this site (repeatable)")] = None,
    batch: Annotated[list[str] | None, typer.Option(help="this batch id (repeatable)")] = None,
    since: Annotated[str | None, typer.Option(help="batches dated on or after YYYY-MM-DD")] = None,
    until: Annotated[str | None, typer.Option(help="batches dated up to YYYY-MM-DD")] = None,
) -> None:
    """Run chosen batches again (by id or by the date in their id), published ones included."""
    from datetime import date

    from flows.nightly import backfill as backfill_flow
    from flows.progress import progress_bars
    from flows.secret import keys_from_env

    try:
        days = [date.fromisoformat(d) if d else None for d in (since, until)]
    except ValueError:
        _fail("--since/--until take a date as YYYY-MM-DD", 2)
    if not batch and days == [None, None]:
        _fail("name --batch ids or a --since/--until window", 2)
    try:
        cfg = load_config(config)
        for s in site or []:
            cfg.site(s)
        keys_from_env(cfg.secret_env)
        with progress_bars(console, len(site or cfg.sites)):
            summaries = backfill_flow(config, sites=site, batches=batch, since=days[0],
                                      until=days[1])
    except (ConfigError, SecretError) as err:
        _fail(str(err), 2)
    except _sites_failed_error() as err:
        _sites_failed(err)
    except _data_errors() as err:
        _fail(str(err), 1)
    print_summaries(summaries, empty="nothing to do: no batch matches")


@app.command()
def deploy(
    config: Annotated[Path, typer.Argument(help="consortium YAML, read by every run")],
) -> None:
    """Register deployments nightly/nightly (on the config's schedule) and backfill/backfill
    in the process work pool radrepo of the Prefect server at PREFECT_API_URL."""
    from prefect.settings import PREFECT_API_URL

    from flows import deploy as deployments

    if not PREFECT_API_URL.value():
        _fail("set PREFECT_API_URL to the Prefect server's API (e.g. http://127.0.0.1:4200/api)",
              2)
    try:
        deployed = deployments.deploy(config)
    except ConfigError as err:
        _fail(str(err), 2)
    for d in deployed:
        console.print(f"deployment {d.name}: {d.schedule}, work pool {deployments.WORK_POOL}",
                      highlight=False)
    console.print(f"start a worker: prefect worker start --pool {deployments.WORK_POOL}",
                  highlight=False)


@app.command()
def query(
    release: Annotated[str, typer.Argument(help="release folder or URL (s3://bucket/prefix)")],
    sql: Annotated[str, typer.Argument(help="SQL over the catalog views")],
) -> None:
    """Run SQL against the release catalog and print the result as a table.

    An s3:// release is read with the standard AWS environment variables (AWS_ENDPOINT_URL
    for a non-AWS endpoint)."""
    from tasks.catalog_query import NoCatalog, open_catalog
    from tasks.publish import Release

    try:
        with open_catalog(Release(release)) as con:
            try:
                result = con.execute(sql)
            except duckdb.Error as err:
                _fail(f"query failed: {str(err).splitlines()[0]}", 1)
            columns = [d[0] for d in result.description]
            rows = result.fetchall()
    except NoCatalog as err:
        _fail(str(err), 2)
    print_table(columns, rows)


@app.command()
def deidentify(
    in_dir: Annotated[Path, typer.Argument(help="export folder (files, trees, zips)")],
    out_dir: Annotated[Path, typer.Argument(help="where the de-identified files go")],
    site_id: Annotated[str, typer.Option(help="site code that keys pseudonyms and SITEID")] = (
        "site"),
    option: Annotated[list[str] | None, typer.Option(
        help="de-identification option (repeatable); default: the pipeline's")] = None,
    workers: Annotated[int, typer.Option(min=1, help="Dask worker processes")] = 1,
    secret_env: Annotated[str, typer.Option(help="variable holding the HMAC secret")] = (
        "RADREPO_SECRET"),
) -> None:
    """De-identify one folder with the pipeline's profile; exit 1 if anything was quarantined."""
    from flows.deidentify_folder import deidentify_folder
    from flows.secret import keys_from_env
    from schemas.config import DeidConfig
    from tasks.deidentify.profile import load_profile
    from tasks.verify import LeakFound

    if not in_dir.is_dir():
        _fail(f"no folder at {in_dir}", 2)
    try:
        options = tuple(option) if option else DeidConfig().options
        load_profile(options)
        keys = keys_from_env(secret_env)
        result = deidentify_folder(in_dir, out_dir, site_id, options, keys, workers)
    except (SecretError, ValueError) as err:
        _fail(str(err), 2)
    except LeakFound as err:
        _fail(str(err), 3)
    console.print(f"{result.files_in} files in, {result.written} de-identified into {out_dir}, "
                  f"{result.same_sop_uid} repeated SOP Instance UID(s) written once, "
                  f"{sum(result.quarantined.values())} quarantined", highlight=False)
    for reason, n in sorted(result.quarantined.items()):
        console.print(f"  {n} quarantined: {reason}", highlight=False, markup=False)
    if result.quarantined:
        raise typer.Exit(1)


@app.command()
def verify(
    release: Annotated[str, typer.Argument(help="release folder or URL (s3://bucket/prefix)")],
    work: Annotated[list[Path] | None, typer.Option(
        help="private work folder whose identifier lists to search for (repeatable)")] = None,
    option: Annotated[list[str] | None, typer.Option(
        help="de-identification option the release was made with (repeatable)")] = None,
) -> None:
    """Check a release: profile structure of every file, and (with --work) every identifier
    seen at the sources, in file headers, names and catalog rows. Exit 1 on any finding.

    An s3:// release is read with the standard AWS environment variables (AWS_ENDPOINT_URL
    for a non-AWS endpoint); only the headers of its files are fetched."""
    from schemas.config import DeidConfig
    from tasks import verify as gate
    from tasks.deidentify.profile import load_profile
    from tasks.publish import Release

    location = Release(release)
    if not location.fs.isdir(location.root):
        _fail(f"no release folder at {release}", 2)
    try:
        profile = load_profile(tuple(option) if option else DeidConfig().options)
    except ValueError as err:
        _fail(str(err), 2)
    matcher = None
    if work:
        lists = [p for w in work for p in sorted(w.glob("*/index/*.identifiers.parquet"))]
        if not lists:
            _fail("no identifier lists under --work (they are written by radrepo run)", 2)
        matcher = gate.read_identifiers(lists)
    files, findings = gate.scan_release_files(location, matcher, profile)
    for finding in findings:
        console.print(str(finding), highlight=False, markup=False)
    console.print(f"{files} DICOM files checked, {len(findings)} finding(s)"
                  + ("" if matcher else " (structure only: give --work to search for "
                     "the sources' identifiers)"), highlight=False)
    if findings:
        raise typer.Exit(1)


def print_table(columns: list[str], rows: list[tuple]) -> None:
    table = Table(*columns)
    for row in rows:
        table.add_row(*("" if v is None else str(v) for v in row))
    console.print(table)


def _demo_secret(work: Path) -> None:
    if os.environ.get("RADREPO_SECRET"):
        console.print("using the secret in RADREPO_SECRET")
        return
    path = work / DEMO_SECRET_FILE
    if not path.exists():
        work.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_hex(32))
        path.chmod(0o600)
        console.print(f"generated a secret for the demo's synthetic data only: {path} "
                      "(real runs take it from RADREPO_SECRET)", highlight=False)
    os.environ["RADREPO_SECRET"] = path.read_text().strip()


@app.command()
def demo(
    folder: Annotated[Path, typer.Argument(help="where the demo writes everything")] = Path(
        "radrepo-demo"),
    patients: Annotated[int, typer.Option(min=1)] = 4,
    seed: int = 0,
) -> None:
    """Synthesize three sites, run the nightly flow on them, and query the catalog."""
    from tasks.synth import synthesize

    folder = folder.resolve()
    truth = synthesize(folder / "sources", sites=3, patients=patients, seed=seed)
    work = folder / "work"
    _demo_secret(work)
    sites = []
    for site_id, site in truth["sites"].items():
        sites.append({
            "site_id": site_id,
            "source": {"kind": {"zip_batches": "zip_batches", "tree": "folder",
                                "flat": "flat"}[site["layout"]],
                       "path": f"sources/{site['source']}"},
            "clinical": {"path": f"sources/{site['clinical']}"},
            "id_remap": f"sources/{site['remap']}",
        })
    config_path = folder / "radrepo.yaml"
    config_path.write_text(yaml.safe_dump(
        {"release": "release", "work_dir": "work", "sites": sites}, sort_keys=False))
    console.print(f"config: {config_path}", highlight=False)
    try:
        summaries = _run_nightly(load_config(config_path), config_path, None, None, False)
    except (ConfigError, SecretError) as err:
        _fail(str(err), 2)
    print_summaries(summaries)
    release = folder / "release"
    with duckdb.connect(str(release / "catalog.duckdb"), read_only=True) as con:
        sql = ("SELECT site_id, status, count(*) AS studies, sum(n_instances) AS files "
               "FROM studies GROUP BY ALL ORDER BY ALL")
        console.print(f"\nper-site studies in the release:\n  {sql}", highlight=False)
        result = con.execute(sql)
        print_table([d[0] for d in result.description], result.fetchall())
    console.print(f'\nquery it yourself: radrepo query {release} "SELECT * FROM studies"',
                  highlight=False)


def main() -> None:
    """Console-script entry point."""
    # a temporary Prefect server must not try to phone home from an offline site network
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # the console shows radrepo's summary and warnings; Prefect's INFO lines still reach its API
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
    logging.getLogger("distributed").setLevel(logging.WARNING)
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
