"""The ``radrepo`` command line: synth, run, query, releases, export, push, labels, demo."""

from __future__ import annotations

import logging
import os
import secrets
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
import yaml
from rich.console import Console
from rich.table import Table

from flows.child_processes import start_temporary_prefect_server
from flows.run_log import RunLog
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
    from tasks.discovery import detect_source_kind

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
        except FileNotFoundError:
            _fail(f"site {site}: the source folder is missing or unreadable", 2)
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
    from tasks.failures import SourceUnavailable
    from tasks.pacs import PacsUnavailable
    from tasks.site_lock import SiteBusy
    from tasks.verify import LeakFound

    return (BatchNotFound, AccountingError, ClinicalError, RemapError, TabularError, LeakFound,
            PacsUnavailable, SourceUnavailable, SiteBusy)


def _fail_run(err: Exception, log: RunLog | None) -> None:
    """End a failed run with one ``radrepo:`` line (a data error's message, whose further
    lines list places such as gate findings; for any other error only its kind); the
    traceback goes to the run's log file in the work folder, never the console."""
    if isinstance(err, _data_errors()):
        first, *places = str(err).splitlines() or [type(err).__name__]
    else:
        first, places = f"the run stopped on an unexpected {type(err).__name__}", []
    _fail("\n".join([log.failure(err, first) if log else first, *places]), 1)


def _check_key(config: RadrepoConfig, rekey: bool) -> None:
    """Refuse another secret than the release's before anything runs; ``rekey`` records the
    new one instead, so the run republishes every batch under it."""
    from flows.secret import check_release_key, keys_from_env
    from tasks.zones import Release

    release = Release(config.release, config.release_storage_options)
    check_release_key(release, keys_from_env(config.secret_env), config.secret_env, rekey)


def _sites_failed_error() -> type[Exception]:
    from flows.nightly import SitesFailed

    return SitesFailed


def _run_nightly(config: RadrepoConfig, config_path: Path | None, sites: list[str] | None,
                 batches: list[str] | None, force: bool, rekey: bool = False) -> list[dict]:
    from flows.nightly import nightly
    from flows.progress import progress_bars
    from flows.site_batch import without_heartbeat

    _check_key(config, rekey)
    start_temporary_prefect_server()
    with progress_bars(console, len(sites or config.sites)), without_heartbeat():
        return nightly(config_path or config, sites=sites, batches=batches, force=force)


def _sites_failed(err, log: RunLog | None) -> None:
    """The summary of every site, then one ``radrepo:`` line per failed site, saying where its
    traceback is (the run's log file, in the work folder); exit 1."""
    print_summaries(err.summaries)
    failed = [s for s in err.summaries if s["status"] == "failed"]
    for row in failed:
        cause = err.errors.get(row["site_id"])
        line = log.failure(cause, row["error"]) if log and cause else row["error"]
        typer.echo(f"radrepo: {line}", err=True)
    raise typer.Exit(1)


class _Run:
    log: RunLog | None = None


@contextmanager
def _run_errors() -> Iterator[_Run]:
    """The error handling of ``run`` and ``backfill``: a config or secret error exits 2; failed
    sites print the summary and one line each (exit 1); any other error one line (exit 1), its
    traceback in the run's log (set ``.log`` on the yielded object once it is open), closed at
    the end."""
    from flows.secret import SecretError

    run = _Run()
    try:
        yield run
    except (ConfigError, SecretError) as err:
        _fail(str(err), 2)
    except typer.Exit:
        raise
    except _sites_failed_error() as err:
        _sites_failed(err, run.log)
    except Exception as err:  # noqa: BLE001 - one line on the console, the rest in the log
        _fail_run(err, run.log)
    finally:
        if run.log:
            run.log.close()


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
    from synth import synthesize

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
    rekey: Annotated[bool, typer.Option(
        help="change the release's key to the secret given: republish every batch")] = False,
    source: Annotated[list[str] | None, typer.Option(help="SITE_ID=PATH (no CONFIG)")] = None,
    clinical: Annotated[list[str] | None, typer.Option(help="SITE_ID=CSV (no CONFIG)")] = None,
    remap: Annotated[list[str] | None, typer.Option(help="SITE_ID=CSV (no CONFIG)")] = None,
    release: Annotated[Path | None, typer.Option(help="release folder (no CONFIG)")] = None,
    work: Annotated[Path | None, typer.Option(help="private work folder (no CONFIG)")] = None,
) -> None:
    """Run every new batch (nightly), or the named sites/batches."""
    from flows.secret import keys_from_env

    with _run_errors() as guard:
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
        keys_from_env(cfg.secret_env)  # before anything is written to the work folder
        guard.log = RunLog(cfg.work_dir)
        summaries = _run_nightly(cfg, config, site, batch, force, rekey)
    print_summaries(summaries)


