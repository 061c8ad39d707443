"""What validating a webhook body costs, and what app.payload.events adds to the worker's memory: two trees
compared in one run, in alternating turns.

Each turn runs, for each tree, a fresh interpreter that imports that tree's ``app.payload.events`` and
times ``parse_event(decode_body(...))`` over a fixed set of realistic bodies (form and JSON,
Africa's Talking's own callbacks and the plain contract), ``--n`` calls per body, and another fresh
interpreter that imports what ``python -m worker`` imports and reads its resident memory. The
trees take turns (before, after; then after, before; ...), so that a slower minute on this shared
machine weighs on both alike. The figures are medians over the turns.

    python -m bench.validation --before /tmp/val-before --after . --turns 9 --n 20000 \\
        --out bench/results/2026-12-02-validation.json

``--before`` is a copy of the tree with the old app/payload/events.py and app/payload/openapi.py put back.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "africastalking"
FORM, JSON_TYPE = "application/x-www-form-urlencoded", "application/json"
_STARTED = time.monotonic()


def bodies() -> dict[str, tuple[str, bytes]]:
    """The bodies timed, by name: (media type, bytes). All of them are accepted."""
    at_completed = (FIXTURES / "completed_with_recording.form").read_bytes()
    from urllib.parse import parse_qsl

    as_json = json.dumps(dict(parse_qsl(at_completed.decode(), keep_blank_values=True))).encode()
    return {
        "plain form, completed": (FORM, b"sessionId=ATVoice_a1b2c3d4e5f6&phoneNumber=%2B254712345678&recordingUrl="
                                        b"https%3A%2F%2Fvoice.africastalking.com%2Frecordings%2Fa1b2c3d4e5f6.mp3"
                                        b"&duration=420&status=completed"),
        "plain form, no-answer": (FORM, b"sessionId=ATVoice_x9y8z7w6v5u4&phoneNumber=%2B254787654321&status=no-answer"),
        "plain JSON, completed": (JSON_TYPE, json.dumps({
            "sessionId": "ATVoice_a1b2c3d4e5f6", "phoneNumber": "+254712345678", "recordingUrl": "",
            "duration": 123, "status": "completed"}).encode()),
        "AT form, completed with recording": (FORM, at_completed),
        "AT form, live": (FORM, (FIXTURES / "live.form").read_bytes()),
        "AT form, busy": (FORM, (FIXTURES / "busy.form").read_bytes()),
        "AT JSON, completed with recording": (JSON_TYPE, as_json),
    }


REFUSED = {  # not part of the goal (the acknowledgement of a valid body), shown for what it is
    "plain form, duration out of range": (FORM, b"sessionId=S1&status=busy&phoneNumber=%2B254712345678"
                                                b"&duration=999999"),
    "JSON, control character": (JSON_TYPE, b'{"sessionId": "S1", "status": "busy", "note": "a\\u0001b"}'),
}


def step(message: str) -> None:
    print(f"[validation {time.monotonic() - _STARTED:6.1f}s] {message}", file=sys.stderr, flush=True)


# --- what runs in each fresh interpreter -------------------------------------------------------


def child_timing(n: int) -> dict[str, Any]:
    """CPU µs per ``parse_event(decode_body(...))`` call for each body, in this interpreter (the
    median of five runs of ``n / 5`` calls, after a warm-up)."""
    import app.payload.events
    from app.base.errors import InvalidPayload
    from app.payload.events import decode_body, parse_event

    def accept(mimetype: str, body: bytes) -> None:
        parse_event(decode_body(mimetype, body))

    def refuse(mimetype: str, body: bytes) -> None:
        try:
            parse_event(decode_body(mimetype, body))
        except InvalidPayload:
            return
        raise AssertionError("accepted")

    figures: dict[str, float] = {}
    for call, group in ((accept, bodies()), (refuse, REFUSED)):
        for name, (mimetype, body) in group.items():
            for _ in range(min(n, 2000)):
                call(mimetype, body)
            runs = []
            for _ in range(5):  # CPU time: what other processes on this shared machine do weighs less
                started = time.process_time()
                for _ in range(n // 5):
                    call(mimetype, body)
                runs.append((time.process_time() - started) / (n // 5) * 1e6)
            figures[name] = statistics.median(runs)
    return {"events_module": app.payload.events.__file__, "us": figures}


def child_memory() -> dict[str, Any]:
    """Resident memory of a fresh interpreter once it holds what ``python -m worker`` imports."""
    import worker.__main__  # noqa: F401 - the import is what is measured

    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return {"rss_kb": int(status["VmRSS"].split()[0]), "hwm_kb": int(status["VmHWM"].split()[0]),
            "modules": len(sys.modules), "msgspec": "msgspec" in sys.modules,
            "pydantic": "pydantic" in sys.modules}


# --- the driver ------------------------------------------------------------------------------


def run_child(tree: Path, what: str, n: int, workdir: Path) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k not in ("PROMETHEUS_MULTIPROC_DIR", "PYTHONPATH")}
    env.update(PYTHONPATH=str(tree), DATABASE_URL=f"sqlite:///{workdir / 'voice.db'}",
               REDIS_URL="redis://127.0.0.1:1/0")  # never connected
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", what, "--n", str(n)],
                          cwd=tree, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise SystemExit(f"{what} in {tree} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def measure(trees: dict[str, Path], turns: int, n: int) -> dict[str, Any]:
    timing: dict[str, list[dict[str, float]]] = {label: [] for label in trees}
    memory: dict[str, list[dict[str, Any]]] = {label: [] for label in trees}
    files: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="bench-validation-") as tmp:
        for turn in range(turns):
            order = list(trees) if turn % 2 == 0 else list(reversed(trees))
            for label in order:
                got = run_child(trees[label], "timing", n, Path(tmp))
                files[label] = got["events_module"]
                timing[label].append(got["us"])
                memory[label].append(run_child(trees[label], "memory", n, Path(tmp)))
                accepted = [got["us"][name] for name in bodies()]
                step(f"turn {turn + 1}/{turns} {label}: {statistics.mean(accepted):.2f} µs per accepted body "
                     f"(mean of {len(accepted)}), worker imports {memory[label][-1]['rss_kb'] / 1024:.1f} MB RSS")
    result: dict[str, Any] = {"turns": turns, "calls_per_body_per_turn": n, "trees": {}}
    for label in trees:
        per_body = {name: round(statistics.median(t[name] for t in timing[label]), 2) for name in timing[label][0]}
        accepted_means = [statistics.mean(t[name] for name in bodies()) for t in timing[label]]
        rss = [m["rss_kb"] for m in memory[label]]
        result["trees"][label] = {
            "tree": str(trees[label]), "events_module": files[label],
            "us_per_accepted_body_median": round(statistics.median(accepted_means), 2),
            "us_per_accepted_body_per_turn": [round(x, 2) for x in accepted_means],
            "us_per_body_median": per_body,
            "worker_import_rss_mb_median": round(statistics.median(rss) / 1024, 2),
            "worker_import_rss_kb_per_turn": rss,
            "worker_modules": memory[label][-1]["modules"],
            "worker_loads_msgspec": memory[label][-1]["msgspec"],
            "worker_loads_pydantic": memory[label][-1]["pydantic"],
        }
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, help="the tree with the old code")
    parser.add_argument("--after", type=Path, default=ROOT, help="the tree with the new code (default: this one)")
    parser.add_argument("--turns", type=int, default=9)
    parser.add_argument("--n", type=int, default=20000, help="calls per body per turn")
    parser.add_argument("--out", type=Path, help="also write the result here (bench/results/DATE-validation.json)")
    parser.add_argument("--note", default="", help="what the trees are, written with the result")
    parser.add_argument("--child", choices=["timing", "memory"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child_timing(args.n) if args.child == "timing" else child_memory()))
        return 0
    trees = {"after": args.after.resolve()} if args.before is None else {
        "before": args.before.resolve(), "after": args.after.resolve()}
    result = {"note": args.note, **measure(trees, args.turns, args.n)}
    if "before" in trees:
        before, after = result["trees"]["before"], result["trees"]["after"]
        result["change"] = {  # after - before
            name: round(after[f"{name}_median"] - before[f"{name}_median"], 2)
            for name in ("us_per_accepted_body", "worker_import_rss_mb")
        }
    print(json.dumps(result, indent=2))
    if args.out:
        sys.path.insert(0, str(ROOT))
        from bench.run import write_result

        write_result(args.out, "validation", shlex.join([".venv/bin/python", "-m", "bench.validation", *sys.argv[1:]]),
                     result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
