"""The consortium config over synthetic sites: what `radrepo demo` writes and the tests load."""

from __future__ import annotations

from pathlib import Path

SOURCE_KINDS = {"zip_batches": "zip_batches", "tree": "folder", "flat": "flat"}  # by layout


def demo_config(sources: Path, truth: dict, *, release: Path = Path("release"),
                work: Path = Path("work")) -> dict:
    """The consortium config (a mapping, as its YAML holds it) running every site of `truth`.

    `sources` is the folder `synthesize` wrote; a relative one (and relative `release`, `work`)
    gives a config that resolves against the folder its YAML is written to.
    """
    def under(relative: str) -> str:
        return str(Path(sources) / relative)

    sites = [{
        "site_id": site_id,
        "source": {"kind": SOURCE_KINDS[site["layout"]], "path": under(site["source"])},
        "clinical": {"path": under(site["clinical"]), "measured_on": "labs_date"},
        "id_remap": under(site["remap"]),
    } for site_id, site in truth["sites"].items()]
    return {"release": str(release), "work_dir": str(work), "sites": sites}