@app.command()
def backfill(
    config: Annotated[Path, typer.Argument(help="consortium YAML")],
    site: Annotated[list[str] | None, typer.Option(help="only this site (repeatable)")] = None,
    batch: Annotated[list[str] | None, typer.Option(help="this batch id (repeatable)")] = None,
    since: Annotated[str | None, typer.Option(help="batches dated on or after YYYY-MM-DD")] = None,
    until: Annotated[str | None, typer.Option(help="batches dated up to YYYY-MM-DD")] = None,
    rekey: Annotated[bool, typer.Option(
        help="change the release's key to the secret given: republish every batch")] = False,
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
    with _run_errors() as guard:
        cfg = load_config(config)
        for s in site or []:
            cfg.site(s)
        keys_from_env(cfg.secret_env)
        guard.log = RunLog(cfg.work_dir)
        _check_key(cfg, rekey)
        start_temporary_prefect_server()
        with progress_bars(console, len(site or cfg.sites)):
            summaries = backfill_flow(config, sites=site, batches=batch, since=days[0],
                                      until=days[1])
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
    frozen: Annotated[str | None, typer.Option(
        "--release", help="query this frozen release (a name, or current) instead")] = None,
) -> None:
    """Run SQL against the release catalog and print the result as a table.

    An s3:// release is read with the standard AWS environment variables (AWS_ENDPOINT_URL
    for a non-AWS endpoint)."""
    import duckdb

    from tasks.catalog_query import NoCatalog, open_catalog
    from tasks.frozen import FrozenReleaseError, open_frozen
    from tasks.zones import Release

    location = Release(release)
    try:
        with open_catalog(location) if frozen is None else open_frozen(location, frozen) as con:
            try:
                result = con.execute(sql)
            except duckdb.Error as err:
                _fail(f"query failed: {str(err).splitlines()[0]}", 1)
            columns = [d[0] for d in result.description]
            rows = result.fetchall()
    except (NoCatalog, FrozenReleaseError) as err:
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
    workers: Annotated[int, typer.Option(
        min=1, help="Dask worker processes (default: one per core)")] = os.cpu_count() or 1,
    secret_env: Annotated[str, typer.Option(help="variable holding the HMAC secret")] = (
        "RADREPO_SECRET"),
) -> None:
    """De-identify one folder with the pipeline's profile; exit 1 if anything was quarantined."""
    from flows.deidentify_folder import deidentify_folder
    from flows.secret import SecretError, keys_from_env
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
    from tasks.zones import Release, all_identifier_files

    location = Release(release)
    if not location.fs.isdir(location.root):
        _fail(f"no release folder at {release}", 2)
    try:
        profile = load_profile(tuple(option) if option else DeidConfig().options)
    except ValueError as err:
        _fail(str(err), 2)
    matcher = None
    if work:
        lists = [p for w in work for p in all_identifier_files(w)]
        if not lists:
            _fail("no identifier lists under --work (they are written by radrepo run)", 2)
        matcher = gate.read_identifiers(lists)
    files, findings = gate.scan_release_files(location, matcher, profile)
    entries, manifest_findings = gate.check_manifests(location)
    findings += manifest_findings
    console.print(f"{entries} manifest entries of {len(location.complete_batches())} "
                  "complete batch(es) checked against their files", highlight=False)
    for finding in findings:
        console.print(str(finding), highlight=False, markup=False)
    console.print(f"{files} DICOM files checked, {len(findings)} finding(s)"
                  + ("" if matcher else " (structure only: give --work to search for "
                     "the sources' identifiers)"), highlight=False)
    if findings:
        raise typer.Exit(1)


