"""The nightly flow (every batch not yet published, one ``site_batch`` each) and the backfill
flow (chosen batches again, on purpose)."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import date, datetime
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows import recovery
from flows.cluster import dask_client
from flows.secret import check_release_key, keys_from_env
from flows.site_batch import site_batch
from schemas.config import RadrepoConfig, load_config
from tasks import ingest
from tasks.pacs import PacsUnavailable
from tasks.publish import Release


def _run_batches(config: RadrepoConfig, sites: list[str] | None,
                 wanted: Callable[[str], bool], force: bool,
                 window: tuple[date | None, date | None] | None = None) -> list[dict[str, Any]]:
    """Discover each chosen site's batches, keep the wanted ones, run ``site_batch`` on each.

    A PACS site is asked for the studies in ``window`` when one is given, and all it
    returns is wanted. A PACS that cannot be reached does not hold up the other sites: the
    run ends with PacsUnavailable naming it once their batches are done."""
    logger = get_run_logger()
    release = Release(config.release, config.release_storage_options)
    check_release_key(release, keys_from_env(config.secret_env), config.secret_env)
    chosen = [s for s in config.sites if not sites or s.site_id in sites]
    plan: list[tuple[str, str]] = []
    unreachable: list[str] = []
    for site in chosen:
        due = recovery.repair_site(config, release, site.site_id, str(flow_run.id or "local"))
        plan += [(site.site_id, b) for b in due]  # a republish cut short, or a rekey
        published = set() if force else {b for s, b in release.complete_batches()
                                         if s == site.site_id}
        try:
            found = ingest.discover_batches(
                site, config.work_dir, published, window,
                notify=lambda note, site_id=site.site_id: logger.warning(
                    "site %s: %s", site_id, note))
        except PacsUnavailable as err:
            logger.error("site %s: %s", site.site_id, err)
            unreachable.append(f"site {site.site_id}: {err}")
            continue
        for batch in found:
            if (wanted(batch.batch_id) or (batch.pacs and window is not None)) and (
                    site.site_id, batch.batch_id) not in plan:
                ingest.save_pending(batch, config.work_dir)
                if force:  # a plain rerun finishes a republish this run does not
                    recovery.mark_republish(config.work_dir, site.site_id, batch.batch_id)
                plan.append((site.site_id, batch.batch_id))
    logger.info("%d batch(es) to run across %d site(s)", len(plan), len(chosen))
    summaries = []
    if plan:
        with dask_client(config.dask) as client:
            for site_id, batch_id in plan:
                summaries.append(site_batch(config, site_id, batch_id, force=force,
                                            scheduler=client.scheduler.address))
    if unreachable:
        raise PacsUnavailable("; ".join(unreachable))
    return summaries


@flow(name="nightly")
def nightly(config: RadrepoConfig, sites: list[str] | None = None,
            batches: list[str] | None = None, force: bool = False) -> list[dict[str, Any]]:
    """Run every new batch of every (or the named) site; return one summary per batch."""
    return _run_batches(config, sites, lambda b: not batches or b in batches, force)


def batch_date(batch_id: str) -> date | None:
    """The date a batch id carries (``CXR-UPDATE-20200523`` -> 2020-05-23), if any."""
    found = re.search(r"(?<!\d)(\d{8})(?!\d)", batch_id)
    try:
        return datetime.strptime(found.group(1), "%Y%m%d").date() if found else None
    except ValueError:
        return None


@flow(name="backfill")
def backfill(config: RadrepoConfig, sites: list[str] | None = None,
             batches: list[str] | None = None, since: date | None = None,
             until: date | None = None) -> list[dict[str, Any]]:
    """Run the named batches, or those whose date lies in ``since..until``, again on purpose.

    Published batches are redone; identical output is not rewritten and each run adds a run
    record. File batches whose id carries no date are only taken by name; PACS sites are
    asked again for the studies dated in the window.
    """
    if not batches and since is None and until is None:
        raise ValueError("backfill needs batch ids or a date window (since/until)")

    def wanted(batch_id: str) -> bool:
        if batches and batch_id in batches:
            return True
        day = batch_date(batch_id)
        return (since is not None or until is not None) and day is not None and (
            since is None or day >= since) and (until is None or day <= until)

    window = (since, until) if since is not None or until is not None else None
    return _run_batches(config, sites, wanted, force=True, window=window)


@flow(name="nightly-from-file")
def nightly_from_file(config_path: str, sites: list[str] | None = None,
                      batches: list[str] | None = None) -> list[dict[str, Any]]:
    """``nightly`` over a consortium YAML read at run time: the entry point for deployments."""
    return nightly(load_config(Path(config_path)), sites, batches)
