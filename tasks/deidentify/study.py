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
from pydicom.filewriter import dcmwrite
from pydicom.uid import UID, ExplicitVRLittleEndian

from schemas.pipeline import OK, QUARANTINED
from tasks.deidentify.dataset import PatientContext, age_in_years
from tasks.deidentify.keys import PseudonymKeys, normalize_patient_id
from tasks.deidentify.profile import load_profile
from tasks.deidentify.remap import current_id
from tasks.deidentify.rewrite import (
    Rewriter,
    TruncatedDataset,
    computed_elements,
    dataset_start,
    elements,
    encode_file_meta,
    read_charset,
    top_values,
)
from tasks.deidentify.walk import collect_identifiers, meta_elements

IMPLEMENTATION_CLASS_UID = "2.25.203861385734931462715532861129339624491"
IMPLEMENTATION_VERSION_NAME = "RADREPO_0_1"
TRUNCATED = "truncated file (data ends before the header says)"
PATIENT_ID, PATIENT_AGE, BIRTH_DATE = 0x00100020, 0x00101010, 0x00100030
STUDY_DATE, SERIES_DATE, CONTENT_DATE = 0x00080020, 0x00080021, 0x00080023


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


def _patient_age(birth: str | None, when: str | None) -> str | None:
    """Patient's Age (AS) at ``when`` from the birth date; ages above 89 become 090Y."""
    years = age_in_years(_as_date(birth), _as_date(when))
    return None if years is None else f"{years:03d}Y"


def explicit_little_endian(source: bytes) -> tuple[memoryview, int, UID]:
    """The file as explicit VR little endian bytes, the dataset offset and the source transfer
    syntax. Explicit little endian (compressed included) is used as read; implicit VR,
    deflated and big-endian files are re-encoded once by pydicom (big-endian pixel words
    byte-swapped, never decoded)."""
    buf = memoryview(source)
    found = dataset_start(buf)
    if found is not None:
        start, ts_text = found
        ts = UID(ts_text or ExplicitVRLittleEndian)
        if ts == ExplicitVRLittleEndian or (ts.is_compressed and ts.is_little_endian
                                            and not ts.is_deflated):
            return buf, start, ts
    ds = dcmread(BytesIO(source))
    ts = UID(ds.file_meta.get("TransferSyntaxUID") or ExplicitVRLittleEndian)
    if not ts.is_little_endian and "PixelData" in ds:
        ds.PixelData = _little_endian_words(ds.PixelData, int(ds.get("BitsAllocated") or 8))
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out = BytesIO()
    dcmwrite(out, ds, enforce_file_format=True, implicit_vr=False, little_endian=True)
    buf = memoryview(out.getvalue())
    return buf, dataset_start(buf)[0], ts


def _deidentify_file(f: SourceFile, ctx: DeidContext, profile, siteid: str, uid_map,
                     identifiers: set[str]) -> dict:
    try:
        with open(f.staged_path, "rb") as fh:
            source = fh.read()
        buf, start, source_ts = explicit_little_endian(source)
        raws, _ = elements(buf, start, len(buf))
        encodings = read_charset(buf, raws)
        values = top_values(buf, raws, encodings)
        parsed: dict = {}
        found = collect_identifiers(buf, raws, encodings, meta_elements(buf), parsed)
    except TruncatedDataset:
        raise _Quarantine(TRUNCATED) from None
    except Exception as err:  # noqa: BLE001
        raise _Quarantine(f"unreadable DICOM ({type(err).__name__})") from None
    source_pid = (values.get(PATIENT_ID) or "").strip()
    if not source_pid:
        raise _Quarantine("no Patient ID")
    patient_key = current_id(normalize_patient_id(source_pid), ctx.remap)
    offset = ctx.keys.date_offset_days(ctx.site_id, patient_key)
    patient = PatientContext(
        pseudonym=ctx.keys.patient_id(ctx.site_id, patient_key),
        siteid=siteid,
        offset_days=offset,
        identifiers=tuple(sorted(found | {source_pid})),
    )
    identifiers.update(patient.identifiers)
    rewriter = Rewriter(buf, profile, patient, uid_map, encodings, parsed=parsed)
    age = None
    if "retain_patient_chars" in profile.options and not values.get(PATIENT_AGE):
        age = _patient_age(values.get(BIRTH_DATE), values.get(STUDY_DATE)
                           or values.get(SERIES_DATE) or values.get(CONTENT_DATE))
    chunks = rewriter.level(raws, nested=False, extra=computed_elements(profile, patient, age))
    value = rewriter.decoded
    sop_uid, sop_class = value(0x00080018), value(0x00080016)
    if not sop_uid:
        raise _Quarantine("no SOP Instance UID")
    out_ts = source_ts if source_ts.is_compressed else ExplicitVRLittleEndian
    pixels = buf[rewriter.pixel[0]:rewriter.pixel[1]] if rewriter.pixel else None
    if _short_pixel_data(value, pixels, out_ts):
        raise _Quarantine(TRUNCATED)
    chunks.insert(0, encode_file_meta(sop_class or "", sop_uid, str(out_ts),
                                      IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME))
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
        "study_uid": value(0x0020000D) or "",
        "series_uid": value(0x0020000E) or "",
        "sop_uid": sop_uid,
        "sop_class_uid": sop_class or "",
        "modality": value(0x00080060) or "",
        "study_date": _as_date(value(STUDY_DATE)),
        "study_time": value(0x00080030),
        "study_description": value(0x00081030),
        "series_description": value(0x0008103E),
        "body_part": value(0x00180015),
        "view_position": value(0x00185101),
        "image_type": value(0x00080008),
        "slice_thickness": _as_float(value(0x00180050)),
        "slice_position": _slice_position(value(0x00200032), value(0x00201041)),
        "instance_number": _as_int(value(0x00200013)),
        "rows": _as_int(value(0x00280010)),
        "columns": _as_int(value(0x00280011)),
        "transfer_syntax": str(out_ts),
        "burned_in": value(0x00280301),
        "has_pixels": pixels is not None,
        "size_bytes": sum(len(c) for c in chunks),
        "sha256": digest.hexdigest(),
        "pixel_sha256": hashlib.sha256(pixels).hexdigest() if pixels is not None else None,
        "output_path": str(out_path),
        "exam_key": ctx.keys.opaque("exam", ctx.site_id, f.exam_id) if f.exam_id else None,
        "exam_time": _shift_exam_time(f.exam_time, offset),
        "member_key": ctx.keys.opaque("member", f.member_path) if f.member_path else None,
        "text_tokens_removed": rewriter.tokens_removed,
    }


def _short_pixel_data(value, pixels, ts: UID) -> bool:
    """Native pixel data shorter than Rows x Columns x frames x samples x bits says."""
    if pixels is None or ts.is_compressed:
        return False
    try:
        expected = (int(value(0x00280010)) * int(value(0x00280011))
                    * int(value(0x00280008) or 1) * int(value(0x00280002) or 1)
                    * int(value(0x00280100))) // 8
    except (TypeError, ValueError):
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


def _slice_position(position: str | None, location: str | None) -> float | None:
    """Where the slice lies along the patient axis: Image Position z, else Slice Location."""
    parts = (position or "").split("\\")
    return _as_float(parts[2]) if len(parts) == 3 else _as_float(location)


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

