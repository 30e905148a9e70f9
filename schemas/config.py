"""The consortium configuration (YAML), validated by pydantic.

Relative paths are resolved against the configuration file's folder. The HMAC secret is never
part of the configuration: only the name of the environment variable that holds it.
"""

from __future__ import annotations

import os
import re
from datetime import date
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

SITE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$"


class ConfigError(ValueError):
    """A configuration problem, described in one line that names the offending key."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FileSourceConfig(Strict):
    """Files on any fsspec URL: tip-sheet zip batches, a folder tree, or a flat folder."""

    kind: Literal["zip_batches", "folder", "flat"]
    path: str
    # fsspec options for the path's filesystem, e.g. an S3 endpoint:
    # {client_kwargs: {endpoint_url: http://127.0.0.1:9000}}; credentials stay in the environment
    storage_options: dict[str, Any] = Field(default_factory=dict)


class StudyQuery(Strict):
    """Which studies a PACS source takes; the PACS is asked once per accession number and
    modality given, each time within the study date window."""

    since: date | None = None
    until: date | None = None
    modalities: tuple[str, ...] = ()
    accession_list: str | None = None  # a text file, one accession number per line


class PacsSourceConfig(Strict):
    query: StudyQuery = StudyQuery()
    retries: int = Field(default=3, ge=0)  # further attempts after a failed retrieve
    backoff_seconds: float = Field(default=2.0, ge=0)  # doubled after each failed attempt
    timeout_seconds: float = Field(default=60.0, gt=0)


class DimsePeer(Strict):
    """A PACS reached by DIMSE: the fields a DIMSE source and a DIMSE research PACS share."""

    kind: Literal["dimse"]
    host: str
    port: int = Field(ge=1, le=65535)
    called_ae: str = Field(min_length=1, max_length=16)
    calling_ae: str = Field(default="RADREPO", min_length=1, max_length=16)
    timeout_seconds: float = Field(default=60.0, gt=0)


class DicomWebPeer(Strict):
    """A PACS reached by DICOMweb: the fields a DICOMweb source and research PACS share."""

    kind: Literal["dicomweb"]
    url: str = Field(pattern=r"^https?://[^/\s]+")  # the DICOMweb root: http://pacs:8042/dicom-web
    username: str | None = None
    password_env: str | None = None  # the environment variable holding the password
    timeout_seconds: float = Field(default=60.0, gt=0)


class DimseSourceConfig(PacsSourceConfig, DimsePeer):
    """A PACS reached by C-FIND and C-MOVE to radrepo's own storage SCP."""

    # where radrepo's storage SCP listens for the PACS's C-STORE; the PACS must know
    # calling_ae at this address as a C-MOVE destination
    storage_host: str = "127.0.0.1"
    storage_port: int = Field(ge=1, le=65535)


class DicomWebSourceConfig(PacsSourceConfig, DicomWebPeer):
    """A PACS reached by QIDO-RS search and WADO-RS retrieve."""


SourceConfig = Annotated[
    FileSourceConfig | DimseSourceConfig | DicomWebSourceConfig, Field(discriminator="kind")
]
PACS_KINDS = ("dimse", "dicomweb")


class DimseResearchPacs(DimsePeer):
    """A research PACS that takes released files by C-STORE (the DIMSE source's fields)."""


class DicomWebResearchPacs(DicomWebPeer):
    """A research PACS that takes released files by STOW-RS (the DICOMweb source's fields)."""

    files_per_request: int = Field(default=16, ge=1)  # instances in one STOW-RS request


ResearchPacsConfig = Annotated[DimseResearchPacs | DicomWebResearchPacs,
                               Field(discriminator="kind")]


class Measurement(Strict):
    column: str
    unit: str = ""


