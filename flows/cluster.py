"""The Dask cluster a run fans de-identification out on: an existing scheduler or a local one."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import dask
from distributed import Client, LocalCluster

from schemas.config import DaskConfig


def local_cluster(workers: int, threads_per_worker: int = 1,
                  scratch: str | Path | None = None) -> LocalCluster:
    """A cluster of worker processes on this machine that listens on 127.0.0.1 only (its
    HTTP routes on a free loopback port, no dashboard); workers spill into ``scratch``."""
    return LocalCluster(
        n_workers=workers,
        threads_per_worker=threads_per_worker,
        processes=True,
        host="127.0.0.1",
        dashboard_address="127.0.0.1:0",
        scheduler_kwargs={"dashboard": False},
        silence_logs=logging.WARNING,
        **({"local_directory": str(scratch)} if scratch else {}),
    )


@contextmanager
def scratch_in(folder: str | Path | None) -> Iterator[None]:
    """Dask's ``temporary-directory`` set to ``folder`` (created, private) meanwhile; the
    worker processes a cluster starts inside take the setting with them."""
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True, mode=0o700)
    with dask.config.set({"temporary-directory": str(folder)}) if folder else nullcontext():
        yield


@contextmanager
def dask_client(cfg: DaskConfig, scheduler: str | None = None) -> Iterator[Client]:
    """A client on ``scheduler`` (or the configured one); else a LocalCluster on 127.0.0.1
    whose spill and scratch space is ``cfg.local_directory`` (the work folder's)."""
    address = scheduler or cfg.scheduler
    if address:
        with Client(address) as client:
            yield client
        return
    with scratch_in(cfg.local_directory), \
            local_cluster(cfg.workers, cfg.threads_per_worker, cfg.local_directory) as cluster, \
            Client(cluster) as client:
        yield client
