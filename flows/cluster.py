"""The Dask cluster a run fans de-identification out on: an existing scheduler or a local one."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from distributed import Client, LocalCluster

from schemas.config import DaskConfig


def local_cluster(workers: int, threads_per_worker: int = 1) -> LocalCluster:
    """A cluster of worker processes on this machine that listens on 127.0.0.1 only (its
    HTTP routes on a free loopback port, no dashboard)."""
    return LocalCluster(
        n_workers=workers,
        threads_per_worker=threads_per_worker,
        processes=True,
        host="127.0.0.1",
        dashboard_address="127.0.0.1:0",
        scheduler_kwargs={"dashboard": False},
        silence_logs=logging.WARNING,
    )


@contextmanager
def dask_client(cfg: DaskConfig, scheduler: str | None = None) -> Iterator[Client]:
    """A client on ``scheduler`` (or the configured one); else a LocalCluster on 127.0.0.1."""
    address = scheduler or cfg.scheduler
    if address:
        with Client(address) as client:
            yield client
        return
    with local_cluster(cfg.workers, cfg.threads_per_worker) as cluster, \
            Client(cluster) as client:
        yield client
