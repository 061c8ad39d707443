"""The capacity plan's tables, computed from the newest result files: docs/scaling.md holds this
command's output between its ``capacity:`` markers, and a test fails when the two differ.

    .venv/bin/python -m bench.capacity            # print the tables
    .venv/bin/python -m bench.capacity --write    # put them into docs/scaling.md
    .venv/bin/python -m bench.capacity --check    # exit 1 when docs/scaling.md differs

Inputs: the newest ``bench/results/*.json`` written by ``bash bench/run.sh`` (web and worker
rates; the worker's from ``python -m bench.worker_floor --out`` when that ran later), by
``python -m bench.redis_ops --out`` (Redis commands per event), by ``python -m bench.storage --out``
(bytes per row) and by ``python -m bench.node_limits --out`` (what one PostgreSQL primary, one
quorum queue and one cache shard take). Every planning assumption is a constant here, named and
explained, so that a changed assumption is a changed line of code.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DOC = ROOT / "docs" / "scaling.md"

CORES = 2  # the benchmark machine's
WEB_PLANNED_SHARE = 0.5  # plan the web at half its saturated rate: the rate at which p99 was measured
WORKER_PLANNED_SHARE = 0.7  # plan a worker process at 70% of what it did beside its database
DEDUP_TTL_SECONDS = 86400  # the default
RATES = (100, 1_000, 10_000)
PARTICIPANTS_PER_CALL = 2  # the storage run's calls


def newest(kind: str) -> tuple[Path, dict[str, Any]]:
    """The newest result file of a kind: 'bench' (bench/run.sh), 'redis-ops', 'storage'."""
    found = []
    for path in sorted(RESULTS.glob("*.json")):
        data = json.loads(path.read_text())
        if data.get("kind", "bench" if "processing" in data and not data.get("tiny") else None) == kind:
            found.append((path, data))
    if not found:
        raise SystemExit(f"no {kind} result file in {RESULTS.relative_to(ROOT)}")
    return max(found, key=lambda item: item[1]["date"])  # newest by when it ran, not by its name


def source(path: Path, data: dict[str, Any]) -> str:
    return f"`{data.get('command', 'bash bench/run.sh')}`, `{path.relative_to(ROOT)}` (commit {data['commit']})"


def fmt(value: float, digits: int = 0) -> str:
    return f"{value:,.{digits}f}"


def worker_line(bench_path: Path, bench: dict[str, Any]) -> tuple[Path, dict[str, Any], dict[str, Any], str]:
    """The worker line's newest figures on PostgreSQL: ``bash bench/run.sh``'s or
    ``python -m bench.worker_floor``'s (the same line, queued events, PostgreSQL with fsync on),
    whichever ran last; with the result's path and data, and the key the figures are under."""
    candidates = [(bench_path, bench, bench["processing"]["postgresql"]["line"], "processing.postgresql.line")]
    try:
        floor_path, floor = newest("worker-floor")
    except SystemExit:  # no worker-floor result yet
        pass
    else:
        candidates.append((floor_path, floor, floor["postgresql"]["line"], "postgresql.line"))
    return max(candidates, key=lambda item: item[1]["date"])


