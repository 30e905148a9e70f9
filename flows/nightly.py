"""The nightly flow (every batch not yet published, sites side by side, one ``site_batch`` per
batch) and the backfill flow (chosen batches again, on purpose).

Both flows take the path of the consortium YAML and ids only, and read the configuration when
they run: that is all a deployment stores and a worker passes on. Callers holding a parsed
configuration use ``nightly``/``backfill``, which write it to the work folder first.
"""

from __future__ import annotations

import contextvars
import hashlib
import os
import re
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from datetime import date, datetime
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows import progress, recovery
from flows.cluster import local_cluster
from flows.secret import check_release_key, keys_from_env
from flows.site_batch import site_batch, without_heartbeat
from schemas.config import DaskConfig, RadrepoConfig, load_config
from tasks import discovery, ledger
from tasks.zones import Release

Wanted = Callable[[str], bool]
Window = tuple[date | None, date | None] | None
FAILED = "failed"


class SitesFailed(RuntimeError):
    """One or more sites failed; the others went on. Carries every site's summary rows, and
    each failed site's exception (in this process only: its traceback is for the private
    log, never for a message or Prefect's state)."""

    def __init__(self, summaries: list[dict[str, Any]],
                 errors: dict[str, BaseException] | None = None):
        self.summaries = summaries
        self.lines = [s["error"] for s in summaries if s["status"] == FAILED]
        self.errors = dict(errors or {})
        super().__init__("; ".join(self.lines))


class SharedCluster:
    """The run's Dask scheduler address: the configured one, or a local cluster started the
    first time a site needs it and stopped when the run ends."""

    def __init__(self, cfg: DaskConfig, stack: ExitStack):
        self._cfg, self._stack, self._lock = cfg, stack, threading.Lock()
        self._address: str | None = cfg.scheduler

    def address(self) -> str:
        with self._lock:
            if self._address is None:
                cluster = self._stack.enter_context(
                    local_cluster(self._cfg.workers, self._cfg.threads_per_worker))
                self._address = cluster.scheduler_address
            return self._address


def failure_line(site_id: str, err: Exception) -> str:
    """What went wrong at a site, starting with ``site SITE_ID:``. radrepo's own exceptions are
    written to quote no identifier; anything else is named by its type only."""
    own = type(err).__module__.split(".")[0] in {"tasks", "flows", "schemas"}
    message = str(err) if own and str(err) else f"failed ({type(err).__name__})"
    return message if message.startswith(f"site {site_id}") else f"site {site_id}: {message}"


def run_site(config_path: str, config: RadrepoConfig, site_id: str, wanted: Wanted,
             force: bool, window: Window, cluster: SharedCluster) -> list[dict[str, Any]]:
    """One site's share of a run: repair what a crash left (recovery.repair_site), discover
    its batches, keep the wanted ones, run ``site_batch`` on each in order. Raises on the
    first batch that fails."""
    logger = get_run_logger()
    site = config.site(site_id)
    release = Release(config.release, config.release_storage_options)
    plan = recovery.repair_site(config, release, site_id, str(flow_run.id or "local"))
    published = set() if force else {b for s, b in release.complete_batches() if s == site_id}
    found = discovery.discover_batches(
        site, config.work_dir, published, window,
        notify=lambda note: logger.warning("site %s: %s", site_id, note))
    for batch in found:  # after the republishes cut short and the rekeys repair_site found
        if (wanted(batch.batch_id) or (batch.pacs and window is not None)) and (
                batch.batch_id not in plan):
            ledger.save_pending(batch, config.work_dir)
            if force:  # a plain rerun finishes a republish this run does not
                recovery.mark_republish(config.work_dir, site_id, batch.batch_id)
            plan.append(batch.batch_id)
    if progress.current():
        progress.current().discovered(len(plan))
    summaries = []
    with without_heartbeat():
        for batch_id in plan:
            summaries.append(site_batch.with_options(flow_run_name=f"{site_id}/{batch_id}")(
                config_path, site_id, batch_id, force=force, scheduler=cluster.address()))
    return summaries


