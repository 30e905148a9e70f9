"""The one pass: each source object's bytes are read once, and everything that needs them is done
while they are in memory, one Dask task per work unit (a study's files, an exam's zips).

Per unit: read (``tasks.indexing``), parse (``tasks.deidentify``), decide split-exam merges
(``tasks.dedupe``) before anything is written, rewrite, gate the output bytes
(``tasks.verify``), render the series thumbnails (``tasks.contact_sheet``) and write each
output once. Only wiring lives here. What a unit cannot check alone (an identifier met in
another unit of the batch) is checked on the values the units return, in ``read_batch``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from schemas.config import PACS_KINDS, SourceConfig
from schemas.pipeline import DEIDENTIFIED, OK, QUARANTINE, QUARANTINED, SOURCE_INDEX
from tasks import dedupe, indexing, sources, verify
from tasks.contact_sheet import thumbnail_png
from tasks.deidentify import DeidContext, ParsedSource, Quarantine, parse_source, rewrite_source
from tasks.deidentify.profile import load_profile
from tasks.deidentify.text import IdentifierMatcher
from tasks.ledger import BatchRef, site_identifiers
from tasks.zones import WorkDir


@dataclass(frozen=True)
class PassContext:
    """What every task of one batch needs; picklable, sent once to each worker."""

    deid: DeidContext
    out_dir: str  # where outputs are written (the batch's staging)
    quarantine_dir: str  # where quarantined objects' bytes are kept
    prior_identifiers: tuple[str, ...] = ()  # met at the site before this batch
    split_minutes: int = 30
    thumbnails: bool = True


def batch_context(work_dir: str, site_id: str, batch_id: str, deid: DeidContext,
                  split_minutes: int = 30) -> PassContext:
    """The one pass's context for one batch of a site: outputs into the batch's staging,
    quarantined bytes into its quarantine folder, the site's identifiers met so far."""
    work = WorkDir(work_dir, site_id)
    return PassContext(deid=deid, out_dir=str(work.staging(batch_id) / "deidentified"),
                       quarantine_dir=str(work.quarantine(batch_id)),
                       prior_identifiers=site_identifiers(work_dir, site_id),
                       split_minutes=split_minutes)


@dataclass
class UnitResult:
    """What one unit hands back: rows per object (index and de-identified), the identifying
    values met, the values its outputs hold (for the batch-wide check), the split-exam merges
    and one thumbnail per series."""

    index: list[dict] = field(default_factory=list)
    deidentified: list[dict] = field(default_factory=list)
    quarantine: list[dict] = field(default_factory=list)
    identifiers: set[str] = field(default_factory=set)
    values: dict[tuple[str, str | bytes], list[str]] = field(default_factory=dict)
    merges: list[dict] = field(default_factory=list)
    thumbnails: dict[str, tuple[int, bytes | None]] = field(default_factory=dict)


@dataclass(frozen=True)
class BatchPass:
    """The whole batch after the one pass: the private index, the de-identified table, the
    quarantine records, the batch's identifiers, merges and thumbnails."""

    index: pa.Table
    deidentified: pa.Table
    quarantine: pa.Table
    identifiers: list[str]
    merges: list[dict]
    thumbnails: dict[str, bytes]


@functools.lru_cache(maxsize=4)
def _matcher(values: tuple[str, ...]) -> IdentifierMatcher:
    return IdentifierMatcher(values)


