"""Listing an image folder: walked every time, walked and cached, and read from the cache.

    python benchmarks/listing.py                              # 1,000 class folders x 200 files
    python benchmarks/listing.py --classes 100 --per-class 50 --keep --dir /mnt/nfs/tmp

Builds a synthetic ImageNet-like tree (``n00000000/n00000000_00000.JPEG``: empty files, since
the listing never opens them) in a temporary folder, deleted afterwards unless ``--keep``, and
times :func:`msn.data.folders.imagefolder_listing`, median of ``--repeats`` runs each:

- ``no cache``: ``list_cache=None``, the tree walked (what every run did before the cache);
- ``first cached listing``: no cache file yet, so walk + write the file;
- ``cached read``: one stat per folder to validate, then load the file;
- for reference, torchvision's ``find_classes`` + ``make_dataset`` (the listing code before).

The OS page cache holds the tree's folders after it is created (dropping it needs root), so the
walks are warm: a first walk after a reboot, or on a network file system, costs far more, and
the cached read saves more than shown here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from torchvision.datasets.folder import find_classes, make_dataset  # noqa: E402

from msn.data import folders  # noqa: E402
from msn.data.folders import imagefolder_listing  # noqa: E402


def make_tree(root: Path, classes: int, per_class: int) -> None:
    for c in range(classes):
        folder = root / f"n{c:08d}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            os.close(os.open(folder / f"n{c:08d}_{i:05d}.JPEG", os.O_CREAT | os.O_WRONLY, 0o644))


def timed(
    fn: Callable[[], object], repeats: int, before: Callable[[], None] = lambda: None
) -> tuple[float, object]:
    """Median seconds of ``fn`` over ``repeats`` runs (``before`` each, untimed) and its last result."""
    times, result = [], None
    for _ in range(repeats):
        before()
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--per-class", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where the temporary tree goes (default: the system's)")
    ap.add_argument("--keep", action="store_true", help="keep the tree and the cache folder")
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="msn-listing-", dir=args.dir))
    tree, cache = work / "tree", work / "cache"
    try:
        start = time.perf_counter()
        make_tree(tree, args.classes, args.per_class)
        made = time.perf_counter() - start
        # A tree changed within the last seconds is not cached (folders._RACY_NS): let it age.
        time.sleep(folders._RACY_NS / 1e9 + 0.2)
        files, dirs = args.classes * args.per_class, args.classes + 1
        print(f"tree: {files:,} files in {dirs:,} folders under {work}, made in {made:.1f} s")
        print(f"python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPUs\n")

        def drop_cache_file() -> None:
            shutil.rmtree(cache, ignore_errors=True)

        def torchvision() -> list[tuple[str, int]]:
            return make_dataset(str(tree), find_classes(str(tree))[1], is_valid_file=folders._is_image_file)

        rows = []
        t, fresh = timed(lambda: imagefolder_listing(tree, None), args.repeats)
        rows.append(("no cache (walk)", t))
        t, first = timed(lambda: imagefolder_listing(tree, cache), args.repeats, drop_cache_file)
        rows.append(("first cached listing (walk + write)", t))
        t, cached = timed(lambda: imagefolder_listing(tree, cache), args.repeats)
        rows.append(("cached read (validate + load)", t))
        t, reference = timed(torchvision, args.repeats)
        rows.append(("reference: torchvision find_classes + make_dataset", t))
        assert fresh == first == cached and fresh[0] == reference, "the variants disagree"
        assert len(fresh[0]) == files

        (file,) = cache.iterdir()
        t_load, _ = timed(lambda: json.loads(file.read_text()), args.repeats)
        absolute = len(json.dumps(fresh[0], separators=(",", ":")))

        print(f"| files | folders | variant | seconds (median of {args.repeats}) |")
        print("|--:|--:|:--|--:|")
        for name, t in rows:
            print(f"| {files:,} | {dirs:,} | {name} | {t:.3f} |")
        print(
            f"\ncache file: {file.stat().st_size / 2**20:.2f} MiB ({file.name}); json.loads alone "
            f"{t_load:.3f} s; the samples as a JSON list of [absolute path, label] would be "
            f"{absolute / 2**20:.2f} MiB"
        )
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
