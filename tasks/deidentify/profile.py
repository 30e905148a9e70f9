"""The de-identification profile as data: PS3.15 Table E.1-1 plus radrepo's overrides.

``load_profile(options)`` turns the table and the chosen options into one action per tag, so
the engine that applies it never decides *what* to do, only *how* for each VR.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import cache
from importlib import resources

import yaml
from pydicom.datadict import tag_for_keyword

# config option name -> (Table E.1-1 column, DCM code of PS3.16 CID 7050, code meaning)
OPTIONS: dict[str, tuple[str, str, str]] = {
    "retain_long_modif_dates": (
        "rtn_long_modif_dates",
        "113107",
        "Retain Longitudinal Temporal Information Modified Dates Option",
    ),
    "retain_patient_chars": ("rtn_pat_chars", "113108", "Retain Patient Characteristics Option"),
    "clean_descriptors": ("clean_desc", "113105", "Clean Descriptors Option"),
    "retain_device_identity": ("rtn_dev_id", "113109", "Retain Device Identity Option"),
    "retain_safe_private": ("rtn_safe_priv", "113111", "Retain Safe Private Option"),
}
BASIC_PROFILE_CODE = ("113100", "Basic Application Confidentiality Profile")

# Option actions that retain more win over those that retain less.
_OPTION_PRECEDENCE = ("K", "C")


@dataclass(frozen=True)
class Profile:
    """Resolved actions: ``actions[tag]`` is one of X, Z, D, K, C, U (pattern rows kept apart)."""

    options: tuple[str, ...]
    actions: dict[int, str]
    computed: dict[int, str]
    private_action: str
    curve_action: str
    overlay_action: str
    safe_private: frozenset[tuple[str, int, int]]

    def action(self, tag: int) -> str:
        """The action for one element tag (file meta group 0002 excluded)."""
        group, elem = tag >> 16, tag & 0xFFFF
        if tag in self.computed:
            return "computed"
        if group % 2 == 1:
            return "safe-private" if self.private_action == "C" else self.private_action
        if (group & 0xFF00) == 0x5000:
            return self.curve_action
        if (group & 0xFF00) == 0x6000 and elem in (0x3000, 0x4000):
            return self.overlay_action
        return self.actions.get(tag, "K")

    @property
    def method_description(self) -> str:
        """Text for De-identification Method (0012,0063), within LO's 64 characters."""
        return "radrepo PS3.15 Basic " + "+".join(OPTIONS[o][1] for o in self.options)

    @property
    def method_codes(self) -> list[tuple[str, str]]:
        """(code value, meaning) pairs for De-identification Method Code Sequence (0012,0064)."""
        return [BASIC_PROFILE_CODE] + [OPTIONS[o][1:] for o in self.options]


def _tag(text: str) -> int:
    group, elem = text.strip("()").split(",")
    return (int(group, 16) << 16) | int(elem, 16)


def _resolve(row: dict[str, str], columns: list[str], compound: dict[str, str]) -> str:
    chosen = [row[c] for c in columns if row[c]]
    for action in _OPTION_PRECEDENCE:
        if action in chosen:
            return action
    basic = row["basic"]
    return compound.get(basic, basic)


@cache
def load_profile(options: tuple[str, ...]) -> Profile:
    """Build the profile for the Basic Profile plus ``options`` (names as in the config)."""
    unknown = [o for o in options if o not in OPTIONS]
    if unknown:
        raise ValueError(f"unknown de-identification option {unknown[0]!r}")
    options = tuple(o for o in OPTIONS if o in options)
    columns = [OPTIONS[o][0] for o in options]
    schemas = resources.files("schemas")
    overrides = yaml.safe_load(schemas.joinpath("deid_overrides.yaml").read_text())
    compound = overrides["compound_actions"]

    actions: dict[int, str] = {}
    patterns: dict[str, str] = {}
    with schemas.joinpath("ps3_15_annex_e.csv").open(newline="") as fh:
        for row in csv.DictReader(fh):
            action = _resolve(row, columns, compound)
            if "x" in row["tag"].lower() or "gggg" in row["tag"]:
                patterns[row["tag"]] = action
            else:
                actions[_tag(row["tag"])] = action
    for keyword in overrides["always_remove"]:
        actions[_keyword_tag(keyword)] = "X"
    computed = {_keyword_tag(k): v for k, v in overrides["computed"].items()}
    safe = yaml.safe_load(schemas.joinpath("safe_private.yaml").read_text())
    return Profile(
        options=options,
        actions=actions,
        computed=computed,
        private_action=patterns["(gggg,eeee) where gggg is odd"],
        curve_action=patterns["(50xx,xxxx)"],
        overlay_action=patterns["(60xx,3000)"],
        safe_private=frozenset((e["creator"], e["group"], e["element"]) for e in safe),
    )


def _keyword_tag(keyword: str) -> int:
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise ValueError(f"deid_overrides.yaml names unknown keyword {keyword!r}")
    return tag
