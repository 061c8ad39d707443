"""Enumerate faults on the service's paths and print what held, as a markdown table.

    python -m tests.enumerate.run                          # every default path
    python -m tests.enumerate.run apply-redis webhook-rabbitmq --out results.md
    python -m tests.enumerate.run --service-root /tmp/before   # another checkout of the service

Progress goes to stderr, one line per run; the table (and each path's steps and every broken run)
to stdout and to ``--out``. Run it from the repository root (``python -m``), with the venv's
Python: the harness is this checkout's, the service under test is ``--service-root``'s.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from tests.enumerate.engine import MAX_LANES, details, enumerate_paths, executed_runs, table
from tests.enumerate.paths import DEFAULT_PATHS, PATHS
from tests.support import ROOT, adopt_orphans, leftovers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="*", choices=[*PATHS, []], help=f"default: {' '.join(DEFAULT_PATHS)}")
    parser.add_argument("--out", type=Path, help="also write the table and details to this file")
    parser.add_argument("--service-root", type=Path, default=ROOT,
                        help="the checkout whose service runs (cwd and PYTHONPATH of its processes)")
    parser.add_argument("--lanes", type=int, default=MAX_LANES, help="services run side by side")
    parser.add_argument("--no-merge", action="store_true",
                        help="run 'after k' and 'before k+1' separately even where they leave the same state")
    parser.add_argument("--kinds", help="fault kinds for every path, comma-separated (default: each path's own; "
                                        "before, after, fail, refuse)")
    parser.add_argument("--keep", action="store_true", help="keep the lanes' logs and traces")
    args = parser.parse_args(argv)
    names = args.paths or list(DEFAULT_PATHS)
    kinds = {name: tuple(args.kinds.split(",")) for name in names} if args.kinds else None
    service_root = args.service_root.resolve()
    adopt_orphans()
    workdir = Path(tempfile.mkdtemp(prefix="voice-enumerate-"))
    started = time.monotonic()
    try:
        reports = enumerate_paths(names, service_root, workdir, merge=not args.no_merge, max_lanes=args.lanes,
                                  kinds=kinds)
    finally:
        if args.keep:
            print(f"logs and traces kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    seconds = time.monotonic() - started
    text = (f"Fault enumeration of {service_root} ({', '.join(names)}): {executed_runs(reports)} runs executed "
            f"in {seconds:.0f} s\n\n{table(reports)}\n{details(reports)}\n")
    print(text)
    if args.out:
        args.out.write_text(text)
    left = leftovers(timeout=10)
    if left:
        print("left behind:\n" + "\n".join(left), file=sys.stderr)
        return 2
    ok = all(r.error is None and r.recording is not None and r.recording.held
             and all(result.held for result in r.results) for r in reports)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