def process_unit(unit: sources.WorkUnit, ctx: PassContext) -> UnitResult:
    """Read, de-identify, gate and write every object of one unit (see the module)."""
    profile = load_profile(ctx.deid.options)
    result = UnitResult()
    parsed: list[tuple[indexing.SourceRead, str, ParsedSource]] = []  # read, key, parse
    for read in indexing.read_unit(unit):
        oid = indexing.object_id(read.key)
        if read.data is None:
            _refuse(result, unit, read, oid, read.problem, ctx, at_ingest=True)
            continue
        try:
            source = parse_source(read.data, ctx.deid)
        except Quarantine as q:
            _refuse(result, unit, read, oid, q.reason, ctx, at_ingest=q.not_an_image)
            continue
        except Exception as err:  # noqa: BLE001 - any failure quarantines this file only
            _refuse(result, unit, read, oid, f"unreadable DICOM ({type(err).__name__})", ctx)
            continue
        result.identifiers.update(source.patient.identifiers)
        row = _index_row(unit, read, oid, OK, None, source.header)
        result.index.append(row)
        parsed.append((read, row["key"], source))
    targets, merges = dedupe.split_exam_targets(
        [_part_fields(read, source) for read, _, source in parsed], ctx.split_minutes)
    uid_map = _uid_map(ctx.deid, targets, result.identifiers)
    unit_matcher = IdentifierMatcher(result.identifiers)
    prior = _matcher(ctx.prior_identifiers)
    done: list[tuple[dict, bytes]] = []
    for read, key, source in parsed:
        oid = indexing.object_id(read.key)
        try:
            out = rewrite_source(source, ctx.deid, profile, uid_map, read.exam)
        except Quarantine as q:
            _keep_copy(oid, read.data, ctx)
            _quarantined(result, key, oid, q.reason)
            continue
        except Exception as err:  # noqa: BLE001 - any failure quarantines this file only
            _keep_copy(oid, read.data, ctx)
            _quarantined(result, key, oid, f"cannot de-identify ({type(err).__name__})")
            continue
        data = b"".join(out.chunks)
        hits, scan = _gate(data, oid, profile, (prior, unit_matcher))
        if hits:
            _keep_copy(oid, read.data, ctx)
            _quarantined(result, key, oid, "gate: " + ", ".join(hits))
            continue
        for value in scan.values:  # what the batch-wide check searches
            result.values.setdefault(value, []).append(oid)
        row = {**out.row, "object_id": oid, "output_path": str(Path(ctx.out_dir) / f"{oid}.dcm")}
        result.deidentified.append(row)
        done.append((row, data))
    keys = ctx.deid.keys  # each study named by its own pseudonym (uid_map merges them)
    result.merges = [{**m, "uid": keys.uid(m["uid"]), "kept_uid": keys.uid(m["kept_uid"])}
                     for m in merges]
    if ctx.thumbnails:
        result.thumbnails = _thumbnails(done)
    for row, data in done:
        with open(row["output_path"], "wb") as out_file:
            out_file.write(data)
    return result


def _gate(data: bytes, oid: str, profile, matchers: tuple[IdentifierMatcher, ...],
          ) -> tuple[list[str], verify.OutputScan | None]:
    """The elements the gate finds wrong in an output (its structure, or an identifier of
    ``matchers``), and its parse; an output the gate cannot read is wrong as a whole."""
    try:
        findings, scan = verify.gate(data, oid, None, profile)
        hits = {f.element for f in findings}
        if scan is not None:
            for matcher in matchers:
                hits.update(scan.holding(matcher))
    except Exception:  # noqa: BLE001 - a file the gate cannot judge is not published
        return ["(unreadable output)"], None
    return sorted(hits), scan


def _part_fields(read: indexing.SourceRead, source: ParsedSource) -> dict:
    return {"study_uid": source.header["study_uid"] or "", "patient": source.patient.pseudonym,
            "exam_id": read.exam.get("exam_id"), "exam_time": read.exam.get("exam_time"),
            "study_date": source.header["study_date"],
            "study_time": source.header["study_time"], "pixel_sha256": source.pixel_sha256}


def _uid_map(deid: DeidContext, targets: dict[str, str],
             identifiers: set[str]) -> Callable[[str], str]:
    """Original UID -> its pseudonym; a part of a split exam's Study Instance UID -> the
    pseudonym of the study it merges into. Originals are remembered as identifiers."""
    cache: dict[str, str] = {}

    def uid_map(original: str) -> str:
        if original not in cache:
            cache[original] = deid.keys.uid(targets.get(original, original))
            identifiers.add(original)
        return cache[original]

    return uid_map