class ClinicalConfig(Strict):
    path: str
    patient_id: str = "mrn"
    index_date: str = "covid_encounter_date"
    sex: str = "sex"
    birth_date: str | None = "birth_date"
    age: str | None = None  # an age-at-encounter column, for exports without birth dates
    test_method: str = "test_method"
    result: str = "rtpcr_result"
    # the column with the date the measurements were taken: clinical.day is that date minus
    # the index date; without one, day is unknown (null)
    measured_on: str | None = None
    measurements: dict[str, Measurement] = Field(
        default_factory=lambda: {
            "wcc": Measurement(column="wcc", unit="10^9/L"),
            "crp": Measurement(column="crp", unit="mg/L"),
            "po2": Measurement(column="po2", unit="kPa"),
        }
    )


class QcConfig(Strict):
    """Parameters of the QC rules in schemas/qc_rules.yaml (the rules name them in braces)."""

    allowed_modalities: tuple[str, ...] = ("CT", "CR", "DX")
    frontal_views: tuple[str, ...] = ("PA", "AP")
    ct_slice_thickness_min: float = 2.5
    ct_slice_thickness_max: float = 5.0
    ct_spacing_tolerance_mm: float = 0.1
    reviewer_cleared_series: tuple[str, ...] = ()
    # CT, Enhanced CT and Legacy Converted Enhanced CT Image Storage: the objects with slices
    ct_image_sop_classes: tuple[str, ...] = (
        "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.2.2")


class QcOverrides(Strict):
    """A site's own QC thresholds; what it leaves out comes from the consortium's ``qc``."""

    allowed_modalities: tuple[str, ...] | None = None
    frontal_views: tuple[str, ...] | None = None
    ct_slice_thickness_min: float | None = None
    ct_slice_thickness_max: float | None = None
    ct_spacing_tolerance_mm: float | None = None
    reviewer_cleared_series: tuple[str, ...] | None = None


class Window(Strict):
    """Days relative to the index date a study may lie in (None: no limit that side)."""

    before: int | None = Field(default=None, ge=0)
    after: int | None = Field(default=None, ge=0)


DEFAULT_WINDOWS = {"CR": Window(before=365), "DX": Window(before=365), "CT": Window(before=30)}


class SiteConfig(Strict):
    site_id: str = Field(pattern=SITE_ID_PATTERN)
    source: SourceConfig
    clinical: ClinicalConfig | None = None
    id_remap: str | None = None
    qc: QcOverrides = QcOverrides()


class DaskConfig(Strict):
    scheduler: str | None = None
    workers: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1)  # one per core
    threads_per_worker: int = Field(default=1, ge=1)
    # where a local cluster spills and keeps scratch (rows it holds carry source identifiers):
    # filled in as <work_dir>/scratch/dask, in the private zone
    local_directory: str | None = None


class ScheduleConfig(Strict):
    """When the ``nightly`` deployment runs: a cron line read in an IANA time zone."""

    cron: str = "0 2 * * *"
    timezone: str = "UTC"

    @field_validator("cron")
    @classmethod
    def _five_fields(cls, cron: str) -> str:
        if len(cron.split()) != 5:
            raise ValueError("expected five cron fields, e.g. '0 2 * * *'")
        return cron

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, timezone: str) -> str:
        from zoneinfo import available_timezones

        if timezone not in available_timezones():
            raise ValueError(f"unknown time zone {timezone!r}")
        return timezone


class DeidConfig(Strict):
    profile: Literal["basic"] = "basic"
    options: tuple[
        Literal[
            "retain_long_modif_dates",
            "retain_patient_chars",
            "clean_descriptors",
            "retain_device_identity",
            "retain_safe_private",
        ],
        ...,
    ] = ("retain_long_modif_dates", "retain_patient_chars", "clean_descriptors")


