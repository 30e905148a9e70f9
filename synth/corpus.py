"""The whole synthetic corpus: every site's export under one folder, and the ground truth."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from synth.emr import write_clinical, write_remap
from synth.ids import Ids
from synth.layouts import write_images
from synth.site import Site
from synth.truth import site_truth

GENERATOR_VERSION = 1


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
    ids = Ids(seed)
    truth: dict = {"seed": seed, "generator_version": GENERATOR_VERSION, "sites": {}}
    for k in range(sites):
        site = Site(k, ids, ct_slices=ct_slices, ct_size=ct_size, cr_size=cr_size)
        site.plan(patients)
        truth["sites"][site.sid] = _write_site(site, out)
    text = json.dumps(truth, indent=1, ensure_ascii=False) + "\n"
    (out / "ground_truth.json").write_text(text, encoding="utf-8")
    return truth


def _write_site(site: Site, out: Path) -> dict:
    """Write the site's images, clinical.csv and id_remap.csv under out/<site>; its ground truth."""
    root = out / site.sid / "images"
    root.mkdir(parents=True)
    files = write_images(site, root)
    write_clinical(site, out / site.sid / "clinical.csv")
    write_remap(site, out / site.sid / "id_remap.csv")
    return site_truth(site, files)
