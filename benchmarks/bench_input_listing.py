"""Listing an input folder on an object store: one flat listing, a page at a time, against the walk.

Before 2026-12-08 raypar walked a remote input folder by folder, as a local one: fsspec's ``ls``
of each folder, which waits for every page of that folder, then the subfolders one after the
other. The driver computes the first mini-batch before anything starts (``driver._primed``), so
a job's workers waited for the whole listing of a flat folder, and a tree of many small folders
cost one request or more per folder in a row. raypar now lists the folder's prefix flat, in key
order, a page at a time (raypar/inputs/flat_listing.py).

For each size, two inputs of ``--files`` tiny files are built on the emulator: ``flat`` (one
folder) and ``tree`` (``--per-folder`` files in each of many folders, as a date-partitioned
input is). For each, side by side and alternating (best of ``--repeat``): the walk (the
previous way, still raypar's for local disk) and the flat listing, each timed to its first name
(what the driver waits for before it creates the job dir and starts workers) and to its last;
both must give the same names in the same order. Then the peak of Python memory of each listing
(tracemalloc, walk / flat), each version handed over as the planner takes it. The emulator
shares this machine's 2 cores.

With ``--job``, the flat folder of the largest size is also the input of a real job (a 2-CPU
Ray on 127.0.0.1, two workers, ``mini_batch_size: "500"``, ``direct`` mode, an entry script that
returns its URIs), alternating with the same job listed by the walk (``flat_listing.pages``
answering None, as raypar did before): seconds from ``raypar.run`` to the first mini-batch's
start (the driver's first batch, the job dir, the session's start) and to the job's end, and
the output checked row for row.

    python benchmarks/bench_input_listing.py --store azurite --files 5000 20000
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

from common import object_store_root, print_load

import raypar
from raypar.inputs import check_input, flat_listing
from raypar.inputs.source import open_source
from raypar.spec.loading import as_spec


def build(fs, bucket: str, layout: str, files: int, per_folder: int) -> str:
    names = ([f"f{i:07d}.txt" for i in range(files)] if layout == "flat" else
             [f"day={i // per_folder:05d}/f{i % per_folder:04d}.txt" for i in range(files)])
    folder = f"{layout}{files}"
    for i in range(0, files, 1000):
        fs.pipe({f"{bucket}/{folder}/{n}": b"x" for n in names[i:i + 1000]})
    return folder


def timed(source, how: str) -> tuple[float, float, list[str]]:
    """(seconds to the first name, seconds to the last, the names) of one listing."""
    started = time.perf_counter()
    names = source.files() if how == "flat" else source._walk(source.root, "")
    first = next(names)
    to_first = time.perf_counter() - started
    listed = [first, *names]
    return to_first, time.perf_counter() - started, listed


def peak_mib(source, how: str) -> float:
    """The listing's peak of Python memory (tracemalloc), names kept as the planner would not."""
    tracemalloc.start()
    try:
        for _ in (source.files() if how == "flat" else source._walk(source.root, "")):
            source.versions.clear()  # the planner takes each version as it plans the file
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def source_of(base: str, options: dict, folder: str):
    protocol = base.split("://")[0]
    spec = as_spec({"type": "parallel", "inputs": {"data": {"type": "uri_folder", "path": f"{base}/{folder}"}},
                    "input_data": "${{inputs.data}}", "task": {"code": "/tmp", "entry_script": "score.py"}})
    storage = {protocol: options}
    return open_source(check_input(spec, storage), storage)


ENTRY = "def run(mini_batch):\n    return [str(uri) for uri in mini_batch]\n"


