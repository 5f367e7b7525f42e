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
both must give the same names in the same order. The emulator shares this machine's 2 cores.

    python benchmarks/bench_input_listing.py --store azurite --files 5000 20000
"""

from __future__ import annotations

import argparse
import time

from common import object_store_root, print_load

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


def source_of(base: str, options: dict, folder: str):
    protocol = base.split("://")[0]
    spec = as_spec({"type": "parallel", "inputs": {"data": {"type": "uri_folder", "path": f"{base}/{folder}"}},
                    "input_data": "${{inputs.data}}", "task": {"code": "/tmp", "entry_script": "score.py"}})
    storage = {protocol: options}
    return open_source(check_input(spec, storage), storage)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", choices=["azurite", "s3"], default="s3")
    parser.add_argument("--files", type=int, nargs="+", default=[5000, 20000])
    parser.add_argument("--per-folder", type=int, default=20, help="files per folder of the tree layout")
    parser.add_argument("--layouts", nargs="+", choices=["flat", "tree"], default=["flat", "tree"])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with object_store_root(args.store, "raypar-bench-listing-") as (base, options):
        import fsspec  # noqa: PLC0415 - the emulator's client

        protocol, bucket = base.split("://")
        fs = fsspec.filesystem(protocol, **options, skip_instance_cache=True, use_listings_cache=False)
        page = flat_listing.PAGE_SIZE or {"az": 5000}.get(protocol, 1000)
        print(f"{args.store}: pages of {page:,} names; the walk is fsspec's ls, folder by folder")
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
                print(f"{files:>7,} {layout:<6} {wf:>10.3f} s {wa:>6.2f} s {ff:>10.3f} s {fa:>6.2f} s "
                      f"{wf / ff:>7.1f}x {wa / fa:>5.1f}x   (built in {built:.0f} s)", flush=True)
    print_load()


if __name__ == "__main__":
    main()
