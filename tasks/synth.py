"""Deterministic generator of synthetic *identified* multi-site DICOM exports.

The demo, the tests and the benchmarks use `synthesize`; the quirks it plants follow the
HIRO/CRDW imaging tip sheet and are all recorded in the returned ground truth.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
import re
import shutil
import zipfile
from dataclasses import dataclass, field, replace
from datetime import date, datetime, time, timedelta
from functools import lru_cache
from pathlib import Path

import numpy as np
import pydicom
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
)

GENERATOR_VERSION = 1
CR_WINDOW_START = -365  # radiographs are exported from one year before the index date
CT_WINDOW_START = -30  # CTs from one month before

_LAYOUTS = ("zip_batches", "tree", "flat")
_CXR_EARLY, _CXR_LATE = "CXR-UPDATE-20200523", "CXR-UPDATE-20200618"
_CT_DONE, _CT_OPEN = "CT-UPDATE-20200519", "CT-UPDATE-20200602"
_BATCH_FOLDERS = {
    _CXR_EARLY: f"{_CXR_EARLY}-COMPLETE",
    _CT_DONE: f"{_CT_DONE}-COMPLETE",
    _CXR_LATE: f"{_CXR_LATE}-COMPLETE",
    _CT_OPEN: f"{_CT_OPEN}-IN-PROGRESS",
}
_CT_CUTOFF = date(2020, 5, 18)  # last CT day that fits the completed CT batch
_CXR_CUTOFF = date(2020, 5, 23)  # radiographs from this day on go to the late CXR batch

_CLINICAL_COLUMNS = (
    "mrn", "covid_encounter_date", "test_method", "rtpcr_result", "sex", "birth_date",
    "wcc", "crp", "po2", "labs_date", "notes",
)
_DICOM_FIELDS = (
    "mrn", "accession", "study_uid", "series_uid", "sop_uid", "sop_class_uid", "modality", "role",
    "view_position", "image_type", "exam_id", "exam_time", "days_from_index",
)
_PRIVATE_CREATOR = "ACME PACS 1.0"
_PPS_SOP_CLASS = "1.2.840.10008.3.1.2.3.3"
_TRUNCATED_BYTES = 300
_ZIP_LEVEL = 1  # noisy 16-bit pixels deflate ~8x faster than at level 6 for the same ratio
_SPLIT_MINUTES = 9

# kind -> (ExamDescription used in zip names, StudyDescription, default series)
_EXAM_TYPES = {
    "ct": ("CT-CHEST-WO", "CT CHEST WO CONTRAST", ("scout", "axial", "dose")),
    "cta": ("CTA-CHEST-PE", "CTA CHEST PE PROTOCOL", ("scout", "axial", "dose")),
    "pa_lat": ("XR-CHEST-PA-LATERAL", "XR CHEST PA AND LATERAL", ("pa", "lat")),
    "port": ("XR-PORT-CHEST-1V", "XR PORTABLE CHEST 1 VIEW", ("ap",)),
    "ped_port": ("XR-P-PORT-CHEST-1V", "XR P PORT CHEST 1 VIEW", ("ap",)),
}
_CT_KINDS = ("ct", "cta")
_CT_EXTRAS = ("screen", "vr")

# series key -> (role, modality, SOP class, ImageType, SeriesDescription, folder, ViewPosition,
#                pixel kind, SeriesNumber, images; 0 images = `ct_slices`).
# Radiograph modality/SOP class (None here) are chosen per exam: CR or DX.
_SERIES = {
    "scout": ("ct_scout", "CT", CTImageStorage, "ORIGINAL\\PRIMARY\\LOCALIZER", "SCOUT",
              "SCOUT", None, "ct", 1, 1),
    "axial": ("ct_axial", "CT", CTImageStorage, "ORIGINAL\\PRIMARY\\AXIAL", "AXIAL 2.5MM",
              "AXIAL_2.5MM", None, "ct", 2, 0),
    "axial_lung": ("ct_axial", "CT", CTImageStorage, "ORIGINAL\\PRIMARY\\AXIAL",
                   "AXIAL LUNG 2.5MM", "AXIAL_LUNG", None, "ct", 3, 0),
    "dose": ("ct_dose_sc", "CT", SecondaryCaptureImageStorage, "DERIVED\\SECONDARY\\OTHER",
             "Dose Report", "DOSE_REPORT", None, "sc", 999, 1),
    "screen": ("screen_save", "OT", SecondaryCaptureImageStorage,
               "DERIVED\\SECONDARY\\SCREEN SAVE", "SCREEN SAVE", "SCREEN_SAVE", None, "sc", 90, 1),
    "vr": ("recon_3d", "CT", CTImageStorage, "DERIVED\\SECONDARY\\REFORMATTED\\3D", "3D VR",
           "3D_VR", None, "ct", 91, 2),
    "pa": ("cr_frontal", None, None, "ORIGINAL\\PRIMARY", "PA", "PA", "PA", "cr", 1, 1),
    "lat": ("cr_lateral", None, None, "ORIGINAL\\PRIMARY", "LATERAL", "LATERAL", "LL", "cr", 2, 1),
    "ap": ("cr_frontal", None, None, "ORIGINAL\\PRIMARY", "AP PORTABLE", "AP", "AP", "cr", 1, 1),
}
_XR_SOP_CLASSES = {"CR": ComputedRadiographyImageStorage,
                   "DX": DigitalXRayImageStorageForPresentation}

_INSTITUTIONS = (
    ("MERCY GENERAL HOSPITAL", "MERCY", "2525 S Michigan Ave, Chicago, IL 60616"),
    ("ST LUKES MEDICAL CENTER", "STLUKES", "1725 W Harrison St, Chicago, IL 60612"),
    ("RIVERSIDE COMMUNITY HOSPITAL", "RIVERSIDE", "350 N Wall St, Kankakee, IL 60901"),
    ("NORTHSHORE UNIVERSITY HEALTH", "NSUH", "2650 Ridge Ave, Evanston, IL 60201"),
    ("LAKEVIEW REGIONAL MEDICAL CENTER", "LAKEVIEW", "95 Lakeview Dr, Covington, LA 70433"),
    ("SAINT ANNE HOSPITAL", "STANNE", "4950 W Thomas St, Chicago, IL 60651"),
)
_PHYSICIANS = (
    "HOUSE^GREGORY", "QUINN^MICHAELA", "KILDARE^JAMES^R", "WELBY^MARCUS", "ROSS^DOUGLAS",
    "GREENE^MARK^ALAN", "LEWIS^SUSAN", "BAILEY^MIRANDA", "YANG^CRISTINA", "CARTER^JOHN",
)
_OPERATORS = ("JENKINS^ROBIN", "OKORO^CHIDI", "HALVORSEN^INGRID", "DELGADO^RAMON", "PRICE^TASHA")
_FAMILIES = (
    "SMITH", "JOHNSON", "WILLIAMS", "BROWN", "NGUYEN", "PATEL", "KOWALSKI", "OKAFOR",
    "JOHANSSON", "ROSSI", "CHEN", "DUBOIS", "MÜLLER", "GARCÍA", "NOVÁK", "PEÑA", "LEFÈVRE",
    "HERNÁNDEZ", "SCHRÖDER",
)
_GIVENS = (
    "JOHN", "MARY", "JAMES", "LINDA", "ROBERT", "PRIYA", "WEI", "CHIOMA", "LARS", "GIULIA",
    "JOSÉ", "FRANÇOIS", "ZOË", "RENÉE", "MARÍA", "JÜRGEN",
)
_MIDDLES = ("PAUL", "ANNE", "LEE", "MARIE", "EDWARD", "ROSE")
_STREETS = ("W Belmont Ave", "N Clark St", "S Halsted St", "E 63rd St", "N Broadway",
            "W Addison St", "S Cottage Grove Ave")
_CITIES = (("Chicago", "IL", "606"), ("Evanston", "IL", "602"), ("Gary", "IN", "464"))
_SYMPTOMS = ("fever and dry cough", "dyspnea on exertion", "anosmia and myalgia",
             "hypoxia, placed on 2L NC", "chest tightness and fatigue")


def synthesize(out: Path, sites: int = 3, patients: int = 4, seed: int = 0,
               ct_slices: int = 6, ct_size: int = 64, cr_size: int = 96) -> dict:
    """Write `sites` synthetic identified sites under `out`; return (and write) the ground truth.

    The ground truth goes to out/ground_truth.json; existing out/site-* folders are replaced.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for old in sorted(out.iterdir()):
        if old.is_dir() and re.fullmatch(r"site-[a-z]+", old.name):
            shutil.rmtree(old)
    ids = _Ids(seed)
    truth: dict = {"seed": seed, "generator_version": GENERATOR_VERSION, "sites": {}}
    for k in range(sites):
        site = _Site(k, ids, ct_slices=ct_slices, ct_size=ct_size, cr_size=cr_size)
        site.plan(patients)
        truth["sites"][site.sid] = site.write(out)
    text = json.dumps(truth, indent=1, ensure_ascii=False) + "\n"
    (out / "ground_truth.json").write_text(text, encoding="utf-8")
    return truth


