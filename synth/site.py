"""The plan of one synthetic site: its patients and exams, and the tip-sheet quirks it plants."""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from datetime import date, datetime, time, timedelta

from synth.ids import Ids
from synth.model import (
    CR_WINDOW_START,
    CT_CUTOFF,
    CT_OPEN,
    CT_WINDOW_START,
    CXR_EARLY,
    CXR_LATE,
    Exam,
    Patient,
    Series,
    Station,
    default_batch,
)
from synth.vocabulary import (
    CITIES,
    CT_EXTRAS,
    CT_KINDS,
    EXAM_TYPES,
    FAMILIES,
    GIVENS,
    INSTITUTIONS,
    MIDDLES,
    OPERATORS,
    PHYSICIANS,
    SERIES,
    STREETS,
    XR_SOP_CLASSES,
)

_LAYOUTS = ("zip_batches", "tree", "flat")
_SPLIT_MINUTES = 9


@dataclass(eq=False)
class Site:
    """One synthetic site: the patients, exams and planted quirks its export is written from."""

    k: int
    ids: Ids
    ct_slices: int
    ct_size: int
    cr_size: int
    patients: list[Patient] = field(default_factory=list)
    exams: list[Exam] = field(default_factory=list)
    quirks: dict = field(default_factory=dict)
    remap: list[tuple[str, str]] = field(default_factory=list)
    identifiers: set[str] = field(default_factory=set)
    defects: dict[str, tuple[Exam, Series, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.sid = "site-" + _letters(self.k)
        self.layout = _LAYOUTS[self.k % len(_LAYOUTS)]
        self.rng = random.Random(f"radrepo-synth:{self.ids.seed}:{self.sid}")
        self.ct_bits = 12 if self.k % 2 == 0 else 16
        self.exam_counter = 0
        campus = self.k // len(INSTITUTIONS)
        name, prefix, self.institution_address = INSTITUTIONS[self.k % len(INSTITUTIONS)]
        if campus:
            name, prefix = f"{name} CAMPUS {campus + 1}", f"{prefix}{campus + 1}"
        self.institution = name
        self.stations = {
            "ct": Station(f"{prefix}-CT01", f"{prefix}_CT1", "SN" + self._number(7),
                          "GE MEDICAL SYSTEMS", "LightSpeed VCT"),
            "xr": Station(f"{prefix}-XR02", f"{prefix}_CR1", "SN" + self._number(7),
                          "CARESTREAM HEALTH", "DRX-Revolution"),
        }
        self.referrers = self.rng.sample(PHYSICIANS, 4)
        self.performing = self.rng.choice([p for p in PHYSICIANS if p not in self.referrers])
        self.operator = self.rng.choice(OPERATORS)
        self.identifiers |= {name, self.institution_address}
        for station in self.stations.values():
            self.identifiers |= {station.name, station.ae, station.serial}
        for person in (*self.referrers, self.performing, self.operator):
            self._add_name(person)
        self.name_pool = [(f, g) for f in FAMILIES for g in GIVENS]
        self.rng.shuffle(self.name_pool)

    def plan(self, patients: int) -> None:
        """Plant the layout's quirk patients, `patients` regular ones and a clinical-only one."""
        {"zip_batches": self._plant_zip, "tree": self._plant_tree,
         "flat": self._plant_flat}[self.layout]()
        for _ in range(patients):
            p = self._patient()
            for _ in range(self.rng.randint(1, 3)):
                kind = self.rng.choice(("ct", "cta", "pa_lat", "port", "port"))
                if kind in CT_KINDS:
                    days = self.rng.randint(-20, min(40, (CT_CUTOFF - p.index_date).days))
                else:
                    days = self.rng.randint(-20, 40)
                self._exam(p, kind, self._when(p, days))
        self._patient().has_images = False

    def _plant_zip(self) -> None:
        q = self.quirks
        p = self._patient()
        original = self._exam(p, "pa_lat", self._when(p, 3), batch=CXR_EARLY, quirk="resent")
        copy = replace(original, exam_id=self._exam_id(), batch=CXR_LATE, copy_of=original)
        self.exams.append(copy)
        q["resent"] = {"original_zip": original.zip_key(), "copy_zip": copy.zip_key()}

        p = self._patient(pediatric=True)
        original = self._exam(p, "ped_port", self._when(p, 1), batch=CXR_EARLY,
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
                for batch in (CXR_EARLY, CXR_LATE)]
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
        readme = self._exam(p, "ct", self._when(p, 2), EXAM_TYPES["ct"][2] + CT_EXTRAS)
        readme.readme = True
        q["readme"] = {"key": f"{readme.zip_key()}!README.txt"}
        days = (date(2020, 5, 25) - p.index_date).days
        late = self._exam(p, "ct", self._when(p, days), batch=CT_OPEN, quirk="in_progress")
        q["in_progress"] = {"zip": late.zip_key()}

        # the pediatric double store again, its copy arriving a batch later
        p = self._patient(pediatric=True)
        original = self._exam(p, "ped_port", self._when(p, 2), batch=CXR_EARLY,
                              quirk="pediatric_double")
        later = self._reissue(original, batch=CXR_LATE)
        q["pediatric_double_across_batches"] = {"original_zip": original.zip_key(),
                                                "copy_zip": later.zip_key()}
        # and once with both copies under the same exam id (a double store, not a split exam)
        p = self._patient(pediatric=True)
        original = self._exam(p, "ped_port", self._when(p, 4), batch=CXR_EARLY,
                              quirk="pediatric_double")
        twin = self._reissue(original, same_exam_id=True)
        q["double_store_same_exam_id"] = {"original_zip": original.zip_key(),
                                          "copy_zip": twin.zip_key(),
                                          "exam_id": original.exam_id}

    def _plant_tree(self) -> None:
        p = self._patient()
        ct = self._exam(p, "ct", self._when(p, 2), EXAM_TYPES["ct"][2] + CT_EXTRAS)
        cr = self._exam(p, "pa_lat", self._when(p, 5))
        axial = ct.series[1]
        self.defects["same_sop_twice"] = (cr, cr.series[0], 0)
        self.defects["truncated"] = (ct, axial, len(axial.sop_uids) - 1)

    def _plant_flat(self) -> None:
        p = self._patient()
        ct = self._exam(p, "ct", self._when(p, 1), EXAM_TYPES["ct"][2] + CT_EXTRAS)
        screen = next(s for s in ct.series if s.role == "screen_save")
        self.defects["no_sop_uid"] = (ct, screen, 0)
        self.quirks["outside_window"] = [self._window_exam(p, "port", -380)]

    def _window_exam(self, p: Patient, kind: str, days: int) -> dict:
        start = CT_WINDOW_START if kind in CT_KINDS else CR_WINDOW_START
        quirk = "window_edge" if days >= start else "outside_window"
        exam = self._exam(p, kind, self._when(p, days), quirk=quirk)
        return {"zip": exam.zip_key() if exam.exam_id else None, "study_uid": exam.study_uid,
                "accession": exam.accession, "modality": exam.series[0].modality,
                "days_from_index": days, "in_window": days >= start}

    def _patient(self, pediatric: bool = False, index_date: date | None = None) -> Patient:
        rng, n = self.rng, len(self.patients)
        if n == 0:  # always one accented, multi-component name per site
            family = rng.choice([f for f in FAMILIES if not f.isascii()])
            given = rng.choice([g for g in GIVENS if not g.isascii()])
        else:
            family, given = self.name_pool[n % len(self.name_pool)]
        middle = rng.choice(MIDDLES) if n < 2 or rng.random() < 0.2 else ""
        ascii_name = (family + given).isascii()
        charset = rng.choice(("ISO_IR 100", None)) if ascii_name else "ISO_IR 192"
        born = (date(2012, 1, 1) + timedelta(days=rng.randint(0, 6 * 365)) if pediatric
                else date(1935, 1, 1) + timedelta(days=rng.randint(0, 65 * 365)))
        city, state, zip3 = rng.choice(CITIES)
        address = (f"{rng.randint(100, 9999)} {rng.choice(STREETS)}, {city}, {state} "
                   f"{zip3}{rng.randint(10, 99)}")
        mrn = self._number(7)
        p = Patient(
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

    def _exam(self, p: Patient, kind: str, when: datetime, roles: tuple[str, ...] = (), *,
              batch: str | None = None, quirk: str | None = None,
              part_of: Exam | None = None) -> Exam:
        is_ct = kind in CT_KINDS
        xr_modality = None if is_ct else self.rng.choice(("CR", "DX"))
        series = [self._series(key, xr_modality) for key in roles or EXAM_TYPES[kind][2]]
        scout = next((s.sop_uids[0] for s in series if s.role == "ct_scout"), None)
        zipped = self.layout == "zip_batches"
        exam = Exam(
            patient=p, kind=kind, when=when,
            accession=part_of.accession if part_of else self._number(10),
            study_id=self._number(8), study_uid=self._uid(), pps_uid=self._uid(),
            frame_uid=(part_of.frame_uid if part_of else self._uid()) if is_ct else None,
            scout_uid=part_of.scout_uid if part_of else scout,
            referring=self.rng.choice(self.referrers), series=series,
            exam_id=(part_of.exam_id if part_of else self._exam_id()) if zipped else None,
            batch=(batch or default_batch(is_ct, when)) if zipped else None,
            quirk=quirk,
        )
        self.exams.append(exam)
        return exam

    def _reissue(self, original: Exam, batch: str | None = None,
                 same_exam_id: bool = False) -> Exam:
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

    def _series(self, key: str, xr_modality: str | None) -> Series:
        role, modality, sop_class, image_type, desc, folder, view, pixel, number, count = (
            SERIES[key])
        modality = modality or xr_modality
        return Series(
            role=role, modality=modality, sop_class=sop_class or XR_SOP_CLASSES[modality],
            image_type=image_type, description=desc, folder=f"{number}_{folder}", view=view,
            pixel_kind=pixel, number=number, uid=self._uid(),
            sop_uids=[self._uid() for _ in range(count or self.ct_slices)],
        )

    def _when(self, p: Patient, days: int) -> datetime:
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


def _letters(k: int) -> str:
    """0 -> 'a', 25 -> 'z', 26 -> 'aa', ..."""
    text = ""
    k += 1
    while k:
        k, rest = divmod(k - 1, 26)
        text = chr(ord("a") + rest) + text
    return text
