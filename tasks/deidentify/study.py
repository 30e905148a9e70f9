"""De-identify one source object's bytes: parse them once, then rewrite them by the profile.

The header is rewritten element by element, the pixel bytes pass through undecoded. Nothing here
reads or writes a file: the one pass (``flows/one_pass.py``) hands the bytes in and writes the
result once. Failures raise ``Quarantine`` with a reason that never quotes a value.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta
from io import BytesIO

import numpy as np
from pydicom import dcmread
from pydicom.charset import decode_bytes
from pydicom.errors import InvalidDicomError
from pydicom.filewriter import dcmwrite
from pydicom.uid import UID, ExplicitVRLittleEndian

from schemas.pipeline import OK
from tasks.deidentify.dataset import PatientContext, age_in_years
from tasks.deidentify.keys import PseudonymKeys, normalize_patient_id
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
PIXEL_DATA, MEDIA_STORAGE_SOP_CLASS = 0x7FE00010, 0x00020002
DICOMDIR_CLASS = "1.2.840.10008.1.3.10"
INDEX_TAGS = {0x00100020: "patient_id", 0x0020000D: "study_uid", 0x0020000E: "series_uid",
              0x00080018: "sop_uid", 0x00080016: "sop_class_uid", 0x00080060: "modality",
              0x00080020: "study_date", 0x00080030: "study_time"}


@dataclass(frozen=True)
class DeidContext:
    """Everything a worker needs for one batch; picklable, sent once per worker."""

    keys: PseudonymKeys
    site_id: str
    options: tuple[str, ...]
    remap: dict[str, str]


@dataclass
class ParsedSource:
    """One source object parsed once (private: it holds the original values): what its
    rewrite, the index and the decisions taken before writing need."""

    buf: memoryview
    source_ts: UID
    raws: list
    encodings: list[str]
    values: dict[int, str]
    parsed: dict
    header: dict[str, str | None]  # the index's original header fields
    patient: PatientContext
    pixel_sha256: str | None


class Quarantine(Exception):
    """The object cannot be de-identified; the message is its reason (quoting no value).
    ``not_an_image``: what the object is, not how its de-identification failed (it is
    refused at ingest)."""

    def __init__(self, reason: str, not_an_image: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.not_an_image = not_an_image


def parse_source(data: bytes, ctx: DeidContext) -> ParsedSource:
    """Parse a source object's bytes: its elements, character set, original header fields,
    identifiers, patient pseudonym and date shift, and the hash of its pixel data."""
    try:
        buf, start, source_ts = explicit_little_endian(data)
        raws, _ = elements(buf, start, len(buf))
        encodings = read_charset(buf, raws)
        values = top_values(buf, raws, encodings)
        parsed: dict = {}
        meta = meta_elements(buf)
        found = collect_identifiers(buf, raws, encodings, meta, parsed)
    except TruncatedDataset:
        raise Quarantine(TRUNCATED) from None
    except InvalidDicomError:
        raise Quarantine("not DICOM", not_an_image=True) from None
    except Exception as err:  # noqa: BLE001
        raise Quarantine(f"unreadable DICOM ({type(err).__name__})") from None
    if _meta_value(buf, meta, MEDIA_STORAGE_SOP_CLASS) == DICOMDIR_CLASS:
        raise Quarantine("DICOMDIR index file (not an image)", not_an_image=True)
    header = header_fields(buf, raws, encodings)
    if not header["sop_uid"]:
        raise Quarantine("no SOP Instance UID", not_an_image=True)
    source_pid = (values.get(PATIENT_ID) or "").strip()
    if not source_pid:
        raise Quarantine("no Patient ID")
    patient_key = current_id(normalize_patient_id(source_pid), ctx.remap)
    offset = ctx.keys.date_offset_days(ctx.site_id, patient_key)
    patient = PatientContext(
        pseudonym=ctx.keys.patient_id(ctx.site_id, patient_key),
        siteid=ctx.keys.siteid(ctx.site_id),
        offset_days=offset,
        identifiers=tuple(sorted(found | {source_pid})),
    )
    pixel = next((r for r in raws if r.tag == PIXEL_DATA), None)
    pixel_sha = (hashlib.sha256(buf[pixel.value_start:pixel.value_end]).hexdigest()
                 if pixel is not None and pixel.value_end > pixel.value_start else None)
    return ParsedSource(buf, source_ts, raws, encodings, values, parsed, header, patient,
                        pixel_sha)


def header_fields(buf: memoryview, raws: list, encodings: list[str]) -> dict[str, str | None]:
    """The source header fields the private index keeps (original values)."""
    out: dict[str, str | None] = dict.fromkeys(INDEX_TAGS.values())
    for r in raws:
        name = INDEX_TAGS.get(r.tag)
        if name and r.value_end > r.value_start:
            text = decode_bytes(bytes(buf[r.value_start:r.value_end]), encodings, set())
            out[name] = text.strip("\0 ") or None
    return out


def _meta_value(buf: memoryview, meta: list, tag: int) -> str:
    for r in meta:
        if r.tag == tag:
            return bytes(buf[r.value_start:r.value_end]).decode("latin-1").strip("\0 ")
    return ""


@dataclass(frozen=True)
class Rewritten:
    """A de-identified file: its bytes (as chunks, written once by the caller) and its row."""

    chunks: list
    row: dict


def rewrite_source(src: ParsedSource, ctx: DeidContext, profile, uid_map,
                   exam: dict) -> Rewritten:
    """The de-identified file of a parsed source object and its DEIDENTIFIED row (without
    seq, object id and output path, which the caller gives)."""
    rewriter = Rewriter(src.buf, profile, src.patient, uid_map, src.encodings,
                        parsed=src.parsed)
    values = src.values
    age = None
    if "retain_patient_chars" in profile.options and not values.get(PATIENT_AGE):
        age = _patient_age(values.get(BIRTH_DATE), values.get(STUDY_DATE)
                           or values.get(SERIES_DATE) or values.get(CONTENT_DATE))
    chunks = rewriter.level(src.raws, nested=False,
                            extra=computed_elements(profile, src.patient, age))
    value = rewriter.decoded
    sop_uid, sop_class = value(0x00080018), value(0x00080016)
    if not sop_uid:
        raise Quarantine("no SOP Instance UID")
    source_ts = src.source_ts
    out_ts = source_ts if source_ts.is_compressed else ExplicitVRLittleEndian
    pixels = src.buf[rewriter.pixel[0]:rewriter.pixel[1]] if rewriter.pixel else None
    if _short_pixel_data(value, pixels, out_ts):
        raise Quarantine(TRUNCATED)
    chunks.insert(0, encode_file_meta(sop_class or "", sop_uid, str(out_ts),
                                      IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME))
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    offset = src.patient.offset_days
    row = {
        "status": OK,
        "reason": None,
        "patient_id": src.patient.pseudonym,
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
        "pixel_sha256": src.pixel_sha256 if pixels is not None else None,  # the same bytes
        "exam_key": (ctx.keys.opaque("exam", ctx.site_id, exam["exam_id"])
                     if exam.get("exam_id") else None),
        "exam_time": _shift_exam_time(exam.get("exam_time"), offset),
        "member_key": (ctx.keys.opaque("member", exam["member_path"])
                       if exam.get("member_path") else None),
        "text_tokens_removed": rewriter.tokens_removed,
    }
    return Rewritten(chunks, row)


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