def _index_row(unit: sources.WorkUnit, read: indexing.SourceRead, oid: str, status: str,
               reason: str | None, header: dict | None) -> dict:
    header = header or {}
    key = read.key
    if unit.keyed_by_sop and header.get("sop_uid"):  # by study and SOP UID, as the ledger
        key = f"{unit.keyed_by_sop}/{header['sop_uid']}"
    return {"object_id": oid, "key": key, "staged_path": read.local_path, "size": read.size,
            "sha256": read.sha256, "status": status, "reason": reason,
            **{k: header.get(k) for k in ("patient_id", "study_uid", "series_uid", "sop_uid",
                                          "sop_class_uid", "modality", "study_date")},
            **{k: read.exam.get(k) for k in ("exam_id", "exam_time", "exam_description",
                                             "member_path")}}


def _keep_copy(oid: str, data: bytes | None, ctx: PassContext) -> None:
    """The bytes of a quarantined object, kept in the private zone to be looked at."""
    if data is None:
        return
    folder = Path(ctx.quarantine_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / oid).write_bytes(data)


def _refuse(result: UnitResult, unit: sources.WorkUnit, read: indexing.SourceRead, oid: str,
            reason: str, ctx: PassContext, at_ingest: bool = False) -> None:
    """An object refused before de-identification: at ingest when it is no DICOM image to
    take (or cannot be read), else at de-identification."""
    _keep_copy(oid, read.data, ctx)
    if at_ingest:
        row = _index_row(unit, read, oid, QUARANTINED, reason, None)
        result.index.append(row)
        result.quarantine.append({"object_id": oid, "key": row["key"], "stage": "ingest",
                                  "reason": reason})
        return
    row = _index_row(unit, read, oid, OK, None, None)
    result.index.append(row)
    _quarantined(result, row["key"], oid, reason)


def _quarantined(result: UnitResult, key: str, oid: str, reason: str) -> None:
    """An object de-identification (or the gate) refused."""
    result.deidentified.append({"object_id": oid, "status": QUARANTINED, "reason": reason})
    result.quarantine.append({"object_id": oid, "key": key, "stage": "deidentify",
                              "reason": reason})