def _run_sites(config_path: str, sites: list[str] | None, wanted: Wanted, force: bool,
               window: Window = None) -> list[dict[str, Any]]:
    """Run each chosen site, at most ``max_parallel_sites`` at once; a site that fails ends
    with a failed row and the others go on. Raises SitesFailed after all sites if any did."""
    logger = get_run_logger()
    config = load_config(Path(config_path))
    release = Release(config.release, config.release_storage_options)
    check_release_key(release, keys_from_env(config.secret_env), config.secret_env)
    chosen = [s.site_id for s in config.sites if not sites or s.site_id in sites]

    errors: dict[str, BaseException] = {}

    def one_site(site_id: str, cluster: SharedCluster) -> list[dict[str, Any]]:
        try:
            return run_site(config_path, config, site_id, wanted, force, window, cluster)
        except Exception as err:  # noqa: BLE001 - a broken site must not stop the others
            line = failure_line(site_id, err)
            logger.error(line)
            errors[site_id] = err
            return [{"site_id": site_id, "batch_id": "", "status": FAILED, "error": line}]

    with ExitStack() as stack, ThreadPoolExecutor(
            max_workers=min(config.max_parallel_sites, len(chosen)) or 1,
            thread_name_prefix="site") as pool:
        cluster = SharedCluster(config.dask, stack)
        futures = [pool.submit(contextvars.copy_context().run, one_site, site_id, cluster)
                   for site_id in chosen]
        summaries = [row for future in futures for row in future.result()]
    done = sum(s["status"] != FAILED for s in summaries)
    logger.info("%d batch(es) run across %d site(s)", done, len(chosen))
    if any(s["status"] == FAILED for s in summaries):
        raise SitesFailed(summaries, errors)
    return summaries


def batch_date(batch_id: str) -> date | None:
    """The date a batch id carries (``CXR-UPDATE-20200523`` -> 2020-05-23), if any."""
    found = re.search(r"(?<!\d)(\d{8})(?!\d)", batch_id)
    try:
        return datetime.strptime(found.group(1), "%Y%m%d").date() if found else None
    except ValueError:
        return None


@flow(name="nightly", persist_result=False)
def nightly_flow(config_path: str, sites: list[str] | None = None,
                 batches: list[str] | None = None, force: bool = False) -> list[dict[str, Any]]:
    """Run every new batch of every (or the named) site; return one summary per batch."""
    return _run_sites(config_path, sites, lambda b: not batches or b in batches, force)


@flow(name="backfill", persist_result=False)
def backfill_flow(config_path: str, sites: list[str] | None = None,
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
    return _run_sites(config_path, sites, wanted, force=True, window=window)


def config_file(config: RadrepoConfig | str | Path) -> str:
    """The absolute path of a configuration file for ``config``: the file itself, or for a
    parsed configuration a copy written (once, by content) to the private work folder."""
    if not isinstance(config, RadrepoConfig):
        return str(Path(config).resolve())
    text = yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)  # order is meaning
    path = Path(config.work_dir) / "configs" / (
        hashlib.sha256(text.encode()).hexdigest()[:16] + ".yaml")
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        partial.write_text(text)
        partial.chmod(0o600)
        partial.replace(path)
    return str(path)


def nightly(config: RadrepoConfig | str | Path, sites: list[str] | None = None,
            batches: list[str] | None = None, force: bool = False) -> list[dict[str, Any]]:
    """The nightly flow over a parsed configuration or a configuration file."""
    return nightly_flow(config_file(config), sites, batches, force)


def backfill(config: RadrepoConfig | str | Path, sites: list[str] | None = None,
             batches: list[str] | None = None, since: date | None = None,
             until: date | None = None) -> list[dict[str, Any]]:
    """The backfill flow over a parsed configuration or a configuration file."""
    return backfill_flow(config_file(config), sites, batches, since, until)
