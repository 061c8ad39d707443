"""Run fault scenarios, repeatedly, and print the tally as a table.

    python -m tests.faults.run                       # every scenario once
    python -m tests.faults.run --repeat 20 kill      # the worker-kill scenario twenty times
    python -m tests.faults.run --repeat 3 --out bench/results/DATE-failover.md \
        pg-failover rabbitmq-cluster redis-cluster-failover    # the failovers, with recovery times
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

from tests.faults.host_cut import host_cut_off
from tests.faults.pg_failover import pg_failover
from tests.faults.rabbitmq import redis_down_on_rabbitmq
from tests.faults.rabbitmq_cluster import rabbitmq_cluster_leader_killed
from tests.faults.rabbitmq_restart import rabbitmq_restart
from tests.faults.redis_cluster import redis_cluster_failover
from tests.faults.scenarios import SCENARIOS, Tally
from tests.faults.sentinel import sentinel_failover

SCENARIOS = {**SCENARIOS, "redis-down-rabbitmq": redis_down_on_rabbitmq,
             "sentinel-failover": partial(sentinel_failover, min_replicas=0),
             "sentinel-failover-wait": partial(sentinel_failover, min_replicas=1),
             "sentinel-failover-lagging": partial(sentinel_failover, min_replicas=0, lagging=True),
             "sentinel-failover-lagging-wait": partial(sentinel_failover, min_replicas=1, lagging=True),
             "rabbitmq-restart": partial(rabbitmq_restart, queue_type="classic"),
             "rabbitmq-restart-quorum": partial(rabbitmq_restart, queue_type="quorum"),
             "host-cut-off": host_cut_off,
             "pg-failover": pg_failover,
             "rabbitmq-cluster": rabbitmq_cluster_leader_killed,
             "redis-cluster-failover": redis_cluster_failover}
# The recovery times a scenario notes (seconds from the kill), shown as min-max over its runs.
RECOVERY = {
    "pg-failover": {"first applied after kill": "first_applied_after_kill_s",
                    "first applied after promotion": "first_applied_after_promotion_s",
                    "feed answers again": "feed_back_after_kill_s", "all applied": "all_applied_after_kill_s"},
    "rabbitmq-cluster": {"200 again": "accepted_again_after_s", "last 503": "last_refusal_after_s",
                         "new leader seen": "new_leader_seen_after_s", "all applied": "all_applied_after_kill_s"},
    "redis-cluster-failover": {"replica took over": "took_over_after_s",
                               "/readyz ready again": "readyz_ready_again_after_s",
                               "all applied": "all_applied_after_kill_s"},
}
# Shows what REDIS_MIN_REPLICAS=1 prevents: events answered 200 and then lost with the master.
# Run only when named, and its losses do not fail the run.
SHOWS_A_LOSS = {"sentinel-failover-lagging"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenarios", nargs="*", choices=[*SCENARIOS, []], help="default: all")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--out", type=Path, help="also write the table (with the command and commit) to this file")
    args = parser.parse_args()
    names = args.scenarios or [name for name in SCENARIOS if name not in SHOWS_A_LOSS]
    rows: list[tuple[str, int, Tally, float]] = []
    for name in names:
        for run in range(1, args.repeat + 1):
            started = time.monotonic()
            with tempfile.TemporaryDirectory(prefix=f"fault-{name}-") as workdir:
                tally = SCENARIOS[name](Path(workdir), seed=run)
            rows.append((name, run, tally, time.monotonic() - started))
            print(f"{name} #{run}: {'ok' if tally.ok else 'FAILED'} {tally}", file=sys.stderr, flush=True)
    report = table(names, rows)
    print(report)
    if args.out:
        command = "python -m tests.faults.run " + " ".join([f"--repeat {args.repeat}", *args.scenarios])
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        runs = "\n".join(f"- {name} #{run} ({took:.0f} s): " + json.dumps(tally.notes, default=str)
                          for name, run, tally, took in rows)
        args.out.write_text(f"`{command}` at commit {commit}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
                            f"\n\n{report}\n\nEach run's notes, as the scenario recorded them:\n\n{runs}\n")
    return 0 if all(t.ok or (n in SHOWS_A_LOSS and t.applied_twice == 0) for n, _, t, _ in rows) else 1


def table(names: list[str], rows: list[tuple[str, int, Tally, float]]) -> str:
    """Runs, events, answered 200, applied, twice, lost per scenario; then the recovery times."""
    lines = ["| fault | runs | events sent | answered 200 | applied | applied twice | lost |",
             "|---|---|---|---|---|---|---|"]
    for name in names:
        mine = [t for n, _, t, _ in rows if n == name]
        answered = [t.notes.get("answered_200") for t in mine]
        answered_cell = str(sum(answered)) if all(isinstance(a, int) for a in answered) else "-"
        lines.append(f"| {mine[0].fault} | {len(mine)} | {sum(t.sent for t in mine)} | {answered_cell} "
                     f"| {sum(t.applied for t in mine)} | {sum(t.applied_twice for t in mine)} "
                     f"| {sum(t.lost for t in mine)} |")
    timed = [name for name in names if name in RECOVERY]
    if timed:
        lines += ["", "| fault | recovery, seconds after the kill (min-max over the runs) |", "|---|---|"]
        for name in timed:
            mine = [t for n, _, t, _ in rows if n == name]
            parts = []
            for label, key in RECOVERY[name].items():
                values = [t.notes[key] for t in mine if isinstance(t.notes.get(key), int | float)]
                if values:
                    parts.append(f"{label} {min(values):g}-{max(values):g}" if len(values) > 1
                                 else f"{label} {values[0]:g}")
            lines.append(f"| {mine[0].fault} | {'; '.join(parts)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