def _thumbnails(done: list[tuple[dict, bytes]]) -> dict[str, tuple[int, bytes | None]]:
    """Per series of the unit: how many files it has here, and the thumbnail of its middle
    instance (by instance number)."""
    by_series: dict[str, list[tuple[int, int]]] = {}
    for i, (row, _) in enumerate(done):
        by_series.setdefault(row["series_uid"], []).append((row["instance_number"] or 0, i))
    out = {}
    for series_uid, files in by_series.items():
        middle = sorted(files)[len(files) // 2][1]
        out[series_uid] = (len(files), thumbnail_png(done[middle][1]))
    return out


def _found_elsewhere(results: list[UnitResult], new: set[str]) -> dict[str, set[str]]:
    """Outputs holding an identifier first met in another unit of the batch: object id ->
    the elements holding it. Each distinct value is matched once."""
    if not new:
        return {}
    matcher = IdentifierMatcher(new)
    if matcher.empty:
        return {}
    holders: dict[tuple[str, str | bytes], list[str]] = {}
    for unit in results:
        for value, oids in unit.values.items():
            holders.setdefault(value, []).extend(oids)
    late: dict[str, set[str]] = {}
    for (element, value), oids in holders.items():
        if verify.value_holds(value, matcher):
            for oid in oids:
                late.setdefault(oid, set()).add(element)
    return late


def work_units(batch: BatchRef, source: SourceConfig, work_dir: str) -> list[sources.WorkUnit]:
    """What the one pass takes of a batch: a PACS batch's studies retrieved whole into the
    private zone, else the source's objects grouped into units (nothing opened)."""
    if source.kind in PACS_KINDS:
        from tasks import retrieval  # the PACS clients: imported only where a PACS is read

        return retrieval.retrieve_batch(batch, source, WorkDir(work_dir, batch.site_id))
    objects = [sources.UnitObject(o.key, o.size, o.problem) for o in batch.objects]
    if source.kind == "zip_batches":
        return indexing.zip_units(source.path, objects, source.storage_options)
    return indexing.folder_units(source.path, objects, source.storage_options)


def read_batch(units: list[sources.WorkUnit], ctx: PassContext, client=None,
               files_done: Callable[[int], None] | None = None, workers: int = 1) -> BatchPass:
    """Run the one pass over every unit, then quarantine each output holding an identifier
    met in another unit of the batch. Units run on the cluster of a distributed ``client``;
    without one, on ``workers`` processes of Dask's local scheduler (forked, so each starts
    with this process's imports done) or, with one worker, here."""
    Path(ctx.out_dir).mkdir(parents=True, exist_ok=True)
    tell = files_done or (lambda n: None)
    if client is not None:
        from distributed import as_completed

        [ctx_future] = client.scatter([ctx], broadcast=True)
        futures = client.map(process_unit, units, ctx=ctx_future, pure=False)
        for future in as_completed(futures):
            tell(len(future.result().index))
        results = client.gather(futures)
    elif workers > 1 and len(units) > 1:
        results = _on_local_processes(units, ctx, workers)
        tell(sum(len(r.index) for r in results))
    else:
        results = []
        for unit in units:
            results.append(process_unit(unit, ctx))
            tell(len(results[-1].index))
    return _assembled(results, ctx)


def _on_local_processes(units: list[sources.WorkUnit], ctx: PassContext,
                        workers: int) -> list[UnitResult]:
    """``process_unit`` over the units on a pool of ``workers`` processes, by Dask's local
    multiprocessing scheduler. A pool forked from a process running other threads could
    inherit a lock held mid-way: then the processes start afresh (spawned) instead."""
    import threading

    import dask

    method = "fork" if threading.active_count() == 1 else "spawn"
    tasks = [dask.delayed(process_unit, pure=False)(unit, ctx) for unit in units]
    with dask.config.set({"multiprocessing.context": method}):
        return list(dask.compute(*tasks, scheduler="processes", num_workers=workers))


def _assembled(results: list[UnitResult], ctx: PassContext) -> BatchPass:
    index = [r for unit in results for r in unit.index]
    seq_of = {row["object_id"]: i for i, row in enumerate(index)}
    for i, row in enumerate(index):
        row["seq"] = i
    deidentified = [r for unit in results for r in unit.deidentified]
    quarantine = [r for unit in results for r in unit.quarantine]
    identifiers = set().union(*(unit.identifiers for unit in results)) if results else set()
    late = _found_elsewhere(results, identifiers - set(ctx.prior_identifiers))
    for i, row in enumerate(deidentified):
        row["seq"] = seq_of[row["object_id"]]
        if row["object_id"] in late and row["status"] == OK:
            Path(row["output_path"]).unlink(missing_ok=True)
            local = index[row["seq"]]["staged_path"]  # read again: its unit has ended
            _keep_copy(row["object_id"], Path(local).read_bytes() if local else None, ctx)
            reason = "gate: " + ", ".join(sorted(late[row["object_id"]]))
            deidentified[i] = {"seq": row["seq"], "object_id": row["object_id"],
                               "status": QUARANTINED, "reason": reason}
            quarantine.append({"object_id": row["object_id"],
                               "key": index[row["seq"]]["key"], "stage": "deidentify",
                               "reason": reason})
    thumbnails: dict[str, tuple[int, bytes | None]] = {}
    for unit in results:
        for series_uid, (n, png) in unit.thumbnails.items():
            if n > thumbnails.get(series_uid, (0, None))[0]:
                thumbnails[series_uid] = (n, png)
    return BatchPass(
        index=pa.Table.from_pylist(index, schema=SOURCE_INDEX),
        deidentified=pa.Table.from_pylist(sorted(deidentified, key=lambda r: r["seq"]),
                                          schema=DEIDENTIFIED),
        quarantine=pa.Table.from_pylist(quarantine, schema=QUARANTINE),
        identifiers=sorted(identifiers),
        merges=[m for unit in results for m in unit.merges],
        thumbnails={uid: png for uid, (_, png) in thumbnails.items() if png is not None},
    )