release_app = typer.Typer(no_args_is_help=True,
                          help="Frozen releases: immutable, checksummed cuts of the catalog.")
app.add_typer(release_app, name="release")


@release_app.command("create")
def release_create(
    release: Annotated[str, typer.Argument(help="release folder or URL (s3://bucket/prefix)")],
    name: Annotated[str, typer.Argument(help="name of the new frozen release")],
    where: Annotated[str | None, typer.Option(
        help="SQL predicate over the `selection` columns (studies with their patient)")] = None,
    description: Annotated[str | None, typer.Option(help="what the release is for")] = None,
    requester: Annotated[str | None, typer.Option(help="who asks (default: the OS user)")] = (
        None),
) -> None:
    """Freeze the COMPLETE batches' studies that --where keeps into releases/NAME/ and point
    releases/current at it. An existing NAME is refused (exit 1)."""
    from tasks.cohort import PredicateError
    from tasks.frozen import FrozenReleaseError
    from tasks.frozen_release import create_release
    from tasks.zones import Release

    try:
        frozen = create_release(Release(release), name, where, description, requester)
    except PredicateError as err:
        _fail(str(err), 2)
    except FrozenReleaseError as err:
        _fail(str(err), 1)
    console.print(f"frozen release {frozen.name}: {frozen.patients} patients, {frozen.studies} "
                  f"studies, {frozen.files} files ({frozen.bytes} bytes), checksum "
                  f"sha256 {frozen.checksum}", highlight=False)


@release_app.command("list")
def release_list(
    release: Annotated[str, typer.Argument(help="release folder or URL (s3://bucket/prefix)")],
) -> None:
    """List the frozen releases, oldest first, with their checksums and predicates."""
    from tasks.frozen_release import list_releases
    from tasks.zones import Release

    rows = list_releases(Release(release))
    columns = ["name", "created", "studies", "files", "checksum", "where"]
    print_table(columns, [tuple(r[c] for c in columns) for r in rows])


@release_app.command("verify")
def release_verify(
    release: Annotated[str, typer.Argument(help="release folder or URL (s3://bucket/prefix)")],
    name: Annotated[str, typer.Argument(help="frozen release name, or current")],
) -> None:
    """Re-read a frozen release in full against its checksum and manifest; exit 1 on a
    difference."""
    from tasks.frozen import FrozenReleaseError, resolve
    from tasks.frozen_release import verify_release
    from tasks.zones import Release

    location = Release(release)
    try:
        name = resolve(location, name)
    except FrozenReleaseError as err:
        _fail(str(err), 2)
    problems = verify_release(location, name)
    for problem in problems:
        console.print(problem, highlight=False, markup=False)
    console.print(f"frozen release {name}: {len(problems)} problem(s)", highlight=False)
    if problems:
        raise typer.Exit(1)


@app.command()
def export(
    release: Annotated[str, typer.Argument(help="release folder or URL (s3://bucket/prefix)")],
    out: Annotated[Path, typer.Argument(help="new (or empty) folder to export into")],
    frozen: Annotated[str, typer.Option(
        "--release", help="frozen release to export from (a name, or current)")],
    purpose: Annotated[str, typer.Option(help="purpose or approval id, for the audit record")],
    where: Annotated[str, typer.Option(help="SQL predicate over the `selection` columns")] = (
        "true"),
    requester: Annotated[str | None, typer.Option(help="who asks (default: the OS user)")] = (
        None),
) -> None:
    """Export the studies --where keeps from a frozen release (DICOM, or object URLs for an
    S3 release, and catalog rows) and add the audit record to the release."""
    from tasks.cohort import PredicateError
    from tasks.export import export_cohort
    from tasks.frozen import FrozenReleaseError, ReleaseNotFound
    from tasks.zones import Release

    try:
        result = export_cohort(Release(release), frozen, where, purpose, out, requester)
    except (PredicateError, ReleaseNotFound) as err:
        _fail(str(err), 2)
    except FrozenReleaseError as err:
        _fail(str(err), 1)
    console.print(f"exported {result.studies} studies, {result.files} files ({result.bytes} "
                  f"bytes) from frozen release {result.release} into {out}; checksum sha256 "
                  f"{result.checksum}; audit record {result.record_id}", highlight=False)


