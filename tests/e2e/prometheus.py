"""Debian's Prometheus, started by a test on a free port with its own config and data folder.

It scrapes a running stack as production would (job ``voice-web``: the web's /metrics; job
``voice-worker``: the worker's metrics port) and evaluates deploy/prometheus/voice-rules.yml with
every duration shortened, so an alert that waits ten minutes in production waits seconds here.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import signal
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from tests.support import ROOT, free_port, wait_for

RULES = ROOT / "deploy" / "prometheus" / "voice-rules.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "voice-webhooks.json"


def fast_rules(text: str, hold: str = "3s", window: str = "10s") -> str:
    """The production rules with every ``for:`` set to ``hold`` and every range window to ``window``.

    Only durations change: expressions, thresholds and labels are the production ones.
    """
    text = re.sub(r"(?m)^(\s+for: )\d+[smh]$", rf"\g<1>{hold}", text)
    return re.sub(r"\[\d+[smh]\]", f"[{window}]", text)


def dashboard_queries(rate_interval: str = "1m") -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target of the Grafana dashboard, Grafana's variables filled in."""
    dashboard = json.loads(DASHBOARD.read_text())
    return [(panel["title"], target["expr"].replace("$__rate_interval", rate_interval))
            for panel in dashboard["panels"] for target in panel["targets"]]


class Prometheus:
    def __init__(self, workdir: Path, targets: dict[str, list[str]], scrape_interval: str = "1s") -> None:
        self.workdir = workdir
        self.targets = targets
        self.scrape_interval = scrape_interval
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Prometheus:
        binary = shutil.which("prometheus")
        if binary is None:
            raise FileNotFoundError("prometheus is missing: scripts/test.sh installs Debian's prometheus package")
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "rules.yml").write_text(fast_rules(RULES.read_text()))
        jobs = "".join(
            f"  - job_name: {job}\n    static_configs:\n      - targets: {json.dumps(addresses)}\n"
            for job, addresses in self.targets.items())
        (self.workdir / "prometheus.yml").write_text(
            f"global:\n  scrape_interval: {self.scrape_interval}\n  scrape_timeout: {self.scrape_interval}\n"
            f"  evaluation_interval: 1s\nrule_files:\n  - rules.yml\nscrape_configs:\n{jobs}")
        log = open(self.workdir / "prometheus.log", "ab")  # noqa: SIM115 - the process owns it
        self.process = subprocess.Popen(
            [binary, f"--config.file={self.workdir / 'prometheus.yml'}",
             f"--storage.tsdb.path={self.workdir / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}",
             "--storage.tsdb.retention.time=1h"],
            cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(lambda: self._get("/-/ready", raw=True), timeout=30, interval=0.2)
        return self

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None

    def log(self) -> str:
        path = self.workdir / "prometheus.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _get(self, path: str, raw: bool = False, **params: Any) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(self.url + path + query, timeout=5) as response:
            body = response.read()
        return body if raw else json.loads(body)

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector ``expr`` evaluates to now."""
        answer = self._get("/api/v1/query", query=expr)
        assert answer["status"] == "success", answer
        return answer["data"]["result"]

    def value(self, expr: str) -> float | None:
        """The single value of ``expr`` now, or None when it has no sample."""
        result = self.query(expr)
        if not result:
            return None
        assert len(result) == 1, result
        return float(result[0]["value"][1])

    def query_range(self, expr: str, start: float, end: float, step: str = "1s") -> list[dict[str, Any]]:
        answer = self._get("/api/v1/query_range", query=expr, start=start, end=end, step=step)
        assert answer["status"] == "success", answer
        return answer["data"]["result"]

    def alerts(self, name: str) -> list[dict[str, Any]]:
        """The pending and firing instances of alert ``name`` (Prometheus's own /api/v1/alerts)."""
        return [alert for alert in self._get("/api/v1/alerts")["data"]["alerts"]
                if alert["labels"]["alertname"] == name]

    def firing(self, name: str) -> list[dict[str, Any]]:
        return [alert for alert in self.alerts(name) if alert["state"] == "firing"]


def has_number(result: list[dict[str, Any]]) -> bool:
    """At least one sample that is a number (a quantile of no traffic is NaN: no data)."""
    return any(not math.isnan(float(series["value"][1])) for series in result)
