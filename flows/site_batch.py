"""The per-batch flow: ingest -> deidentify -> qc -> clinical_join -> dedupe -> publish.

Only wiring lives here; each task is a thin wrapper over a plain function in ``tasks/``.
Flow parameters carry ids and configuration, never a source path inside a batch or a
header value, because Prefect stores parameters on its server.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
from prefect.utilities.annotations import quote

from flows import progress, recovery
from flows.batch_report import STEP_SECONDS, publish_report, timed
from flows.cluster import dask_client
from flows.one_pass import BatchPass, PassContext, batch_context, read_batch, work_units
from flows.secret import check_release_key, keys_from_env
from schemas.catalog import CLINICAL
from schemas.config import RadrepoConfig, SourceConfig, load_config
from schemas.pipeline import DEIDENTIFIED_CLINICAL
from tasks import catalog, clinical, dedupe, discovery, ledger, qc, verify
from tasks import publish as publishing
from tasks.contact_sheet import contact_sheet
from tasks.deidentify import (
    DeidContext,
    DeidentifiedClinical,
    deidentify_clinical,
    load_remap,
)
from tasks.deidentify.keys import PseudonymKeys
from tasks.deidentify.profile import load_profile
from tasks.deidentify.text import IdentifierMatcher
from tasks.indexing import WorkUnit
from tasks.kill_point import kill_point
from tasks.ledger import BatchRef
from tasks.zones import Release


def step(name: str) -> Callable:
    """A Prefect task, not cached or persisted, whose seconds go on the batch's clock. Its
    arguments are handed over quoted: Prefect would otherwise walk every list, dict and
    dataclass of them looking for futures (seconds on a batch of ten thousand files)."""

    def decorate(fn: Callable) -> Callable:
        prefect_task = task(name=name, cache_policy=NO_CACHE, persist_result=False)(
            timed(name, fn))

        @functools.wraps(fn)
        def call(*args, **kwargs):
            return prefect_task(*map(quote, args), **{k: quote(v) for k, v in kwargs.items()})

        call.fn = fn
        return call

    return decorate


class BatchNotFound(LookupError):
    """The named batch is not in the source (or is still IN-PROGRESS)."""


@step(name="ingest")
def ingest_step(batch: BatchRef, source: SourceConfig, work_dir: str) -> list[WorkUnit]:
    """The batch's work units: a PACS batch's studies retrieved whole, else the source's
    objects grouped for the one pass (nothing is opened here)."""
    return work_units(batch, source, work_dir)


@step(name="deidentify")
def deidentify_step(units: list[WorkUnit], ctx: PassContext, scheduler: str | None,
                    config: RadrepoConfig, site_id: str, batch_id: str) -> BatchPass:
    """The one pass over every unit, on the Dask cluster; the batch's index, quarantine
    listing and identifiers are kept in the private zone."""
    bars = progress.current()
    if bars:
        bars.files_found(sum(len(u.objects) for u in units))
    with dask_client(config.dask, scheduler) as client:
        done = read_batch(units, ctx, client, bars.files_done if bars else None)
    ledger.write_batch_records(config.work_dir, site_id, batch_id, done.index, done.quarantine,
                               done.identifiers)
    return done


@step(name="deidentify_clinical")
def deidentify_clinical_step(config: RadrepoConfig, site_id: str, keys,
                             remap) -> DeidentifiedClinical:
    site = config.site(site_id)
    if site.clinical is None:
        return DeidentifiedClinical(DEIDENTIFIED_CLINICAL.empty_table(), CLINICAL.empty_table())
    return deidentify_clinical(site.clinical.path, site.clinical, keys, site_id, remap)


@step(name="qc")
def qc_step(deidentified: pa.Table, params: dict) -> qc.QcResult:
    return qc.evaluate_qc(deidentified, params)


@step(name="clinical_join")
def clinical_join_step(deidentified: pa.Table, patients: pa.Table,
                       windows: dict) -> clinical.ClinicalJoin:
    return clinical.join_clinical(deidentified, patients, windows)


@step(name="dedupe")
def dedupe_step(deidentified: pa.Table, qc_result: qc.QcResult, joined: clinical.ClinicalJoin,
                release: Release, site_id: str, batch_id: str,
                merges: list[dict]) -> dedupe.DedupeResult:
    """Copies of other files, among what QC and the inclusion window keep."""
    published = publishing.read_published(release, "instances", site_id, batch_id,
                                          ["sop_uid", "sha256", "study_uid", "pixel_sha256"])
    studies = publishing.read_published(release, "studies", site_id, batch_id,
                                        ["study_uid", "patient_id", "study_date", "study_time"])
    return dedupe.find_duplicates(deidentified,
                                  set(qc_result.excluded) | set(joined.files_outside),
                                  published, batch_id,
                                  dedupe.published_images(published, studies), merges)


@step(name="decide")
def decide_step(index: pa.Table, deidentified: pa.Table, qc_result: qc.QcResult,
                joined: clinical.ClinicalJoin, dups: dedupe.DedupeResult) -> pa.Table:
    return catalog.decide(index, deidentified, qc_result.excluded, joined.files_outside,
                          dups.excluded)


@step(name="catalog")
def catalog_step(site_id: str, siteid: str, deidentified: pa.Table, decisions: pa.Table,
                 joined: clinical.ClinicalJoin, emr: DeidentifiedClinical, qc_result: qc.QcResult,
                 dups: dedupe.DedupeResult, release: Release,
                 batch_id: str) -> catalog.CatalogBatch:
    known = {r["patient_id"] for r in publishing.read_published(
        release, "patients", site_id, batch_id, ["patient_id"]).to_pylist()}
    return catalog.assemble_catalog(
        site_id=site_id, siteid=siteid, deidentified=deidentified, decisions=decisions,
        links=joined.links, clinical_patients=emr.patients, measurements=emr.measurements,
        qc_outcomes=pa.concat_tables([qc_result.outcomes, joined.outcomes]),
        duplicates=dups.rows, known_patients=known)


@step(name="run_record")
def run_record_step(run_id: str, options: tuple[str, ...], started: datetime,
                    counts: dict) -> pa.Table:
    return catalog.run_row(run_id, load_profile(options).method_description, started, counts)


@step(name="contact_sheet")
def contact_sheet_step(site_id: str, batch_id: str, assembled: catalog.CatalogBatch,
                       thumbnails: dict[str, bytes]) -> dict[str, bytes]:
    return contact_sheet(site_id, batch_id, assembled.tables["series"],
                         assembled.tables["qc"], thumbnails)


@step(name="verify")
def verify_step(work_dir: str, site_id: str, assembled: catalog.CatalogBatch, run: pa.Table,
                reports: dict[str, bytes], batch_id: str) -> int:
    """The gate on what the files do not carry: fail the batch if any identifier seen at the
    site (in this batch or another) is in a release path, a catalog row or a report. The
    files themselves were gated by the one pass while it held their bytes."""
    matcher = IdentifierMatcher(ledger.site_identifiers(work_dir, site_id))
    findings = verify.scan_names([f"batch {batch_id}"], matcher)
    if findings and discovery.withdraw_batch_id(work_dir, site_id, batch_id):
        raise verify.LeakFound(f"site {site_id}: a batch id matches an identifier met at the "
                               "site; its folder is taken under an opaque id from the next run")
    for relative, data in reports.items():
        findings += verify.scan_names([relative], matcher)
        if relative.endswith(".html"):
            findings += verify.scan_report(relative, data, matcher)
    findings += verify.scan_names([f[1] for f in assembled.files], matcher)
    for name, table in {**assembled.tables, "runs": run}.items():
        findings += verify.scan_table(name, table, matcher)
    verify.raise_if_found(findings)
    return len(assembled.files)


@step(name="publish")
def publish_step(release: Release, site_id: str, batch_id: str,
                 assembled: catalog.CatalogBatch, run: pa.Table, run_id: str,
                 reports: dict[str, bytes], key_check: str) -> publishing.PublishResult:
    return publishing.publish_batch(release, site_id, batch_id, assembled.tables,
                                    assembled.files, run, run_id, reports, key_check)


@contextmanager
def without_heartbeat() -> Iterator[None]:
    """Flow runs started meanwhile send no heartbeats of their own, for Prefect's heartbeat
    thread holds every flow run's end for up to a second: a ``site_batch`` runs inside its
    caller's process (a deployment's run keeps beating), and a command-line run has no worker
    to watch it (a killed one is repaired by the next run, whatever Prefect says of it)."""
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


def find_batch(config: RadrepoConfig, site_id: str, batch_id: str) -> BatchRef:
    """The batch named ``batch_id``: as discovery left it, or found again in the source."""
    pending = ledger.load_pending(config.work_dir, site_id, batch_id)
    if pending is not None:
        return pending
    recorded = discovery.batch_from_ledger(config.site(site_id), config.work_dir, batch_id)
    if recorded is not None:
        return recorded
    for batch in discovery.discover_batches(config.site(site_id), config.work_dir, set()):
        if batch.batch_id == batch_id:
            return batch
    raise BatchNotFound(f"site {site_id}: no batch {batch_id!r} in the source "
                        "(unknown, or still IN-PROGRESS)")


@flow(name="site_batch", persist_result=False)
def site_batch(config: RadrepoConfig | str, site_id: str, batch_id: str, force: bool = False,
               scheduler: str | None = None) -> dict[str, Any]:
    """Take one batch of one site from its source to a published, COMPLETE release batch,
    holding the site's lock (one writer per site).

    ``config`` is a parsed configuration or the path of its file (what flow runs record)."""
    if isinstance(config, str):
        config = load_config(Path(config))
    release = Release(config.release, config.release_storage_options)
    started = datetime.now(UTC)
    STEP_SECONDS.set({})
    keys = keys_from_env(config.secret_env)
    key_check = check_release_key(release, keys, config.secret_env)
    run_id = str(flow_run.id or f"local-{started:%Y%m%dT%H%M%S}")
    with recovery.holding_site(config, release, site_id, run_id):
        return _take_batch(config, release, keys, key_check, site_id, batch_id, force,
                           scheduler, run_id, started)


def _take_batch(config: RadrepoConfig, release: Release, keys: PseudonymKeys,
                key_check: str, site_id: str, batch_id: str, force: bool,
                scheduler: str | None, run_id: str, started: datetime) -> dict[str, Any]:
    """site_batch's work, under the site's lock: whether the batch is due is decided here."""
    logger = get_run_logger()
    complete = release.is_complete(site_id, batch_id)
    if complete and not force and batch_id not in recovery.batches_due(config, release,
                                                                       site_id):
        logger.info("site %s batch %s is already published; nothing to do", site_id, batch_id)
        return {"site_id": site_id, "batch_id": batch_id, "status": "already published"}
    if complete:  # a republish: a rerun finishes it if this one is cut short
        recovery.mark_republish(config.work_dir, site_id, batch_id)
    site = config.site(site_id)
    batch = find_batch(config, site_id, batch_id)
    ledger.save_pending(batch, config.work_dir)

    units = ingest_step(batch, site.source, config.work_dir)
    kill_point("after:ingest")
    remap = load_remap(site.id_remap)
    ctx = batch_context(config.work_dir, site_id, batch_id,
                        DeidContext(keys=keys, site_id=site_id,
                                    options=tuple(config.deid.options), remap=remap),
                        config.split_exam_minutes)
    done = deidentify_step(units, ctx, scheduler, config, site_id, batch_id)
    kill_point("after:deidentify")
    deidentified = done.deidentified
    emr = deidentify_clinical_step(config, site_id, keys, remap)

    qc_result = qc_step(deidentified, config.qc_params(site_id))
    joined = clinical_join_step(deidentified, emr.patients, config.inclusion_windows)
    dups = dedupe_step(deidentified, qc_result, joined, release, site_id, batch_id, done.merges)
    decisions = decide_step(done.index, deidentified, qc_result, joined, dups)
    assembled = catalog_step(site_id, keys.siteid(site_id), deidentified, decisions, joined,
                             emr, qc_result, dups, release, batch_id)
    counts = {**assembled.counts, "skipped_already_ingested": batch.already_ingested,
              "clinical_rows_read": emr.rows_read,
              "clinical_rows_skipped": dict(sorted(emr.rows_skipped.items()))}
    run = run_record_step(run_id, tuple(config.deid.options), started, counts)
    reports = contact_sheet_step(site_id, batch_id, assembled, done.thumbnails)
    verify_step(config.work_dir, site_id, assembled, run, reports, batch_id)
    kill_point("after:verify")
    result = publish_step(release, site_id, batch_id, assembled, run, run_id, reports,
                          key_check)
    recovery.finish_batch(config, release, site_id, batch_id, run_id)
    if progress.current():
        progress.current().published()
    publish_report(site_id, batch_id, counts, STEP_SECONDS.get() or {}, sorted(reports),
                   (datetime.now(UTC) - started).total_seconds())
    logger.info("site %s batch %s: %d files in, %d published, %d excluded, %d quarantined",
                site_id, batch_id, counts["files_in"], counts["published"], counts["excluded"],
                counts["quarantined"])
    return {"site_id": site_id, "batch_id": batch_id, "status": "published", **counts,
            "files_written": result.files_written, "files_unchanged": result.files_unchanged}