@app.command()
def report(
    release: Annotated[str, typer.Argument(help="release folder or URL (s3://bucket/prefix)")],
) -> None:
    """Write the release report (reports/index.html): descriptive tables by site, plots, links
    to the contact sheets; one static page, viewable offline."""
    from tasks.report import write_report
    from tasks.zones import Release

    location = Release(release)
    if not location.complete_batches():
        _fail(f"no COMPLETE batch in {release}: nothing to report", 2)
    console.print(f"report: {location.url}/{write_report(location)}", highlight=False)


@app.command()
def push(
    config: Annotated[Path, typer.Argument(help="consortium YAML")],
    to: Annotated[str, typer.Option("--to", help="a research PACS named under research_pacs")],
) -> None:
    """Send the release's complete batches to a research PACS, resuming from its push ledger,
    then check each study's instance count there. Exit 1 if anything is missing."""
    from tasks.pacs import PacsUnavailable
    from tasks.pacs.push import PushError, PushLedger, ledger_path, push_release
    from tasks.zones import Release

    try:
        cfg = load_config(config)
    except ConfigError as err:
        _fail(str(err), 2)
    if to not in cfg.research_pacs:
        _fail(f"research_pacs: no research PACS named {to!r}", 2)
    try:
        ledger = PushLedger(ledger_path(cfg.work_dir, to))
    except PushError as err:
        _fail(str(err), 2)
    try:
        result = push_release(Release(cfg.release, cfg.release_storage_options),
                              cfg.research_pacs[to], ledger)
    except (PacsUnavailable, PushError) as err:
        _fail(str(err), 1)
    finally:
        ledger.close()
    console.print(f"{result.planned} instances in complete batches: {result.sent} sent, "
                  f"{result.already_sent} already there (push ledger), "
                  f"{sum(result.failed.values())} refused; {result.studies_verified} studies "
                  f"verified, {len(result.short_studies)} short", highlight=False)
    for reason, n in sorted(result.failed.items()):
        console.print(f"  {n} refused: {reason}", highlight=False, markup=False)
    for uid, (want, got) in result.short_studies.items():
        console.print(f"  study {uid}: {want} sent, the PACS holds {got} (will be resent)",
                      highlight=False, markup=False)
    if not result.ok:
        raise typer.Exit(1)


labels_app = typer.Typer(no_args_is_help=True,
                         help="The labelling loop: FHIR form, labels back in, agreement.")
app.add_typer(labels_app, name="labels")
SchemaOption = Annotated[Path | None, typer.Option(
    "--schema", help="label schema YAML (default: RICORD's, schemas/label_schema.yaml)")]


def _label_schema(path: Path | None):
    from schemas.label_schema import DEFAULT_LABEL_SCHEMA, load_label_schema

    try:
        return load_label_schema(path or DEFAULT_LABEL_SCHEMA)
    except ConfigError as err:
        _fail(str(err), 2)


@labels_app.command("form")
def labels_form(
    release: Annotated[str, typer.Argument(help="release folder or URL")],
    out: Annotated[Path, typer.Option(help="folder for questionnaire.json and responses/")],
    schema: SchemaOption = None,
) -> None:
    """Write the FHIR R4 Questionnaire and one pre-filled QuestionnaireResponse per study."""
    from tasks.catalog_query import NoCatalog, open_catalog
    from tasks.labels.form import write_form
    from tasks.zones import Release

    form_schema = _label_schema(schema)
    try:
        with open_catalog(Release(release)) as con:
            n = write_form(con, form_schema, out)
    except NoCatalog as err:
        _fail(str(err), 2)
    console.print(f"wrote {out / 'questionnaire.json'} and {n} pre-filled responses in "
                  f"{out / 'responses'}", highlight=False)


