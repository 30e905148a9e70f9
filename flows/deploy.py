"""Deployments as code: ``nightly/nightly`` on the configured schedule and ``backfill/backfill``
on demand, both in the process work pool ``radrepo`` of the server at PREFECT_API_URL.

The entry points are module paths (``flows.nightly.nightly_flow``), so a process worker finds
the code in the installed package: nothing is pulled or built. A deployment's parameters are
the configuration file's path and ids only; the flow reads the file when it runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.exceptions import ObjectAlreadyExists
from prefect.schedules import Cron
from prefect.types.entrypoint import EntrypointType
from prefect.workers.process import ProcessWorker

from flows.nightly import backfill_flow, nightly_flow
from schemas.config import load_config

WORK_POOL = "radrepo"


@dataclass(frozen=True)
class Deployed:
    name: str  # flow/deployment, as `prefect deployment run` takes it
    schedule: str  # "cron in timezone", or "on demand"


def ensure_work_pool(name: str = WORK_POOL) -> bool:
    """Create the process work pool ``name`` unless it exists; True if it was created."""
    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(
                name=name, type=ProcessWorker.type,
                base_job_template=ProcessWorker.get_default_base_job_template()))
        except ObjectAlreadyExists:
            return False
    return True


def deploy(config_path: Path, work_pool: str = WORK_POOL) -> list[Deployed]:
    """Register (or update) the two deployments for the configuration at ``config_path``."""
    path = Path(config_path).resolve()
    schedule = load_config(path).schedule
    ensure_work_pool(work_pool)
    parameters = {"config_path": str(path)}
    nightly = nightly_flow.to_deployment(
        name="nightly", schedule=Cron(schedule.cron, timezone=schedule.timezone),
        parameters=parameters, entrypoint_type=EntrypointType.MODULE_PATH,
        description="Every new batch of every site, on the configured schedule.")
    backfill = backfill_flow.to_deployment(
        name="backfill", parameters=parameters, entrypoint_type=EntrypointType.MODULE_PATH,
        description="Chosen batches again: parameters sites, batches, since, until.")
    for deployment in (nightly, backfill):
        deployment.apply(work_pool_name=work_pool)
    return [Deployed(f"{nightly_flow.name}/nightly",
                     f"{schedule.cron} in {schedule.timezone}"),
            Deployed(f"{backfill_flow.name}/backfill", "on demand")]
