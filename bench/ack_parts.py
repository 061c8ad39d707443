"""Where the acknowledgement's server CPU goes under gunicorn, accounted for by taking its parts
away one at a time: each rung of the ladder is a server of its own (the Procfile's gunicorn line),
all measured in the same alternating turns (``bench.ack_cpu``'s turn: wrk, then /proc's CPU per
request), so every difference between two rungs is the CPU one part costs as the service runs it.

    .venv/bin/python -m bench.ack_parts --out bench/results/DATE-ack-parts.json
    .venv/bin/python -m bench.ack_parts --brokers redis --turns 1 --seconds 3      # a quick look
    .venv/bin/python -m bench.ack_parts --open-rate 800     # and every rung's latency at 800 req/s, open
                                                            # loop, 3 alternating turns (--open-turns)

The ladder (``bench.ack_variants``):

1. bare: ``bench/bare.py``, Flask answering the webhook's JSON, nothing else;
2. bare + one Redis round trip (a PING): what a round trip costs a bare endpoint; on RabbitMQ also
   bare + one confirmed, persistent publish (py-amqp, a 900-byte message): the publish's floor;
3. the service with no publish and no log line (LOG_LEVEL=WARNING): its webhook endpoint (ahead of
   Flask since the third round) with the body's decoding and validation, the checks, the metrics,
   the answer;
4. + the log line (LOG_LEVEL=INFO, as shipped);
5. + one Redis round trip where the publish was (Redis broker only);
6. the service as shipped: the real publish.

Rung 6 - rung 5 is what publishing costs beyond its one round trip (building the task message,
the pending entry, the JSON); on RabbitMQ, rung 6 - rung 4 is the whole publish
(a confirmed, persistent basic.publish), to be set against the floor's rung. A profiler attached
to the server inflates what it measures (py-spy pauses the process to sample) and the test
client's profile sees each part alone, where under gunicorn a part costs more (cache, thread
switches): this measures the parts in place.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from bench.ack_cpu import Side, measure, on_each_broker
from bench.run import ROOT, Processes, step, write_result

VARIANTS = "bench.ack_variants:app"
QUIET = {"LOG_LEVEL": "WARNING"}


def ladder(broker: str) -> dict[str, Side]:
    rungs: dict[str, Side] = {
        "bare": (ROOT, "bench.bare:app", {}),
        "bare + round trip": (ROOT, "bench.ack_variants:bare_round_trip", {}),
        **({"bare + confirmed publish": (ROOT, "bench.ack_variants:bare_confirmed_publish", {})}
           if broker == "rabbitmq" else {}),
        "service, no publish, no log line": (ROOT, VARIANTS, {"VOICE_BENCH_VARIANT": "no-publish", **QUIET}),
        "service, no publish": (ROOT, VARIANTS, {"VOICE_BENCH_VARIANT": "no-publish"}),
    }
    if broker == "redis":
        rungs["service, a round trip for the publish"] = (ROOT, VARIANTS, {"VOICE_BENCH_VARIANT": "round-trip"})
    rungs["service"] = (ROOT, "wsgi:app", {})
    return rungs


# (part, upper rung, lower rung): the part's CPU per request is the upper's minus the lower's.
PARTS = [
    ("a Redis round trip, in a bare endpoint", "bare + round trip", "bare"),
    ("a confirmed, persistent publish on RabbitMQ, in a bare endpoint (the floor)", "bare + confirmed publish", "bare"),
    ("the service's endpoint over bare's Flask: checks, decoding and validation, metrics, answer",
     "service, no publish, no log line", "bare"),
    ("the log line", "service, no publish", "service, no publish, no log line"),
    ("a Redis round trip, in the service", "service, a round trip for the publish", "service, no publish"),
    ("the publish beyond its round trip (task message, pending entry, JSON)", "service",
     "service, a round trip for the publish"),
    ("the whole publish", "service", "service, no publish"),
    ("the service over bare", "service", "bare"),
]


def parts(got: dict[str, Any]) -> dict[str, float]:
    found = {part: round(got[upper]["cpu_us_per_request"] - got[lower]["cpu_us_per_request"], 1)
             for part, upper, lower in PARTS if upper in got and lower in got}
    floor = "a confirmed, persistent publish on RabbitMQ, in a bare endpoint (the floor)"
    if floor in found:
        found["the whole publish beyond the floor"] = round(found["the whole publish"] - found[floor], 1)
    return found


def table(result: dict[str, Any]) -> str:
    lines = []
    for broker, got in result["brokers"].items():
        lines.append(f"broker {broker}: median of {result['turns']} alternating turns of {result['seconds']} s")
        lines.append(f"  {'rung':40s} {'req/s':>7s} {'CPU us/req':>10s} {'user':>6s} {'kernel':>6s} {'switches':>8s}"
                     + (f" {'p50/p99 ms at ' + format(result['open_rate'], '.0f') + '/s':>22s}"
                        if "open_rate" in result else ""))
        for name, figures in got["rungs"].items():
            tail = figures.get("open_fixed")
            lines.append(f"  {name:40s} {figures['rps']:7.0f} {figures['cpu_us_per_request']:10.0f} "
                         f"{figures['user_us_per_request']:6.0f} {figures['system_us_per_request']:6.0f} "
                         f"{figures['switches_per_request']:8.2f}"
                         + (f" {tail['p50_ms']:10.1f} / {tail['p99_ms']:7.1f} {tail['turns_p99_ms']}" if tail else ""))
        lines.append(f"  {'part':80s} {'CPU us/req':>10s}")
        for part, value in got["parts"].items():
            lines.append(f"  {part:80s} {value:10.0f}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--brokers", nargs="+", choices=["redis", "rabbitmq"], default=["redis", "rabbitmq"])
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=6, help="each turn's load on each server")
    parser.add_argument("--out", type=Path, help="write the result here (bench.run.write_result, kind ack-parts; "
                                                 "ack-tail with --open-rate)")
    parser.add_argument("--open-rate", type=float, help="after the turns, every rung in an open loop at this "
                                                        "rate (req/s): which part brings the latency's tail")
    parser.add_argument("--open-seconds", type=int, default=10, help="each rung's open loop (with --open-rate)")
    parser.add_argument("--open-turns", type=int, default=3, help="alternating open-loop turns (with --open-rate)")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk is needed: bash bench/run.sh installs it (apt-get install wrk)")

    def rungs(procs: Processes, broker: str) -> dict[str, Any]:
        ladder_of = ladder(broker)
        step(f"broker {broker}: {len(ladder_of)} servers side by side, {args.turns} turns")
        got = measure(procs, ladder_of, args.turns, args.seconds, args.open_seconds,
                      open_loop_for=list(ladder_of) if args.open_rate else [], open_rate=args.open_rate,
                      open_turns=args.open_turns)
        return {"rungs": got, "parts": parts(got)}

    brokers = on_each_broker(args.brokers, "voice-ack-parts-", rungs)
    result = {"turns": args.turns, "seconds": args.seconds, "brokers": brokers,
              **({"open_rate": args.open_rate, "open_seconds": args.open_seconds, "open_turns": args.open_turns}
                 if args.open_rate else {})}
    print(table(result), file=sys.stderr)
    print(json.dumps(result, indent=1))
    if args.out:
        # A run with the open loops is kept apart from the ladders docs/performance.md's tables come from.
        write_result(args.out, "ack-tail" if args.open_rate else "ack-parts",
                     " ".join([".venv/bin/python -m bench.ack_parts", *sys.argv[1:]]), result)
        step(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
