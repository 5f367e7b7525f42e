"""Input files that changed after they were planned: find them, plan their batches again.

The manifest keeps each input file's version as it was planned (size and
nanosecond mtime on disk; the etag on object stores, else size and time). A
session that finds a complete manifest lists the input again and compares:

- a **changed** file's batches are retired and planned again from its new
  content; the new batches take the retired ones' place in the output, and
  the retired batches' done records no longer count, so the output holds the
  new content exactly once (a byte range planned from the old content is never
  read again);
- a **gone** file is an error: its rows cannot be made again, and silently
  dropping them would change the output behind the user's back;
- a **new** file is not part of this job (named in a notice).

Planning again is written as one sealed revision of the manifest (see
``Ledger.write_revision``): a crash before it leaves the plan as it was, and
the next session finds the same changes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

from raypar.errors import SpecError
from raypar.inputs import partitioned, tabular
from raypar.inputs.base import MiniBatch, files_of, files_read_by, plan_source
from raypar.inputs.source import Source, open_source

if TYPE_CHECKING:
    from raypar.jobdir.ledger import Ledger
    from raypar.jobdir.tables import Manifest
    from raypar.spec.models import JobSpec

SHOWN = 5  # file names a message lists before "and N more"


@dataclass
class InputChanges:
    """How the input differs from what the manifest planned."""

    changed: list[str] = field(default_factory=list)
    gone: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    versions: dict = field(default_factory=dict)  # the current version of each changed file
    added_versions: dict = field(default_factory=dict)  # ... and of each added one

    def __bool__(self) -> bool:
        return bool(self.changed or self.gone)


def compare(planned: dict, source: Source) -> InputChanges:
    """List the input again and compare it with the planned versions (name -> version)."""
    remaining = dict(planned)
    changes = InputChanges()
    for name in source.files():
        version = source.versions.pop(name, None)
        before = remaining.pop(name, None)
        if before is None:
            changes.added.append(name)
            changes.added_versions[name] = version
        elif version != before:
            changes.changed.append(name)
            changes.versions[name] = version
    changes.gone = list(remaining)
    return changes


def check_input_files(ledger: Ledger, spec: JobSpec, desc: dict, storage: dict) -> Optional[InputChanges]:
    """The input's changes since planning, or None when the job dir holds no input versions
    (planned by an older raypar) or planning never finished."""
    planned = ledger.read_input_versions()
    if planned is None:
        return None
    return compare(planned, open_source(desc, storage))


def names(files: list[str], source: Optional[Source] = None) -> str:
    shown = [source.url(f) if source else f for f in files[:SHOWN]]
    more = f" and {len(files) - SHOWN} more" if len(files) > SHOWN else ""
    return ", ".join(shown) + more


def refuse_gone(changes: InputChanges, source: Source, where: str) -> None:
    if changes.gone:
        raise SpecError(f"{where}: {len(changes.gone)} planned input file(s) are gone: "
                        f"{names(changes.gone, source)}; restore them, or start a new job dir")


def replan(ledger: Ledger, spec: JobSpec, desc: dict, storage: dict, manifest: Manifest,
           changes: InputChanges) -> int:
    """Retire the batches that read a changed file and plan their files again; returns how many
    batches were retired. Writes one revision of the manifest."""
    source = open_source(desc, storage)
    changed = set(changes.changed)
    touched = _batches_reading(manifest, changed)
    if spec.partition_keys:
        runs = _replan_partitions(spec, source, manifest, touched, changes)
    else:
        runs = _replan_runs(spec, source, manifest, touched, changes, ledger)
    ledger.write_revision(runs, changes.versions, sorted(changed))
    return sum(len(retired) for retired, _ in runs)


def append_added(ledger: Ledger, spec: JobSpec, desc: dict, storage: dict, manifest: Manifest,
                 changes: InputChanges) -> tuple[list[str], int]:
    """Plan the input files added since the job was planned as new batches after all the others
    (an incremental run: the same spec again over a grown input); returns the files and how many
    batches. Writes one revision of the manifest, which names the files it added (``raypar
    status`` shows them) and records their versions.

    A listed file without a recorded version that a batch already reads is not new: job dirs
    planned before versions were recorded for every input (an MLTable's folders) have such
    files. Its version is recorded now; it is never planned twice."""
    wanted = set(changes.added)
    # Only MLTable folder entries went without versions; the check reads the manifest (O(batches)).
    unversioned = any(e["kind"] == "folder" for e in desc.get("entries") or ())
    planned = {f for b in _batches_reading(manifest, wanted).values() for f in files_read_by(b.payload) & wanted} \
        if unversioned else set()
    if planned:
        changes = InputChanges(added=[f for f in changes.added if f not in planned],
                               added_versions=changes.added_versions)
    if not changes.added:
        ledger.write_revision([], changes.added_versions, [])
        return [], 0
    source = open_source(desc, storage)
    versions = ledger.read_input_versions() or {}
    first_file = next(iter(versions), None)
    restricted = source.restricted(changes.added, changes.added_versions)
    if source.desc["read"].get("header") == "from_first_file" and first_file is not None:
        restricted.first_header = tabular.first_file_header(source, first_file)
    batches = [MiniBatch(ordinal=len(manifest) + i, kind=b.kind, payload=b.payload, item_count=b.item_count)
               for i, b in enumerate(plan_source(spec, restricted))]
    ledger.write_revision([([], batches)], changes.added_versions, [], added=list(changes.added))
    return list(changes.added), len(batches)


def _batches_reading(manifest: Manifest, files: set[str]) -> dict[int, MiniBatch]:
    """The live batches that read any of ``files`` (only lines naming one are parsed)."""
    needles = [json.dumps(f).encode() for f in files]
    out = {}
    for ordinal, line in enumerate(manifest.lines):
        if len(needles) <= 16 and not any(n in line for n in needles):
            continue
        if manifest.is_retired(ordinal):
            continue
        batch = MiniBatch.from_json(line)
        if files_read_by(batch.payload) & files:
            out[ordinal] = batch
    return out


def _replan_runs(spec, source: Source, manifest: Manifest, touched: dict, changes: InputChanges, ledger):
    """Each run of consecutive touched batches is planned again from its files, in order."""
    next_ordinal = len(manifest)
    starts = {manifest.planned, *(added[0] for revision in manifest.revisions for _, added in revision)}
    runs: list[list[int]] = []
    for ordinal in sorted(touched):
        if runs and runs[-1][-1] == ordinal - 1 and ordinal not in starts:
            runs[-1].append(ordinal)
        else:
            runs.append([ordinal])
    versions = ledger.read_input_versions() or {}
    first_file = next(iter(versions), None)
    out = []
    for run in runs:
        files = list(dict.fromkeys(f for o in run for f in files_of(touched[o].payload)))
        current = {f: changes.versions.get(f, versions.get(f)) for f in files}
        restricted = source.restricted(files, current)
        if source.desc["read"].get("header") == "from_first_file" and first_file not in (None, files[0]):
            restricted.first_header = tabular.first_file_header(source, first_file)
        batches = []
        for batch in plan_source(spec, restricted):
            batches.append(MiniBatch(ordinal=next_ordinal, kind=batch.kind, payload=batch.payload,
                                     item_count=batch.item_count))
            next_ordinal += 1
        out.append((run, batches))
    return out


def _replan_partitions(spec, source: Source, manifest: Manifest, touched: dict, changes: InputChanges):
    """One batch per key combination: each touched combination again, with its files' new pieces.

    A changed file may now hold other key values (a column key): it joins the combinations it
    holds now and leaves those it no longer holds; a value no batch was planned for is an error.
    """

    changed = set(changes.changed)
    data_keys = next((b.payload.get("filter") or [] for b in touched.values()), [])
    if data_keys:
        combos = {}
        for ordinal, line in enumerate(manifest.lines):  # one batch per combination: a small plan
            if not manifest.is_retired(ordinal):
                batch = MiniBatch.from_json(line)
                combos[tuple(v for _, v in batch.payload["key"])] = batch
        holds = {}
        for name in changed:
            found = partitioned.key_values_in(source, name, spec.partition_keys, data_keys)
            unplanned = [c for c in found if c not in combos]
            if unplanned:
                raise SpecError(f"{source.url(name)}: changed since it was planned and now holds partition key "
                                f"values no mini-batch was planned for ({dict(zip(spec.partition_keys, unplanned[0], strict=True))}); "
                                f"start a new job dir")
            holds[name] = set(found)
            touched.update({b.ordinal: b for c, b in combos.items() if c in holds[name]})
    order = {n: i for i, n in enumerate(source.files())}  # a batch's files follow the listing
    source.versions.clear()
    next_ordinal = len(manifest)
    out = []
    for ordinal in sorted(touched):
        batch = touched[ordinal]
        combo = tuple(v for _, v in batch.payload["key"])
        files = [f for f in batch.payload["files"] if f not in changed] if "files" in batch.payload \
            else [p["file"] for p in batch.payload["pieces"] if p["file"] not in changed]
        kept_changed = [f for f in files_of(batch.payload) if f in changed]
        if data_keys:
            kept_changed = [f for f in changed if combo in holds[f]]
        files = sorted({*files, *kept_changed}, key=lambda f: order.get(f, len(order)))
        payload = dict(batch.payload)
        if "pieces" in payload:
            payload["pieces"] = [tabular.pieces_of_whole_file(source, f) for f in files]
            item_count = 0
        else:
            payload["files"] = files
            item_count = len(files)
        out.append(([ordinal], [MiniBatch(ordinal=next_ordinal, kind=batch.kind, payload=payload,
                                          item_count=item_count)]))
        next_ordinal += 1
    return out