@labels_app.command("import")
def labels_import(
    config: Annotated[Path, typer.Argument(help="consortium YAML")],
    inputs: Annotated[list[Path], typer.Argument(
        help="QuestionnaireResponse JSON or Bundle files, CSV exports, DICOM SEG files, "
             "or folders of them")],
    schema: SchemaOption = None,
) -> None:
    """Check completed labels and segmentations against the form and the catalog and append
    them to the release. Exit 1 if anything was rejected (the rest is imported)."""
    from flows.secret import SecretError, keys_from_env
    from tasks.catalog_query import NoCatalog, open_catalog
    from tasks.deidentify.profile import load_profile
    from tasks.labels.importer import LabelChecker, published_studies
    from tasks.labels.intake import import_inputs
    from tasks.publish import refresh_catalog_db
    from tasks.verify import read_identifiers
    from tasks.zones import Release, all_identifier_files

    form_schema = _label_schema(schema)
    try:
        cfg = load_config(config)
        keys = keys_from_env(cfg.secret_env)
    except (ConfigError, SecretError) as err:
        _fail(str(err), 2)
    missing = [str(p) for p in inputs if not p.exists()]
    if missing:
        _fail(f"no such input: {missing[0]}", 2)
    lists = all_identifier_files(cfg.work_dir)
    identifiers = read_identifiers(lists) if lists else None
    location = Release(cfg.release, cfg.release_storage_options)
    try:
        with open_catalog(location) as con:
            checker = LabelChecker(form_schema, published_studies(con), keys, identifiers)
            result = import_inputs(location, con, checker, load_profile(cfg.deid.options),
                                   inputs)
    except NoCatalog as err:
        _fail(str(err), 2)
    refresh_catalog_db(location, cfg.work_dir)
    console.print(f"{result.labels} labels imported, {result.already_imported} already there, "
                  f"{result.segmentations} segmentations published, {len(result.rejected)} "
                  "rejected", highlight=False)
    for rejection in result.rejected:
        console.print(f"  rejected: {rejection}", highlight=False, markup=False)
    if result.rejected:
        raise typer.Exit(1)


@labels_app.command("agreement")
def labels_agreement(
    release: Annotated[str, typer.Argument(help="release folder or URL")],
    schema: SchemaOption = None,
) -> None:
    """Readers' agreement per site and item (Fleiss' kappa), also written to
    reports/labels/agreement.csv in the release."""
    from tasks.catalog_query import NoCatalog, open_catalog
    from tasks.labels.agreement import agreement_csv, agreement_table
    from tasks.zones import Release

    form_schema = _label_schema(schema)
    location = Release(release)
    try:
        with open_catalog(location) as con:
            table = agreement_table(con, form_schema)
    except NoCatalog as err:
        _fail(str(err), 2)
    location.write_bytes("reports/labels/agreement.csv", agreement_csv(table))
    print_table(table.column_names, [tuple(f"{v:.4f}" if isinstance(v, float) else v
                                           for v in r.values()) for r in table.to_pylist()])
    console.print(f"written to {location.url}/reports/labels/agreement.csv", highlight=False)


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
    from synth import demo_config, synthesize

    folder = folder.resolve()
    truth = synthesize(folder / "sources", sites=3, patients=patients, seed=seed)
    _demo_secret(folder / "work")
    config_path = folder / "radrepo.yaml"
    config_path.write_text(yaml.safe_dump(demo_config(Path("sources"), truth), sort_keys=False))
    console.print(f"config: {config_path}", highlight=False)
    from flows.secret import SecretError

    try:
        summaries = _run_nightly(load_config(config_path), config_path, None, None, False)
    except (ConfigError, SecretError) as err:
        _fail(str(err), 2)
    print_summaries(summaries)
    import duckdb

    release = folder / "release"
    with duckdb.connect(str(release / "catalog.duckdb"), read_only=True) as con:
        sql = ("SELECT site_id, status, count(*) AS studies, sum(n_instances) AS files, "
               "sum(n_excluded) AS files_excluded FROM studies GROUP BY ALL ORDER BY ALL")
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
