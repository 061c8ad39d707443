"""What a Prometheus scraping both roles sums, with one shared multiprocess folder and with a
folder per role (the Procfile's layout): the same 20 webhooks, counted by a real Prometheus.

    .venv/bin/python -m scripts.metrics_layout

Needs Debian's prometheus. Starts its own stacks (SQLite, its own Redis) and stops them.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.e2e.prometheus import Prometheus  # noqa: E402
from tests.e2e.stack import Stack  # noqa: E402
from tests.support import wait_for  # noqa: E402

QUERIES = ('sum(voice_webhooks_total{outcome="accepted"})', 'sum(voice_events_total{outcome="applied"})',
           'sum by (job) (voice_webhooks_total{outcome="accepted"})')


def measure(shared: bool, webhooks: int = 20) -> None:
    layout = "one shared folder" if shared else "a folder per role"
    workdir = Path(tempfile.mkdtemp(prefix="voice-layout-"))
    stack = Stack(workdir, f"sqlite:///{workdir / 'voice.db'}")
    if shared:  # both roles write to the same folder, as the Procfile had it
        folder = workdir / "metrics" / "shared"
        folder.mkdir(parents=True)
        stack.role_metrics_dir = lambda role: str(folder)  # type: ignore[method-assign]
    prometheus = Prometheus(workdir / "prometheus", {"voice-web": [f"127.0.0.1:{stack.port}"],
                                                     "voice-worker": [f"127.0.0.1:{stack.metrics_port}"]})
    try:
        stack.start()
        prometheus.start()
        wait_for(lambda: prometheus.value("sum(up)") == 2, timeout=30, interval=0.5)
        for _ in range(webhooks):
            status, body = stack.post_form({"sessionId": f"layout_{uuid.uuid4().hex[:8]}", "status": "busy"})
            if status != 200:
                raise SystemExit(f"webhook answered {status}: {body}")
        stack.wait_until_idle()
        wait_for(lambda: prometheus.value(QUERIES[1]) is not None, timeout=20, interval=0.5)
        time.sleep(3)  # three more scrapes: the last events' samples are in
        print(f"{webhooks} webhooks sent, {layout}:")
        for expr in QUERIES:
            found = [(r["metric"].get("job", ""), r["value"][1]) for r in prometheus.query(expr)]
            print(f"  {expr} = " + ", ".join(f"{job + ': ' if job else ''}{value}" for job, value in found))
    finally:
        prometheus.stop()
        stack.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    measure(shared=True)
    measure(shared=False)
