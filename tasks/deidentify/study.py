"""De-identify one study's files: the unit of parallel work (one Dask task per study).

Each file is read once, its header rewritten by the profile, its pixel bytes passed through
undecoded, and written once. Failures become quarantine rows whose reason never quotes a value.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta
from io import BytesIO
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from schemas.pipeline import OK, QUARANTINED
from tasks.deidentify.dataset import (
    PatientContext,
    deidentify_dataset,
    identifying_values,
    set_computed,
)
from tasks.deidentify.keys import PseudonymKeys, normalize_patient_id
from tasks.deidentify.profile import load_profile
from tasks.deidentify.remap import current_id
from tasks.deidentify.writer import encode_file

IMPLEMENTATION_CLASS_UID = "2.25.203861385734931462715532861129339624491"
IMPLEMENTATION_VERSION_NAME = "RADREPO_0_1"


@dataclass(frozen=True)
class DeidContext:
    """Everything a worker needs for one batch; picklable, sent once per worker."""

    keys: PseudonymKeys
    site_id: str
    options: tuple[str, ...]
    remap: dict[str, str]
    out_dir: str


@dataclass(frozen=True)
class SourceFile:
    """One ingested object as the worker sees it."""

    seq: int
    object_id: str
    staged_path: str
    exam_id: str | None
    exam_time: str | None
    member_path: str | None


@dataclass(frozen=True)
class StudyResult:
    """One row per file, and the identifying values the study's files held (private zone only:
    the verification gate looks for them in the output)."""

    rows: list[dict]
    identifiers: set[str]


def deidentify_study(files: list[SourceFile], ctx: DeidContext) -> StudyResult:
    """De-identify every file of one study into ``ctx.out_dir``; one result row per file."""
    profile = load_profile(ctx.options)
    siteid = ctx.keys.siteid(ctx.site_id)
    uid_cache: dict[str, str] = {}

    def uid_map(original: str) -> str:
        if original not in uid_cache:
            uid_cache[original] = ctx.keys.uid(original)
        return uid_cache[original]

    rows = []
    identifiers: set[str] = set()
    for f in files:
        try:
            rows.append(_deidentify_file(f, ctx, profile, siteid, uid_map, identifiers))
        except _Quarantine as q:
            rows.append(_quarantined(f, q.reason))
        except Exception as err:  # noqa: BLE001 - any failure quarantines this file only
            rows.append(_quarantined(f, f"cannot de-identify ({type(err).__name__})"))
    identifiers.update(uid_cache)
    return StudyResult(rows=rows, identifiers=identifiers)


class _Quarantine(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _quarantined(f: SourceFile, reason: str) -> dict:
    return {"seq": f.seq, "object_id": f.object_id, "status": QUARANTINED, "reason": reason}


def _patient_age(ds: Dataset) -> str | None:
    birth = str(ds.get("PatientBirthDate") or "")
    when = str(ds.get("StudyDate") or ds.get("SeriesDate") or ds.get("ContentDate") or "")
    try:
        b = datetime.strptime(birth[:8], "%Y%m%d").date()
        s = datetime.strptime(when[:8], "%Y%m%d").date()
    except ValueError:
        return None
    years = s.year - b.year - ((s.month, s.day) < (b.month, b.day))
    if years < 0:
        return None
    return f"{min(years, 90):03d}Y"


def _deidentify_file(f: SourceFile, ctx: DeidContext, profile, siteid: str, uid_map,
                     identifiers: set[str]) -> dict:
    try:
        with open(f.staged_path, "rb") as fh:
            source = fh.read()
        ds = dcmread(BytesIO(source))
    except Exception as err:  # noqa: BLE001
        raise _Quarantine(f"unreadable DICOM ({type(err).__name__})") from None
    source_pid = str(ds.get("PatientID") or "").strip()
    if not source_pid:
        raise _Quarantine("no Patient ID")
    if "SOPInstanceUID" not in ds:
        raise _Quarantine("no SOP Instance UID")
    patient_key = current_id(normalize_patient_id(source_pid), ctx.remap)
    offset = ctx.keys.date_offset_days(ctx.site_id, patient_key)
    patient = PatientContext(
        pseudonym=ctx.keys.patient_id(ctx.site_id, patient_key),
        siteid=siteid,
        offset_days=offset,
        identifiers=identifying_values(ds),
    )
    identifiers.update(patient.identifiers)
    identifiers.add(source_pid)
    if "retain_patient_chars" in profile.options and not ds.get("PatientAge"):
        age = _patient_age(ds)
        if age:
            ds.PatientAge = age
    source_ts = UID(ds.file_meta.get("TransferSyntaxUID") or ExplicitVRLittleEndian)

    deidentify_dataset(ds, profile, patient, uid_map)
    set_computed(ds, profile, patient)

    out_ts = source_ts if source_ts.is_compressed else ExplicitVRLittleEndian
    if not source_ts.is_little_endian and "PixelData" in ds:
        ds.PixelData = _little_endian_words(ds.PixelData, int(ds.get("BitsAllocated") or 8))
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = out_ts
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    ds.file_meta = meta

    pixels = _pixel_bytes(ds)
    copyable = (ds.original_encoding == (False, True)
                and source_ts != DeflatedExplicitVRLittleEndian)
    if copyable:
        chunks = encode_file(ds, meta, source)
    else:
        buffer = BytesIO()
        dcmwrite(buffer, ds, enforce_file_format=True)
        chunks = [buffer.getvalue()]
    if _short_pixel_data(ds, pixels, out_ts):
        raise _Quarantine("truncated file (pixel data shorter than the header says)")
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    out_path = Path(ctx.out_dir) / f"{f.object_id}.dcm"
    with open(out_path, "wb") as out:
        out.writelines(chunks)

    return {
        "seq": f.seq,
        "object_id": f.object_id,
        "status": OK,
        "reason": None,
        "patient_id": patient.pseudonym,
        "study_uid": str(ds.get("StudyInstanceUID") or ""),
        "series_uid": str(ds.get("SeriesInstanceUID") or ""),
        "sop_uid": str(ds.SOPInstanceUID),
        "sop_class_uid": str(ds.get("SOPClassUID") or ""),
        "modality": str(ds.get("Modality") or ""),
        "study_date": _as_date(ds.get("StudyDate")),
        "study_time": str(ds.get("StudyTime") or "") or None,
        "study_description": str(ds.get("StudyDescription") or "") or None,
        "series_description": str(ds.get("SeriesDescription") or "") or None,
        "body_part": str(ds.get("BodyPartExamined") or "") or None,
        "view_position": str(ds.get("ViewPosition") or "") or None,
        "image_type": "\\".join(ds.get("ImageType") or []) or None,
        "slice_thickness": _as_float(ds.get("SliceThickness")),
        "instance_number": _as_int(ds.get("InstanceNumber")),
        "rows": _as_int(ds.get("Rows")),
        "columns": _as_int(ds.get("Columns")),
        "transfer_syntax": str(out_ts),
        "burned_in": str(ds.get("BurnedInAnnotation") or "") or None,
        "has_pixels": pixels is not None,
        "size_bytes": sum(len(c) for c in chunks),
        "sha256": digest.hexdigest(),
        "pixel_sha256": hashlib.sha256(pixels).hexdigest() if pixels is not None else None,
        "output_path": str(out_path),
        "exam_key": ctx.keys.opaque("exam", ctx.site_id, f.exam_id) if f.exam_id else None,
        "exam_time": _shift_exam_time(f.exam_time, offset),
        "member_key": ctx.keys.opaque("member", f.member_path) if f.member_path else None,
    }


def _pixel_bytes(ds: Dataset) -> bytes | None:
    """The Pixel Data value as stored (raw bytes, never decoded into an array)."""
    if 0x7FE00010 not in ds:
        return None
    return ds.get_item(0x7FE00010).value


def _short_pixel_data(ds: Dataset, pixels: bytes | None, ts: UID) -> bool:
    """Native pixel data shorter than Rows x Columns x frames x samples x bits says."""
    if pixels is None or ts.is_compressed:
        return False
    try:
        expected = (int(ds.Rows) * int(ds.Columns) * int(ds.get("NumberOfFrames") or 1)
                    * int(ds.get("SamplesPerPixel") or 1) * int(ds.BitsAllocated)) // 8
    except (AttributeError, TypeError, ValueError):
        return False
    return len(pixels) < expected


def _little_endian_words(data: bytes, bits_allocated: int) -> bytes:
    """Big-endian native pixel words in little-endian order (a byte swap, not a decode)."""
    width = bits_allocated // 8
    if width <= 1:
        return data
    return np.frombuffer(data, dtype=f">u{width}").astype(f"<u{width}").tobytes()


def _as_date(value) -> object:
    text = str(value or "")
    try:
        return datetime.strptime(text[:8], "%Y%m%d").date() if len(text) >= 8 else None
    except ValueError:
        return None


def _as_float(value) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _as_int(value) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _shift_exam_time(exam_time: str | None, offset_days: int) -> datetime | None:
    if not exam_time:
        return None
    try:
        when = datetime.strptime(exam_time, "%Y%m%d-%H%M%S")
    except ValueError:
        return None
    return when + timedelta(days=offset_days)