def job_rounds(base: str, options: dict, folder: str, files: int, rounds: int) -> None:
    import os  # noqa: PLC0415
    import tempfile  # noqa: PLC0415

    import ray  # noqa: PLC0415 - only --job needs Ray

    from raypar.jobdir.ledger import Ledger  # noqa: PLC0415

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # every Ray process binds to 127.0.0.1
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    protocol = base.split("://")[0]
    os.environ.update({"AZURE_STORAGE_CONNECTION_STRING": options["connection_string"]} if protocol == "az" else
                      {"AWS_ACCESS_KEY_ID": options["key"], "AWS_SECRET_ACCESS_KEY": options["secret"],
                       "AWS_ENDPOINT_URL": options["endpoint_url"], "AWS_DEFAULT_REGION": "eu-west-1"})
    work = tempfile.mkdtemp(prefix="raypar-bench-listing-job-")
    with open(os.path.join(work, "entry.py"), "w") as f:
        f.write(ENTRY)
    real_pages = flat_listing.pages
    got: dict[str, list] = {"walk": [], "flat": []}
    for rnd in range(rounds):
        for how in (("walk", "flat") if rnd % 2 == 0 else ("flat", "walk")):
            out = os.path.join(work, f"out-{how}-{rnd}")
            spec = {"type": "parallel", "name": f"listing-{how}",
                    "inputs": {"data": {"type": "uri_folder", "path": f"{base}/{folder}", "mode": "direct"}},
                    "outputs": {"out": {"type": "uri_folder", "path": out}},
                    "input_data": "${{inputs.data}}", "mini_batch_size": "500",
                    "resources": {"instance_count": 1}, "max_concurrency_per_instance": 2,
                    "task": {"type": "run_function", "code": work, "entry_script": "entry.py",
                             "append_row_to": "${{outputs.out}}"}}
            flat_listing.pages = real_pages if how == "flat" else (lambda fs, folder: None)
            job_dir = os.path.join(work, f"job-{how}-{rnd}")
            started = time.time()
            outcome = raypar.run(spec, job_dir=job_dir, echo=lambda line: None).wait()
            ended = time.time() - started
            assert outcome.state.value == "succeeded", outcome.reason
            first = min(r.started for r in Ledger(job_dir).view().done.values()) - started
            with open(os.path.join(out, "parallel_run_step.txt")) as f:
                rows = f.read().splitlines()
            assert len(rows) == files and rows == sorted(rows), (len(rows), rows[:2])
            got[how].append((first, ended))
            print(f"  round {rnd + 1}: {how}: first mini-batch started at {first:.2f} s, job done at {ended:.2f} s",
                  flush=True)
    flat_listing.pages = real_pages
    (wf, wa), (ff, fa) = (min(got[h]) for h in ("walk", "flat"))
    print(f"best: the walk's first mini-batch at {wf:.2f} s, the flat listing's at {ff:.2f} s ({wf / ff:.1f}x); "
          f"jobs done at {wa:.2f} and {fa:.2f} s ({wa / fa:.2f}x)")
    ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", choices=["azurite", "s3"], default="s3")
    parser.add_argument("--files", type=int, nargs="+", default=[5000, 20000])
    parser.add_argument("--per-folder", type=int, default=20, help="files per folder of the tree layout")
    parser.add_argument("--layouts", nargs="+", choices=["flat", "tree"], default=["flat", "tree"])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--job", type=int, default=0, metavar="ROUNDS",
                        help="also run ROUNDS rounds of a real job per side over the largest flat folder")
    args = parser.parse_args()
    with object_store_root(args.store, "raypar-bench-listing-") as (base, options):
        import fsspec  # noqa: PLC0415 - the emulator's client

        protocol, bucket = base.split("://")
        fs = fsspec.filesystem(protocol, **options, skip_instance_cache=True, use_listings_cache=False)
        page = flat_listing.PAGE_SIZE or {"az": 5000}.get(protocol, 1000)
        print(f"{args.store}: the flat listing's first page {flat_listing.FIRST_PAGE_SIZE} names, then {page:,}; "
              f"the walk is fsspec's ls, folder by folder")
        print(f"{'files':>7} {'layout':<6} {'walk: first':>12} {'all':>8} {'flat: first':>12} {'all':>8} "
              f"{'first x':>8} {'all x':>6}")
        for files in args.files:
            for layout in args.layouts:
                started = time.perf_counter()
                folder = build(fs, bucket, layout, files, args.per_folder)
                built = time.perf_counter() - started
                best = {"walk": (float("inf"), float("inf")), "flat": (float("inf"), float("inf"))}
                expected = None
                for _ in range(args.repeat):
                    for how in ("walk", "flat"):
                        first, whole, names = timed(source_of(base, options, folder), how)
                        expected = expected or names
                        assert names == expected and len(names) == files, (how, len(names))
                        best[how] = (min(best[how][0], first), min(best[how][1], whole))
                (wf, wa), (ff, fa) = best["walk"], best["flat"]
                wm, fm = (peak_mib(source_of(base, options, folder), how) for how in ("walk", "flat"))
                print(f"{files:>7,} {layout:<6} {wf:>10.3f} s {wa:>6.2f} s {ff:>10.3f} s {fa:>6.2f} s "
                      f"{wf / ff:>7.1f}x {wa / fa:>5.1f}x   peak {wm:.1f} / {fm:.1f} MiB   (built in {built:.0f} s)",
                      flush=True)
        if args.job:
            job_rounds(base, options, f"flat{max(args.files)}", max(args.files), args.job)
    print_load()


if __name__ == "__main__":
    main()