class RadrepoConfig(Strict):
    release: str
    # fsspec options for the release URL's filesystem, as a source's storage_options
    release_storage_options: dict[str, Any] = Field(default_factory=dict)
    work_dir: str
    secret_env: str = "RADREPO_SECRET"
    dask: DaskConfig = DaskConfig()
    deid: DeidConfig = DeidConfig()
    qc: QcConfig = QcConfig()
    inclusion_windows: dict[str, Window] = Field(default_factory=lambda: dict(DEFAULT_WINDOWS))
    split_exam_minutes: int = Field(default=30, ge=0)
    # a run finding a site locked by another run waits this long, then gives up naming it
    lock_wait_seconds: float = Field(default=300.0, ge=0)
    # an object-store release's site lease expires this long after its last renewal
    lease_seconds: float = Field(default=300.0, ge=5)
    schedule: ScheduleConfig = ScheduleConfig()
    max_parallel_sites: int = Field(default=2, ge=1)  # sites a nightly run works on at once
    sites: list[SiteConfig] = Field(min_length=1)
    # research PACS that `radrepo push --to NAME` sends the release's complete batches to
    research_pacs: dict[str, ResearchPacsConfig] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _dask_scratch_in_work_dir(cls, raw: Any) -> Any:
        if not isinstance(raw, dict) or not isinstance(raw.get("work_dir"), str):
            return raw
        dask = raw.get("dask") or {}
        if isinstance(dask, dict) and not dask.get("local_directory"):
            scratch = str(Path(raw["work_dir"]) / "scratch" / "dask")
            raw = {**raw, "dask": {**dask, "local_directory": scratch}}
        return raw

    @field_validator("sites")
    @classmethod
    def _unique_site_ids(cls, sites: list[SiteConfig]) -> list[SiteConfig]:
        seen = [s.site_id for s in sites]
        dupes = sorted({s for s in seen if seen.count(s) > 1})
        if dupes:
            raise ValueError(f"duplicate site_id {dupes[0]}")
        return sites

    def qc_params(self, site_id: str) -> dict:
        """The QC parameters for one site: the consortium's, overridden by the site's."""
        own = self.site(site_id).qc.model_dump(exclude_none=True)
        return {**self.qc.model_dump(), **own}

    def site(self, site_id: str) -> SiteConfig:
        for s in self.sites:
            if s.site_id == site_id:
                return s
        raise ConfigError(f"sites: no site with site_id {site_id!r}")


def _resolve(path: str, base: Path) -> str:
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", path):
        return path
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def _resolve_paths(raw: dict, base: Path) -> dict:
    raw = dict(raw)
    for key in ("release", "work_dir"):
        if isinstance(raw.get(key), str):
            raw[key] = _resolve(raw[key], base)
    sites = []
    for site in raw.get("sites") or []:
        if not isinstance(site, dict):
            sites.append(site)
            continue
        site = dict(site)
        for block in ("source", "clinical"):
            if isinstance(site.get(block), dict) and isinstance(site[block].get("path"), str):
                site[block] = {**site[block], "path": _resolve(site[block]["path"], base)}
        source = site.get("source")
        query = source.get("query") if isinstance(source, dict) else None
        if isinstance(query, dict) and isinstance(query.get("accession_list"), str):
            query = {**query, "accession_list": _resolve(query["accession_list"], base)}
            site["source"] = {**source, "query": query}
        if isinstance(site.get("id_remap"), str):
            site["id_remap"] = _resolve(site["id_remap"], base)
        sites.append(site)
    if "sites" in raw:
        raw["sites"] = sites
    return raw


def describe_validation_error(err: ValidationError) -> str:
    """The first error as one line: dotted key path, then what is wrong with it."""
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "(top level)"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    elif first["type"] == "missing":
        msg = "required key is missing"
    more = len(err.errors()) - 1
    return f"{where}: {msg}" + (f" (and {more} more)" if more else "")


def parse_config(raw: object, base: Path) -> RadrepoConfig:
    """Validate an already-loaded mapping; relative paths resolve against ``base``."""
    if not isinstance(raw, dict):
        raise ConfigError("(top level): expected a mapping of keys")
    try:
        return RadrepoConfig.model_validate(_resolve_paths(raw, base))
    except ValidationError as err:
        raise ConfigError(describe_validation_error(err)) from None


def load_config(path: Path) -> RadrepoConfig:
    """Read and validate a YAML configuration file."""
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise ConfigError(f"cannot read configuration {path}: {err.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"configuration is not valid YAML{where}") from None
    return parse_config(raw, Path(path).resolve().parent)
