"""Checkout cost as a repository's history grows.

For each history length (default 100, 10,000 and 50,000 commits; a tree of
5,000 files in 50 folders), a repository is generated with `git fast-import`
and cached under bench/out/repos/ (generated once; later runs reuse it). Each
run clones it (hardlinked) as the origin, lets runner.workspace.Workspace
make its first (cold) checkout, then repeatedly adds a commit that changes 10
files to the origin and times Workspace.checkout of that new commit: a fetch,
a forced checkout and a clean, as a warm runner does for every job. The origin
is named by a file:// URL, so it is fetched from as a remote repository is (a
plain path would be shared through git's alternates and need no fetch at all).
Prints the median per length; asserts nothing.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from harness import OUT, Repo, median, progress, report

from runner.workspace import Workspace

TARGET = 0.300  # s per warm checkout
FLAT = 1.5  # the longest history's median may be at most this many times the shortest's
FILES = 5000


def cached_repo(commits: int, files: int) -> Path:
    """A bare repository of `commits` commits over `files` files, generated once."""
    path = OUT / "repos" / f"history-{commits}-files-{files}.git"
    if (path / "volt-bench-complete").exists():
        return path
    progress(f"generating {commits} commits over {files} files (cached in {path})")
    began = time.monotonic()
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    repo = Repo(tmp, bare=True)
    repo.import_commits(1, files=files)
    if commits > 1:
        repo.import_commits(commits - 1)
    repo.git("gc", "--quiet")  # packed as a served repository would be
    (tmp / "volt-bench-complete").write_text(repo.head())
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    progress(f"generated in {time.monotonic() - began:.1f}s")
    return path


def measure(commits: int, files: int, runs: int) -> tuple[float, list[float]]:
    source = cached_repo(commits, files)
    tmp = Path(tempfile.mkdtemp(prefix="volt-bench-checkout-"))
    try:
        origin = Repo.open(tmp / "origin.git")
        origin.path.parent.mkdir(exist_ok=True)
        Repo.open(tmp).git("clone", "--quiet", "--bare", str(source), str(origin.path))
        workspace = Workspace(tmp / "runner")
        url = f"file://{origin.path}"
        began = time.perf_counter()
        workspace.checkout(url, origin.head())
        cold = time.perf_counter() - began
        warm = []
        for _ in range(runs):
            new = origin.import_commits(1, touch=10)
            began = time.perf_counter()
            workspace.checkout(url, new)
            warm.append(time.perf_counter() - began)
        progress(
            f"{commits} commits: cold {cold * 1000:.0f} ms, warm " + ", ".join(f"{w * 1000:.0f}" for w in warm) + " ms"
        )
        return cold, warm
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="3 checkouts per length instead of 9")
    parser.add_argument("--histories", default="100,10000,50000", help="comma-separated history lengths")
    parser.add_argument("--files", type=int, default=FILES)
    parser.add_argument("--runs", type=int)
    args = parser.parse_args()
    runs = args.runs or (3 if args.quick else 9)
    lengths = [int(n) for n in args.histories.split(",")]
    medians: dict[int, float] = {}
    print(f"tree of {args.files} files; {runs} warm checkouts per history length")
    print(f"{'commits':>8} {'cold ms':>8} {'warm median ms':>15} {'min':>6} {'max':>6}")
    for n in lengths:
        cold, warm = measure(n, args.files, runs)
        medians[n] = median(warm)
        print(
            f"{n:>8} {cold * 1000:>8.0f} {medians[n] * 1000:>15.0f} {min(warm) * 1000:>6.0f} {max(warm) * 1000:>6.0f}"
        )
    worst = max(medians.values())
    growth = medians[max(lengths)] / medians[min(lengths)]
    report(
        "checkout",
        f"warm checkout, {args.files} files, history {min(lengths)} -> {max(lengths)} commits",
        " / ".join(f"{medians[n] * 1000:.0f}" for n in lengths) + f" ms (x{growth:.2f})",
        f"< {TARGET * 1000:.0f} ms, flat (x <= {FLAT:g})",
        worst < TARGET and growth <= FLAT,
        medians={str(n): m for n, m in medians.items()},
        growth=growth,
    )


if __name__ == "__main__":
    main()
