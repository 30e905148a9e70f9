"""What a synthetic site holds: patients, exams, series, stations, and the tip sheet's batches."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime

from synth.vocabulary import CT_KINDS, EXAM_TYPES

CR_WINDOW_START = -365  # radiographs are exported from one year before the index date
CT_WINDOW_START = -30  # CTs from one month before

CXR_EARLY, CXR_LATE = "CXR-UPDATE-20200523", "CXR-UPDATE-20200618"
CT_DONE, CT_OPEN = "CT-UPDATE-20200519", "CT-UPDATE-20200602"
BATCH_FOLDERS = {
    CXR_EARLY: f"{CXR_EARLY}-COMPLETE",
    CT_DONE: f"{CT_DONE}-COMPLETE",
    CXR_LATE: f"{CXR_LATE}-COMPLETE",
    CT_OPEN: f"{CT_OPEN}-IN-PROGRESS",
}
CT_CUTOFF = date(2020, 5, 18)  # last CT day that fits the completed CT batch
CXR_CUTOFF = date(2020, 5, 23)  # radiographs from this day on go to the late CXR batch


@dataclass(eq=False)
class Patient:
    """One patient as the images and the EMR export name them."""

    mrn: str  # as written in the images
    current_mrn: str  # as in the EMR export
    family: str
    given: str
    middle: str
    charset: str | None
    birth_date: date
    sex: str
    address: str
    phone: str
    other_id: str
    index_date: date
    has_images: bool = True
    clinical: dict = field(default_factory=dict)  # what the EMR export says, for the truth

    @property
    def pn(self) -> str:
        return "^".join(part for part in (self.family, self.given, self.middle) if part)

    @property
    def spaced(self) -> str:
        return self.pn.replace("^", " ")


@dataclass(eq=False)
class Series:
    """One series of an exam: its description, folder and instance UIDs."""

    role: str
    modality: str
    sop_class: str
    image_type: str
    description: str
    folder: str
    view: str | None
    pixel_kind: str
    number: int
    uid: str
    sop_uids: list[str]


@dataclass(eq=False)
class Exam:
    """One exam (study) of a patient, with its zip-batch placement and quirk."""

    patient: Patient
    kind: str
    when: datetime
    accession: str
    study_id: str
    study_uid: str
    pps_uid: str
    frame_uid: str | None
    scout_uid: str | None
    referring: str
    series: list[Series]
    exam_id: str | None
    batch: str | None
    quirk: str | None
    copy_of: Exam | None = None  # original of a re-sent or pediatric double copy
    readme: bool = False
    zip_suffix: str = ""  # a second zip of one exam id and time; sorts after the original

    @property
    def code(self) -> str:
        return EXAM_TYPES[self.kind][0]

    @property
    def is_ct(self) -> bool:
        return self.kind in CT_KINDS

    @property
    def days(self) -> int:
        return (self.when.date() - self.patient.index_date).days

    @property
    def pixel_key(self) -> str:
        """Pixel-noise key: re-issued copies of a procedure (same accession, time) share pixels."""
        return f"{self.accession}/{self.when:%Y%m%d%H%M%S}"

    def zip_key(self) -> str:
        mrn, stamp = self.patient.mrn, f"{self.when:%Y%m%d-%H%M%S}"
        return (f"{BATCH_FOLDERS[self.batch]}/{mrn}_{stamp}_{self.exam_id}_{self.code}"
                f"{self.zip_suffix}.zip")


@dataclass(frozen=True)
class Station:
    """One scanner: what its headers say about it."""

    name: str
    ae: str
    serial: str
    manufacturer: str
    model: str


def default_batch(is_ct: bool, when: datetime) -> str:
    """The tip-sheet batch an exam goes to when no quirk names one."""
    if is_ct:
        return CT_DONE
    return CXR_EARLY if when.date() < CXR_CUTOFF else CXR_LATE
