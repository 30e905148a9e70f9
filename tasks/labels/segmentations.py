"""DICOM SEG objects (RICORD's CT annotations) that segment published series: read with
highdicom, their references checked against the catalog, published under their study and listed
in the ``segmentations`` table."""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import duckdb
import highdicom as hd
import pyarrow as pa
import pyarrow.parquet as pq
from pydicom.errors import InvalidDicomError

from schemas.catalog import SEGMENTATIONS
from tasks.deidentify.profile import Profile
from tasks.deidentify.text import IdentifierMatcher
from tasks.labels.importer import LabelRejected, PublishedStudy
from tasks.verify import check_structure
from tasks.zones import Release, table_bytes

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


@dataclass(frozen=True)
class PublishedImages:
    """The published series (-> study) and instances (-> series) of the catalog."""

    series: dict[str, str]
    instances: dict[str, str]

    @classmethod
    def from_catalog(cls, con: duckdb.DuckDBPyConnection) -> PublishedImages:
        series = dict(con.execute("SELECT series_uid, study_uid FROM series "
                                  "WHERE status = 'published'").fetchall())
        instances = dict(con.execute("SELECT sop_uid, series_uid FROM instances").fetchall())
        return cls(series, instances)


def check_segmentation(data: bytes, studies: dict[str, PublishedStudy],
                       images: PublishedImages, profile: Profile,
                       identifiers: IdentifierMatcher | None = None) -> tuple[dict, PublishedStudy]:
    """The catalog row of a SEG that references only published images of one published
    study, and that study; LabelRejected (naming no value) otherwise. It is published as it
    came, so it must pass the checks ``radrepo verify`` makes of every released file under the
    release's profile (2.25 UIDs, pseudonyms, nothing the profile removes or empties)."""
    try:
        seg = hd.seg.segread(io.BytesIO(data))
    except (InvalidDicomError, ValueError, AttributeError, KeyError, TypeError):
        raise LabelRejected("not a readable DICOM Segmentation object") from None
    if str(seg.SOPClassUID) != SEG_STORAGE:
        raise LabelRejected("not a DICOM Segmentation Storage object")
    study_uid = str(seg.StudyInstanceUID)
    study = studies.get(study_uid)
    if study is None:
        raise LabelRejected("its study is not a published study (value not shown)")
    if str(seg.get("PatientID", "")) != study.patient_id or \
            str(seg.get("PatientName", "")) not in ("", study.patient_id):
        raise LabelRejected("its patient is not the published patient of its study")
    if seg.get("PatientBirthDate"):
        raise LabelRejected("it carries a patient birth date")
    findings = check_structure(io.BytesIO(data), "SEG", profile)
    if findings:
        shown = "; ".join(f"{f.element}: {f.what}" for f in findings[:5])
        more = f" and {len(findings) - 5} more" if len(findings) > 5 else ""
        raise LabelRejected(f"it fails the release's de-identification check ({shown}{more})")
    if identifiers is not None and identifiers.in_bytes(data):
        raise LabelRejected("it carries an identifier seen at a source (value not shown)")
    sources = seg.get_source_image_uids()
    if not sources:
        raise LabelRejected("it references no source images")
    referenced_series = sorted({series for _, series, _ in sources})
    for ref_study, series, sop in sources:
        if images.series.get(series) is None:
            raise LabelRejected("it references a series that is not published (unknown series)")
        if str(ref_study) != study_uid or images.series[series] != study_uid:
            raise LabelRejected("it references a series of another study")
        if images.instances.get(sop) != series:
            raise LabelRejected("it references an image that is not a published instance of "
                                "its series")
    if len(referenced_series) != 1:
        raise LabelRejected("it references more than one series")
    numbers = list(seg.segment_numbers)
    labels = [str(seg.get_segment_description(n).segment_label) for n in numbers]
    sop_uid, series_uid = str(seg.SOPInstanceUID), str(seg.SeriesInstanceUID)
    row = {"site_id": study.site_id, "batch_id": study.batch_id, "sop_uid": sop_uid,
           "series_uid": series_uid, "study_uid": study_uid, "patient_id": study.patient_id,
           "referenced_series_uid": referenced_series[0],
           "n_referenced_instances": len({sop for _, _, sop in sources}),
           "n_segments": len(numbers), "segment_labels": "|".join(labels),
           "path": f"dicom/{study.site_id}/{study.patient_id}/{study_uid}/{series_uid}/"
                   f"{sop_uid}.dcm",
           "size_bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    return row, study


def published_segmentations(release: Release) -> set[str]:
    """SOP Instance UIDs of the SEG objects already in the release."""
    out = set()
    for site, batch in release.complete_batches():
        for relative in release.catalog_files("segmentations", site, batch):
            with release.fs.open(release.path(relative), "rb") as fh:
                out.update(pq.read_table(fh, columns=["sop_uid"]).column("sop_uid").to_pylist())
    return out


def publish_segmentations(release: Release, accepted: list[tuple[dict, bytes]]) -> int:
    """Place each new SEG file under its study, then its catalog rows; the files written."""
    done = published_segmentations(release)
    fresh: dict[tuple[str, str], list[dict]] = {}
    for row, data in accepted:
        if row["sop_uid"] in done:
            continue
        done.add(row["sop_uid"])
        release.write_bytes(row["path"], data)
        fresh.setdefault((row["site_id"], row["batch_id"]), []).append(row)
    for (site, batch), rows in sorted(fresh.items()):
        table = pa.Table.from_pylist([{f.name: r[f.name] for f in SEGMENTATIONS}
                                      for r in sorted(rows, key=lambda r: r["sop_uid"])],
                                     schema=SEGMENTATIONS)
        data = table_bytes(table)
        name = f"seg-{hashlib.sha256(data).hexdigest()[:16]}.parquet"
        release.write_bytes(f"{release.partition('segmentations', site, batch)}/{name}", data)
    return sum(len(rows) for rows in fresh.values())