def _digest(text: str) -> int:
    """128-bit integer from the SHA-256 of `text`."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:16], "big")


_IMPLEMENTATION_UID = f"2.25.{_digest('radrepo-synth-implementation')}"


class _Ids:
    """Run-wide unique UIDs (hash of seed and counter) and unique random digit strings."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.counter = 0
        self.used: set[str] = set()

    def uid(self) -> str:
        self.counter += 1
        return f"2.25.{_digest(f'radrepo-synth:{self.seed}:{self.counter}')}"

    def number(self, rng: random.Random, digits: int) -> str:
        while True:
            value = str(rng.randrange(10 ** (digits - 1), 10**digits))
            if value not in self.used:
                self.used.add(value)
                return value


@dataclass(eq=False)
class _Patient:
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
class _Series:
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
class _Exam:
    patient: _Patient
    kind: str
    when: datetime
    accession: str
    study_id: str
    study_uid: str
    pps_uid: str
    frame_uid: str | None
    scout_uid: str | None
    referring: str
    series: list[_Series]
    exam_id: str | None
    batch: str | None
    quirk: str | None
    copy_of: _Exam | None = None  # original of a re-sent or pediatric double copy
    readme: bool = False
    zip_suffix: str = ""  # a second zip of one exam id and time; sorts after the original

    @property
    def code(self) -> str:
        return _EXAM_TYPES[self.kind][0]

    @property
    def is_ct(self) -> bool:
        return self.kind in _CT_KINDS

    @property
    def days(self) -> int:
        return (self.when.date() - self.patient.index_date).days

    @property
    def pixel_key(self) -> str:
        """Pixel-noise key: re-issued copies of a procedure (same accession, time) share pixels."""
        return f"{self.accession}/{self.when:%Y%m%d%H%M%S}"

    def zip_key(self) -> str:
        mrn, stamp = self.patient.mrn, f"{self.when:%Y%m%d-%H%M%S}"
        return (f"{_BATCH_FOLDERS[self.batch]}/{mrn}_{stamp}_{self.exam_id}_{self.code}"
                f"{self.zip_suffix}.zip")


