"""The enumeration: record each path's calls, then run it once per step and fault kind, on lanes
that work side by side, and tally what held.

A path's recording is a run without a fault; its trace lists the calls the path made, in order.
A fault run arms the same path with ``{"step": k, "kind": ...}``; its own trace must show the same
calls up to k and the fault placed at k, or the run counts as "not placed" (the path took another
turn than recorded), never as held.

Kills just after step k and just before step k+1 leave the stores in the same state when the path
sends nothing else in between (the trace records any broker frame no step covers); with
``merge=True`` one run stands for both and counts for each.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.enumerate.checks import broken_invariants, settle, unreplayed_dead_letters
from tests.enumerate.lane import Lane, copy_database, create_template, drop_database
from tests.enumerate.paths import PATHS, THEN, PathDef, Run, SceneNeverArmed, after_run, before_settle
from tests.support import rabbitmq_vhost

MAX_LANES = 12


@dataclass(frozen=True)
class Step:
    index: int
    label: str
    down: bool  # failed on purpose by the path's own database failure


@dataclass
class Job:
    path: str
    fault: dict[str, Any] | None  # None: the recording
    counts_for: list[tuple[int, str]] = field(default_factory=list)  # (step, kind) results it stands for


@dataclass
class Result:
    path: str
    step: int | None
    label: str
    kind: str | None
    held: bool
    broken: list[str]
    placed: bool
    seconds: float
    notes: dict[str, Any]
    merged: bool = False  # counted from the run of an equivalent (step, kind)


@dataclass
class PathReport:
    path: PathDef
    steps: list[Step] = field(default_factory=list)
    sides: dict[int, list[str]] = field(default_factory=dict)
    recording: Result | None = None
    results: list[Result] = field(default_factory=list)
    error: str | None = None


def steps_of(records: list[dict[str, Any]]) -> tuple[list[Step], dict[int, list[str]]]:
    steps = [Step(r["i"], r["label"], bool(r.get("down"))) for r in records if r["event"] == "step"]
    sides: dict[int, list[str]] = {}
    for r in records:
        if r["event"] == "side":
            sides.setdefault(r["after"], []).append(r["what"])
    return steps, sides


def plan_jobs(path: PathDef, steps: list[Step], sides: dict[int, list[str]], kinds: tuple[str, ...],
              merge: bool) -> list[Job]:
    """One job per (step, kind), or one per pair of equivalent kills with ``merge``."""
    jobs: dict[tuple[int, str], Job] = {}
    arming_delivery = path.role == "worker"
    for step in steps:
        for kind in kinds:
            if kind == "before" and step.index == 0 and arming_delivery:
                continue  # the delivery that arms the path is read before anything can stop it
            if kind in {"after", "fail", "refuse"} and step.down:
                continue  # the call fails anyway
            if kind == "refuse" and not ((step.label.startswith("redis ") and not step.label.endswith("(reply)"))
                                         or step.label.startswith("amqp basic_publish")):
                continue  # only a server's refusal: a Redis error reply, a broker's nack of a publish
            key = (step.index, kind)
            if merge and kind == "after" and step.index + 1 < len(steps) and not sides.get(step.index) \
                    and "before" in kinds:
                jobs.setdefault((step.index + 1, "before"), Job(path.name, fault_at(steps, step.index + 1, "before")))
                jobs[(step.index + 1, "before")].counts_for.append(key)
                continue
            jobs.setdefault(key, Job(path.name, fault_at(steps, step.index, kind)))
            jobs[key].counts_for.append(key)
    return sorted(jobs.values(), key=lambda job: (job.fault or {}).get("step", -1))


def fault_at(steps: list[Step], index: int, kind: str) -> dict[str, Any]:
    """A fault on the recorded step ``index``: its label and which occurrence of it."""
    label = steps[index].label
    occurrence = sum(1 for step in steps[:index + 1] if step.label == label)
    return {"step": index, "label": label, "occurrence": occurrence, "kind": kind}


# --- one run ---------------------------------------------------------------------------------


def execute(path: PathDef, lane: Lane, fault: dict[str, Any] | None) -> tuple[Run, list[str], float]:
    """Run the path once on the lane: scenario, restart what died, settle, check (replaying any
    dead letter), and return the broken invariants."""
    started = time.monotonic()
    run = path.new_run(lane, fault)
    exits_before = len(lane.exits)
    try:
        path.scenario(run)
        before_settle(path, lane)
        lane.restart_worker_if_dead()
        run.notes["settled_s"] = round(settle(lane, run.expect, path.settle_seconds), 1)
        if path.name in THEN:
            THEN[path.name](run)
            run.notes["settled_then_s"] = round(settle(lane, run.expect, path.settle_seconds), 1)
        letters = unreplayed_dead_letters(lane, run.marker)
        broken_before_replay = broken_invariants(lane, run.expect, final=False)
        if letters:
            done = lane.flask("voice", "replay", *map(str, letters))
            run.notes["replayed"] = letters if done.returncode == 0 else f"replay failed: {done.stdout}{done.stderr}"
            run.notes["settled_replay_s"] = round(settle(lane, run.expect, path.settle_seconds), 1)
            still = unreplayed_dead_letters(lane, run.marker)
            if still:
                run.notes["not_replayable"] = still
        broken = broken_invariants(lane, run.expect)
        if letters and not path.dead_letters_ok:
            broken += [b for b in broken_before_replay if b.startswith("not dead-lettered") and b not in broken]
        if run.notes.get("not_replayable"):
            broken.append(f"dead letter replayable ({run.notes['not_replayable']} not replayed)")
        if len(lane.exits) > exits_before:  # not an invariant of the brief, but never right: shown in the details
            run.notes["exited"] = lane.exits[exits_before:]
        if "unanswered" in run.notes:
            broken.append(f"answered 200 (event {run.notes['unanswered']} never answered 200)")
    finally:
        after_run(path, lane, fault is not None)
    return run, broken, time.monotonic() - started


def placed(run: Run, fault: dict[str, Any] | None, steps: list[Step]) -> tuple[bool, str]:
    """Whether the fault struck the recorded step (the path made the same calls up to it)."""
    if fault is None:
        return True, ""
    records = run.trace_records()
    seen = [r for r in records if r["event"] == "step"]
    fired = [r for r in records if r["event"] == "fault"]
    k = fault["step"]
    if not fired:
        return False, f"the path made {len(seen)} calls; call {k} ({fault['label']} #{fault['occurrence']}) never came"
    at = fired[0]["i"]
    labels = [r["label"] for r in seen[:at + 1]]
    expected = [s.label for s in steps[:k + 1]]
    if labels != expected:  # placed on its call, after other calls than recorded: say which
        extra = [label for label in labels if label not in expected]
        return True, f"struck as call {at}; calls before it differed from the recording (extra: {extra})"
    return True, ""


# --- lanes and scheduling --------------------------------------------------------------------


class Session:
    """Everything one enumeration made: the template database, lanes' databases and vhosts."""

    def __init__(self, service_root: Path, workdir: Path, log: Callable[[str], None]) -> None:
        self.service_root = service_root
        self.workdir = workdir
        self.log = log
        self.template = ""
        self.stack = contextlib.ExitStack()
        self.lock = threading.Lock()
        self.count = 0

    def __enter__(self) -> Session:
        self.template = create_template(self.service_root, self.workdir)
        self.stack.callback(drop_database, self.template)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stack.close()

    @contextlib.contextmanager
    def lane(self, path: PathDef) -> Iterator[Lane]:
        with self.lock:
            self.count += 1
            name = f"l{self.count}"
        database = copy_database(self.template)
        try:
            with contextlib.ExitStack() as stack:
                broker_url = stack.enter_context(rabbitmq_vhost()) if path.spec.broker == "rabbitmq" else None
                lane = Lane(name, self.workdir / f"{name}-{path.name}", self.service_root, database, path.spec,
                            broker_url)
                stack.callback(lane.stop)
                lane.start()
                yield lane
        finally:
            drop_database(database)