def tables() -> str:
    """The inputs table and the plan table, as markdown."""
    bench_path, bench = newest("bench")
    ops_path, ops = newest("redis-ops")
    storage_path, storage = newest("storage")
    webhook_rps = bench["ack"]["webhook_rps"]
    open_50 = bench["ack"]["webhook_open_50"]
    line_path, line_data, line, line_key = worker_line(bench_path, bench)
    redis_commands = ops["redis_broker"]["commands_per_event"]
    cache_commands = ops["rabbitmq_broker"]["commands_per_event"]
    events_published = ops["redis_broker"]["by_command"].get("publish", 0.0)
    event_row = storage["tables"]["webhook_events"]
    recording_row = storage["tables"]["voice_recordings"]["bytes_per_row"]
    participant_row = storage["tables"]["participants"]["bytes_per_row"]
    events_per_call = storage["events"] / storage["calls"]
    key_bytes = storage["dedup_key_memory_usage_bytes"]

    web_per_core = webhook_rps / CORES * WEB_PLANNED_SHARE
    worker_per_process = line["new_eps"] / line["processes"] * WORKER_PLANNED_SHARE
    # bench/run.sh's line applied one event per transaction (before batches, or on RabbitMQ, whose
    # worker still does): what a worker process plans at where events are not batched.
    single = bench["processing"]["postgresql"]["line"]
    single_per_process = single["new_eps"] / single["processes"] * WORKER_PLANNED_SHARE
    bytes_per_event = (event_row["bytes_per_row"] + recording_row / events_per_call
                       + PARTICIPANTS_PER_CALL * participant_row / events_per_call)
    messages_per_event = 1 + events_published

    rows = [
        ("W", "webhooks answered per second, closed loop, 2 cores", f"{fmt(webhook_rps)} req/s",
         source(bench_path, bench) + ", `ack.webhook_rps`"),
        ("L", f"ack p99 at half that rate ({fmt(open_50['rate'])} req/s), open loop", f"{open_50['p99_ms']} ms",
         "same file, `ack.webhook_open_50.p99_ms`"),
        ("P", "new events applied per second, the Procfile's worker line, PostgreSQL",
         f"{fmt(line['new_eps'], 1)} with {line['processes']} processes on 2 cores",
         ("same file" if line_path == bench_path else source(line_path, line_data)) + f", `{line_key}.new_eps`"),
        ("D", "duplicates turned away per second, the same line", fmt(line["duplicate_eps"], 1),
         f"same file, `{line_key}.duplicate_eps`"),
        ("R", "Redis commands per applied event, Redis as broker (inside scripts too)", f"{redis_commands}",
         source(ops_path, ops) + ", `redis_broker.commands_per_event`"),
        ("R'", "Redis commands per applied event, RabbitMQ as broker", f"{cache_commands}",
         "same file, `rabbitmq_broker.commands_per_event`"),
        ("E", "task events published per applied event (none until Flower turns them on)",
         f"{events_published}", "same file, `redis_broker.by_command.publish`"),
        ("S", "PostgreSQL bytes per stored event, indexes included",
         f"{event_row['bytes_per_row']} (of which {event_row['index_bytes_per_row']} index)",
         source(storage_path, storage) + ", `tables.webhook_events`"),
        ("S'", "bytes per recording row / per participant row", f"{recording_row} / {participant_row}",
         "same file, `tables.voice_recordings`, `tables.participants`"),
        ("C", "events per call (AT's realistic sequences, 2 participants)", f"{events_per_call:.2f}",
         "same file, `events` ÷ `calls`"),
        ("K", "Redis memory per done dedup key (`MEMORY USAGE`)", f"{fmt(key_bytes)} B",
         "same file, `dedup_key_memory_usage_bytes`"),
    ]
    inputs = ["| # | figure | value | source |", "|---|---|---|---|"]
    inputs += [f"| {'|'.join(f' {cell} ' for cell in row).strip()} |" for row in rows]

    def per_rate(compute: Any) -> list[str]:
        return [compute(rate) for rate in RATES]

    plan = [
        ("per-unit figures", [f"web {fmt(web_per_core)} webhooks/s per core (W ÷ {CORES} x {WEB_PLANNED_SHARE}); "
                              f"worker {fmt(worker_per_process)} new events/s per process "
                              f"(P ÷ {line['processes']} x {WORKER_PLANNED_SHARE}); "
                              f"{fmt(bytes_per_event)} B per event in PostgreSQL (S + S'/C + 2 S'/C)"]),
        (f"web cores (÷ {fmt(web_per_core)})", per_rate(lambda r: str(math.ceil(r / web_per_core)))),
        (f"worker processes, Redis broker (÷ {fmt(worker_per_process)})",
         per_rate(lambda r: str(math.ceil(r / worker_per_process)))),
        (f"worker processes, RabbitMQ broker: one event at a time (÷ {fmt(single_per_process)}, the line in "
         f"{bench_path.name})", per_rate(lambda r: str(math.ceil(r / single_per_process)))),
        (f"Redis commands/s, Redis broker (x {redis_commands})", per_rate(lambda r: fmt(r * redis_commands))),
        (f"Redis commands/s, RabbitMQ broker (x {cache_commands})", per_rate(lambda r: fmt(r * cache_commands))),
        ("PostgreSQL write transactions/s, at most (one per event alone; a batch shares one)",
         per_rate(lambda r: fmt(r))),
        (f"broker messages/s (x {messages_per_event:.2f}: the task, and E)",
         per_rate(lambda r: fmt(r * messages_per_event))),
        ("events per day", per_rate(lambda r: f"{r * 86400 / 1e6:,.2f} million")),
        (f"PostgreSQL growth per day (x {fmt(bytes_per_event)} B)",
         per_rate(lambda r: f"{r * 86400 * bytes_per_event / 1e9:,.1f} GB")),
        (f"dedup keys in Redis (rate x {DEDUP_TTL_SECONDS} x {fmt(key_bytes)} B)",
         per_rate(lambda r: f"{r * DEDUP_TTL_SECONDS * key_bytes / 1e9:,.1f} GB")),
    ]
    header = "| | " + " | ".join(f"{fmt(rate)} events/s" for rate in RATES) + " |"
    lines = [header, "|---|" + "---|" * len(RATES)]
    for label, cells in plan[1:]:
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return ("<!-- capacity:inputs -->\n" + "\n".join(inputs) + "\n<!-- /capacity:inputs -->\n\n"
            + f"Per unit: {plan[0][1][0]}.\n\n"
            + "<!-- capacity:plan -->\n" + "\n".join(lines) + "\n<!-- /capacity:plan -->")


