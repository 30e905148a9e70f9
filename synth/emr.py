"""The EMR side of a site's export: its clinical export and its patient-id remap file."""

from __future__ import annotations

import csv
import random
from datetime import date, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from synth.vocabulary import SYMPTOMS

if TYPE_CHECKING:
    from synth.site import Site

_CLINICAL_COLUMNS = (
    "mrn", "covid_encounter_date", "test_method", "rtpcr_result", "sex", "birth_date",
    "wcc", "crp", "po2", "labs_date", "notes",
)


def write_clinical(site: Site, path: Path) -> None:
    """Write the EMR export (clinical.csv) of the site's patients, and note in each what it says."""
    rng = site.rng
    # lab dates have their own stream, so adding them left every other draw as it was
    labs_rng = random.Random(f"radrepo-synth:{site.ids.seed}:{site.sid}:labs")
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(_CLINICAL_COLUMNS)
        for p in sorted(site.patients, key=lambda p: p.current_mrn):
            method = rng.choices(("PCR", "serology", "clinical"), weights=(7, 2, 1))[0]
            result = ""
            if method == "PCR":
                result = "positive" if rng.random() < 0.85 else "negative"
            labs = [f"{rng.uniform(lo, hi):.1f}" if rng.random() < 0.8 else ""
                    for lo, hi in ((3.0, 18.0), (1.0, 250.0), (50.0, 100.0))]
            labs_day = labs_rng.randint(-2, 5)
            note = f"{p.given} {p.family} presented with {rng.choice(SYMPTOMS)}."
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


def write_remap(site: Site, path: Path) -> None:
    """Write the site's id_remap.csv: each retired MRN and the one that replaced it."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(("old_id", "new_id"))
        writer.writerows(site.remap)


def _completed_years(birth: date, at: date) -> int:
    return at.year - birth.year - ((at.month, at.day) < (birth.month, birth.day))
