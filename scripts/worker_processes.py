"""Runs N Celery worker processes side by side, each with the solo pool: the Procfile's ``worker``.

    python scripts/worker_processes.py N python -m worker --pool=solo [options...]

Why not one worker with a prefork pool of N: there, a main process fetches each message and hands
it to a pool process over a pipe, and acknowledges it when the pool process says it is done. A
solo worker runs the task in the process that fetched it: no hand-off, and the task's own Redis
writes can go in the acknowledgement's round trip (``app.transport.ride_on_ack``). Measured in
``bench/worker_matrix.py`` (docs/performance.md).

This process only supervises, importing nothing but the standard library:

- each child gets ``--hostname=<name>-<i>@<host>`` (``<name>`` from the command's ``--hostname``,
  else ``worker``), and only the first serves the worker's metrics port (every child writes to the
  same multiprocess folder, so one endpoint serves them all); the others get
  ``WORKER_METRICS_PORT=0``;
- SIGTERM, SIGINT and SIGHUP go on to every child as SIGTERM (Celery's warm shutdown: the task
  running finishes; a terminal's Ctrl-C also reaches the children directly, and a second SIGINT
  would be Celery's cold shutdown; Celery's own SIGHUP re-executes the worker, which a process
  started with ``python -m`` cannot do reliably), SIGQUIT as itself (cold shutdown); once the
  children have all exited, so does this, with the first non-zero status among them;
- a child killed by a signal while the others run (out of memory, a crash) is started again, as a
  prefork pool replaces a lost pool process, after a pause that grows while it keeps dying. Its
  message goes back to the queue through the broker (the visibility timeout) and the pending
  set's sweeper, as for any killed worker. A child that exits on its own (a configuration error,
  a shutdown command, a broker given up on) stops the whole line with its status, as one worker
  would stop: an error is seen, not looped on;
- the children die with this process (``PR_SET_PDEATHSIG``): a supervisor killed outright does
  not leave workers behind.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime

QUICK_DEATH_SECONDS = 30.0  # killed again this soon after a restart: wait longer before the next
RESTART_BACKOFF_SECONDS = (1.0, 2.0, 5.0, 10.0, 30.0)
MAX_PROCESSES = 64
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP)
_PR_SET_PDEATHSIG = 1


def log(event: str, level: str = "info", **fields: object) -> None:
    """One JSON line on stderr, in the service's log shape."""
    record = {"event": event, "level": level, "logger": "worker_processes",
              "timestamp": datetime.now(UTC).isoformat().replace("+00:00", "Z"), **fields}
    print(json.dumps(record), file=sys.stderr, flush=True)


def parse_count(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= MAX_PROCESSES:
        raise SystemExit(f"WORKER_CONCURRENCY must be an integer between 1 and {MAX_PROCESSES}, got '{text}'")
    return int(text)


def child_argv(command: list[str], index: int) -> list[str]:
    """The command with this child's own node name."""
    name, host, rest = "worker", "%h", []
    for arg in command:
        if arg.startswith("--hostname="):
            value = arg.split("=", 1)[1]
            name, _, host = value.partition("@")
            host = host or "%h"
        else:
            rest.append(arg)
    return [*rest, f"--hostname={name}-{index}@{host}"]


def _die_with_parent() -> None:
    """In the child, before exec: receive SIGTERM when the supervisor dies (Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


class Supervisor:
    def __init__(self, count: int, command: list[str]) -> None:
        self.count, self.command = count, command
        self.children: dict[int, tuple[subprocess.Popen[bytes], float]] = {}  # index -> (process, started at)
        self.failures = [0] * count
        self.stopping = False
        self.status = 0

    def start(self, index: int) -> None:
        env = dict(os.environ)
        if index:
            env["WORKER_METRICS_PORT"] = "0"
        process = subprocess.Popen(child_argv(self.command, index), env=env,  # noqa: S603 - the Procfile's command
                                   preexec_fn=_die_with_parent)  # only prctl, before exec
        self.children[index] = (process, time.monotonic())
        log("worker_process_started", index=index, pid=process.pid)

    def forward(self, signum: int, _frame: object = None) -> None:
        self.stopping = True
        sent = signal.SIGQUIT if signum == signal.SIGQUIT else signal.SIGTERM
        for process, _started in self.children.values():
            if process.poll() is None:
                process.send_signal(sent)

    def run(self) -> int:
        for signum in FORWARDED:
            signal.signal(signum, self.forward)
        for index in range(self.count):
            self.start(index)
        while self.children:
            try:
                pid, wait_status = os.wait()
            except ChildProcessError:
                break
            index = next((i for i, (p, _s) in self.children.items() if p.pid == pid), None)
            if index is None:
                continue
            process, started = self.children.pop(index)
            process.returncode = os.waitstatus_to_exitcode(wait_status)
            self._exited(index, process, started)
        return self.status

    def _exited(self, index: int, process: subprocess.Popen[bytes], started: float) -> None:
        code = process.returncode
        if self.stopping:
            # A child stopped by the signal passed on (one still starting has no handler yet) stopped as asked.
            if code not in (0, None) and -code not in FORWARDED and not self.status:
                self.status = code if code > 0 else 128 - code
            return
        lived = time.monotonic() - started
        log("worker_process_exited", level="warning" if code else "info", index=index, pid=process.pid,
            status=code, lived_s=round(lived, 1))
        if code is not None and code >= 0:
            # It chose to exit (a configuration error, a shutdown command, the broker given up on):
            # the line does what one worker would, and exits with its status, so that it is seen.
            self.status = code
            log("worker_processes_stopping", level="error" if code else "info",
                reason="a worker process exited on its own", status=code)
            self.forward(signal.SIGTERM)
            return
        # Killed by a signal (out of memory, a crash): replaced, backing off while it keeps dying.
        self.failures[index] = self.failures[index] + 1 if lived < QUICK_DEATH_SECONDS else 1
        delay = RESTART_BACKOFF_SECONDS[min(self.failures[index], len(RESTART_BACKOFF_SECONDS)) - 1]
        restart_at = time.monotonic() + delay
        while not self.stopping and time.monotonic() < restart_at:
            time.sleep(0.05)
        if not self.stopping:
            self.start(index)


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        raise SystemExit("usage: worker_processes.py N command...")
    count = parse_count(argv[0])
    return Supervisor(count, argv[1:]).run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
