"""Screenshots of Prometheus's own graph page under the simulator's load, for docs/.

Starts a stack (gunicorn, a Celery worker, its own Redis, SQLite), Debian's Prometheus scraping it
as deploy/prometheus/prometheus.yml does, plays `flask voice simulate`-style calls for a few
minutes, then has headless Chromium photograph the graph page for two of the dashboard's queries.

    .venv/bin/python -m scripts.screenshots            # writes docs/prometheus-*.png
    .venv/bin/python -m scripts.screenshots --minutes 1

Needs Debian's prometheus and chromium (apt-get install prometheus chromium). Not part of CI.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlencode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.operating.simulator import simulate  # noqa: E402
from tests.e2e.prometheus import Prometheus  # noqa: E402
from tests.e2e.stack import Stack  # noqa: E402

SHOTS = {
    "prometheus-webhook-answers.png": 'sum by (reason) (rate(voice_webhooks_total[30s]))',
    "prometheus-ack-latency.png":
        'histogram_quantile(0.99, sum by (le) (rate(voice_webhook_ack_seconds_bucket[30s])))',
}


def graph_url(prometheus: Prometheus, expr: str, minutes: float) -> str:
    return f"{prometheus.url}/graph?" + urlencode({
        "g0.expr": expr, "g0.tab": "0", "g0.stacked": "0", "g0.show_exemplars": "0",
        "g0.range_input": f"{max(1, round(minutes + 1))}m"})


def screenshot(chromium: str, url: str, path: Path) -> None:
    argv = [chromium, "--headless", "--disable-gpu", "--hide-scrollbars", "--window-size=1400,900",
            "--virtual-time-budget=15000", f"--screenshot={path}", url]
    if os.geteuid() == 0:
        argv.insert(1, "--no-sandbox")  # Chromium's sandbox refuses root
    subprocess.run(argv, check=True, capture_output=True, timeout=120)  # noqa: S603 - our own argv


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=3.0, help="how long the simulator plays calls")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("chromium is needed: apt-get install chromium")
    workdir = Path(tempfile.mkdtemp(prefix="voice-screenshots-"))
    stack = Stack(workdir, f"sqlite:///{workdir / 'voice.db'}")
    prometheus = Prometheus(workdir / "prometheus", {
        "voice-web": [f"127.0.0.1:{stack.port}"], "voice-worker": [f"127.0.0.1:{stack.metrics_port}"]},
        scrape_interval="2s")
    try:
        stack.start()
        prometheus.start()
        url = f"http://127.0.0.1:{stack.port}/api/v1/voice/webhook"
        deadline = time.monotonic() + args.minutes * 60
        seed = 0
        while time.monotonic() < deadline:
            seed += 1
            report = simulate(url, calls=10 + 5 * (seed % 4), participants=3, duplicates=0.3, seed=seed,
                              concurrency=2, prefix="ATVoice_shot")
            print(f"batch {seed}: {report.summary()}", file=sys.stderr)
            time.sleep(1)  # a steady, moderate load (the machine may be shared), with some shape to it
        stack.wait_until_idle(timeout=600)  # the worker catches up with what the load left
        time.sleep(5)  # two more scrapes, so the graphs show the load ending
        args.out.mkdir(parents=True, exist_ok=True)
        for name, expr in SHOTS.items():
            screenshot(chromium, graph_url(prometheus, expr, args.minutes), args.out / name)
            print(f"written: {args.out / name} ({expr})")
    finally:
        prometheus.stop()
        stack.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
