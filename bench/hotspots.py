"""The hottest functions in a py-spy profile of collapsed stacks (`--format raw`).

  bench/throughput.py --profile bench/out/dispatcher.txt
  bench/hotspots.py bench/out/dispatcher.txt

Prints the top functions by own time (samples where the function itself was
running) and by total time (samples where it was anywhere on the stack).
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

# "name (path:line)" -> "name (file.py)": one entry per function, not per line.
_FRAME = re.compile(r"^(?P<name>.*?) \((?P<path>[^:()]+)(?::\d+)?\)$")


def function(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    path = m.group("path")
    short = "/".join(Path(path).parts[-2:]) if "site-packages" in path or "/lib/" in path else path
    return f"{m.group('name')} ({short.split('/work/main/')[-1]})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("profile", type=Path)
    parser.add_argument("--top", type=int, default=10)
    args = parser.parse_args()
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in args.profile.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        # py-spy puts the process and the thread first; frames go root -> leaf.
        frames = [function(f) for f in stack.split(";") if "(" in f and not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        samples += n
        own[frames[-1]] += n
        for f in set(frames):
            total[f] += n
    print(f"{samples} samples")
    for title, counter in (("own time", own), ("total time (on the stack)", total)):
        print(f"\ntop {args.top} by {title}:")
        for name, n in counter.most_common(args.top):
            print(f"  {n / samples:6.1%}  {name}")


if __name__ == "__main__":
    main()