@dataclass(frozen=True)
class _Station:
    name: str
    ae: str
    serial: str
    manufacturer: str
    model: str


@dataclass(eq=False)
class _Site:
    """One synthetic site: its patients, exams and planted quirks, and the writer of its export."""

    k: int
    ids: _Ids
    ct_slices: int
    ct_size: int
    cr_size: int
    patients: list[_Patient] = field(default_factory=list)
    exams: list[_Exam] = field(default_factory=list)
    quirks: dict = field(default_factory=dict)
    remap: list[tuple[str, str]] = field(default_factory=list)
    identifiers: set[str] = field(default_factory=set)
    defects: dict[str, tuple[_Exam, _Series, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.sid = "site-" + _letters(self.k)
        self.layout = _LAYOUTS[self.k % len(_LAYOUTS)]
        self.rng = random.Random(f"radrepo-synth:{self.ids.seed}:{self.sid}")
        self.ct_bits = 12 if self.k % 2 == 0 else 16
        self.exam_counter = 0
        campus = self.k // len(_INSTITUTIONS)
        name, prefix, self.institution_address = _INSTITUTIONS[self.k % len(_INSTITUTIONS)]
        if campus:
            name, prefix = f"{name} CAMPUS {campus + 1}", f"{prefix}{campus + 1}"
        self.institution = name
        self.stations = {
            "ct": _Station(f"{prefix}-CT01", f"{prefix}_CT1", "SN" + self._number(7),
                           "GE MEDICAL SYSTEMS", "LightSpeed VCT"),
            "xr": _Station(f"{prefix}-XR02", f"{prefix}_CR1", "SN" + self._number(7),
                           "CARESTREAM HEALTH", "DRX-Revolution"),
        }
        self.referrers = self.rng.sample(_PHYSICIANS, 4)
        self.performing = self.rng.choice([p for p in _PHYSICIANS if p not in self.referrers])
        self.operator = self.rng.choice(_OPERATORS)
        self.identifiers |= {name, self.institution_address}
        for station in self.stations.values():
            self.identifiers |= {station.name, station.ae, station.serial}
        for person in (*self.referrers, self.performing, self.operator):
            self._add_name(person)
        self.name_pool = [(f, g) for f in _FAMILIES for g in _GIVENS]
        self.rng.shuffle(self.name_pool)

    # ----------------------------------------------------------------- planning

    def plan(self, patients: int) -> None:
        """Plant the layout's quirk patients, `patients` regular ones and a clinical-only one."""
        {"zip_batches": self._plant_zip, "tree": self._plant_tree,
         "flat": self._plant_flat}[self.layout]()
        for _ in range(patients):
            p = self._patient()
            for _ in range(self.rng.randint(1, 3)):
                kind = self.rng.choice(("ct", "cta", "pa_lat", "port", "port"))
                if kind in _CT_KINDS:
                    days = self.rng.randint(-20, min(40, (_CT_CUTOFF - p.index_date).days))
                else:
                    days = self.rng.randint(-20, 40)
                self._exam(p, kind, self._when(p, days))
        self._patient().has_images = False

    def _plant_zip(self) -> None:
        q = self.quirks
        p = self._patient()
        original = self._exam(p, "pa_lat", self._when(p, 3), batch=_CXR_EARLY, quirk="resent")
        copy = replace(original, exam_id=self._exam_id(), batch=_CXR_LATE, copy_of=original)
        self.exams.append(copy)
        q["resent"] = {"original_zip": original.zip_key(), "copy_zip": copy.zip_key()}

        p = self._patient(pediatric=True)
        original = self._exam(p, "ped_port", self._when(p, 1), batch=_CXR_EARLY,
                              quirk="pediatric_double")
        double = self._reissue(original)
        q["pediatric_double"] = {"original_zip": original.zip_key(), "copy_zip": double.zip_key(),
                                 "accession": original.accession}

        p = self._patient()
        first = self._exam(p, "ct", self._when(p, 2), ("scout", "axial"), quirk="ct_split")
        second = self._exam(p, "ct", first.when + timedelta(minutes=_SPLIT_MINUTES),
                            ("axial_lung", "dose"), quirk="ct_split", part_of=first)
        q["ct_split"] = {"zips": [first.zip_key(), second.zip_key()], "exam_id": first.exam_id,
                         "accession": first.accession, "minutes_apart": _SPLIT_MINUTES}

        p = self._patient()
        when = self._when(p, 5)
        pair = [self._exam(p, "port", when, batch=batch, quirk="same_time_not_duplicate")
                for batch in (_CXR_EARLY, _CXR_LATE)]
        q["same_time_not_duplicate"] = {"zips": [e.zip_key() for e in pair]}

        p = self._patient()
        intermediate, current = self._number(7), self._number(7)
        p.current_mrn = current
        self.remap += [(p.mrn, intermediate), (intermediate, current)]
        self._exam(p, "pa_lat", self._when(p, 0), quirk="id_change")
        q["id_change"] = {"old": p.mrn, "intermediate": intermediate, "current": current}

        p = self._patient()
        q["outside_window"] = [
            self._window_exam(p, kind, days)
            for kind, days in (("pa_lat", -400), ("port", -366), ("port", -365),
                               ("ct", -31), ("ct", -30))
        ]

        p = self._patient(index_date=date(2020, 5, 1) + timedelta(days=self.rng.randint(0, 6)))
        readme = self._exam(p, "ct", self._when(p, 2), _EXAM_TYPES["ct"][2] + _CT_EXTRAS)
        readme.readme = True
        q["readme"] = {"key": f"{readme.zip_key()}!README.txt"}
        days = (date(2020, 5, 25) - p.index_date).days
        late = self._exam(p, "ct", self._when(p, days), batch=_CT_OPEN, quirk="in_progress")
        q["in_progress"] = {"zip": late.zip_key()}

        # the pediatric double store again, its copy arriving a batch later
        p = self._patient(pediatric=True)
        original = self._exam(p, "ped_port", self._when(p, 2), batch=_CXR_EARLY,
                              quirk="pediatric_double")
        later = self._reissue(original, batch=_CXR_LATE)
        q["pediatric_double_across_batches"] = {"original_zip": original.zip_key(),
                                                "copy_zip": later.zip_key()}
        # and once with both copies under the same exam id (a double store, not a split exam)
        p = self._patient(pediatric=True)
        original = self._exam(p, "ped_port", self._when(p, 4), batch=_CXR_EARLY,
                              quirk="pediatric_double")
        twin = self._reissue(original, same_exam_id=True)
        q["double_store_same_exam_id"] = {"original_zip": original.zip_key(),
                                          "copy_zip": twin.zip_key(),
                                          "exam_id": original.exam_id}

    def _plant_tree(self) -> None:
        p = self._patient()
        ct = self._exam(p, "ct", self._when(p, 2), _EXAM_TYPES["ct"][2] + _CT_EXTRAS)
        cr = self._exam(p, "pa_lat", self._when(p, 5))
        axial = ct.series[1]
        self.defects["same_sop_twice"] = (cr, cr.series[0], 0)
        self.defects["truncated"] = (ct, axial, len(axial.sop_uids) - 1)

    def _plant_flat(self) -> None:
        p = self._patient()
        ct = self._exam(p, "ct", self._when(p, 1), _EXAM_TYPES["ct"][2] + _CT_EXTRAS)
        screen = next(s for s in ct.series if s.role == "screen_save")
        self.defects["no_sop_uid"] = (ct, screen, 0)
        self.quirks["outside_window"] = [self._window_exam(p, "port", -380)]

    def _window_exam(self, p: _Patient, kind: str, days: int) -> dict:
        start = CT_WINDOW_START if kind in _CT_KINDS else CR_WINDOW_START
        quirk = "window_edge" if days >= start else "outside_window"
        exam = self._exam(p, kind, self._when(p, days), quirk=quirk)
        return {"zip": exam.zip_key() if exam.exam_id else None, "study_uid": exam.study_uid,
                "accession": exam.accession, "modality": exam.series[0].modality,
                "days_from_index": days, "in_window": days >= start}

    def _patient(self, pediatric: bool = False, index_date: date | None = None) -> _Patient:
        rng, n = self.rng, len(self.patients)
        if n == 0:  # always one accented, multi-component name per site
            family = rng.choice([f for f in _FAMILIES if not f.isascii()])
            given = rng.choice([g for g in _GIVENS if not g.isascii()])
        else:
            family, given = self.name_pool[n % len(self.name_pool)]
        middle = rng.choice(_MIDDLES) if n < 2 or rng.random() < 0.2 else ""
        ascii_name = (family + given).isascii()
        charset = rng.choice(("ISO_IR 100", None)) if ascii_name else "ISO_IR 192"
        born = (date(2012, 1, 1) + timedelta(days=rng.randint(0, 6 * 365)) if pediatric
                else date(1935, 1, 1) + timedelta(days=rng.randint(0, 65 * 365)))
        city, state, zip3 = rng.choice(_CITIES)
        address = (f"{rng.randint(100, 9999)} {rng.choice(_STREETS)}, {city}, {state} "
                   f"{zip3}{rng.randint(10, 99)}")
        mrn = self._number(7)
        p = _Patient(
            mrn=mrn, current_mrn=mrn, family=family, given=given, middle=middle,
            charset=charset, birth_date=born, sex=rng.choice("FM"), address=address,
            phone=f"({rng.choice(('312', '773', '847'))}) 555-01{rng.randint(0, 99):02d}",
            other_id="E" + self._number(9),
            index_date=index_date or date(2020, 3, 1) + timedelta(days=rng.randint(0, 67)),
        )
        self.patients.append(p)
        self._add_name(p.pn)
        self.identifiers |= {f"{given} {family}", address, p.phone, p.other_id, f"{born:%Y%m%d}"}
        return p

    def _exam(self, p: _Patient, kind: str, when: datetime, roles: tuple[str, ...] = (), *,
              batch: str | None = None, quirk: str | None = None,
              part_of: _Exam | None = None) -> _Exam:
        is_ct = kind in _CT_KINDS
        xr_modality = None if is_ct else self.rng.choice(("CR", "DX"))
        series = [self._series(key, xr_modality) for key in roles or _EXAM_TYPES[kind][2]]
        scout = next((s.sop_uids[0] for s in series if s.role == "ct_scout"), None)
        zipped = self.layout == "zip_batches"
        exam = _Exam(
            patient=p, kind=kind, when=when,
            accession=part_of.accession if part_of else self._number(10),
            study_id=self._number(8), study_uid=self._uid(), pps_uid=self._uid(),
            frame_uid=(part_of.frame_uid if part_of else self._uid()) if is_ct else None,
            scout_uid=part_of.scout_uid if part_of else scout,
            referring=self.rng.choice(self.referrers), series=series,
            exam_id=(part_of.exam_id if part_of else self._exam_id()) if zipped else None,
            batch=(batch or _default_batch(is_ct, when)) if zipped else None,
            quirk=quirk,
        )
        self.exams.append(exam)
        return exam

    def _reissue(self, original: _Exam, batch: str | None = None,
                 same_exam_id: bool = False) -> _Exam:
        """Same procedure stored again by PACS: new HIRO id (unless ``same_exam_id``) and new
        UIDs, same pixels and time; in ``batch``, or the original's."""
        series = [replace(s, uid=self._uid(), sop_uids=[self._uid() for _ in s.sop_uids])
                  for s in original.series]
        copy = replace(original, exam_id=original.exam_id if same_exam_id else self._exam_id(),
                       study_uid=self._uid(), pps_uid=self._uid(), series=series,
                       copy_of=original, batch=batch or original.batch,
                       zip_suffix="2" if same_exam_id else "")
        self.exams.append(copy)
        return copy

    def _series(self, key: str, xr_modality: str | None) -> _Series:
        role, modality, sop_class, image_type, desc, folder, view, pixel, number, count = (
            _SERIES[key])
        modality = modality or xr_modality
        return _Series(
            role=role, modality=modality, sop_class=sop_class or _XR_SOP_CLASSES[modality],
            image_type=image_type, description=desc, folder=f"{number}_{folder}", view=view,
            pixel_kind=pixel, number=number, uid=self._uid(),
            sop_uids=[self._uid() for _ in range(count or self.ct_slices)],
        )

    def _when(self, p: _Patient, days: int) -> datetime:
        clock = time(self.rng.randint(0, 23), self.rng.randint(0, 59), self.rng.randint(0, 59))
        return datetime.combine(p.index_date + timedelta(days=days), clock)

    def _uid(self) -> str:
        uid = self.ids.uid()
        self.identifiers.add(uid)
        return uid

    def _number(self, digits: int) -> str:
        value = self.ids.number(self.rng, digits)
        self.identifiers.add(value)
        return value

    def _exam_id(self) -> str:
        self.exam_counter += 1
        return f"A{self.exam_counter:03d}"

    def _add_name(self, pn: str) -> None:
        parts = [part for part in pn.split("^") if part]
        self.identifiers |= {pn, " ".join(parts)} | {part for part in parts if len(part) >= 3}

    # ------------------------------------------------------------------ writing

    def write(self, out: Path) -> dict:
        """Write this site's images, clinical.csv and id_remap.csv; return its ground truth."""
        root = out / self.sid / "images"
        root.mkdir(parents=True)
        files = {"zip_batches": self._write_zips, "tree": self._write_tree,
                 "flat": self._write_flat}[self.layout](root)
        self._write_clinical(out / self.sid / "clinical.csv")
        with open(out / self.sid / "id_remap.csv", "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow(("old_id", "new_id"))
            writer.writerows(self.remap)
        used = {e.batch for e in self.exams}
        return {
            "layout": self.layout,
            "source": f"{self.sid}/images",
            "clinical": f"{self.sid}/clinical.csv",
            "remap": f"{self.sid}/id_remap.csv",
            "batches": {b: {"folder": folder, "complete": folder.endswith("-COMPLETE")}
                        for b, folder in _BATCH_FOLDERS.items() if b in used},
            "patients": [
                {"mrn": p.mrn, "current_mrn": p.current_mrn, "name": p.pn,
                 "birth_date": f"{p.birth_date:%Y%m%d}", "sex": p.sex,
                 "index_date": f"{p.index_date:%Y%m%d}", "has_clinical": True,
                 "has_images": p.has_images, "clinical": p.clinical}
                for p in self.patients
            ],
            "files": sorted(files, key=lambda f: f["key"]),
            "quirks": self.quirks,
            "identifiers": sorted(self.identifiers),
        }

    def _write_zips(self, root: Path) -> list[dict]:
        files = []
        for exam in self.exams:
            zip_key = exam.zip_key()
            path = root / zip_key
            path.parent.mkdir(parents=True, exist_ok=True)
            members = [(f"{s.folder}/IM{i + 1:04d}.dcm", s, i)
                       for s in exam.series for i in range(len(s.sop_uids))]
            if exam.readme:
                members.append(("README.txt", None, 0))
            stamp = exam.when.timetuple()[:6]
            with zipfile.ZipFile(path, "w") as zf:
                for member, series, i in sorted(members, key=lambda m: m[0]):
                    key = f"{zip_key}!{member}"
                    if series is None:
                        text = f"HIRO export of {exam.code} for subject {exam.patient.mrn}.\n"
                        _zip_add(zf, member, stamp, text.encode())
                        files.append(_blank_entry(key, exam.batch, "not_dicom"))
                        continue
                    _zip_add(zf, member, stamp, self._encode(exam, series, i))
                    original = f"{exam.copy_of.zip_key()}!{member}" if exam.copy_of else None
                    files.append(self._entry(key, exam, series, i, duplicate_of=original))
        return files

    def _write_tree(self, root: Path) -> list[dict]:
        files = []
        for exam in self.exams:
            p = exam.patient
            exam_dir = f"{p.family}_{p.given}_{p.mrn}/{exam.when:%Y%m%d}_{exam.accession}"
            for series in exam.series:
                (root / exam_dir / series.folder).mkdir(parents=True)
                for i in range(len(series.sop_uids)):
                    key = f"{exam_dir}/{series.folder}/{i + 1}.dcm"
                    data = self._encode(exam, series, i)
                    if self.defects["truncated"] == (exam, series, i):
                        (root / key).write_bytes(data[:_TRUNCATED_BYTES])
                        files.append(_blank_entry(key, None, "truncated"))
                        self.quirks["truncated"] = {"key": key}
                        continue
                    (root / key).write_bytes(data)
                    twice = self.defects["same_sop_twice"] == (exam, series, i)
                    files.append(self._entry(key, exam, series, i,
                                             quirk="same_sop_twice" if twice else None))
                    if twice:
                        copy = f"{exam_dir}/{series.folder}/{i + 1}_1.dcm"
                        (root / copy).write_bytes(data)
                        files.append(self._entry(copy, exam, series, i, quirk="same_sop_twice",
                                                 duplicate_of=key))
                        self.quirks["same_sop_twice"] = {"original": key, "copy": copy}
        return files

    def _write_flat(self, root: Path) -> list[dict]:
        instances = [(e, s, i) for e in self.exams for s in e.series
                     for i in range(len(s.sop_uids))]
        names = [f"IM_{n:06d}" for n in self.rng.sample(range(1, 1_000_000),
                                                         len(instances) + 1)]
        (root / names[-1]).write_bytes(b"")
        (root / "notes.txt").write_text(
            f"PACS export from {self.stations['ct'].name}; contact radiology IT with questions.\n")
        files = [_blank_entry(names[-1], None, "empty"),
                 _blank_entry("notes.txt", None, "not_dicom")]
        self.quirks |= {"empty": {"key": names[-1]}, "not_dicom": {"key": "notes.txt"}}
        for name, (exam, series, i) in zip(names, instances, strict=False):
            drop = self.defects["no_sop_uid"] == (exam, series, i)
            (root / name).write_bytes(self._encode(exam, series, i, implicit=True, drop_sop=drop))
            files.append(self._entry(name, exam, series, i, drop_sop=drop))
            if drop:
                self.quirks["no_sop_uid"] = {"key": name}
        return files

    def _write_clinical(self, path: Path) -> None:
        rng = self.rng
        # lab dates have their own stream, so adding them left every other draw as it was
        labs_rng = random.Random(f"radrepo-synth:{self.ids.seed}:{self.sid}:labs")
        with open(path, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow(_CLINICAL_COLUMNS)
            for p in sorted(self.patients, key=lambda p: p.current_mrn):
                method = rng.choices(("PCR", "serology", "clinical"), weights=(7, 2, 1))[0]
                result = ""
                if method == "PCR":
                    result = "positive" if rng.random() < 0.85 else "negative"
                labs = [f"{rng.uniform(lo, hi):.1f}" if rng.random() < 0.8 else ""
                        for lo, hi in ((3.0, 18.0), (1.0, 250.0), (50.0, 100.0))]
                labs_day = labs_rng.randint(-2, 5)
                note = f"{p.given} {p.family} presented with {rng.choice(_SYMPTOMS)}."
                writer.writerow((p.current_mrn, p.index_date.isoformat(), method, result, p.sex,
                                 p.birth_date.isoformat(), *labs,
                                 (p.index_date + timedelta(days=labs_day)).isoformat(), note))
                p.clinical = {
                    "test_method": method, "rtpcr_result": result,
                    "age_at_index": min(_completed_years(p.birth_date, p.index_date), 90),
                    "labs_day": labs_day,
                    "labs": {name: float(v) for name, v in zip(("wcc", "crp", "po2"), labs,
                                                               strict=True) if v},
                }

    def _entry(self, key: str, exam: _Exam, series: _Series, i: int, *,
               quirk: str | None = None, duplicate_of: str | None = None,
               drop_sop: bool = False) -> dict:
        """Ground-truth record of one DICOM file."""
        return {
            "key": key, "batch": exam.batch, "defect": "no_sop_uid" if drop_sop else None,
            "mrn": exam.patient.mrn, "accession": exam.accession, "study_uid": exam.study_uid,
            "series_uid": series.uid, "sop_uid": None if drop_sop else series.sop_uids[i],
            "sop_class_uid": series.sop_class, "modality": series.modality, "role": series.role,
            "view_position": series.view, "image_type": series.image_type,
            "exam_id": exam.exam_id, "exam_time": f"{exam.when:%Y%m%d%H%M%S}",
            "days_from_index": exam.days, "quirk": quirk or exam.quirk,
            "duplicate_of": duplicate_of,
        }

    # ----------------------------------------------------------------- encoding

    def _encode(self, exam: _Exam, series: _Series, i: int, *, implicit: bool = False,
                drop_sop: bool = False) -> bytes:
        """One DICOM file as bytes (explicit VR LE unless `implicit`)."""
        ds = self._dataset(exam, series, i, implicit)
        if drop_sop:  # not a conformant file any more: no SOP Instance UID anywhere
            del ds.SOPInstanceUID
            del ds.file_meta.MediaStorageSOPInstanceUID
            ds.preamble = b"\0" * 128
        buffer = io.BytesIO()
        pydicom.dcmwrite(buffer, ds, enforce_file_format=not drop_sop)
        return buffer.getvalue()

    def _dataset(self, exam: _Exam, series: _Series, i: int, implicit: bool) -> Dataset:
        p = exam.patient
        station = self.stations["ct" if exam.is_ct else "xr"]
        sop_uid = series.sop_uids[i]
        series_time = exam.when + timedelta(minutes=exam.series.index(series))
        content_time = series_time + timedelta(seconds=i)

        meta = FileMetaDataset()
        meta.FileMetaInformationVersion = b"\x00\x01"
        meta.MediaStorageSOPClassUID = series.sop_class
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
        meta.ImplementationClassUID = _IMPLEMENTATION_UID
        meta.ImplementationVersionName = "RADREPO_SYNTH1"
        meta.SourceApplicationEntityTitle = station.ae

        ds = Dataset()
        ds.file_meta = meta
        if p.charset:
            ds.SpecificCharacterSet = p.charset
        ds.ImageType = series.image_type.split("\\")
        ds.SOPClassUID = series.sop_class
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate, ds.StudyTime = f"{exam.when:%Y%m%d}", f"{exam.when:%H%M%S}"
        ds.SeriesDate, ds.SeriesTime = f"{series_time:%Y%m%d}", f"{series_time:%H%M%S}"
        ds.AcquisitionDate, ds.AcquisitionTime = ds.SeriesDate, ds.SeriesTime
        ds.ContentDate, ds.ContentTime = f"{content_time:%Y%m%d}", f"{content_time:%H%M%S}"
        ds.AccessionNumber = exam.accession
        ds.Modality = series.modality
        if series.sop_class == SecondaryCaptureImageStorage:
            ds.ConversionType = "WSD"
        if series.modality == "DX":
            ds.PresentationIntentType = "FOR PRESENTATION"
        ds.Manufacturer = station.manufacturer
        ds.InstitutionName = self.institution
        ds.InstitutionAddress = self.institution_address
        ds.ReferringPhysicianName = exam.referring
        ds.StationName = station.name
        ds.StudyDescription = _EXAM_TYPES[exam.kind][1]
        ds.SeriesDescription = series.description
        ds.PerformingPhysicianName = self.performing
        ds.OperatorsName = self.operator
        ds.ManufacturerModelName = station.model
        ds.ReferencedPerformedProcedureStepSequence = [
            _reference(_PPS_SOP_CLASS, exam.pps_uid)]
        if series.role == "ct_axial" and exam.scout_uid:
            ds.ReferencedImageSequence = [_reference(CTImageStorage, exam.scout_uid)]
        ds.PatientName = p.pn
        ds.PatientID = p.mrn
        ds.PatientBirthDate = f"{p.birth_date:%Y%m%d}"
        ds.PatientSex = p.sex
        ds.OtherPatientIDs = p.other_id
        ds.PatientAge = f"{(exam.when.date() - p.birth_date).days // 365:03d}Y"
        ds.PatientAddress = p.address
        ds.PatientTelephoneNumbers = p.phone
        ds.BodyPartExamined = "CHEST"
        ds.DeviceSerialNumber = station.serial
        ds.SoftwareVersions = "4.2.1"
        ds.InstanceCreationDate, ds.InstanceCreationTime = ds.ContentDate, ds.ContentTime
        ds.InstitutionalDepartmentName = "RADIOLOGY"
        ds.PhysiciansOfRecord = exam.referring
        ds.NameOfPhysiciansReadingStudy = self.performing
        ds.AdditionalPatientHistory = f"{p.spaced}: cough, fever, suspected COVID-19"
        ds.PatientSize, ds.PatientWeight = "1.72", "74"
        ds.PatientPosition = "FFS" if exam.is_ct else ""
        ds.DateOfLastCalibration, ds.TimeOfLastCalibration = "20200102", "070000"
        ds.LossyImageCompression = "00"
        for keyword, value in (_CT_TECHNIQUE if exam.is_ct else _XR_TECHNIQUE):
            vr = dictionary_VR(tag_for_keyword(keyword))
            setattr(ds, keyword, float(value) if vr in ("FL", "FD") else value)
        ds.StudyInstanceUID = exam.study_uid
        ds.SeriesInstanceUID = series.uid
        ds.StudyID = exam.study_id
        ds.SeriesNumber = series.number
        ds.InstanceNumber = i + 1
        if series.sop_class == CTImageStorage:
            ds.KVP = "120"
            ds.SliceThickness = "2.5"
            z = -50.0 - 2.5 * i
            ds.ImagePositionPatient = [-175.0, -175.0, z]
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
            ds.SliceLocation = z
            ds.FrameOfReferenceUID = exam.frame_uid
            ds.PositionReferenceIndicator = ""
        elif series.view:
            ds.KVP = "110"
            ds.ViewPosition = series.view
            ds.PatientOrientation = ["A", "F"] if series.view == "LL" else ["L", "F"]
        prefix = "Portable" if series.view == "AP" else exam.code.replace("-", " ")
        ds.ImageComments = f"{prefix}, pt {p.spaced} MRN {p.mrn}"
        request = Dataset()
        request.AccessionNumber = exam.accession
        request.RequestedProcedureID = exam.accession
        request.ScheduledProcedureStepID = exam.accession
        request.RequestedProcedureDescription = ds.StudyDescription
        ds.RequestAttributesSequence = [request]
        self._add_pixels(ds, series, f"{exam.pixel_key}/{series.number}/{i}")
        block = ds.private_block(0x0029, _PRIVATE_CREATOR, create=True)
        block.add_new(0x10, "LO", p.mrn)
        block.add_new(0x11, "LT", f"Patient: {p.pn}")
        return ds

    def _add_pixels(self, ds: Dataset, series: _Series, key: str) -> None:
        kind = series.pixel_kind
        size = self.cr_size if kind == "cr" else self.ct_size
        bits_stored = {"ct": self.ct_bits, "cr": 12, "sc": 8}[kind]
        base = _base_image(kind, size)
        rng = np.random.default_rng([self.ids.seed, _digest(key)])
        pixels = base + rng.integers(0, 32, size=base.shape, dtype=base.dtype)
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ds.Columns = size
        ds.BitsAllocated = base.dtype.itemsize * 8
        ds.BitsStored = bits_stored
        ds.HighBit = bits_stored - 1
        ds.PixelRepresentation = 1 if kind == "ct" else 0
        if kind == "ct":
            ds.PixelSpacing = [round(350 / size, 4)] * 2
            ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
            ds.WindowCenter, ds.WindowWidth = -600, 1500
        elif kind == "cr":
            ds.ImagerPixelSpacing = [round(430 / size, 4)] * 2
            ds.WindowCenter, ds.WindowWidth = 2048, 4096
        ds.PixelData = pixels.tobytes()


# Technique attributes a real scanner writes (none identifies anyone); they give the synthetic
# headers the size of real ones (about 150 elements).
_CT_TECHNIQUE = (
    ("ScanOptions", "HELICAL MODE"), ("DataCollectionDiameter", "500"),
    ("ReconstructionDiameter", "350"), ("DistanceSourceToDetector", "946.7"),
    ("DistanceSourceToPatient", "541"), ("GantryDetectorTilt", "0"), ("TableHeight", "160"),
    ("RotationDirection", "CW"), ("ExposureTime", "500"), ("XRayTubeCurrent", "250"),
    ("Exposure", "125"), ("FilterType", "BODY FILTER"), ("GeneratorPower", "30"),
    ("FocalSpots", "0.7"), ("ConvolutionKernel", "STANDARD"), ("RevolutionTime", "0.5"),
    ("SingleCollimationWidth", "0.625"), ("TotalCollimationWidth", "40"),
    ("TableSpeed", "78.75"), ("TableFeedPerRotation", "39.375"), ("SpiralPitchFactor", "0.984"),
    ("CTDIvol", "8.2"), ("AcquisitionNumber", "1"), ("PixelSpacing", ["0.683", "0.683"]),
    ("ProtocolName", "CHEST ROUTINE"), ("ContrastBolusAgent", ""),
    ("EstimatedDoseSaving", "22.5"), ("ReconstructionAlgorithm", "ITERATIVE"),
    ("AcquisitionType", "SPIRAL"), ("TubeAngle", "0"), ("ReconstructionMethod", "ASIR 40"),
    ("SpatialResolution", "0.35"),
    ("RescaleType", "HU"), ("WindowCenterWidthExplanation", ["LUNG", "MEDIASTINUM"]),
)
_XR_TECHNIQUE = (
    ("ExposureTime", "12"), ("XRayTubeCurrent", "320"), ("Exposure", "4"),
    ("ExposureInuAs", "4000"), ("DistanceSourceToDetector", "1800"),
    ("DistanceSourceToPatient", "1650"), ("FilterType", "NONE"), ("GeneratorPower", "35"),
    ("FocalSpots", "1.2"), ("Grid", "NONE"), ("AnodeTargetMaterial", "TUNGSTEN"),
    ("BodyPartThickness", "220"), ("CompressionForce", "0"), ("RelativeXRayExposure", "1450"),
    ("ExposureIndex", "310"), ("TargetExposureIndex", "300"), ("DeviationIndex", "0.14"),
    ("Sensitivity", "200"), ("DetectorType", "SCINTILLATOR"),
    ("DetectorConfiguration", "AREA"), ("DetectorID", "DET01"),
    ("ImagerPixelSpacing", ["0.139", "0.139"]), ("FieldOfViewShape", "RECTANGLE"),
    ("ProtocolName", "CHEST 1V"), ("AcquisitionNumber", "1"),
)


def _completed_years(birth: date, at: date) -> int:
    return at.year - birth.year - ((at.month, at.day) < (birth.month, birth.day))


def _letters(k: int) -> str:
    """0 -> 'a', 25 -> 'z', 26 -> 'aa', ..."""
    text = ""
    k += 1
    while k:
        k, rest = divmod(k - 1, 26)
        text = chr(ord("a") + rest) + text
    return text


def _blank_entry(key: str, batch: str | None, defect: str) -> dict:
    """Ground-truth record of a file that is not readable DICOM: all DICOM fields are null."""
    return {"key": key, "batch": batch, "defect": defect, **dict.fromkeys(_DICOM_FIELDS),
            "quirk": None, "duplicate_of": None}


def _default_batch(is_ct: bool, when: datetime) -> str:
    if is_ct:
        return _CT_DONE
    return _CXR_EARLY if when.date() < _CXR_CUTOFF else _CXR_LATE


def _reference(sop_class: str, sop_uid: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_uid
    return item


def _zip_add(zf: zipfile.ZipFile, name: str, stamp: tuple[int, ...], data: bytes) -> None:
    """Add one deflated member with a fixed timestamp and attributes (reproducible zips)."""
    info = zipfile.ZipInfo(name, date_time=stamp)
    info.create_system = 3
    info.external_attr = 0o100644 << 16
    zf.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=_ZIP_LEVEL)


@lru_cache(maxsize=6)
def _base_image(kind: str, size: int) -> np.ndarray:
    """Noise-free chest-like phantom for a pixel kind ('ct' int16, 'cr' uint16, 'sc' uint8)."""
    y, x = np.ogrid[-1:1:size * 1j, -1:1:size * 1j]
    body = (x / 0.85) ** 2 + (y / 0.65) ** 2 <= 1
    lungs = ((np.abs(x) - 0.38) / 0.27) ** 2 + (y / 0.45) ** 2 <= 1
    if kind == "sc":
        image = np.where((np.arange(size) // 8 % 2 == 0)[:, None] & body, 180, 20)
        dtype = np.dtype("u1")
    else:
        background, tissue, lung = (0, 1024, 200) if kind == "ct" else (300, 2400, 1300)
        image = np.where(lungs, lung, np.where(body, tissue, background))
        dtype = np.dtype("<i2" if kind == "ct" else "<u2")
    image = image.astype(dtype)
    image.setflags(write=False)
    return image
