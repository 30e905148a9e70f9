"""Start-of-run repair and the site lock: what makes a plain rerun finish any crash.

COMPLETE is a batch's one commit point. Everything after it (``catalog.duckdb``, dropping a
superseded version, the ingest ledger, pending and staging cleanup) is derived state, redone
here from the set of COMPLETE batches under the site's lock, before discovery looks at the
ledger. Batches due again (a republish that was cut short, a batch under a key the release no
longer holds) are named here so the run takes them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pyarrow.parquet as pq

from schemas.config import RadrepoConfig
from schemas.pipeline import SOURCE_INDEX
from tasks import discovery, ledger, site_lock
from tasks import publish as publishing
from tasks.kill_point import kill_point
from tasks.zones import CATALOG_DB, KEY_CHECK, TEMPORARY, Release, WorkDir

CATALOG_LOCK = "release catalog"


@contextmanager
def holding_site(config: RadrepoConfig, release: Release, site_id: str,
                 run_id: str) -> Iterator[None]:
    """One writer per site: the work folder's lock, and a lease in an object-store release."""
    lease = {} if release.local else {
        "lease_fs": release.fs, "lease_path": release.path(f"locks/{site_id}.lease"),
        "lease_seconds": config.lease_seconds}
    with site_lock.hold(config.work_dir, f"site {site_id}", run_id, config.lock_wait_seconds,
                        **lease):
        yield


def refresh_catalog(config: RadrepoConfig, release: Release, run_id: str) -> bool:
    """Rebuild ``catalog.duckdb`` if it does not match the COMPLETE batches (one at a time)."""
    with site_lock.hold(config.work_dir, CATALOG_LOCK, run_id, config.lock_wait_seconds):
        release.remove_temporary(f".{CATALOG_DB}{TEMPORARY}*")
        return publishing.refresh_catalog_db(release, config.work_dir)


def mark_republish(work_dir: str, site_id: str, batch_id: str) -> None:
    """Remember that a complete batch is being republished, so a rerun finishes it."""
    marker = WorkDir(work_dir, site_id).republish(batch_id)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()


def finish_republish(work_dir: str, site_id: str, batch_id: str) -> None:
    WorkDir(work_dir, site_id).republish(batch_id).unlink(missing_ok=True)


def batches_due(config: RadrepoConfig, release: Release, site_id: str) -> list[str]:
    """Complete batches of a site to publish again: a republish cut short, or a batch whose
    marker names another key than the release's (a rekey not yet done for it)."""
    due = WorkDir(config.work_dir, site_id).republishing()
    recorded = release.read_bytes(KEY_CHECK)
    key = recorded.decode("ascii", "replace").strip() if recorded else None
    complete = [b for s, b in release.complete_batches() if s == site_id]
    for batch_id in complete:
        version = release.current_version(site_id, batch_id)
        if key and version is not None and version.key_check not in (None, key):
            due.add(batch_id)
    return sorted(due & set(complete))


def _settle_ingest(config: RadrepoConfig, site_id: str, batch_id: str) -> None:
    """Record a complete batch's objects in the ledger, then drop its staging and pending."""
    pending = ledger.load_pending(config.work_dir, site_id, batch_id)
    if pending is None:
        return
    index_path = WorkDir(config.work_dir, site_id).index(batch_id)
    index = pq.read_table(index_path, schema=SOURCE_INDEX) if index_path.exists() else (
        SOURCE_INDEX.empty_table())
    discovery.mark_batch_published(config.work_dir, site_id, batch_id)
    ledger.record_ingested(pending, index, config.work_dir)
    kill_point("after:ledger")
    ledger.clear_staging(pending, config.work_dir)
    ledger.forget_pending(config.work_dir, site_id, batch_id)


def finish_batch(config: RadrepoConfig, release: Release, site_id: str,
                 batch_id: str, run_id: str) -> None:
    """What follows a batch's COMPLETE, each step idempotent: catalog, superseded version,
    ledger, staging and pending."""
    refresh_catalog(config, release, run_id)
    kill_point("after:catalog")
    publishing.drop_superseded(release, site_id, batch_id)
    kill_point("after:superseded")
    _settle_ingest(config, site_id, batch_id)
    finish_republish(config.work_dir, site_id, batch_id)


def repair_site(config: RadrepoConfig, release: Release, site_id: str,
                run_id: str) -> list[str]:
    """Finish what a killed run left after COMPLETE at a site; return the batches due again.

    Leftover temporary files in the site's batch folders go, the catalog is rebuilt if it
    does not match the COMPLETE batches, then every complete batch loses what only a
    superseded version holds and has its ingest settled (no-ops when already done)."""
    with holding_site(config, release, site_id, run_id):
        release.remove_temporary(f"batches/{site_id}/*/*{TEMPORARY}*")
        refresh_catalog(config, release, run_id)
        for s, batch_id in release.complete_batches():
            if s == site_id:
                publishing.drop_superseded(release, site_id, batch_id)
                _settle_ingest(config, site_id, batch_id)
        return batches_due(config, release, site_id)
