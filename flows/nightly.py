"""The nightly flow: for each site, every batch not yet published, one ``site_batch`` each."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows.cluster import dask_client
from flows.secret import keys_from_env
from flows.site_batch import site_batch
from schemas.config import RadrepoConfig, load_config
from tasks import ingest
from tasks.publish import Release


@flow(name="nightly")
def nightly(config: RadrepoConfig, sites: list[str] | None = None,
            batches: list[str] | None = None, force: bool = False) -> list[dict[str, Any]]:
    """Run every new batch of every (or the named) site; return one summary per batch."""
    logger = get_run_logger()
    keys_from_env(config.secret_env)
    release = Release(config.release)
    chosen = [s for s in config.sites if not sites or s.site_id in sites]
    plan: list[tuple[str, str]] = []
    for site in chosen:
        published = set() if force else {b for s, b in release.complete_batches()
                                         if s == site.site_id}
        for batch in ingest.discover_batches(site, config.work_dir, published):
            if batches and batch.batch_id not in batches:
                continue
            ingest.save_pending(batch, config.work_dir)
            plan.append((site.site_id, batch.batch_id))
    logger.info("%d batch(es) to run across %d site(s)", len(plan), len(chosen))
    if not plan:
        return []
    summaries = []
    with dask_client(config.dask) as client:
        for site_id, batch_id in plan:
            summaries.append(site_batch(config, site_id, batch_id, force=force,
                                        scheduler=client.scheduler.address))
    return summaries


@flow(name="nightly-from-file")
def nightly_from_file(config_path: str, sites: list[str] | None = None,
                      batches: list[str] | None = None) -> list[dict[str, Any]]:
    """``nightly`` over a consortium YAML read at run time: the entry point for deployments."""
    return nightly(load_config(Path(config_path)), sites, batches)