def nodes() -> str:
    """Per node: what one PostgreSQL primary, one quorum queue's leader and one cache shard take on
    the benchmark machine, what an event costs each, and the rate at which each runs out."""
    limits_path, limits = newest("node-limits")
    ops_path, ops = newest("redis-ops")
    pg, rabbit, cache = limits["postgresql"], limits["rabbitmq"], limits["redis"]
    alone, synced = pg["primary_alone"], pg["primary_sync_standby"]
    messages_per_event = 1 + ops["redis_broker"]["by_command"].get("publish", 0.0)
    queue_events = rabbit["messages_per_second"] / messages_per_event
    rows = [
        ("one PostgreSQL primary, with a synchronous standby",
         f"{fmt(synced['one_call_tps'])} transactions/s as one server-side call; "
         f"{fmt(synced['seven_statements_tps'])}/s as seven statements",
         f"one write transaction per new event; the standby costs "
         f"{1 - synced['one_call_tps'] / alone['one_call_tps']:.0%} of the primary alone's "
         f"{fmt(alone['one_call_tps'])}/s (one call) and "
         f"{1 - synced['seven_statements_tps'] / alone['seven_statements_tps']:.0%} of its "
         f"{fmt(alone['seven_statements_tps'])}/s (seven statements)",
         f"{fmt(synced['one_call_tps'])} new events/s with one call per event; "
         f"{fmt(synced['seven_statements_tps'])} with statements sent one by one",
         "a partitioned events table (by month: retention drops partitions) first; then recordings "
         "sharded by session id over several primaries"),
        ("one quorum queue's leader (three nodes)",
         f"{fmt(rabbit['publish']['per_second'])} confirmed publishes/s; "
         f"{fmt(rabbit['consume']['per_second'])} deliveries acknowledged/s",
         f"{messages_per_event:.2f} messages per event, each published, replicated to 3 nodes, "
         f"delivered and acknowledged ({fmt(rabbit['messages_per_second'])} messages/s through)",
         f"{fmt(queue_events)} events/s",
         "partitioned queues: N webhook queues, an event routed by a hash of its session id (one "
         "session's events stay on one queue, in order), each queue's leader on another node"),
        ("one cache shard (one Redis master)",
         f"{fmt(cache['claims_per_second'])} claim scripts/s; {fmt(cache['done_marks_per_second'])} "
         f"done marks/s",
         f"one claim and one done mark per event ({ops['rabbitmq_broker']['commands_per_event']} "
         f"commands in all on RabbitMQ, R')",
         f"{fmt(cache['events_per_second'])} events/s",
         "more masters in the cluster (an event's keys are in one slot: events spread over "
         "every master); memory, not rate, decides the count (the dedup keys row)"),
    ]
    lines = ["| piece | measured on this machine | cost per event | runs out at | next step |",
             "|---|---|---|---|---|"]
    lines += [f"| {' | '.join(row)} |" for row in rows]
    note = (f"Source: {source(limits_path, limits)}, {limits['seconds']} s per figure; "
            f"messages per event from {ops_path.relative_to(ROOT)}.")
    return "<!-- capacity:nodes -->\n" + "\n".join(lines) + "\n\n" + note + "\n<!-- /capacity:nodes -->"


BLOCK = re.compile(r"<!-- capacity:inputs -->.*<!-- /capacity:plan -->", re.S)
NODES_BLOCK = re.compile(r"<!-- capacity:nodes -->.*<!-- /capacity:nodes -->", re.S)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="put the tables into docs/scaling.md")
    parser.add_argument("--check", action="store_true", help="exit 1 when docs/scaling.md differs")
    args = parser.parse_args()
    blocks = ((BLOCK, tables()), (NODES_BLOCK, nodes()))
    if not (args.write or args.check):
        print("\n\n".join(generated for _, generated in blocks))
        return 0
    text = DOC.read_text()
    for pattern, generated in blocks:
        found = pattern.search(text)
        if found is None:
            print(f"{DOC} has no {pattern.pattern.split(' ')[1]} markers", file=sys.stderr)
            return 1
        if args.check and found.group(0) != generated:
            print(f"{DOC} differs from `python -m bench.capacity`: run it with --write", file=sys.stderr)
            return 1
        text = text[:found.start()] + generated + text[found.end():]
    if args.write:
        DOC.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