WAIT = "wait for the recording"
NEVER_ARMED_RUNS_AGAIN = 2


class Scheduler:
    """Lanes side by side; each takes the path whose remaining work per lane is largest, and keeps
    its lane while that path has runs left."""

    def __init__(self, session: Session, paths: list[PathDef], kinds: dict[str, tuple[str, ...]], merge: bool,
                 max_lanes: int, progress: Callable[[str], None]) -> None:
        self.session = session
        self.paths = paths
        self.kinds = kinds
        self.merge = merge
        self.max_lanes = max_lanes
        self.progress = progress
        self.reports = {p.name: PathReport(p) for p in paths}
        self.jobs: dict[str, list[Job]] = {p.name: [] for p in paths}
        self.left: dict[str, int] = {p.name: 0 for p in paths}  # runs not finished yet
        self.recorded = {p.name: threading.Event() for p in paths}
        self.recording_taken: set[str] = set()
        self.lanes_on = {p.name: 0 for p in paths}
        self.lock = threading.Lock()
        self.starts = threading.Semaphore(3)  # lanes starting at once: each starts four Python processes

    def run(self) -> list[PathReport]:
        threads = [threading.Thread(target=self._slot, name=f"slot-{n}") for n in range(self.max_lanes)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return [self.reports[p.name] for p in self.paths]

    def _choose(self, current: str | None) -> tuple[str, Job | str] | None:
        """The next job: a recording nobody took yet, else more of the lane's own path, else the
        path with the most work per lane (WAIT while its recording runs)."""
        with self.lock:
            for path in self.paths:
                if path.name not in self.recording_taken:
                    self.recording_taken.add(path.name)
                    return path.name, Job(path.name, None)
            if current is not None and self.jobs[current]:
                return current, self.jobs[current].pop(0)
            waiting = [p for p in self.paths if not self.recorded[p.name].is_set()]
            ready = [p for p in self.paths if self.jobs[p.name]]
            if not ready and not waiting:
                return None
            estimate = {p.name: p.run_seconds * (len(self.jobs[p.name]) if self.recorded[p.name].is_set() else 40)
                        for p in ready + waiting}
            best = max(ready + waiting, key=lambda p: estimate[p.name] / (self.lanes_on[p.name] + 1))
            if self.jobs[best.name]:
                return best.name, self.jobs[best.name].pop(0)
            return best.name, WAIT

    def _slot(self) -> None:
        lane_stack: contextlib.ExitStack | None = None
        lane: Lane | None = None
        current: str | None = None
        try:
            while True:
                chosen = self._choose(current)
                if chosen is None:
                    return
                name, job = chosen
                if name != current:
                    if lane_stack is not None:
                        lane_stack.close()
                        with self.lock:
                            self.lanes_on[current] -= 1  # type: ignore[index]
                    lane_stack, lane, current = contextlib.ExitStack(), None, name
                    with self.lock:
                        self.lanes_on[name] += 1
                    try:
                        with self.starts:
                            lane = lane_stack.enter_context(self.session.lane(PATHS[name]))
                    except Exception as exc:
                        lane_stack.close()
                        lane_stack, current = None, None
                        with self.lock:
                            self.lanes_on[name] -= 1
                        self._failed(name, job, f"lane did not start: {exc!r}\n{traceback.format_exc()[-2000:]}")
                        continue
                if job == WAIT:
                    self.recorded[name].wait(timeout=5)
                    continue
                assert lane is not None and isinstance(job, Job)
                self._do(PATHS[name], lane, job)
        finally:
            if lane_stack is not None:
                lane_stack.close()

    def _failed(self, name: str, job: Job | str, why: str) -> None:
        self.progress(f"[{name}] ERROR {why}")
        with self.lock:
            if isinstance(job, Job) and job.fault is None:
                self.reports[name].error = why
                self.jobs[name].clear()  # no recording: the path's runs cannot be planned
                self.recorded[name].set()
            elif isinstance(job, Job):
                self.jobs[name].insert(0, job)  # another lane runs it

    def _do(self, path: PathDef, lane: Lane, job: Job) -> None:
        report = self.reports[path.name]
        try:
            for again in range(NEVER_ARMED_RUNS_AGAIN + 1):
                try:
                    run, broken, seconds = execute(path, lane, job.fault)
                    break
                except SceneNeverArmed as exc:
                    if again == NEVER_ARMED_RUNS_AGAIN:
                        raise
                    self.progress(f"[{path.name}] {exc}; run again")
            for _ in range(NEVER_ARMED_RUNS_AGAIN):
                if job.fault is None or any(r["event"] == "armed" for r in run.trace_records()):
                    break
                # The path never started: the run's message reached the worker without arming it,
                # so no call was numbered and no fault could strike (one way: taken ahead behind
                # another message by the take-ahead script, not by a BRPOP reply of its own). Not
                # a fault's effect: the run is made again.
                self.progress(f"[{path.name}] step {job.fault['step']} {job.fault['kind']}: the path never "
                              "started; run again")
                run, broken, seconds = execute(path, lane, job.fault)
        except Exception as exc:
            why = f"run {job.fault} failed: {exc!r}\n{traceback.format_exc()[-2000:]}"
            if job.fault is None:
                self._failed(path.name, job, why)
            else:
                self.progress(f"[{path.name}] ERROR {why}")
                with self.lock:
                    for step_index, kind in job.counts_for:
                        report.results.append(Result(path.name, step_index, report.steps[step_index].label, kind,
                                                     False, [], False, 0.0, {"not_placed": f"harness error: {exc!r}"}))
            return
        if job.fault is None:
            steps, sides = steps_of(run.trace_records())
            # Recorded again: a path whose calls differ from one run to the next cannot be enumerated
            # by index; a third recording decides which sequence is the path's own.
            takes = [(run, broken, seconds, steps, sides)]
            try:
                for _ in range(2):
                    again = execute(path, lane, None)
                    takes.append((*again, *steps_of(again[0].trace_records())))
                    labels = [[s.label for s in take[3]] for take in takes]
                    agreed = [take for take in takes if labels.count([s.label for s in take[3]]) >= 2]
                    if agreed:
                        run, broken, seconds, steps, sides = agreed[0]
                        break
                else:
                    report.error = "the path's calls differ from one recording to the next: " + " / ".join(
                        ", ".join(label) for label in labels)
            except Exception as exc:
                self._failed(path.name, job, f"recording again failed: {exc!r}")
                return
            if len(takes) > 2:
                run.notes["recordings"] = len(takes)
            broken = sorted({b for take in takes for b in take[1]})
            jobs = plan_jobs(path, steps, sides, self.kinds.get(path.name, path.kinds), self.merge)
            with self.lock:
                report.steps, report.sides = steps, sides
                report.recording = Result(path.name, None, "recording", None, not broken, broken, True, seconds,
                                          run.notes)
                self.jobs[path.name].extend(jobs)
                self.left[path.name] = len(jobs)
            self.recorded[path.name].set()
            self.progress(f"[{path.name}] recorded {len(steps)} steps ({seconds:.1f} s, "
                          f"{'held' if not broken else 'BROKEN: ' + '; '.join(broken)}); {len(jobs)} runs to go")
            return
        ok, why = placed(run, job.fault, report.steps)
        if why:
            run.notes["not_placed" if not ok else "placed"] = why
        with self.lock:
            for step_index, kind in job.counts_for:
                merged = (step_index, kind) != (job.fault["step"], job.fault["kind"])
                report.results.append(Result(path.name, step_index, report.steps[step_index].label, kind,
                                             ok and not broken, broken, ok, seconds, run.notes, merged=merged))
            self.left[path.name] -= 1
            left = self.left[path.name]
        what = "held" if ok and not broken else ("NOT PLACED: " + why if not ok else "BROKEN: " + "; ".join(broken))
        stands = [f"{k} {s}" for s, k in job.counts_for if (s, k) != (job.fault["step"], job.fault["kind"])]
        self.progress(f"[{path.name}] step {job.fault['step']} {report.steps[job.fault['step']].label!r} "
                      f"{job.fault['kind']}: {what} ({seconds:.1f} s; {left} left)"
                      + (f" [also counts as {', '.join(stands)}]" if stands else ""))


def enumerate_paths(names: list[str], service_root: Path, workdir: Path, *, merge: bool = True,
                    max_lanes: int = MAX_LANES, kinds: dict[str, tuple[str, ...]] | None = None,
                    progress: Callable[[str], None] | None = None) -> list[PathReport]:
    """Record and fault every named path; see the module's docstring."""
    say = progress or (lambda line: print(line, file=sys.stderr, flush=True))
    paths = [PATHS[name] for name in names]
    workdir.mkdir(parents=True, exist_ok=True)
    with Session(service_root, workdir, say) as session:
        return Scheduler(session, paths, kinds or {}, merge, max_lanes, say).run()


# --- the table -------------------------------------------------------------------------------


def table(reports: list[PathReport], kinds: tuple[str, ...] = ("before", "after", "fail", "refuse")) -> str:
    """path | steps | fault kind | runs | held | broken (with which invariant) | not placed"""
    lines = ["| path | steps | fault kind | runs | held (invariants ok) | broken (invariant: runs) | not placed |",
             "|---|---|---|---|---|---|---|"]
    for report in reports:
        name = report.path.name
        if report.error is not None:
            lines.append(f"| {name} | - | - | 0 | 0 | could not run: {report.error.splitlines()[0][:150]} | - |")
            continue
        recording = report.recording
        if recording is not None:
            verdict = "1: " + "; ".join(sorted({b.split(" (", 1)[0] for b in recording.broken}))
            lines.append(f"| {name} | {len(report.steps)} | none (recording) | 1 | {int(recording.held)} "
                         f"| {'' if recording.held else verdict} | 0 |")
        for kind in kinds:
            mine = [r for r in report.results if r.kind == kind]
            if not mine:
                continue
            held = sum(r.held for r in mine)
            broken: dict[str, list[int]] = {}
            for r in mine:
                if r.placed and r.broken:
                    for invariant in {b.split(" (", 1)[0] for b in r.broken}:
                        broken.setdefault(invariant, []).append(r.step)  # type: ignore[arg-type]
            text = "; ".join(f"{inv}: {len(set(s))} (steps {', '.join(map(str, sorted(set(s))))})"
                             for inv, s in sorted(broken.items()))
            unplaced = sum(1 for r in mine if not r.placed)
            count = sum(1 for r in mine if r.placed and r.broken)
            lines.append(f"| {name} | {len(report.steps)} | {kind} | {len(mine)} | {held} | "
                         f"{f'{count}: {text}' if count else '0'} | {unplaced} |")
    return "\n".join(lines)


def details(reports: list[PathReport]) -> str:
    """Each path's recorded steps, and every run that broke an invariant or was not placed."""
    out = []
    for report in reports:
        out.append(f"\n### {report.path.name}: {report.path.about}\n")
        if report.error:
            out.append(f"could not run: {report.error}\n")
            continue
        for step in report.steps:
            out.append(f"- {step.index}: {step.label}" + (" (fails: the path's database failure)" if step.down else "")
                       + (f" — then {', '.join(report.sides[step.index])}" if report.sides.get(step.index) else ""))
        if report.recording is not None and not report.recording.held:
            out.append(f"\nwithout any fault: {'; '.join(report.recording.broken)}")
        slow = sorted((r for r in report.results if r.held and r.seconds > 90 and not r.merged),
                      key=lambda r: -r.seconds)
        for r in slow:
            out.append(f"- slow to settle: step {r.step} `{r.label}` {r.kind}: {r.seconds:.0f} s")
        for r in report.results:
            if r.notes.get("exited") and not r.merged:
                out.append(f"- a process exited on its own: step {r.step} `{r.label}` {r.kind}: "
                           f"{'; '.join(r.notes['exited'])}")
        bad = [r for r in report.results if not r.held]
        if bad:
            out.append("")
            for r in sorted(bad, key=lambda r: (r.step or 0, r.kind or "")):
                why = r.notes.get("not_placed") if not r.placed else "; ".join(r.broken)
                shared = " (the run of the equivalent kill)" if r.merged else ""
                out.append(f"- step {r.step} `{r.label}` {r.kind}{shared}: "
                           f"{'not placed' if not r.placed else 'broken'}: {why}")
    return "\n".join(out)


def executed_runs(reports: list[PathReport]) -> int:
    return sum(1 for report in reports for r in report.results if not r.merged) + sum(
        1 for report in reports if report.recording is not None)
